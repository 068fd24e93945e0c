"""NeMo with decision adapters (``dmc.decision_source=adapter``): the config carries the
source, the model builds with adapters, trains a step, saves and loads; ``dmc_trainable=
decisions`` freezes all but the adapters."""

from dataclasses import replace

import pytest
import torch

pytest.importorskip("nemo.collections.llm", reason="needs the `nemo` extra")

from megatron_utils import TINY_GQA  # noqa: E402
from test_decision_adapter import _randomise_adapters  # noqa: E402
from test_nemo import _batch, _inputs  # noqa: E402
from nemo_dmc.checkpoints.weights import load_weights_checkpoint  # noqa: E402
from nemo_dmc.core import DMCConfig  # noqa: E402
from nemo_dmc.megatron.model import build_model  # noqa: E402
from nemo_dmc.megatron.parallel import seed_all  # noqa: E402
from nemo_dmc.megatron.stats import collect_dmc_stats  # noqa: E402
from nemo_dmc.nemo import DMCGPTModel  # noqa: E402
from nemo_dmc.nemo.checkpoint import export_nemo_checkpoint, load_nemo_model  # noqa: E402
from nemo_dmc.nemo.config import dmc_llama_config  # noqa: E402

ADAPTER = DMCConfig(decision_source="adapter", window=4)


def _adapter_nemo_model(trainable="all"):
    config = dmc_llama_config(TINY_GQA, ADAPTER, stage="retrofit", stage_steps=10,
                              dmc_trainable=trainable)
    model = DMCGPTModel(config, tokenizer=None)
    model.configure_model()
    _randomise_adapters(model, scale=0.5)
    return model


def _train_step(model):
    """One training step (DMC loss included) and an SGD update; returns the loss."""
    batch = _batch()
    torch.manual_seed(0)
    loss_sum, num_tokens, _ = model.training_loss_reduction.forward(
        batch, model.training_step(batch))
    loss = loss_sum / num_tokens
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= 0.1 * p.grad
    return loss


def test_nemo_adapter_model_trains_a_step_saves_and_loads(megatron_tp1, tmp_path):
    seed_all(8)
    model = _adapter_nemo_model().train()
    assert model.config.dmc.decision_source == "adapter"
    adapter = model.module.decoder.layers[0].self_attention.decision_adapter
    before = adapter.linear.weight.detach().clone()
    _train_step(model)
    assert 0.05 < collect_dmc_stats(model).merge_fraction.item() < 0.95
    assert adapter.linear.weight.grad.abs().sum() > 0
    assert not torch.equal(adapter.linear.weight, before)  # the adapter learned
    model.module.eval()
    export_nemo_checkpoint(model.module, TINY_GQA, ADAPTER, tmp_path / "nemo")
    restored = load_nemo_model(tmp_path / "nemo").eval()
    assert isinstance(restored, DMCGPTModel) and restored.config.dmc == ADAPTER
    ours = build_model(TINY_GQA, ADAPTER).eval()  # the own trainer's model reads it too
    load_weights_checkpoint(ours, tmp_path / "nemo")
    with torch.no_grad():
        want = model.module(*_inputs())
        assert torch.equal(restored(*_inputs()), want)
        assert torch.equal(ours(*_inputs()), want)


def test_nemo_trainable_decisions_freezes_all_but_the_adapters(megatron_tp1):
    seed_all(9)
    model = _adapter_nemo_model(trainable="decisions").train()
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all("decision_adapter" in n for n in trained)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    _train_step(model)
    for name, p in model.named_parameters():
        if name in frozen:
            assert p.grad is None and torch.equal(p, frozen[name]), name
        else:
            assert p.grad is not None, name


@pytest.mark.parametrize("change,message", [
    (dict(dmc=DMCConfig(), dmc_trainable="decisions"), "decision_source=adapter"),
    (dict(dmc=ADAPTER, dmc_stage="zero_out"), "zero_out"),
    (dict(dmc=ADAPTER, dmc_trainable="some"), "dmc_trainable")])
def test_invalid_adapter_nemo_settings_are_rejected(change, message):
    with pytest.raises(ValueError, match=message):
        dmc_llama_config(TINY_GQA, **{"dmc": ADAPTER, **change})


def test_recipe_passes_the_adapter_source_and_trainable():
    from nemo_dmc.nemo.recipe import dmc_recipe

    recipe = dmc_recipe("llama2_7b", stage="retrofit", decision_source="adapter",
                        trainable="decisions")
    assert recipe.model.config.dmc.decision_source == "adapter"
    assert recipe.model.config.dmc_trainable == "decisions"
