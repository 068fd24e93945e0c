"""The Hydra configs in conf/: composition, typing, validation and stage plans."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from typing import List

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError, ValidationError

from nemo_dmc.core import ModelConfig, Stage
from nemo_dmc.megatron import model as model_module
from nemo_dmc.train import CONFIG_DIR, to_train_config
from nemo_dmc.training.config import (
    ConfigError,
    TrainConfig,
    data_parallel_size,
    validate_config,
)
from nemo_dmc.training.plan import plan_stages

REPO = Path(__file__).resolve().parents[1]


def composed(*overrides: str) -> TrainConfig:
    """conf/config.yaml with ``overrides``, typed but not validated."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return to_train_config(compose("config", overrides=["run_dir=/tmp/unused", *overrides]))


def load(*overrides: str, world_size: int = 1) -> TrainConfig:
    """Compose conf/config.yaml with ``overrides`` and validate it (on a CPU machine)."""
    cfg = composed(*overrides)
    validate_config(cfg, world_size=world_size, cuda_available=False)
    return cfg


def error_key(*overrides: str, world_size: int = 1) -> str:
    with pytest.raises(ConfigError) as info:
        load(*overrides, world_size=world_size)
    assert info.value.key in str(info.value)
    return info.value.key


def test_default_config_chains_the_three_stages_in_order():
    plans = plan_stages(load())
    assert [p.stage for p in plans] == [Stage.ZERO_OUT, Stage.RETROFIT, Stage.FINETUNE]


def test_a_stage_can_be_selected_alone():
    assert [p.stage for p in plan_stages(load("stage=retrofit"))] == [Stage.RETROFIT]


def test_unknown_key_fails_naming_it():
    with pytest.raises(ConfigCompositionException, match="optim.lrr"):
        load("optim.lrr=0.1")


def test_badly_typed_value_fails_naming_its_key():
    with pytest.raises(ConfigCompositionException) as info:
        load("optim.lr=fast")
    assert isinstance(info.value.__cause__, (ValidationError, ConfigKeyError))
    assert "optim.lr" in str(info.value.__cause__)


def test_compression_ratio_below_one_is_rejected():
    assert error_key("dmc.target_cr=0.5") == "dmc.target_cr"


def test_negative_stage_steps_are_rejected():
    assert error_key("stage.retrofit.steps=-5") == "stage.retrofit.steps"


def test_tensor_parallel_size_must_divide_the_kv_heads():
    # tiny: 8 query heads, 4 KV groups; 8 processes so TP=8 divides the world.
    assert error_key("parallel.tensor_model_parallel_size=8", world_size=8) == \
        "model.num_query_groups"


def test_tensor_parallel_size_must_divide_the_world():
    assert error_key("parallel=tp2", world_size=3) == "parallel.tensor_model_parallel_size"


@pytest.mark.skipif(model_module._have_fused_norms(), reason="TE/Apex norms support it")
def test_sequence_parallel_without_fused_norms_is_rejected():
    assert error_key("parallel=tp2", "parallel.sequence_parallel=true", world_size=2) == \
        "parallel.sequence_parallel"


def test_pipeline_stages_must_divide_the_layers_and_with_tp_the_world():
    # tiny: 4 layers
    assert error_key("parallel.pipeline_model_parallel_size=3", world_size=3) == \
        "parallel.pipeline_model_parallel_size"
    assert error_key("parallel=tp2_pp2", world_size=6) == "parallel.pipeline_model_parallel_size"
    assert error_key("parallel=pp2", "parallel.data_parallel_size=2", world_size=2) == \
        "parallel.data_parallel_size"
    cfg = load("parallel=tp2_pp2", "data.global_batch_size=16", world_size=8)
    assert (cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size,
            data_parallel_size(cfg, 8)) == (2, 2, 2)


def test_interleaved_stages_need_a_pipeline_chunks_dividing_layers_and_micro_batch_groups():
    key = "parallel.virtual_pipeline_model_parallel_size"
    assert error_key(f"{key}=2") == key  # no pipeline
    assert error_key("parallel=pp2", f"{key}=4", world_size=2) == key  # 4 layers, 8 chunks
    assert error_key("parallel=pp2", f"{key}=2", "data.global_batch_size=3",
                     "data.micro_batch_size=1", world_size=2) == key  # 3 micro-batches
    cfg = load("parallel=pp2", f"{key}=2", "data.global_batch_size=8", world_size=2)
    assert cfg.parallel.virtual_pipeline_model_parallel_size == 2


