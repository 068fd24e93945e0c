"""NeMo 2 glue: DMC config/model, NeMo checkpoints, loss reduction, recipe, Hydra YAML."""

from dataclasses import asdict, fields, replace
from pathlib import Path
from types import SimpleNamespace

import subprocess
import sys

import pytest
import torch

pytest.importorskip("nemo.collections.llm", reason="needs the `nemo` extra")

from megatron.core import dist_checkpointing  # noqa: E402
from megatron.core.transformer.enums import AttnBackend  # noqa: E402
from nemo.collections.llm import LlamaModel  # noqa: E402
from nemo.collections.llm.gpt.model.llama import LlamaConfig  # noqa: E402
from nemo.lightning import io  # noqa: E402

from megatron_utils import TINY_GQA  # noqa: E402
from nemo_dmc.checkpoints.nemo_context import (  # noqa: E402
    cpu_overrides,
    load_context_model,
    read_nemo_model_config,
)
from nemo_dmc.checkpoints.run_dir import Progress, step_dir_name  # noqa: E402
from nemo_dmc.checkpoints.weights import load_weights_checkpoint  # noqa: E402
from nemo_dmc.convert.__main__ import main as convert_main  # noqa: E402
from nemo_dmc.core import DMCConfig  # noqa: E402
from nemo_dmc.megatron.attention import MethodSelfAttention  # noqa: E402
from nemo_dmc.megatron.cpu_shims import causal_attention_mask  # noqa: E402
from nemo_dmc.megatron.model import build_model  # noqa: E402
from nemo_dmc.megatron.parallel import seed_all  # noqa: E402
from nemo_dmc.megatron.stats import collect_dmc_stats  # noqa: E402
from nemo_dmc.nemo import DMCGPTModel  # noqa: E402
from nemo_dmc.nemo.checkpoint import export_nemo_checkpoint, load_nemo_model  # noqa: E402
from nemo_dmc.nemo.config import DMCLlamaConfig, dmc_llama_config  # noqa: E402
from nemo_dmc.training.config import DMCSettings, TrainConfig  # noqa: E402
from nemo_dmc.training.runner import write_run_config  # noqa: E402

DMC = DMCConfig(init_offset=0.0, window=4)
CPU_OFF = dict(apply_rope_fusion=False, bias_activation_fusion=False, masked_softmax_fusion=False,
               persist_layer_norm=False, bias_dropout_fusion=False,
               gradient_accumulation_fusion=False, cross_entropy_loss_fusion=False)


def _inputs(seq=12):
    tokens = torch.randint(0, TINY_GQA.vocab_size, (2, seq), generator=torch.Generator().manual_seed(0))
    return tokens, torch.arange(seq).expand(2, seq), causal_attention_mask(seq)


def test_nemo_checkpoint_restores_dmc_model_settings_and_logits(megatron_tp1, tmp_path):
    seed_all(1)
    dmc = replace(DMC, decision_scale=4.0, target_cr=3.0, loss_reduction="sequence",
                  balance="head", balance_cap=2.0)
    model = build_model(TINY_GQA, dmc).eval()
    export_nemo_checkpoint(model, TINY_GQA, dmc, tmp_path / "nemo")
    assert (tmp_path / "nemo" / "context" / "io.json").is_file()
    restored = load_nemo_model(tmp_path / "nemo").eval()
    assert isinstance(restored, DMCGPTModel)
    assert (restored.config.dmc.window, restored.config.dmc.target_cr) == (4, 3.0)
    assert restored.config.dmc == dmc
    assert isinstance(restored.module.decoder.layers[0].self_attention, MethodSelfAttention)
    with torch.no_grad():
        assert torch.equal(restored(*_inputs()), model(*_inputs()))


def test_nemo_checkpoint_loads_back_into_our_training_model(megatron_tp1, tmp_path):
    seed_all(2)
    model = build_model(TINY_GQA, DMC).eval()
    export_nemo_checkpoint(model, TINY_GQA, DMC, tmp_path / "nemo")
    shape = read_nemo_model_config(tmp_path / "nemo", vocab_size=TINY_GQA.vocab_size)
    assert shape == TINY_GQA
    ours = build_model(shape, DMC).eval()
    load_weights_checkpoint(ours, tmp_path / "nemo")
    with torch.no_grad():
        assert torch.equal(ours(*_inputs()), model(*_inputs()))


