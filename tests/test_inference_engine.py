"""The inference engine on megatron-core DMC models (TP=1): exactness against the model's
full-sequence forward, DMC off vs megatron's static KV cache, batching, the block pool,
sampling and errors."""

from dataclasses import replace

import pytest
import torch
from megatron.core.inference.contexts import StaticInferenceContext

from megatron_utils import TINY_GQA
from nemo_dmc.core import DMCConfig
from nemo_dmc.inference import (
    DMCModelRunner,
    EngineConfig,
    InferenceEngine,
    SamplingParams,
    filter_logits,
    generate,
)
from nemo_dmc.kvcache import CacheFullError
from nemo_dmc.megatron.cpu_shims import causal_attention_mask
from nemo_dmc.megatron.model import build_model
from nemo_dmc.megatron.parallel import seed_all
from nemo_dmc.megatron.zero_out import zero_decision_projections

TINY_MHA = replace(TINY_GQA, num_query_groups=None)
VOCAB = TINY_GQA.vocab_size


def _model(shape=TINY_GQA, window=3, seed=7):
    seed_all(seed)  # offset 0: the decision logit is k[D-1] itself, so about half merge
    return build_model(shape, DMCConfig(init_offset=0.0, window=window)).eval()


def _full_logits(model, tokens):
    b, s = tokens.shape
    with torch.no_grad():
        return model(tokens, torch.arange(s).expand(b, s), causal_attention_mask(s))


def _greedy_reference(model, prompt, new_tokens):
    tokens = list(prompt)
    for _ in range(new_tokens):
        logits = _full_logits(model, torch.tensor([tokens]))
        tokens.append(int(logits[0, -1, :VOCAB].argmax()))
    return tokens[len(prompt):]


def _prompts(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in lengths]


def prefill_and_decode_match(runner, tokens, full, prompt_lengths, chunk):
    """Prefill each row's prompt (``tokens[i, :n]``), decode the rest of ``tokens`` one token
    at a time, and check every logit against the full forward ``full``; returns the rows."""
    rows = [runner.cache.acquire_row() for _ in prompt_lengths]
    prompts = [tokens[i, :n].tolist() for i, n in enumerate(prompt_lengths)]
    prompt_logits = runner.prefill(rows, prompts, chunk_size=chunk, all_logits=True)
    for i, n in enumerate(prompt_lengths):
        torch.testing.assert_close(prompt_logits[i], full[i, :n], atol=1e-5, rtol=1e-5)
    for t in range(min(prompt_lengths), tokens.shape[1]):
        active = [i for i, n in enumerate(prompt_lengths) if n <= t]
        logits = runner.decode([rows[i] for i in active], tokens[active, t])
        torch.testing.assert_close(logits, full[active, t], atol=1e-5, rtol=1e-5)
    return rows


@pytest.mark.parametrize("shape", [TINY_MHA, TINY_GQA], ids=["mha", "gqa"])
@pytest.mark.parametrize("window", [None, 3], ids=["unbounded", "window3"])
@pytest.mark.parametrize("chunk", [None, 3], ids=["whole_prompt", "chunks_of_3"])
def test_prefill_and_decode_logits_equal_full_forward_for_mixed_lengths(megatron_tp1, shape,
                                                                        window, chunk):
    model = _model(shape, window)
    seq, prompt_lengths = 16, [5, 11, 8]
    tokens = torch.randint(0, VOCAB, (3, seq), generator=torch.Generator().manual_seed(0))
    full = _full_logits(model, tokens)
    merges = torch.cat([layer.self_attention.method.record.decisions.hard for layer in model.decoder.layers])
    assert 0.2 < merges.mean() < 0.8

    runner = DMCModelRunner(model, block_size=4, num_blocks=200, max_sequences=3,
                            max_sequence_length=seq)
    prefill_and_decode_match(runner, tokens, full, prompt_lengths, chunk)


def test_one_prefill_can_start_new_rows_and_continue_cached_ones(megatron_tp1):
    model = _model()
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


