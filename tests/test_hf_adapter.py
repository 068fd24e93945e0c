"""Decision adapters (``dmc.decision_source=adapter``) through the Hugging Face export: weight
names, forward and generate equal to the megatron model and engine, left padding, and the
import back (import-hf) carrying the adapters."""

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from megatron_utils import TINY_GQA
from test_convert_hf_export import _ids, _megatron_logits
from test_decision_adapter import _randomise_adapters
from test_hf_generate_padded import PAD, _left_padded, _prompts
from nemo_dmc.checkpoints.sharding import gather_full_state
from nemo_dmc.checkpoints.weights import load_weights_checkpoint, read_model_config
from nemo_dmc.convert.__main__ import main as convert_main
from nemo_dmc.convert.hf_export import megatron_to_hf, save_hf_checkpoint
from nemo_dmc.convert.hf_import import hf_to_megatron
from nemo_dmc.core import DMCConfig
from nemo_dmc.hf import DMCLlamaForCausalLM
from nemo_dmc.hf.cache import DMCCache
from nemo_dmc.megatron import parallel
from nemo_dmc.megatron.model import build_model
from nemo_dmc.megatron.parallel import seed_all
from nemo_dmc.megatron.stats import collect_dmc_stats

ADAPTER = DMCConfig(decision_source="adapter", window=4)
NAMES = ("norm.weight", "linear.weight", "linear.bias")


def _adapter_model(seed=6):
    seed_all(seed)
    model = build_model(TINY_GQA, ADAPTER)
    _randomise_adapters(model, seed=seed)
    return model


def _adapter_export(tmp_path, seed=6):
    model = _adapter_model(seed)
    save_hf_checkpoint(gather_full_state(model), TINY_GQA, tmp_path / "hf", method=ADAPTER)
    return model, AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()


def test_round_trip_keeps_the_adapters_under_clear_names(megatron_tp1):
    state = gather_full_state(_adapter_model())
    hf = megatron_to_hf(state, TINY_GQA)
    layer = "model.layers.1.self_attn.decision_adapter."
    assert hf[layer + "linear.weight"].shape == (2 * TINY_GQA.kv_heads, TINY_GQA.hidden_size)
    assert hf[layer + "linear.bias"].shape == (2 * TINY_GQA.kv_heads,)
    assert hf[layer + "norm.weight"].shape == (TINY_GQA.hidden_size,)
    back = hf_to_megatron(hf, TINY_GQA)
    assert back.keys() == state.keys()
    for name, tensor in state.items():
        assert torch.equal(back[name], tensor), name
    assert not any("decision_adapter" in k for k in megatron_to_hf(state, TINY_GQA,
                                                                    adapters=False))


def test_hf_adapter_model_forward_equals_megatron(megatron_tp1, tmp_path):
    model, hf = _adapter_export(tmp_path)
    assert isinstance(hf, DMCLlamaForCausalLM) and hf.config.dmc_config == ADAPTER
    saved = load_file(tmp_path / "hf" / "model.safetensors")
    for i in range(TINY_GQA.num_layers):
        for name in NAMES:
            assert f"model.layers.{i}.self_attn.decision_adapter.{name}" in saved
    ids = _ids()
    want = _megatron_logits(model, ids)
    assert 0.2 < collect_dmc_stats(model).merge_fraction.item() < 0.8
    with torch.no_grad():
        torch.testing.assert_close(hf(ids, use_cache=False).logits, want, atol=2e-5, rtol=1e-5)