def _context(path: Path):
    """The saved model spec of a NeMo 2 checkpoint, not built (fiddle config)."""
    return io.load_context(path / "context", subpath="model", build=False)


def test_nemo_context_keeps_gpu_defaults_not_cpu_overrides(megatron_tp1, tmp_path):
    model = build_model(TINY_GQA, DMC)
    export_nemo_checkpoint(model, TINY_GQA, DMC, tmp_path / "nemo")
    saved = _context(tmp_path / "nemo").config
    defaults = {f.name: f.default for f in fields(DMCLlamaConfig)}
    for key in ("use_cpu_initialization", "bias_activation_fusion",
                "masked_softmax_fusion", "persist_layer_norm", "bias_dropout_fusion"):
        assert getattr(saved, key) == defaults[key], key
    assert saved.apply_rope_fusion is False  # needs Transformer Engine just to load
    assert load_nemo_model(tmp_path / "nemo").config.use_cpu_initialization == (
        cpu_overrides().get("use_cpu_initialization", False))


def test_plain_export_restores_a_nemo_llama_model_with_same_logits(megatron_tp1, tmp_path):
    seed_all(5)
    model = build_model(TINY_GQA, method=None).eval()
    export_nemo_checkpoint(model, TINY_GQA, None, tmp_path / "nemo")
    restored = load_nemo_model(tmp_path / "nemo").eval()
    assert type(restored) is LlamaModel and type(restored.config) is LlamaConfig
    with torch.no_grad():
        assert torch.equal(restored(*_inputs()), model(*_inputs()))


def _trainer_run(run_dir: Path, dmc: DMCSettings, progress: Progress) -> None:
    """A run directory as the trainer leaves it: run_config.yaml and one stage checkpoint."""
    write_run_config(TrainConfig(run_dir=str(run_dir), model=TINY_GQA, dmc=dmc))
    model = build_model(TINY_GQA, dmc.core())
    path = run_dir / "checkpoints" / progress.stage / step_dir_name(progress.step)
    path.mkdir(parents=True)
    dist_checkpointing.save({"model": model.sharded_state_dict(prefix="module."),
                             "progress": asdict(progress)}, str(path))


RUN_DMC = DMCSettings(target_cr=3.0, init_offset=0.0, window=4, decision_scale=2.0,
                      loss_weight=7.5)


def test_export_cli_writes_the_runs_dmc_training_settings(megatron_tp1, tmp_path):
    _trainer_run(tmp_path / "run", RUN_DMC, Progress("retrofit", 30, 40, 0, 1, 1))
    assert convert_main(["export-nemo", "--input", str(tmp_path / "run"),
                         "--output", str(tmp_path / "nemo")]) == 0
    saved = _context(tmp_path / "nemo")
    assert saved.__fn_or_cls__ is DMCGPTModel
    config = saved.config
    assert (config.dmc.loss_weight, config.dmc.target_cr) == (7.5, 3.0)
    assert config.dmc.decision_scale == 2.0
    assert (config.dmc_stage, config.dmc_stage_steps, config.dmc.window) == ("retrofit", 40, 4)


LOAD_IN_FRESH_PROCESS = """
import sys
from nemo.lightning import io
model = io.load_context(sys.argv[1], subpath="model")
print(type(model).__name__, model.config.apply_rope_fusion, type(model.tokenizer).__name__)
print(model.tokenizer.text_to_ids("def f(x): return x"))
"""


