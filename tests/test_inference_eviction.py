"""The inference engine on plain attention and the eviction methods (TP=1): logits equal the
model's full forward (which simulates the evicting cache), evicted slots free their blocks,
batching and preemption change no output, and vanilla equals megatron's own attention."""

import math
from dataclasses import replace

import pytest
import torch

from megatron_utils import TINY_GQA
from nemo_dmc.core import DMCConfig
from nemo_dmc.inference import DMCModelRunner, EngineConfig, InferenceEngine, SamplingParams
from nemo_dmc.megatron.model import build_model
from nemo_dmc.megatron.parallel import seed_all
from nemo_dmc.methods import settings_for
from test_inference_engine import (
    _full_logits,
    _greedy_reference,
    _prompts,
    prefill_and_decode_match,
)

TINY_MHA = replace(TINY_GQA, num_query_groups=None)
VOCAB = TINY_GQA.vocab_size
EVICTION = ("h2o", "tova", "streaming")
RATIO, SINKS = 3.0, 2


def _settings(name):
    return settings_for(name, DMCConfig(), ratio=RATIO, sinks=SINKS)


def _model(name, shape=TINY_GQA, seed=7):
    seed_all(seed)
    return build_model(shape, _settings(name)).eval()



@pytest.mark.parametrize("name", EVICTION + ("vanilla",))
@pytest.mark.parametrize("shape", [TINY_MHA, TINY_GQA], ids=["mha", "gqa"])
@pytest.mark.parametrize("chunk", [None, 3], ids=["whole_prompt", "chunks_of_3"])
def test_prefill_and_decode_logits_equal_the_methods_full_forward(megatron_tp1, name, shape,
                                                                   chunk):
    model = _model(name, shape)
    seq, prompt_lengths = 16, [5, 11, 8]
    tokens = torch.randint(0, VOCAB, (3, seq), generator=torch.Generator().manual_seed(0))
    full = _full_logits(model, tokens)
    runner = DMCModelRunner(model, block_size=2, num_blocks=400, max_sequences=3,
                            max_sequence_length=seq)
    rows = prefill_and_decode_match(runner, tokens, full, prompt_lengths, chunk)
    if name != "vanilla":  # the model's own record: slots held after the last token
        slots = torch.stack([layer.self_attention.method.record.slots
                             for layer in model.decoder.layers], dim=1)  # [b, layers, hk]
        assert torch.equal(runner.cache.lengths[rows], slots)


@pytest.mark.parametrize("name", EVICTION)
@pytest.mark.parametrize("chunk", [None, 4], ids=["whole_prompt", "chunks_of_4"])
def test_evicted_slots_free_their_blocks(megatron_tp1, name, chunk):
    model = _model(name)
    block, layers, heads = 2, TINY_GQA.num_layers, TINY_GQA.kv_heads
    settings = _settings(name)
    runner = DMCModelRunner(model, block_size=block, num_blocks=100, max_sequences=1,
                            max_sequence_length=32)
    row = runner.cache.acquire_row()
    tokens = _prompts([32])[0]
    runner.prefill([row], [tokens[:9]], chunk_size=chunk)
    for n in range(9, 33):
        budget = settings.budget(n)
        assert (runner.cache.lengths[row] == budget).all()
        assert runner.cache.num_used_blocks == layers * heads * math.ceil(budget / block)
        grows = math.ceil(settings.budget(n + 1) / block) - math.ceil(budget / block)
        assert runner.blocks_needed_for_next_token(torch.tensor([row])) == layers * heads * grows
        if n < 32:
            runner.decode([row], torch.tensor([tokens[n]]))
    assert runner.cache.num_used_blocks < layers * heads * 32 // block // 2
    runner.cache.release_row(row)
    assert runner.cache.num_free_blocks == 100 and torch.all(runner.cache.block_tables == -1)


@pytest.mark.parametrize("name", EVICTION + ("vanilla",))
def test_batched_continuous_generation_equals_one_request_at_a_time(megatron_tp1, name):
    model = _model(name)
    prompts, news = _prompts([4, 9, 2, 7, 5]), [6, 3, 8, 5, 4]
    config = EngineConfig(max_batch_size=2, max_sequence_length=24, block_size=2,
                          prefill_chunk_size=3)
    engine = InferenceEngine(model, config, vocab_size=VOCAB)
    batched = engine.generate(prompts, [SamplingParams(max_new_tokens=n) for n in news])
    assert [r.tokens for r in batched] == [_greedy_reference(model, p, n)
                                           for p, n in zip(prompts, news)]
    assert engine.cache.num_free_blocks == engine.cache.layout.num_blocks