def test_context_parallelism_is_rejected_with_its_reason():
    with pytest.raises(ConfigError, match="ring attention") as info:
        load("parallel.context_parallel_size=2", world_size=2)
    assert info.value.key == "parallel.context_parallel_size"


def test_distillation_under_pipeline_parallelism_is_rejected(tmp_path):
    assert error_key("parallel=pp2", "distill=kl", f"checkpoint.pretrained={tmp_path}",
                     world_size=2) == "parallel.pipeline_model_parallel_size"


def test_full_activation_recompute_is_rejected():
    assert error_key("parallel.recompute=full") == "parallel.recompute"


def test_global_batch_must_split_into_micro_batches_over_data_parallel_ranks():
    key = error_key("data.global_batch_size=6", "data.micro_batch_size=4")
    assert key == "data.global_batch_size"


def test_bf16_is_rejected_without_a_gpu():
    assert error_key("precision=bf16") == "precision"


def test_token_budget_rounds_up_to_whole_global_batches():
    cfg = load("stage=retrofit", "stage.retrofit.tokens=5000", "data.global_batch_size=8")
    (plan,) = plan_stages(cfg)
    assert plan.tokens_per_step == 8 * 256
    assert plan.steps == 3  # ceil(5000 / 2048)


def test_budget_percent_of_pretraining_tokens_sizes_stages_by_their_share():
    cfg = load("model.pretrain_tokens=1000000", "dmc.budget_pct=4", "data.global_batch_size=8")
    steps = {p.stage: p.steps for p in plan_stages(cfg)}
    # 4 % of 1M = 40,000 tokens: retrofit 0.75 -> 30,000 / 2048 -> 15 steps, fine-tune 5.
    assert steps[Stage.RETROFIT] == 15
    assert steps[Stage.FINETUNE] == 5
    assert steps[Stage.ZERO_OUT] == 12  # no budget share: its own steps


def test_budget_percent_needs_the_pretraining_token_count():
    assert error_key("dmc.budget_pct=2") == "model.pretrain_tokens"


def test_stage_lr_overrides_the_optimizer_lr():
    (plan,) = plan_stages(load("stage=finetune", "stage.finetune.lr=1e-4",
                               "stage.finetune.min_lr=1e-5"))
    assert (plan.lr, plan.min_lr) == (1e-4, 1e-5)


@pytest.mark.parametrize("model, tp, world", [
    ("llama2_7b", 4, 32), ("llama2_13b", 4, 8), ("llama3_8b", 8, 8), ("smollm2_135m", 1, 2)])
def test_model_presets_validate_at_their_tensor_parallel_size(model, tp, world):
    cfg = load(f"model={model}", f"parallel.tensor_model_parallel_size={tp}",
               "data.micro_batch_size=1", "data.global_batch_size=64", world_size=world)
    assert cfg.model.pretrain_tokens > 0


def indexed_files(directory: Path, *names: str) -> List[str]:
    """Prefixes of empty ``.bin``/``.idx`` pairs (validation only checks that they exist)."""
    for name in names:
        for suffix in (".bin", ".idx"):
            (directory / f"{name}{suffix}").touch()
    return [str(directory / name) for name in names]


def test_reference_recipe_is_llama2_7b_cr4_on_tp4_with_sequence_parallel(tmp_path):
    train, valid = indexed_files(tmp_path, "t", "v")
    recipe = ["+recipe=llama2_7b_cr4", f"data.tokenizer={tmp_path}",
              f"data.train_prefixes=[{train}]", f"data.valid_prefixes=[{valid}]"]
    cfg = composed(*recipe)
    # Sequence parallel needs Transformer Engine (GPU); the rest validates here.
    load(*recipe, "parallel.sequence_parallel=false", world_size=32)
    steps = {p.stage: p.steps for p in plan_stages(cfg)}
    assert steps == {Stage.ZERO_OUT: 250, Stage.RETROFIT: 6000, Stage.FINETUNE: 2000}
    assert (cfg.model.hidden_size, cfg.model.seq_length) == (4096, 4096)
    assert (cfg.parallel.tensor_model_parallel_size, cfg.parallel.sequence_parallel) == (4, True)
    assert (cfg.optim.lr, cfg.optim.min_lr, cfg.optim.beta2) == (3e-5, 3e-6, 0.95)
    assert (cfg.dmc.target_cr, cfg.dmc.window, cfg.data.global_batch_size) == (4.0, 12, 1024)


