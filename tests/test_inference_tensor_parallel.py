"""Tensor-parallel inference: KV heads split over 2 gloo ranks give the TP=1 results, also when
a short pool makes the ranks agree on preempting a sequence."""

import pytest
import torch

from distributed import run_distributed
from megatron_utils import TINY_GQA
from nemo_dmc.checkpoints.sharding import shard_full_state
from nemo_dmc.core import DMCConfig
from nemo_dmc.inference import DMCModelRunner, EngineConfig, InferenceEngine, SamplingParams
from nemo_dmc.kvcache.paged import CacheFullError
from nemo_dmc.megatron import parallel
from nemo_dmc.megatron.cpu_shims import causal_attention_mask
from nemo_dmc.megatron.model import build_model

SEQ, PROMPTS, VOCAB = 14, [4, 9, 6], TINY_GQA.vocab_size


def _prompts():
    g = torch.Generator().manual_seed(2)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in PROMPTS]


def _engine_run(model):
    config = EngineConfig(max_batch_size=2, max_sequence_length=SEQ, block_size=2,
                          prefill_chunk_size=4)
    return InferenceEngine(model, config, vocab_size=VOCAB).generate(
        _prompts(), SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=5, seed=3))


def _greedy_run(model, num_blocks=None):
    """All prompts at once, greedy, with ``num_blocks`` per rank; returns (engine, tokens)."""
    config = EngineConfig(max_batch_size=3, max_sequence_length=SEQ, block_size=4,
                          num_blocks=num_blocks)
    engine = InferenceEngine(model, config, vocab_size=VOCAB)
    results = engine.generate(_prompts(), SamplingParams(max_new_tokens=8))
    return engine, [r.tokens for r in results]


def _check_preemption_agreed_over_ranks(sharded, expected, rank: int) -> None:
    """``sharded`` in a pool of 14 blocks of 4 per rank (4 local heads need <= 16 for a
    sequence that never merges): the sequences wait, are retried alone and preempted. The
    ranks' heads differ, and here rank 1 runs short at a step where rank 0 does not: only the
    shortage agreed over the TP group keeps their schedules (and collectives) in step. The
    tokens stay ``expected`` (TP=1, enough blocks)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from nemo_dmc.inference import engine as engine_module

    local_flags = []  # each rank's own shortage flag at every agreement

    def recording_tp_any(flag, device):
        local_flags.append(bool(flag))
        return agree(flag, device)

    agree, engine_module.tp_any = engine_module.tp_any, recording_tp_any
    try:
        engine, tokens = _greedy_run(sharded, num_blocks=14)
    finally:
        engine_module.tp_any = agree
    flags = [None, None]
    dist.all_gather_object(flags, local_flags,
                           group=parallel_state.get_tensor_model_parallel_group())
    assert len(flags[0]) == len(flags[1]) and flags[0] != flags[1], flags  # ranks disagreed
    assert engine.preemptions > 0, rank
    assert engine.admission_waits > 0 and engine.admission_retries > 0, rank
    assert tokens == expected, rank
    assert engine.cache.num_free_blocks == 14, rank


def _check_prefill_overflow_raises_on_every_rank(sharded, tokens, rank: int) -> None:
    """Only rank 1's pool is too small, yet both ranks raise (else rank 0 would carry on
    into collectives rank 1 never joins)."""
    runner = DMCModelRunner(sharded, block_size=2, num_blocks=200 if rank == 0 else 2,
                            max_sequences=3, max_sequence_length=SEQ)
    rows = [runner.cache.acquire_row() for _ in PROMPTS]
    with pytest.raises(CacheFullError, match="engine.num_blocks"):
        runner.prefill(rows, [tokens[i, :n].tolist() for i, n in enumerate(PROMPTS)])


def _cached_logits(model, tokens):
    """Chunked prefill of mixed-length prompts, then teacher-forced decode to SEQ."""
    runner = DMCModelRunner(model, block_size=2, num_blocks=200, max_sequences=3,
                            max_sequence_length=SEQ)
    rows = [runner.cache.acquire_row() for _ in PROMPTS]
    logits = runner.prefill(rows, [tokens[i, :n].tolist() for i, n in enumerate(PROMPTS)],
                            chunk_size=3, all_logits=True)
    logits = [list(x) for x in logits]
    for t in range(min(PROMPTS), SEQ):
        active = [i for i, n in enumerate(PROMPTS) if n <= t]
        step = runner.decode([rows[i] for i in active], tokens[active, t])
        for j, i in enumerate(active):
            logits[i].append(step[j])
    return torch.stack([torch.stack(x) for x in logits])


def _tp_worker(rank: int, world: int) -> None:
    tokens = torch.randint(0, VOCAB, (3, SEQ), generator=torch.Generator().manual_seed(0))
    for window in (None, 3):
        dmc = DMCConfig(init_offset=0.0, window=window)
        parallel.initialize(tensor_parallel_size=1, seed=0)
        model = build_model(TINY_GQA, dmc).eval()
        full_state = {k: v.clone() if torch.is_tensor(v) else v
                      for k, v in model.state_dict().items()}
        with torch.no_grad():
            full = model(tokens, torch.arange(SEQ).expand(3, SEQ), causal_attention_mask(SEQ))
        reference = _engine_run(model)
        greedy_reference = _greedy_run(model)[1] if window is None else None  # one window will do

        parallel.initialize(tensor_parallel_size=2, seed=0)
        sharded = build_model(TINY_GQA, dmc).eval()
        sharded.load_state_dict(shard_full_state(full_state, sharded))
        torch.testing.assert_close(_cached_logits(sharded, tokens), full, atol=1e-5, rtol=1e-5,
                                   msg=f"rank {rank} window {window}")
        results = _engine_run(sharded)
        for ref, got in zip(reference, results):
            assert got.tokens == ref.tokens, (rank, window)
            assert torch.equal(got.cache.head_lengths, ref.cache.head_lengths), (rank, window)
            assert got.cache.memory == ref.cache.memory, (rank, window)
        assert any(r.cache.compression_ratio > 1.2 for r in reference)
        if greedy_reference is not None:
            _check_preemption_agreed_over_ranks(sharded, greedy_reference, rank)
            _check_prefill_overflow_raises_on_every_rank(sharded, tokens, rank)
    parallel.shutdown()


def test_tp2_engine_equals_tp1_logits_tokens_cache_and_preemption_for_gqa():
    run_distributed(_tp_worker, 2)