@pytest.mark.parametrize("name", EVICTION)
def test_pool_shortage_preempts_an_evicting_sequence_without_changing_any_output(megatron_tp1,
                                                                                  name):
    model = _model(name)
    prompts, news = _prompts([6, 8, 5, 7]), [14, 12, 14, 13]
    # after ~20 tokens a sequence holds <= 7 slots: 8 heads x 4 blocks of 2; four need 128
    engine = InferenceEngine(model, EngineConfig(max_batch_size=4, max_sequence_length=24,
                                                 block_size=2, num_blocks=80), vocab_size=VOCAB)
    results = engine.generate(prompts, [SamplingParams(max_new_tokens=n) for n in news])
    assert engine.preemptions > 0
    assert [r.tokens for r in results] == [_greedy_reference(model, p, n)
                                           for p, n in zip(prompts, news)]
    assert engine.cache.num_free_blocks == 80


@pytest.mark.parametrize("name", EVICTION)
def test_results_report_the_slots_eviction_holds(megatron_tp1, name):
    (result,) = InferenceEngine(_model(name), EngineConfig(max_batch_size=1,
                                                           max_sequence_length=32, block_size=4),
                                vocab_size=VOCAB).generate(_prompts([10]),
                                                           SamplingParams(max_new_tokens=13))
    stats, budget = result.cache, _settings(name).budget(22)
    assert stats.tokens == 22 and (stats.head_lengths == budget).all()
    assert stats.compression_ratio == pytest.approx(22 / budget)
    slot_bytes = 2 * TINY_GQA.head_dim * 4
    assert stats.memory.logical == 8 * budget * slot_bytes
    assert stats.memory.allocated == 8 * math.ceil(budget / 4) * 4 * slot_bytes
    assert stats.memory.open_state == 0


@pytest.mark.parametrize("shape", [TINY_MHA, TINY_GQA], ids=["mha", "gqa"])
def test_vanilla_generation_equals_megatrons_own_attention(megatron_tp1, shape):
    """Channel D-1 is used as is: the vanilla method is megatron's attention, cached."""
    seed_all(11)
    plain = build_model(shape, method=None).eval()
    vanilla = build_model(shape, settings_for("vanilla", DMCConfig())).eval()
    vanilla.load_state_dict(plain.state_dict())
    prompts, news = _prompts([6, 9, 4], seed=4), [8, 5, 7]
    results = InferenceEngine(vanilla, EngineConfig(max_batch_size=3, max_sequence_length=20,
                                                    block_size=4, prefill_chunk_size=4),
                              vocab_size=VOCAB).generate(
        prompts, [SamplingParams(max_new_tokens=n) for n in news])
    assert [r.tokens for r in results] == [_greedy_reference(plain, p, n)
                                           for p, n in zip(prompts, news)]
    assert all(r.cache.compression_ratio == 1.0 and r.cache.memory.open_state == 0
               for r in results)
    tokens = torch.tensor([prompts[1] + results[1].tokens[:-1]])
    runner = DMCModelRunner(vanilla, block_size=4, num_blocks=100, max_sequences=1,
                            max_sequence_length=20)
    row = runner.cache.acquire_row()
    logits = [runner.prefill([row], [prompts[1]], all_logits=True)[0]]
    for t in results[1].tokens[:-1]:
        logits.append(runner.decode([row], torch.tensor([t])))
    torch.testing.assert_close(torch.cat(logits), _full_logits(plain, tokens)[0],
                               atol=1e-5, rtol=1e-5)


def test_force_decision_is_rejected_for_methods_other_than_dmc(megatron_tp1):
    with pytest.raises(ValueError, match="engine.force_decision"):
        InferenceEngine(_model("h2o"), EngineConfig(force_decision="append"))


@pytest.mark.parametrize("name", EVICTION)
def test_a_pool_of_exactly_the_budgets_blocks_is_enough(megatron_tp1, name):
    model = _model(name)
    prompt, new = _prompts([6])[0], 18
    blocks = TINY_GQA.num_layers * TINY_GQA.kv_heads * math.ceil(_settings(name).budget(24) / 2)
    engine = InferenceEngine(model, EngineConfig(max_batch_size=1, max_sequence_length=24,
                                                 block_size=2, num_blocks=blocks,
                                                 prefill_chunk_size=4), vocab_size=VOCAB)
    (result,) = engine.generate([prompt], SamplingParams(max_new_tokens=new))
    assert result.tokens == _greedy_reference(model, prompt, new) and engine.preemptions == 0