def test_llama2_70b_recipe_is_the_reference_recipe_on_tp8_x_pp2(tmp_path):
    train, valid = indexed_files(tmp_path, "t", "v")
    recipe = ["+recipe=llama2_70b_cr4", f"data.tokenizer={tmp_path}",
              f"data.train_prefixes=[{train}]", f"data.valid_prefixes=[{valid}]"]
    cfg = load(*recipe, "parallel.sequence_parallel=false", world_size=128)
    assert (cfg.model.num_layers, cfg.model.kv_heads, cfg.model.hidden_size) == (80, 8, 8192)
    assert (cfg.parallel.tensor_model_parallel_size,
            cfg.parallel.pipeline_model_parallel_size, data_parallel_size(cfg, 128)) == (8, 2, 8)
    assert composed(*recipe).parallel.sequence_parallel and cfg.optim.use_distributed_optimizer
    reference = composed("+recipe=llama2_7b_cr4")
    assert {p.stage: p.steps for p in plan_stages(cfg)} == \
        {p.stage: p.steps for p in plan_stages(reference)}
    assert (cfg.dmc, cfg.optim, cfg.data.global_batch_size) == \
        (reference.dmc, reference.optim, reference.data.global_batch_size)


def test_dms_recipe_is_the_smollm2_recipe_on_any_model():
    cfg = load("+recipe=dms_cr4", "model=smollm2_135m")
    assert (cfg.method, cfg.dmc.decision_source, cfg.dmc.target_cr) == ("dms", "adapter", 4.0)
    assert (cfg.dmc.balance, cfg.dmc.balance_cap) == ("none", 3.0)
    assert (cfg.optim.lr, cfg.optim.decision_lr_mult, cfg.optim.trainable) == (3e-5, 300.0, "all")
    # Adapter decisions leave q/k intact: no zero-out stage; the ramp, then the target.
    assert [p.stage for p in plan_stages(cfg)] == [Stage.RETROFIT, Stage.FINETUNE]
    budget = load("+recipe=dms_cr4", "dmc.budget_pct=1", "model.pretrain_tokens=2048000")
    steps = {p.stage: p.steps for p in plan_stages(budget)}
    assert steps[Stage.RETROFIT] == 4 * steps[Stage.FINETUNE]


def test_cli_reports_a_bad_value_by_key_before_building_anything(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "nemo_dmc.train", "dmc.target_cr=0.5", f"hydra.run.dir={tmp_path}"],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "dmc.target_cr" in result.stderr
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "metrics.jsonl").exists()


def test_a_non_positive_gumbel_temperature_is_rejected():
    assert error_key("dmc.temperature=0") == "dmc.temperature"


def test_a_non_positive_decision_scale_is_rejected_and_a_positive_one_reaches_the_core():
    assert error_key("dmc.decision_scale=0") == "dmc.decision_scale"
    assert load("dmc.decision_scale=4").dmc.core().decision_scale == 4.0


def test_a_pretrained_checkpoint_of_another_shape_is_rejected_by_key(tmp_path):
    (tmp_path / "model_config.yaml").write_text(
        yaml.safe_dump(asdict(ModelConfig(hidden_size=576, num_attention_heads=9,
                                          num_query_groups=3))))
    assert error_key(f"checkpoint.pretrained={tmp_path}") == "model.hidden_size"


def test_a_negative_compression_loss_weight_is_rejected():
    assert error_key("dmc.loss_weight=-1") == "dmc.loss_weight"
    assert load("dmc.loss_weight=30").dmc.loss_weight == 30.0