def test_cache_lengths_are_the_appends_of_the_models_hard_decisions(megatron_tp1):
    model = _model()
    tokens = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))
    _full_logits(model, tokens)
    merges = torch.stack([layer.self_attention.method.record.decisions.hard
                          for layer in model.decoder.layers], dim=1)  # [b, layers, hk, s]
    runner = DMCModelRunner(model, block_size=4, num_blocks=100, max_sequences=2,
                            max_sequence_length=12)
    rows = [runner.cache.acquire_row() for _ in range(2)]
    runner.prefill(rows, [tokens[0, :7].tolist(), tokens[1, :7].tolist()], chunk_size=4)
    for t in range(7, 12):
        runner.decode(rows, tokens[:, t])
    assert torch.equal(runner.cache.lengths[rows], (12 - merges.sum(-1)).long())


def _megatron_static_greedy(model, prompts, new_tokens):
    """Greedy generation with megatron-core's StaticInferenceContext, batched as megatron's
    static ``TextGenerationController`` batches mixed prompt lengths: prefill up to the shortest
    prompt, then one token per step for every row, a longer prompt's own next token replacing
    the sampled one until that prompt is used up.

    Returns each prompt's ``new_tokens`` tokens and the ``[b, new_tokens, vocab]`` logits that
    chose them."""
    lengths = torch.tensor([len(p) for p in prompts])
    b, start, total = len(prompts), int(lengths.min()), int(lengths.max()) + new_tokens
    tokens = torch.zeros(b, total, dtype=torch.int64)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = torch.tensor(p)
    context = StaticInferenceContext(b, total)
    chose = torch.zeros(b, total, VOCAB)  # chose[:, t]: the logits that pick token t
    with torch.no_grad():
        logits = model(tokens[:, :start], torch.arange(start).expand(b, start),
                       causal_attention_mask(start), inference_context=context,
                       runtime_gather_output=True)
        context.sequence_len_offset = start
        for position in range(start, total):
            chose[:, position] = logits[:, -1, :VOCAB]
            generating = lengths <= position
            tokens[:, position] = torch.where(generating, chose[:, position].argmax(-1),
                                              tokens[:, position])
            if position == total - 1:
                break
            if bool(generating.all()):
                context.enable_decode_mode()
            logits = model(tokens[:, position:position + 1], torch.full((b, 1), position), None,
                           inference_context=context, runtime_gather_output=True)
            context.sequence_len_offset += 1
    out = [tokens[i, n:n + new_tokens].tolist() for i, n in enumerate(lengths.tolist())]
    seen = torch.stack([chose[i, n:n + new_tokens] for i, n in enumerate(lengths.tolist())])
    return out, seen


@pytest.mark.parametrize("shape", [TINY_MHA, TINY_GQA], ids=["mha", "gqa"])
def test_dmc_off_engine_equals_megatron_static_kv_cache_generation(megatron_tp1, shape):
    """Same weights in a vanilla megatron model and a DMC model run with
    ``force_decision="append"``; prompts of mixed lengths.

    The decision channel D-1 of q and k is zeroed in both: DMC attention drops that channel
    from q.k (it carries the decision logit and importance) while vanilla attention uses it,
    so with it left non-zero the two models would attend differently on the same weights.
    Zeroed, the vanilla model is a model "with DMC off" and every token appends anyway (zeroed
    rows zero the channel before RoPE only: ``zero_after_rope=False``)."""
    seed_all(11)
    vanilla = build_model(shape, method=None).eval()
    dmc = build_model(shape, DMCConfig(zero_after_rope=False)).eval()
    dmc.load_state_dict(vanilla.state_dict())
    zero_decision_projections(vanilla)
    zero_decision_projections(dmc)
    prompts = _prompts([6, 9, 4], seed=4)
    expected, megatron_logits = _megatron_static_greedy(vanilla, prompts, new_tokens=8)
    config = EngineConfig(max_batch_size=3, max_sequence_length=20, block_size=4,
                          force_decision="append")
    results = InferenceEngine(dmc, config, vocab_size=VOCAB).generate(
        prompts, SamplingParams(max_new_tokens=8))
    assert [r.tokens for r in results] == expected
    assert all(r.cache.compression_ratio == 1.0 for r in results)

    runner = InferenceEngine(dmc, config).runner
    rows = [runner.cache.acquire_row() for _ in prompts]
    logits = [runner.prefill(rows, prompts)]
    for step in range(7):
        logits.append(runner.decode(rows, torch.tensor([e[step] for e in expected])))
    torch.testing.assert_close(torch.stack(logits, 1)[..., :VOCAB], megatron_logits,
                               atol=1e-5, rtol=1e-5)


