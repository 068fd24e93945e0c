"""NeMo 2 glue: DMC config/model, NeMo checkpoints, loss reduction, recipe, Hydra YAML."""

from dataclasses import replace
from pathlib import Path

import pytest
import torch

pytest.importorskip("nemo.collections.llm", reason="needs the `nemo` extra")

from megatron.core.transformer.enums import AttnBackend  # noqa: E402

from megatron_utils import TINY_GQA  # noqa: E402
from nemo_dmc.convert.checkpoint_dir import load_weights_checkpoint  # noqa: E402
from nemo_dmc.core import DMCConfig  # noqa: E402
from nemo_dmc.megatron.attention import DMCSelfAttention  # noqa: E402
from nemo_dmc.megatron.cpu_shims import causal_attention_mask  # noqa: E402
from nemo_dmc.megatron.model import build_model  # noqa: E402
from nemo_dmc.megatron.parallel import seed_all  # noqa: E402
from nemo_dmc.megatron.stats import collect_dmc_stats  # noqa: E402
from nemo_dmc.nemo import DMCGPTModel  # noqa: E402
from nemo_dmc.nemo.checkpoint import (  # noqa: E402
    export_nemo_checkpoint,
    load_nemo_model,
    read_nemo_model_config,
)
from nemo_dmc.nemo.config import dmc_llama_config  # noqa: E402

DMC = DMCConfig(init_offset=0.0, window=4)
CPU_OFF = dict(apply_rope_fusion=False, bias_activation_fusion=False, masked_softmax_fusion=False,
               persist_layer_norm=False, bias_dropout_fusion=False,
               gradient_accumulation_fusion=False, cross_entropy_loss_fusion=False)


def _inputs(seq=12):
    tokens = torch.randint(0, TINY_GQA.vocab_size, (2, seq), generator=torch.Generator().manual_seed(0))
    return tokens, torch.arange(seq).expand(2, seq), causal_attention_mask(seq)


def test_nemo_checkpoint_restores_dmc_model_settings_and_logits(megatron_tp1, tmp_path):
    seed_all(1)
    dmc = replace(DMC, decision_scale=4.0)
    model = build_model(TINY_GQA, dmc).eval()
    export_nemo_checkpoint(model, TINY_GQA, dmc, tmp_path / "nemo", target_cr=3.0)
    assert (tmp_path / "nemo" / "context" / "io.json").is_file()
    restored = load_nemo_model(tmp_path / "nemo").eval()
    assert isinstance(restored, DMCGPTModel)
    assert (restored.config.dmc_window, restored.config.dmc_target_cr) == (4, 3.0)
    assert restored.config.dmc_config() == dmc
    assert isinstance(restored.module.decoder.layers[0].self_attention, DMCSelfAttention)
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


def _nemo_model(stage="retrofit", steps=10):
    config = dmc_llama_config(TINY_GQA, DMC, target_cr=4.0, stage=stage, stage_steps=steps)
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
    attn = [m for m in model.modules() if isinstance(m, DMCSelfAttention)]
    assert all(m.dmc_mode == "zero_out" and m.zero_out_scale == 1.0 for m in attn)
    loss_sum, num_tokens, _ = model.training_loss_reduction.forward(batch, out)
    torch.testing.assert_close(loss_sum / num_tokens, out.mean())  # LM loss only
    model.on_train_end()
    d = TINY_GQA.head_dim
    assert torch.all(attn[0].linear_qkv.weight[[d - 1, 2 * d - 1, 3 * d - 1]] == 0)


@pytest.mark.parametrize("change,message", [({"dmc_stage": "warmup"}, "warmup"),
                                            ({"dmc_target_cr": 0.5}, "dmc_target_cr"),
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
    assert (model.config.num_layers, model.config.dmc_target_cr, model.config.dmc_window) == (32, 4.0, 12)


def test_recipe_swaps_in_dmc_model_and_reference_optimizer():
    import fiddle as fdl

    from nemo_dmc.nemo.recipe import dmc_recipe

    recipe = dmc_recipe("llama2_7b", stage="finetune", target_cr=8.0, steps=2000,
                        restore_from="/ckpt/retrofit")
    assert recipe.model.__fn_or_cls__ is DMCGPTModel
    assert (recipe.model.config.num_layers, recipe.model.config.dmc_target_cr) == (32, 8.0)
    assert recipe.trainer.max_steps == 2000 and recipe.optim.config.lr == 3e-5
    assert recipe.resume.restore_config.path == "/ckpt/retrofit"
    for key, value in CPU_OFF.items():
        setattr(recipe.model.config, key, value)
    assert fdl.build(recipe.model).config.dmc_stage == "finetune"
