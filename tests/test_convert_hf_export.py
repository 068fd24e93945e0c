"""Hugging Face export: round trip, DMC-aware transformers model, plain Llama export."""

from dataclasses import replace

import pytest
import torch
from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from megatron_utils import TINY_GQA
from nemo_dmc.convert.hf_export import megatron_to_hf, save_hf_checkpoint
from nemo_dmc.convert.hf_import import hf_to_megatron, load_hf_checkpoint
from nemo_dmc.checkpoints.sharding import gather_full_state
from nemo_dmc.core import DMCConfig
from nemo_dmc.hf import DMCLlamaForCausalLM
from nemo_dmc.megatron.cpu_shims import causal_attention_mask
from nemo_dmc.megatron.model import build_model
from nemo_dmc.megatron.parallel import seed_all
from nemo_dmc.megatron.zero_out import zero_decision_projections

DMC = DMCConfig(init_offset=0.0, window=4)  # offset 0: random weights merge about half


def _ids(seq=13):
    return torch.randint(0, TINY_GQA.vocab_size, (2, seq), generator=torch.Generator().manual_seed(5))


def _megatron_logits(model, ids):
    s = ids.shape[1]
    with torch.no_grad():
        out = model.eval()(ids, torch.arange(s).expand_as(ids), causal_attention_mask(s))
    return gather_from_tensor_model_parallel_region(out)[..., :TINY_GQA.vocab_size]


def test_megatron_hf_megatron_round_trip_is_identical(megatron_tp1):
    seed_all(1)
    state = gather_full_state(build_model(TINY_GQA, DMC))
    back = hf_to_megatron(megatron_to_hf(state, TINY_GQA), TINY_GQA)
    assert back.keys() == state.keys()
    for name, tensor in state.items():
        assert torch.equal(back[name], tensor), name


@pytest.mark.parametrize("scale", [1.0, 4.0], ids=["paper", "decision_scale4"])
def test_hf_dmc_model_logits_equal_megatron_dmc_model_in_eval(megatron_tp1, tmp_path, scale):
    seed_all(2)
    dmc = replace(DMC, decision_scale=scale)
    model = build_model(TINY_GQA, dmc)
    save_hf_checkpoint(gather_full_state(model), TINY_GQA, tmp_path / "hf", method=dmc)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert isinstance(hf, DMCLlamaForCausalLM) and hf.config.dmc_config.window == 4
    assert hf.config.dmc_config.decision_scale == scale
    assert hf.model.layers[0].self_attn.dmc_config == dmc
    ids = _ids()
    with torch.no_grad():
        hf_logits = hf(ids, use_cache=False).logits
    torch.testing.assert_close(hf_logits, _megatron_logits(model, ids), atol=2e-5, rtol=1e-5)
    reloaded = load_hf_checkpoint(tmp_path / "hf")
    assert reloaded.model == TINY_GQA


def test_never_retrofitted_model_exports_to_stock_llama(megatron_tp1, tmp_path):
    seed_all(3)
    vanilla = build_model(TINY_GQA, method=None)
    save_hf_checkpoint(gather_full_state(vanilla), TINY_GQA, tmp_path / "plain")
    stock = LlamaForCausalLM.from_pretrained(tmp_path / "plain").eval()
    assert type(stock) is LlamaForCausalLM
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(stock(ids).logits, _megatron_logits(vanilla, ids),
                                   atol=2e-5, rtol=1e-5)


def test_dmc_with_all_append_equals_stock_llama_with_zeroed_channel(megatron_tp1, tmp_path):
    seed_all(4)
    vanilla = build_model(TINY_GQA, method=None)
    zero_decision_projections(vanilla)
    state = gather_full_state(vanilla)
    save_hf_checkpoint(state, TINY_GQA, tmp_path / "plain")
    save_hf_checkpoint(state, TINY_GQA, tmp_path / "dmc", method=DMCConfig())  # offset 5: appends
    ids = _ids()
    with torch.no_grad():
        plain = LlamaForCausalLM.from_pretrained(tmp_path / "plain").eval()(ids).logits
        dmc = DMCLlamaForCausalLM.from_pretrained(tmp_path / "dmc").eval()(ids, use_cache=False).logits
    torch.testing.assert_close(dmc, plain, atol=2e-5, rtol=1e-5)


def _dmc_export(tmp_path, seed=6):
    seed_all(seed)
    model = build_model(TINY_GQA, DMC)
    save_hf_checkpoint(gather_full_state(model), TINY_GQA, tmp_path / "hf", method=DMC)
    return model, DMCLlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()


def test_hf_generate_uses_compressed_cache_and_matches_engine(megatron_tp1, tmp_path):
    from nemo_dmc.hf.cache import DMCCache
    from nemo_dmc.inference import EngineConfig, SamplingParams, generate

    model, hf = _dmc_export(tmp_path)
    ids = _ids(seq=9)
    cache = DMCCache(hf.config, batch_size=2, max_length=9 + 12)
    with torch.no_grad():
        out = hf.generate(ids, past_key_values=cache, max_new_tokens=12, do_sample=False)
        recomputed = hf.generate(ids, use_cache=False, max_new_tokens=12, do_sample=False)
    engine = generate(model, [row.tolist() for row in ids],
                      SamplingParams(max_new_tokens=12), EngineConfig(max_batch_size=2),
                      vocab_size=TINY_GQA.vocab_size)
    for row, result in zip(out[:, 9:], engine):
        assert row.tolist() == list(result.tokens)
    assert torch.equal(out, recomputed)
    assert cache.get_seq_length() == 9 + 11 and cache.memory().compression_ratio > 1.3


def test_hf_generate_creates_its_cache(megatron_tp1, tmp_path):
    _, hf = _dmc_export(tmp_path, seed=7)
    ids = _ids(seq=5)
    with torch.no_grad():
        assert hf.generate(ids, max_new_tokens=3, do_sample=False).shape == (2, 8)


@pytest.mark.parametrize("method", ["vanilla", "h2o", "tova", "streaming", "dms"])
def test_hf_export_of_another_kv_method_runs_it_in_forward_and_generate(megatron_tp1, tmp_path,
                                                                        method):
    from nemo_dmc.inference import EngineConfig, SamplingParams, generate
    from nemo_dmc.methods import settings_for

    seed_all(7)
    dms = method == "dms"  # offset 0: a random init evicts about half, after a 3-token delay
    settings = settings_for(method, DMCConfig(init_offset=0.0), ratio=None if dms else 2.0,
                            sinks=1, window=3 if dms else None)
    model = build_model(TINY_GQA, settings)
    save_hf_checkpoint(gather_full_state(model), TINY_GQA, tmp_path / "hf", method=settings)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert hf.config.method_settings == settings
    ids = _ids(seq=9)
    with torch.no_grad():
        torch.testing.assert_close(hf(ids, use_cache=False).logits, _megatron_logits(model, ids),
                                   atol=2e-5, rtol=1e-5)
        cached = hf.generate(ids, max_new_tokens=8, do_sample=False)
        recomputed = hf.generate(ids, use_cache=False, max_new_tokens=8, do_sample=False)
    assert torch.equal(cached, recomputed)
    engine = generate(model, [row.tolist() for row in ids], SamplingParams(max_new_tokens=8),
                      EngineConfig(max_batch_size=2), vocab_size=TINY_GQA.vocab_size)
    assert [row.tolist() for row in cached[:, 9:]] == [list(r.tokens) for r in engine]
    assert all((r.cache.compression_ratio > 1.0) == (method != "vanilla") for r in engine)

