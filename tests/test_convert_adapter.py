"""Conversions of a checkpoint with decision adapters (``dmc.decision_source=adapter``):
import-hf -> export-hf / export-nemo keep them (a weights checkpoint with adapters exports as
an adapter model), GQA pooling keeps the base weights only, and a DMC model deciding from
channel D-1 refuses them."""

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from megatron_utils import TINY_GQA
from test_convert_hf_export import _ids, _megatron_logits
from test_hf_adapter import ADAPTER, _adapter_export
from nemo_dmc.checkpoints.weights import (
    load_weights_checkpoint,
    read_model_config,
    stores_decision_adapters,
)
from nemo_dmc.convert.__main__ import main as convert_main
from nemo_dmc.convert.gqa import main as gqa_main
from nemo_dmc.core import DMCConfig
from nemo_dmc.megatron import parallel
from nemo_dmc.megatron.model import build_model


@pytest.fixture
def imported(tmp_path):
    """(weights checkpoint imported from an adapter model's HF export, the logits on _ids()
    of its weights with the default adapter settings: a weights checkpoint records the
    model's shape, not its DMC settings such as the window)."""
    parallel.initialize(tensor_parallel_size=1, seed=0)
    try:
        model, _ = _adapter_export(tmp_path, seed=5)
        default = build_model(TINY_GQA, DMCConfig(decision_source="adapter"))
        default.load_state_dict(model.state_dict())
        want = _megatron_logits(default, _ids())
    finally:
        parallel.shutdown()
    out = tmp_path / "imported"
    assert convert_main(["import-hf", "--input", str(tmp_path / "hf"), "--output", str(out)]) == 0
    assert stores_decision_adapters(out)
    return out, want


def test_export_hf_of_imported_adapter_weights_keeps_the_adapters(imported, tmp_path):
    weights, want = imported
    out = tmp_path / "again"
    assert convert_main(["export-hf", "--input", str(weights), "--output", str(out),
                         "--format", "dmc"]) == 0
    assert "model.layers.0.self_attn.decision_adapter.linear.weight" in \
        load_file(out / "model.safetensors")
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    assert hf.config.dmc_config.decision_source == "adapter"
    with torch.no_grad():
        torch.testing.assert_close(hf(_ids(), use_cache=False).logits, want, atol=2e-5,
                                   rtol=1e-5)


def test_export_nemo_of_imported_adapter_weights_keeps_the_adapters(imported, tmp_path):
    pytest.importorskip("nemo.collections.llm", reason="needs the `nemo` extra")
    from nemo_dmc.nemo.checkpoint import load_nemo_model

    weights, want = imported
    out = tmp_path / "nemo"
    assert convert_main(["export-nemo", "--input", str(weights), "--output", str(out),
                         "--format", "dmc"]) == 0
    parallel.initialize(tensor_parallel_size=1, seed=0)
    try:
        restored = load_nemo_model(out).eval()
        assert restored.config.dmc.decision_source == "adapter"
        torch.testing.assert_close(_megatron_logits(restored.module, _ids()), want, atol=1e-6,
                                   rtol=1e-6)
    finally:
        parallel.shutdown()


def test_gqa_pooling_keeps_the_base_and_channel_dmc_refuses_adapters(imported, tmp_path):
    weights, _ = imported
    pooled = tmp_path / "pooled"
    assert gqa_main(["--src", str(weights), "--dst", str(pooled), "--groups", "1"]) == 0
    assert not stores_decision_adapters(pooled)  # a plain-attention baseline
    parallel.initialize(tensor_parallel_size=1, seed=0)
    try:
        channel = build_model(read_model_config(weights), DMCConfig())
        with pytest.raises(ValueError, match="decision_source=adapter"):
            load_weights_checkpoint(channel, weights)
        load_weights_checkpoint(build_model(read_model_config(weights), ADAPTER), weights)
    finally:
        parallel.shutdown()