def test_a_missing_indexed_dataset_or_tokenizer_is_named_by_key_before_any_compute(tmp_path):
    train, valid = indexed_files(tmp_path, "train", "valid")
    good = ["data=indexed", f"data.tokenizer={tmp_path}", f"data.train_prefixes=[{train}]",
            f"data.valid_prefixes=[{valid}]"]
    load(*good)
    assert error_key(*good, "data.train_prefixes=[/nope/a]") == "data.train_prefixes"
    # the weights of a weighted blend are not prefixes; its missing prefix is named
    with pytest.raises(ConfigError, match=r"data.train_prefixes.*/nope/b\.idx"):
        load(*good, f"data.train_prefixes=[0.5,{train},0.5,/nope/b]")
    load(*good, f"data.train_prefixes=[0.5,{train},0.5,{valid}]")
    (tmp_path / "valid.bin").unlink()
    with pytest.raises(ConfigError, match=r"data.valid_prefixes.*valid\.bin"):
        load(*good)
    assert error_key(*good[:-1], "data.tokenizer=/nope/tok") == "data.tokenizer"


def test_without_valid_prefixes_the_split_must_leave_train_and_valid_documents(tmp_path):
    (train,) = indexed_files(tmp_path, "train")
    data = ["data=indexed", f"data.tokenizer={tmp_path}", f"data.train_prefixes=[{train}]",
            "data.valid_prefixes=[]"]
    assert load(*data).data.split == "969,30,1"
    load(*data, "data.split='90,10'")
    assert error_key(*data, "data.split='100,0,0'") == "data.split"
    assert error_key(*data, "data.split=all") == "data.split"


def test_examples_retrofit_reports_a_bad_value_as_a_config_error(tmp_path):
    result = subprocess.run(
        [sys.executable, "examples/retrofit.py", "dmc.target_cr=0.5", f"hydra.run.dir={tmp_path}"],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "config error: dmc.target_cr" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("override, key", [("dmc.loss_reduction=token", "dmc.loss_reduction"),
                                           ("dmc.balance=model", "dmc.balance"),
                                           ("dmc.balance_cap=1", "dmc.balance_cap")])
def test_a_bad_compression_loss_form_is_rejected_by_key(override, key):
    assert error_key(override) == key


def test_compression_loss_forms_reach_the_core():
    core = load("dmc.loss_reduction=sequence", "dmc.balance=head", "dmc.balance_cap=3").dmc.core()
    assert (core.loss_reduction, core.balance, core.balance_cap) == ("sequence", "head", 3.0)
    default = load().dmc.core()
    assert (default.loss_reduction, default.balance, default.balance_cap) == ("global", "none", None)


def test_distillation_is_off_by_default_and_kl_turns_it_on(tmp_path):
    assert not load().distill.enabled
    cfg = load("distill=kl", f"checkpoint.pretrained={tmp_path}", "distill.temperature=2")
    assert cfg.distill.enabled and cfg.distill.direction == "forward"
    assert cfg.distill.core().temperature == 2.0
    assert cfg.distill.checkpoint(cfg.checkpoint.pretrained) == str(tmp_path)


def test_distillation_without_a_teacher_checkpoint_is_rejected_by_key(tmp_path):
    assert error_key("distill=kl") == "checkpoint.pretrained"
    assert error_key("distill=kl", f"distill.teacher={tmp_path / 'missing'}") == "distill.teacher"
    assert load("distill=kl", f"distill.teacher={tmp_path}").distill.teacher == str(tmp_path)


@pytest.mark.parametrize("override, key", [("distill.temperature=0", "distill.temperature"),
                                           ("distill.direction=sideways", "distill.direction"),
                                           ("distill.lm_weight=-1", "distill.lm_weight"),
                                           ("distill.kl_weight=-0.5", "distill.kl_weight")])
def test_bad_distillation_settings_are_rejected_by_key(override, key, tmp_path):
    assert error_key("distill=kl", f"checkpoint.pretrained={tmp_path}", override) == key


def test_distillation_with_no_loss_weight_at_all_is_rejected():
    assert error_key("distill.lm_weight=0", "distill.kl_weight=0") == "distill.kl_weight"
