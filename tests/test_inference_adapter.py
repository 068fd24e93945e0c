"""The inference engine on DMC models whose decisions come from decision adapters
(``dmc.decision_source=adapter``): prefill and decode logits equal the full forward (MHA, GQA,
torch and Triton decode kernels, TP=2)."""

from dataclasses import replace

import pytest
import torch

from distributed import run_distributed
from megatron_utils import TINY_GQA
from test_decision_adapter import _randomise_adapters
from test_inference_engine import _full_logits, prefill_and_decode_match
from test_inference_tensor_parallel import _cached_logits
from nemo_dmc.checkpoints.sharding import shard_full_state
from nemo_dmc.core import DMCConfig
from nemo_dmc.inference import DMCModelRunner
from nemo_dmc.megatron import parallel
from nemo_dmc.megatron.model import build_model
from nemo_dmc.megatron.parallel import seed_all

TINY_MHA = replace(TINY_GQA, num_query_groups=None)
VOCAB = TINY_GQA.vocab_size


def _adapter_model(shape=TINY_GQA, window=3, seed=7):
    """A DMC model with random decision adapters (about half merge) and random q/k channel
    D-1 (which the adapter source leaves in attention)."""
    seed_all(seed)
    model = build_model(shape, DMCConfig(decision_source="adapter", window=window)).eval()
    _randomise_adapters(model, seed=seed)
    return model


def _merge_fraction(model):
    return torch.cat([layer.self_attention.method.record.decisions.hard
                      for layer in model.decoder.layers]).mean()


@pytest.mark.parametrize("shape", [TINY_MHA, TINY_GQA], ids=["mha", "gqa"])
@pytest.mark.parametrize("window", [None, 3], ids=["unbounded", "window3"])
def test_adapter_prefill_and_decode_logits_equal_full_forward(megatron_tp1, shape, window):
    model = _adapter_model(shape, window)
    seq, prompt_lengths = 14, [5, 9, 7]
    tokens = torch.randint(0, VOCAB, (3, seq), generator=torch.Generator().manual_seed(0))
    full = _full_logits(model, tokens)
    assert 0.2 < _merge_fraction(model) < 0.8
    runner = DMCModelRunner(model, block_size=4, num_blocks=200, max_sequences=3,
                            max_sequence_length=seq)
    rows = prefill_and_decode_match(runner, tokens, full, prompt_lengths, chunk=3)
    assert int(runner.cache.lengths[rows].sum()) < 3 * seq * runner.cache.lengths.shape[1] * \
        runner.cache.lengths.shape[2]  # merges reached the cache


def test_adapter_engine_with_triton_decode_kernels_equals_full_forward(megatron_tp1,
                                                                        monkeypatch):
    import nemo_dmc.kernels.cache_update as update_module

    launches = []
    kernel = update_module.decode_cache_update
    monkeypatch.setattr(update_module, "decode_cache_update",
                        lambda *a, **kw: launches.append(a[-1] is not None) or kernel(*a, **kw))
    monkeypatch.setenv("NEMO_DMC_KERNELS", "triton")
    model = _adapter_model(replace(TINY_GQA, num_layers=1), window=3)
    tokens = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(4))
    full = _full_logits(model, tokens)
    runner = DMCModelRunner(model, block_size=4, num_blocks=50, max_sequences=2,
                            max_sequence_length=10)
    prefill_and_decode_match(runner, tokens, full, [4, 6], chunk=None)
    assert launches and all(launches)  # every decode step ran the kernel with the signals


def _tp_worker(rank: int, world: int) -> None:
    tokens = torch.randint(0, VOCAB, (3, 14), generator=torch.Generator().manual_seed(0))
    for window in (None, 3):
        dmc = DMCConfig(decision_source="adapter", window=window)
        parallel.initialize(tensor_parallel_size=1, seed=0)
        model = build_model(TINY_GQA, dmc).eval()
        _randomise_adapters(model)
        full_state = {k: v.clone() if torch.is_tensor(v) else v
                      for k, v in model.state_dict().items()}
        full = _full_logits(model, tokens)
        assert 0.2 < _merge_fraction(model) < 0.8
        parallel.initialize(tensor_parallel_size=2, seed=0)
        sharded = build_model(TINY_GQA, dmc).eval()
        sharded.load_state_dict(shard_full_state(full_state, sharded))
        torch.testing.assert_close(_cached_logits(sharded, tokens), full, atol=1e-5, rtol=1e-5,
                                   msg=f"rank {rank} window {window}")
    parallel.shutdown()


def test_tp2_adapter_engine_equals_full_forward():
    run_distributed(_tp_worker, 2)