def test_batched_continuous_generation_equals_one_request_at_a_time(megatron_tp1):
    model = _model()
    prompts, news = _prompts([4, 9, 2, 7, 5]), [6, 3, 8, 5, 4]
    config = EngineConfig(max_batch_size=2, max_sequence_length=24, block_size=2,
                          prefill_chunk_size=3)
    batched = InferenceEngine(model, config, vocab_size=VOCAB).generate(
        prompts, [SamplingParams(max_new_tokens=n) for n in news])
    assert [r.tokens for r in batched] == [_greedy_reference(model, p, n)
                                           for p, n in zip(prompts, news)]


def test_sequences_join_and_leave_and_the_pool_returns_to_empty(megatron_tp1):
    model = _model(TINY_MHA)
    engine = InferenceEngine(model, EngineConfig(max_batch_size=3, max_sequence_length=40,
                                                 block_size=2, num_blocks=400),
                             vocab_size=VOCAB)
    g = torch.Generator().manual_seed(5)
    for n in torch.randint(1, 12, (12,), generator=g).tolist():
        new_tokens = int(torch.randint(1, 12, (1,), generator=g))
        engine.add_request(_prompts([n], seed=n)[0], SamplingParams(max_new_tokens=new_tokens))
    running, finished = [], 0
    while engine.has_unfinished:
        finished += len(engine.step())
        running.append(engine.num_running)
        if engine.has_unfinished:
            assert engine.cache.num_used_blocks > 0
    assert finished == 12 and max(running) == 3 and len(set(running)) > 2
    assert engine.cache.num_free_blocks == 400 and engine.cache.num_free_rows == 3
    assert torch.all(engine.cache.block_tables == -1) and torch.all(engine.cache.lengths == 0)


def test_pool_shortage_preempts_a_sequence_without_changing_any_output(megatron_tp1):
    model = _model(window=None)
    prompts, news = _prompts([6, 8, 5, 7]), [9, 7, 9, 8]
    # each sequence fits alone (<= 8 heads x 8 blocks of 2), all four together do not
    engine = InferenceEngine(model, EngineConfig(max_batch_size=4, max_sequence_length=20,
                                                 block_size=2, num_blocks=80), vocab_size=VOCAB)
    results = engine.generate(prompts, [SamplingParams(max_new_tokens=n) for n in news])
    assert engine.preemptions > 0
    assert [r.tokens for r in results] == [_greedy_reference(model, p, n)
                                           for p, n in zip(prompts, news)]
    assert engine.cache.num_free_blocks == 80


def test_admission_waits_when_a_prompt_does_not_fit_beside_running_sequences(megatron_tp1):
    model = _model()
    prompts = _prompts([14, 14, 14], seed=8)
    # one 14-token prompt fits the pool of 60 blocks (8 heads x <= 7 blocks of 2), two do not
    engine = InferenceEngine(model, EngineConfig(max_batch_size=3, max_sequence_length=20,
                                                 block_size=2, num_blocks=60), vocab_size=VOCAB)
    results = engine.generate(prompts, SamplingParams(max_new_tokens=3))
    assert engine.admission_retries > 0  # the batch of three did not fit: retried one alone
    assert engine.admission_waits > 0  # the others waited for it to finish
    assert [r.tokens for r in results] == [_greedy_reference(model, p, 3) for p in prompts]
    assert engine.cache.num_free_blocks == 60 and engine.cache.num_free_rows == 3


def test_runner_prefill_raises_when_the_pool_runs_out(megatron_tp1):
    runner = DMCModelRunner(_model(), block_size=2, num_blocks=6, max_sequences=1,
                            max_sequence_length=16)
    row = runner.cache.acquire_row()
    with pytest.raises(CacheFullError, match="engine.num_blocks=6"):
        runner.prefill([row], _prompts([12]), chunk_size=4)
    runner.cache.release_row(row)
    assert runner.cache.num_free_blocks == 6 and not runner.cache.overflow
    row = runner.cache.acquire_row()
    runner.prefill([row], _prompts([12]), raise_on_overflow=False)
    assert runner.cache.overflow