def test_hf_adapter_generate_equals_engine_and_left_padding(megatron_tp1, tmp_path):
    from nemo_dmc.inference import EngineConfig, SamplingParams, generate

    model, hf = _adapter_export(tmp_path, seed=8)
    ids = _ids(seq=9)
    cache = DMCCache(hf.config, batch_size=2, max_length=9 + 10)
    with torch.no_grad():
        out = hf.generate(ids, past_key_values=cache, max_new_tokens=10, do_sample=False)
        recomputed = hf.generate(ids, use_cache=False, max_new_tokens=10, do_sample=False)
    engine = generate(model, [row.tolist() for row in ids], SamplingParams(max_new_tokens=10),
                      EngineConfig(max_batch_size=2), vocab_size=TINY_GQA.vocab_size)
    for row, result in zip(out[:, 9:], engine):
        assert row.tolist() == list(result.tokens)
    assert torch.equal(out, recomputed)
    assert cache.memory().compression_ratio > 1.3
    prompts = _prompts(11, 6)
    padded, mask = _left_padded(prompts)
    with torch.no_grad():
        batched = hf.generate(padded, attention_mask=mask, max_new_tokens=8, do_sample=False,
                              pad_token_id=PAD)
        for row, prompt in enumerate(prompts):
            alone = hf.generate(prompt.unsqueeze(0), max_new_tokens=8, do_sample=False)
            assert batched[row, 11:].tolist() == alone[0, len(prompt):].tolist(), row


def test_fresh_hf_adapters_start_at_megatrons_init(megatron_tp1, tmp_path):
    """Weights without adapters (an original model) load with the adapters at zero."""
    model = _adapter_model()
    state = gather_full_state(model)
    save_hf_checkpoint(state, TINY_GQA, tmp_path / "plain", method=DMCConfig())
    config = AutoModelForCausalLM.from_pretrained(tmp_path / "plain").config
    config.kv_method = {**config.kv_method, "decision_source": "adapter"}
    hf = DMCLlamaForCausalLM.from_pretrained(tmp_path / "plain", config=config).eval()
    adapter = hf.model.layers[0].self_attn.decision_adapter
    assert not adapter.linear.weight.any() and not adapter.linear.bias.any()
    assert torch.equal(adapter.norm.weight, torch.ones_like(adapter.norm.weight))
    vanilla = build_model(TINY_GQA, method=None)
    vanilla.load_state_dict({k: v for k, v in model.state_dict().items()
                             if "decision_adapter" not in k})
    with torch.no_grad():  # zero signals: every token appends, q/k intact = plain attention
        torch.testing.assert_close(hf(_ids(), use_cache=False).logits,
                                   _megatron_logits(vanilla, _ids()), atol=2e-5, rtol=1e-5)


def test_plain_and_eviction_exports_drop_the_adapters(megatron_tp1, tmp_path):
    from nemo_dmc.methods import settings_for

    state = gather_full_state(_adapter_model())
    save_hf_checkpoint(state, TINY_GQA, tmp_path / "plain")
    save_hf_checkpoint(state, TINY_GQA, tmp_path / "h2o",
                       method=settings_for("h2o", ADAPTER, ratio=2.0, sinks=1))
    for name in ("plain", "h2o"):
        assert not any("decision_adapter" in k
                       for k in load_file(tmp_path / name / "model.safetensors"))


def test_import_hf_carries_the_adapters(tmp_path, capsys):
    parallel.initialize(tensor_parallel_size=1, seed=0)
    try:
        model, _ = _adapter_export(tmp_path)
        ids = _ids()
        want = _megatron_logits(model, ids)
    finally:
        parallel.shutdown()
    out = tmp_path / "imported"
    assert convert_main(["import-hf", "--input", str(tmp_path / "hf"), "--output", str(out)]) == 0
    assert "decision adapters" in capsys.readouterr().out
    parallel.initialize(tensor_parallel_size=1, seed=0)
    try:
        loaded = build_model(read_model_config(out), ADAPTER)
        load_weights_checkpoint(loaded, out)
        torch.testing.assert_close(_megatron_logits(loaded, ids), want, atol=1e-6, rtol=1e-6)
        plain = build_model(read_model_config(out), method=None)  # the base model alone loads
        load_weights_checkpoint(plain, out)
    finally:
        parallel.shutdown()
