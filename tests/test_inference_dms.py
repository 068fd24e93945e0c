"""The inference engine on DMS (TP=1): prefill and decode logits equal the model's full
forward, each head holds its window plus the survivors (blocks only for those), and batched
generation equals one request at a time."""

import math
from dataclasses import replace

import pytest
import torch

from megatron_utils import TINY_GQA
from nemo_dmc.inference import DMCModelRunner, EngineConfig, InferenceEngine, SamplingParams
from nemo_dmc.megatron.model import build_model
from nemo_dmc.megatron.parallel import seed_all
from nemo_dmc.methods import DMSConfig
from test_inference_engine import (
    _full_logits,
    _greedy_reference,
    _prompts,
    prefill_and_decode_match,
)

TINY_MHA = replace(TINY_GQA, num_query_groups=None)
VOCAB = TINY_GQA.vocab_size


def _model(shape=TINY_GQA, window=4, seed=7):
    seed_all(seed)
    return build_model(shape, DMSConfig(window=window, init_offset=0.0)).eval()


def _record_slots(model):
    return torch.stack([layer.self_attention.method.record.slots
                        for layer in model.decoder.layers], dim=1).long()  # [b, layers, hk]


@pytest.mark.parametrize("shape", [TINY_MHA, TINY_GQA], ids=["mha", "gqa"])
@pytest.mark.parametrize("window", [1, 4])
@pytest.mark.parametrize("chunk", [None, 3], ids=["whole_prompt", "chunks_of_3"])
def test_prefill_and_decode_logits_equal_the_full_forward(megatron_tp1, shape, window, chunk):
    model = _model(shape, window)
    seq, prompt_lengths = 16, [5, 11, 8]
    tokens = torch.randint(0, VOCAB, (3, seq), generator=torch.Generator().manual_seed(0))
    full = _full_logits(model, tokens)
    evicted = torch.cat([layer.self_attention.method.record.decisions.hard
                         for layer in model.decoder.layers])
    assert 0.2 < evicted.mean() < 0.8
    runner = DMCModelRunner(model, block_size=2, num_blocks=400, max_sequences=3,
                            max_sequence_length=seq)
    rows = prefill_and_decode_match(runner, tokens, full, prompt_lengths, chunk)
    assert torch.equal(runner.cache.lengths[rows], _record_slots(model))


@pytest.mark.parametrize("chunk", [None, 4], ids=["whole_prompt", "chunks_of_4"])
def test_heads_hold_window_plus_survivors_and_blocks_only_for_them(megatron_tp1, chunk):
    model, block, window = _model(), 2, 4
    runner = DMCModelRunner(model, block_size=block, num_blocks=200, max_sequences=1,
                            max_sequence_length=32)
    row = runner.cache.acquire_row()
    tokens = _prompts([32])[0]
    runner.prefill([row], [tokens[:9]], chunk_size=chunk)
    for n in range(9, 32):
        predicted = runner.blocks_needed_for_next_token(torch.tensor([row]))
        used = runner.cache.num_used_blocks
        runner.decode([row], torch.tensor([tokens[n]]))
        assert runner.cache.num_used_blocks - used <= predicted
    _full_logits(model, torch.tensor([tokens]))
    lengths = runner.cache.lengths[row]
    assert torch.equal(lengths, _record_slots(model)[0])
    assert (lengths >= window).all() and lengths.sum() < 0.8 * lengths.numel() * 32
    assert runner.cache.num_used_blocks == int(((lengths + block - 1) // block).sum())
    memory = runner.cache.memory([row])
    assert memory.slots == int(lengths.sum()) and memory.open_state == 0
    runner.cache.release_row(row)
    assert runner.cache.num_free_blocks == 200


def test_batched_continuous_generation_equals_one_request_at_a_time(megatron_tp1):
    model = _model()
    prompts, news = _prompts([4, 9, 2, 7, 5]), [6, 3, 8, 5, 4]
    config = EngineConfig(max_batch_size=2, max_sequence_length=24, block_size=2,
                          prefill_chunk_size=3)
    engine = InferenceEngine(model, config, vocab_size=VOCAB)
    batched = engine.generate(prompts, [SamplingParams(max_new_tokens=n) for n in news])
    assert [r.tokens for r in batched] == [_greedy_reference(model, p, n)
                                           for p, n in zip(prompts, news)]
    assert engine.cache.num_free_blocks == engine.cache.layout.num_blocks


def test_pool_shortage_preempts_without_changing_any_output(megatron_tp1):
    model = _model(window=2)
    prompts, news = _prompts([6, 8, 5, 7]), [14, 12, 14, 13]
    engine = InferenceEngine(model, EngineConfig(max_batch_size=4, max_sequence_length=24,
                                                 block_size=2, num_blocks=120), vocab_size=VOCAB)
    results = engine.generate(prompts, [SamplingParams(max_new_tokens=n) for n in news])
    assert engine.preemptions > 0
    assert [r.tokens for r in results] == [_greedy_reference(model, p, n)
                                           for p, n in zip(prompts, news)]
    assert engine.cache.num_free_blocks == 120


def test_forced_eviction_keeps_exactly_the_window(megatron_tp1):
    seed_all(7)
    model = build_model(TINY_GQA, DMSConfig(window=3, force_decision="evict")).eval()
    (result,) = InferenceEngine(model, EngineConfig(max_batch_size=1, max_sequence_length=32,
                                                    block_size=4),
                                vocab_size=VOCAB).generate(_prompts([10]),
                                                           SamplingParams(max_new_tokens=13))
    assert result.cache.tokens == 22 and (result.cache.head_lengths == 3).all()
    assert result.cache.compression_ratio == pytest.approx(22 / 3)
    assert math.isclose(result.cache.memory.allocated,
                        8 * 4 * 2 * TINY_GQA.head_dim * 4)  # one block of 4 slots per head


def test_chunked_prefill_returns_the_blocks_of_tokens_that_left_the_window(megatron_tp1):
    seed_all(7)
    model = build_model(TINY_GQA, DMSConfig(window=2, force_decision="evict")).eval()
    runner = DMCModelRunner(model, block_size=2, num_blocks=100, max_sequences=1,
                            max_sequence_length=16)
    row = runner.cache.acquire_row()
    runner.prefill([row], [_prompts([12])[0]], chunk_size=4)
    heads = TINY_GQA.num_layers * TINY_GQA.kv_heads
    assert (runner.cache.lengths[row] == 2).all() and runner.cache.num_used_blocks == heads


def test_one_prefill_can_start_new_rows_and_continue_cached_ones(megatron_tp1):
    model = _model(window=3)
    tokens = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(6))
    full = _full_logits(model, tokens)
    runner = DMCModelRunner(model, block_size=2, num_blocks=100, max_sequences=2,
                            max_sequence_length=12)
    cached, new = runner.cache.acquire_row(), runner.cache.acquire_row()
    runner.prefill([cached], [tokens[0, :5].tolist()])
    logits = runner.prefill([cached, new], [tokens[0, 5:].tolist(), tokens[1, :9].tolist()],
                            all_logits=True)
    torch.testing.assert_close(logits[0], full[0, 5:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits[1], full[1, :9], atol=1e-5, rtol=1e-5)