def test_prompt_larger_than_the_pool_is_a_clear_error(megatron_tp1):
    engine = InferenceEngine(_model(), EngineConfig(max_batch_size=2, max_sequence_length=64,
                                                    block_size=2, num_blocks=6))
    with pytest.raises(CacheFullError, match="engine.num_blocks"):
        engine.generate(_prompts([40]))
    assert engine.cache.num_free_blocks == 6


def test_results_report_achieved_ratio_and_kv_memory(megatron_tp1):
    model = _model()
    (result,) = InferenceEngine(model, EngineConfig(max_batch_size=1, max_sequence_length=32,
                                                    block_size=4), vocab_size=VOCAB
                                ).generate(_prompts([10]), SamplingParams(max_new_tokens=6))
    stats = result.cache
    assert stats.tokens == 15  # the last sampled token is never fed
    assert stats.head_lengths.shape == (2, 4)
    slots = int(stats.head_lengths.sum())
    assert stats.compression_ratio == pytest.approx(15 * 8 / slots) and stats.compression_ratio > 1
    slot_bytes = 2 * TINY_GQA.head_dim * 4
    assert stats.memory.logical == slots * slot_bytes
    assert stats.memory.allocated == int(((stats.head_lengths + 3) // 4).sum()) * 4 * slot_bytes


def test_stop_token_ends_generation_and_max_new_tokens_caps_it(megatron_tp1):
    model = _model()
    prompt = _prompts([5])[0]
    free_run = _greedy_reference(model, prompt, 6)
    engine = InferenceEngine(model, EngineConfig(max_batch_size=2, max_sequence_length=32),
                             vocab_size=VOCAB)
    stopped, capped = engine.generate(
        [prompt, prompt], [SamplingParams(max_new_tokens=6, stop_token_ids=(free_run[2],)),
                           SamplingParams(max_new_tokens=4)])
    first_stop = free_run.index(free_run[2])
    assert stopped.tokens == free_run[:first_stop + 1] and stopped.finish_reason == "stop"
    assert capped.tokens == free_run[:4] and capped.finish_reason == "length"


def test_seeded_sampling_is_reproducible_whatever_shares_the_batch(megatron_tp1):
    model = _model()
    prompts = _prompts([5, 7, 3])
    params = SamplingParams(temperature=1.0, top_k=20, top_p=0.95, max_new_tokens=8, seed=42)
    config = EngineConfig(max_batch_size=3, max_sequence_length=32)
    alone = InferenceEngine(model, config, vocab_size=VOCAB).generate([prompts[0]], params)
    together = InferenceEngine(model, config, vocab_size=VOCAB).generate(
        prompts, [params, SamplingParams(temperature=1.0, max_new_tokens=5), SamplingParams()])
    assert alone[0].tokens == together[0].tokens
    other_seed = InferenceEngine(model, config, vocab_size=VOCAB).generate(
        [prompts[0]], replace(params, seed=43))
    assert other_seed[0].tokens != alone[0].tokens


def test_top_k_of_one_samples_the_greedy_token(megatron_tp1):
    model = _model()
    prompt = _prompts([6])[0]
    (result,) = generate(model, [prompt],
                         SamplingParams(temperature=2.0, top_k=1, max_new_tokens=5),
                         EngineConfig(max_batch_size=1, max_sequence_length=16), vocab_size=VOCAB)
    assert result.tokens == _greedy_reference(model, prompt, 5)


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([0.1, 0.5, 0.15, 0.25]))
    kept = torch.isfinite(filter_logits(logits, top_k=0, top_p=0.7)).tolist()
    assert kept == [False, True, False, True]
    assert torch.isfinite(filter_logits(logits, top_k=0, top_p=0.05)).sum() == 1
    top3 = torch.isfinite(filter_logits(logits, top_k=3, top_p=1.0))
    assert top3.tolist() == [False, True, True, True]


class _ByteTokenizer:
    vocab_size = 256

    def encode(self, text):
        return list(text.encode())

    def decode(self, ids):
        return bytes(ids).decode(errors="replace")


def test_generate_api_takes_text_prompts_and_returns_text(megatron_tp1):
    model = _model()
    results = generate(model, ["hello", [1, 2, 3]], SamplingParams(max_new_tokens=3),
                       EngineConfig(max_batch_size=2, max_sequence_length=16),
                       tokenizer=_ByteTokenizer())
    assert results[0].prompt_tokens == list(b"hello") and results[1].prompt_tokens == [1, 2, 3]
    assert results[0].text == _ByteTokenizer().decode(results[0].tokens)


@pytest.mark.parametrize("kwargs,key", [
    ({"block_size": 0}, "engine.block_size"),
    ({"num_blocks": 8, "kv_memory_mb": 1.0}, "engine.num_blocks"),
    ({"force_decision": "evict"}, "engine.force_decision"),
    ({"prefill_chunk_size": 0}, "engine.prefill_chunk_size"),
])
def test_bad_engine_settings_name_their_key(kwargs, key):
    with pytest.raises(ValueError, match=key):
        EngineConfig(**kwargs)


@pytest.mark.parametrize("kwargs,key", [({"temperature": -1.0}, "sampling.temperature"),
                                        ({"top_p": 0.0}, "sampling.top_p"),
                                        ({"max_new_tokens": 0}, "sampling.max_new_tokens")])
def test_bad_sampling_settings_name_their_key(kwargs, key):
    with pytest.raises(ValueError, match=key):
        SamplingParams(**kwargs)


def test_kv_memory_budget_sets_the_pool_size(megatron_tp1):
    engine = InferenceEngine(_model(), EngineConfig(block_size=4, kv_memory_mb=1.0))
    block_bytes = 4 * 2 * TINY_GQA.head_dim * 4
    assert engine.cache.layout.num_blocks == 2 ** 20 // block_bytes


def test_a_sequence_outgrowing_the_pool_alone_finishes_with_its_tokens_and_the_engine_goes_on(
        megatron_tp1):
    model = _model()
    # 8 (layer, KV head) caches with blocks of 2: a 4-token prompt takes 8 blocks, and 16
    # blocks are exhausted long before 24 new tokens (the random decisions merge about half)
    engine = InferenceEngine(model, EngineConfig(max_batch_size=1, max_sequence_length=64,
                                                 block_size=2, num_blocks=16), vocab_size=VOCAB)
    prompt = _prompts([4], seed=3)[0]
    (full,) = engine.generate([prompt], SamplingParams(max_new_tokens=24))
    assert full.finish_reason == "cache_full" and 0 < len(full.tokens) < 24
    assert full.tokens == _greedy_reference(model, prompt, len(full.tokens))
    assert engine.cache.num_free_blocks == 16 and not engine.has_unfinished
    (again,) = engine.generate([prompt], SamplingParams(max_new_tokens=2))  # still usable
    assert again.finish_reason == "length" and again.tokens == full.tokens[:2]


def test_cancel_frees_a_running_or_waiting_request_and_returns_its_tokens(megatron_tp1):
    model = _model()
    engine = InferenceEngine(model, EngineConfig(max_batch_size=1, max_sequence_length=32,
                                                 block_size=2), vocab_size=VOCAB)
    first, second = _prompts([5, 6], seed=4)
    running = engine.add_request(first, SamplingParams(max_new_tokens=10))
    waiting = engine.add_request(second, SamplingParams(max_new_tokens=10))
    engine.step()
    engine.step()  # one row: the first runs, the second waits
    free_before = engine.cache.num_free_blocks
    stopped = engine.cancel(running)
    assert stopped.finish_reason == "cancelled" and 0 < len(stopped.tokens) < 10
    assert stopped.tokens == _greedy_reference(model, first, len(stopped.tokens))
    assert engine.cache.num_free_blocks > free_before and engine.cancel(running) is None
    queued = engine.cancel(waiting)
    assert queued.finish_reason == "cancelled" and queued.tokens == []
    assert not engine.has_unfinished and engine.cache.num_free_rows == 1