@pytest.mark.parametrize("fmt", ["dmc", "plain"])
def test_export_loads_with_nemos_own_call_in_a_fresh_process_and_carries_the_tokenizer(
        megatron_tp1, tmp_path, fmt):
    """``io.load_context(<export>/context, subpath="model")`` (NeMo's documented call) in a new
    process without Transformer Engine, tokenizer included (issue 17 item 7)."""
    from nemo_dmc.data.tokenizer import load_tokenizer, train_bpe_tokenizer

    tokenizer_dir = tmp_path / "tok"
    train_bpe_tokenizer(["def f(x): return x", "class A: pass"] * 50, tokenizer_dir,
                        vocab_size=300)
    _trainer_run(tmp_path / "run", RUN_DMC, Progress("finetune", 2, 2, 0, 1, 1))
    assert convert_main(["export-nemo", "--input", str(tmp_path / "run"), "--output",
                         str(tmp_path / "nemo"), "--format", fmt,
                         "--tokenizer", str(tokenizer_dir)]) == 0
    assert (tmp_path / "nemo" / "context" / "nemo_tokenizer" / "tokenizer.json").is_file()
    done = subprocess.run([sys.executable, "-c", LOAD_IN_FRESH_PROCESS,
                           str(tmp_path / "nemo" / "context")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    kind, ids = done.stdout.strip().splitlines()[-2:]
    model = "DMCGPTModel" if fmt == "dmc" else "LlamaModel"
    assert kind == f"{model} False AutoTokenizer"
    ours = load_tokenizer(tokenizer_dir)
    assert ids == str(ours.tokenize("def f(x): return x"))
    # our own loaders skip building the tokenizer, and find the carried one
    from nemo_dmc.checkpoints.resolve import find_tokenizer_path, resolve_checkpoint

    resolved = resolve_checkpoint(tmp_path / "nemo")
    assert find_tokenizer_path(None, resolved) == tmp_path / "nemo" / "context" / "nemo_tokenizer"
    built = load_context_model(tmp_path / "nemo")  # the safe loader drops the tokenizer
    assert type(built) is (DMCGPTModel if fmt == "dmc" else LlamaModel)
    assert built.tokenizer is None


def test_export_cli_plain_format_writes_a_nemo_llama_model(megatron_tp1, tmp_path):
    _trainer_run(tmp_path / "run", RUN_DMC, Progress("finetune", 2, 2, 0, 1, 1))
    assert convert_main(["export-nemo", "--input", str(tmp_path / "run"),
                         "--output", str(tmp_path / "nemo"), "--format", "plain"]) == 0
    saved = _context(tmp_path / "nemo")
    assert saved.__fn_or_cls__ is LlamaModel and saved.config.__fn_or_cls__ is LlamaConfig


def _nemo_model(stage="retrofit", steps=10):
    config = dmc_llama_config(TINY_GQA, DMC, stage=stage, stage_steps=steps)
    model = DMCGPTModel(config, tokenizer=None)
    model.configure_model()
    return model


def test_training_loss_adds_compression_loss_per_token(megatron_tp1):
    seed_all(3)
    model = _nemo_model(stage="finetune").train()
    tokens, positions, mask = _inputs()
    batch = {"tokens": tokens, "labels": tokens, "position_ids": positions,
             "attention_mask": mask, "loss_mask": torch.ones(tokens.shape)}
    torch.manual_seed(0)
    out = model.training_step(batch)
    loss_sum, num_tokens, logged = model.training_loss_reduction.forward(batch, out)
    stats = collect_dmc_stats(model)
    expected = out.mean() + stats.loss(4.0)
    torch.testing.assert_close(loss_sum / num_tokens, expected)
    assert stats.loss(4.0) > 0
    torch.testing.assert_close(logged["loss_sum_and_ub_size"][0] / num_tokens, out.mean().detach())


def test_zero_out_stage_decays_channel_then_zeroes_rows(megatron_tp1):
    seed_all(4)
    model = _nemo_model(stage="zero_out", steps=10).train()
    tokens, positions, mask = _inputs()
    batch = {"tokens": tokens, "labels": tokens, "position_ids": positions,
             "attention_mask": mask, "loss_mask": torch.ones(tokens.shape)}
    out = model.training_step(batch)
    attn = [m for m in model.modules() if isinstance(m, MethodSelfAttention)]
    assert all(m.method.phase == "zero_out" and m.method.zero_out_scale == 1.0 for m in attn)
    loss_sum, num_tokens, _ = model.training_loss_reduction.forward(batch, out)
    torch.testing.assert_close(loss_sum / num_tokens, out.mean())  # LM loss only
    model.on_train_end()
    d = TINY_GQA.head_dim
    assert torch.all(attn[0].linear_qkv.weight[[d - 1, 2 * d - 1, 3 * d - 1]] == 0)


def _batch():
    tokens, positions, mask = _inputs()
    return {"tokens": tokens, "labels": tokens, "position_ids": positions,
            "attention_mask": mask, "loss_mask": torch.ones(tokens.shape)}


def test_retrofit_step_follows_the_cr_ramp_at_the_trainers_global_step(megatron_tp1):
    seed_all(6)
    model = _nemo_model(stage="retrofit", steps=10).train()
    model._trainer = SimpleNamespace(global_step=4)
    batch = _batch()
    out = model.training_step(batch)
    assert model.stage_target_cr == pytest.approx(1.0 + 3.0 * 5 / 10)  # after step 5 of 10
    loss_sum, num_tokens, _ = model.training_loss_reduction.forward(batch, out)
    stats = collect_dmc_stats(model)
    assert stats.loss(2.5) > 0
    torch.testing.assert_close(loss_sum / num_tokens, out.mean() + stats.loss(2.5))


def test_zero_out_scale_decays_with_the_trainers_global_step(megatron_tp1):
    model = _nemo_model(stage="zero_out", steps=10).train()
    attn = [m for m in model.modules() if isinstance(m, MethodSelfAttention)]
    for step, scale in ((4, 0.5), (8, 0.0)):  # 1 - step / (0.8 * 10), floored at 0
        model._trainer = SimpleNamespace(global_step=step)
        model.training_step(_batch())
        assert all(m.method.zero_out_scale == pytest.approx(scale) for m in attn)


def test_model_state_dict_works_after_a_training_step(megatron_tp1):
    model = _nemo_model(stage="retrofit").train()
    model.training_loss_reduction.forward(_batch(), model.training_step(_batch()))
    assert "module.embedding.word_embeddings.weight" in model.state_dict()  # no module cycle
    model.cpu()


@pytest.mark.gpu
def test_nemo_trainer_with_megatron_strategy_trains_the_retrofit_ramp(monkeypatch):
    """NeMo's own Trainer and MegatronStrategy; GPU only: NeMo's DDP setup, megatron's
    optimizer and pipeline schedule allocate on "cuda" unconditionally."""
    import lightning.pytorch as pl
    from megatron.core.optimizer import OptimizerConfig
    from nemo import lightning as nl
    from nemo.collections import llm

    from nemo_dmc.megatron import parallel
    from nemo_dmc.training.launch import free_port

    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    tokenizer = SimpleNamespace(vocab_size=TINY_GQA.vocab_size)
    config = dmc_llama_config(TINY_GQA, DMC, stage="retrofit", stage_steps=2,
                              **CPU_OFF)  # fusions off: Transformer Engine may be absent
    optim = nl.MegatronOptimizerModule(OptimizerConfig(optimizer="adam", lr=1e-3, bf16=False,
                                                       use_distributed_optimizer=False))
    model = DMCGPTModel(config, optim=optim, tokenizer=tokenizer)
    data = llm.MockDataModule(seq_length=TINY_GQA.seq_length, tokenizer=tokenizer,
                              micro_batch_size=2, global_batch_size=2, num_train_samples=8,
                              num_val_samples=2, num_test_samples=2, num_workers=0,
                              pin_memory=False, create_attention_mask=True)
    seen = []

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer, module, *args) -> None:
            seen.append((module.stage_target_cr, collect_dmc_stats(module) is not None))

    trainer = nl.Trainer(accelerator="gpu", devices=1, max_steps=2, logger=False,
                         strategy=nl.MegatronStrategy(ckpt_async_save=False),
                         plugins=nl.MegatronMixedPrecision(precision="32"),
                         enable_checkpointing=False, limit_val_batches=0,
                         num_sanity_val_steps=0, callbacks=[Record()])
    try:
        trainer.fit(model, data)
    finally:
        parallel.shutdown()
    assert trainer.global_step == 2
    assert seen == [(2.5, True), (4.0, True)]  # CR ramp 1 -> 4 over the stage's 2 steps


@pytest.mark.parametrize("change,message", [({"dmc_stage": "warmup"}, "warmup"),
                                            ({"dmc_stage_steps": 0}, "dmc_stage_steps"),
                                            ({"attention_backend": AttnBackend.local}, "local")])
def test_invalid_dmc_nemo_settings_are_rejected(change, message):
    with pytest.raises(ValueError, match=message):
        dmc_llama_config(TINY_GQA, DMC, **change)


def test_hydra_yaml_instantiates_dmc_nemo_model():
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(Path(__file__).parents[1] / "examples" / "nemo" / "dmc_llama2_7b.yaml")
    cfg.config.update(CPU_OFF)
    model = instantiate(cfg)
    assert isinstance(model, DMCGPTModel)
    assert (model.config.num_layers, model.config.dmc.target_cr, model.config.dmc.window) == (32, 4.0, 12)


def test_recipe_swaps_in_dmc_model_and_reference_optimizer():
    import fiddle as fdl

    from nemo_dmc.nemo.recipe import dmc_recipe

    recipe = dmc_recipe("llama2_7b", stage="finetune", target_cr=8.0, steps=2000,
                        restore_from="/ckpt/retrofit")
    assert recipe.model.__fn_or_cls__ is DMCGPTModel
    assert (recipe.model.config.num_layers, recipe.model.config.dmc.target_cr) == (32, 8.0)
    assert recipe.trainer.max_steps == 2000 and recipe.optim.config.lr == 3e-5
    assert recipe.resume.restore_config.path == "/ckpt/retrofit"
    for key, value in CPU_OFF.items():
        setattr(recipe.model.config, key, value)
    assert fdl.build(recipe.model).config.dmc_stage == "finetune"


def _nemo_with_teacher(settings):
    """A NeMo DMC model distilling from a plain-attention copy of its own weights."""
    from nemo_dmc.megatron.distill import Teacher
    from nemo_dmc.methods import VanillaSettings

    model = _nemo_model(stage="finetune").train()
    original = build_model(TINY_GQA, VanillaSettings())
    original.load_state_dict(model.module.state_dict())
    teacher = Teacher(original, settings)
    model.set_teacher(teacher)
    return model, teacher


def test_distillation_loss_in_nemo_is_the_own_trainers_composition(megatron_tp1):
    from nemo_dmc.core import DistillConfig
    from nemo_dmc.training.loop import token_sums

    seed_all(8)
    model, teacher = _nemo_with_teacher(DistillConfig(lm_weight=0.5, kl_weight=2.0,
                                                      temperature=2.0))
    batch = _batch()
    torch.manual_seed(0)
    out = model.training_step(batch)
    loss_sum, num_tokens, logged = model.training_loss_reduction.forward(batch, out)
    stats = collect_dmc_stats(model)
    torch.manual_seed(0)  # the own trainer's sums, same noise, same micro-batch
    ours = token_sums(model.module, batch, batch["attention_mask"], teacher)
    torch.testing.assert_close(loss_sum / num_tokens,
                               ours.objective / ours.tokens + stats.loss(4.0))
    torch.testing.assert_close(logged["loss_sum_and_ub_size"][0] / num_tokens,
                               ours.lm / ours.tokens)  # logged: the cross-entropy
    assert model.last_kl == pytest.approx(float(ours.kl / ours.tokens)) and model.last_kl > 0
    (loss_sum / num_tokens).backward()
    assert all(p.grad is None for p in teacher.module.parameters())
    assert not any(k.startswith("teacher") for k in model.state_dict())
    assert len(list(model.parameters())) == len(list(model.module.parameters()))


def test_nemo_validation_with_a_teacher_reports_the_cross_entropy(megatron_tp1):
    from nemo_dmc.core import DistillConfig

    seed_all(9)
    model, _ = _nemo_with_teacher(DistillConfig(lm_weight=0.0, kl_weight=1.0))
    model.eval()
    batch = _batch()
    with torch.no_grad():
        out = model.validation_step(batch)
        loss_sum, num_tokens, _ = model.validation_loss_reduction.forward(batch, out)
        torch.testing.assert_close(loss_sum / num_tokens, model.last_distill.ce.mean())
