"""The paged DMC cache and its attention kernels against the token-by-token reference
(``nemo_dmc.core.simulate_inference``), without megatron."""

import pytest
import torch

from nemo_dmc.core import DMCConfig, rotate_half_rope, simulate_inference
from nemo_dmc.kernels import references
from nemo_dmc.kvcache.attention import decode_attention, prefill_attention
from nemo_dmc.kvcache.paged import CacheLayout, PagedKVCache


def _inputs(hq, hk, seq, batch=2, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, hq, seq, dim, generator=g, dtype=torch.float64)
    k = torch.randn(batch, hk, seq, dim, generator=g, dtype=torch.float64)
    v = torch.randn(batch, hk, seq, dim, generator=g, dtype=torch.float64)
    k[..., -1] = 3.0 * k[..., -1] + 5.0  # logit k[D-1] - 5: about half the tokens merge
    return q, k, v


def _cache(batch, hk, dim, window, seq, block_size=2, num_blocks=None, dtype=torch.float64):
    return PagedKVCache(CacheLayout(
        num_layers=1, kv_heads=hk, head_dim=dim, window=window, block_size=block_size,
        num_blocks=num_blocks or batch * hk * seq, max_sequences=batch,
        max_sequence_length=seq, dtype=dtype))


def _run(cache, q, k, v, cfg, prefill, chunk):
    """Prefill ``prefill`` tokens in chunks of ``chunk``, then decode the rest one by one."""
    b, seq = q.shape[0], q.shape[2]
    rows, rope, scale = torch.arange(b), rotate_half_rope(), q.shape[-1] ** -0.5
    outs, done = [], 0
    while done < prefill:
        c = min(chunk, prefill - done)
        pos = (done + torch.arange(c)).expand(b, c)
        sl = slice(done, done + c)
        outs.append(prefill_attention(cache, 0, rows, q[:, :, sl], k[:, :, sl], v[:, :, sl], pos,
                                      torch.full((b,), c), cfg, rope, scale))
        done += c
    for t in range(prefill, seq):
        sl = slice(t, t + 1)
        outs.append(decode_attention(cache, 0, rows, q[:, :, sl], k[:, :, sl], v[:, :, sl],
                                     torch.full((b, 1), t), cfg, rope, scale))
    return torch.cat(outs, dim=2)


@pytest.mark.parametrize("hq,hk", [(4, 4), (4, 2)], ids=["mha", "gqa"])
@pytest.mark.parametrize("window", [None, 1, 3], ids=lambda w: f"window{w}")
@pytest.mark.parametrize("prefill,chunk", [(1, 1), (13, 13), (9, 4)],
                         ids=["decode_only", "one_prefill", "chunked_then_decode"])
def test_paged_cache_outputs_and_lengths_equal_token_by_token_reference(hq, hk, window, prefill,
                                                                       chunk):
    q, k, v = _inputs(hq, hk, seq=13)
    cfg = DMCConfig(window=window)
    cache = _cache(2, hk, 8, window, 13)
    out = _run(cache, q, k, v, cfg, prefill, chunk)
    ref = simulate_inference(q, k, v, cfg, rope=rotate_half_rope())
    assert 0.2 < ref.decisions.mean() < 0.8
    assert torch.equal(cache.lengths[:, 0], ref.cache_lengths)
    torch.testing.assert_close(out, ref.output, atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("force", ["append", "merge"])
def test_forced_decisions_give_vanilla_or_single_slot_caches(force):
    q, k, v = _inputs(4, 2, seq=9)
    cfg = DMCConfig(window=4, force_decision=force)
    cache = _cache(2, 2, 8, 4, 9)
    out = _run(cache, q, k, v, cfg, prefill=5, chunk=2)
    ref = simulate_inference(q, k, v, cfg, rope=rotate_half_rope())
    assert torch.all(cache.lengths[:, 0] == (9 if force == "append" else 1))
    torch.testing.assert_close(out, ref.output, atol=1e-10, rtol=1e-9)


def test_windowed_merge_continues_across_decode_steps_from_the_ring():
    # one head, every token merges: the slot is the omega-weighted mean of the last W tokens
    q, k, v = _inputs(1, 1, seq=7, batch=1)
    cfg = DMCConfig(window=3, force_decision="merge")
    cache = _cache(1, 1, 8, 3, 7)
    _run(cache, q, k, v, cfg, prefill=2, chunk=2)
    omega = torch.sigmoid(q[0, 0, 4:, -1] + cfg.init_offset)
    expected = (omega[:, None] * v[0, 0, 4:]).sum(0) / omega.sum()
    torch.testing.assert_close(cache.value_pool[cache.block_tables[0, 0, 0, 0], 0], expected)


def test_decode_attention_reads_only_blocks_up_to_the_longest_head():
    pool = torch.arange(10 * 4 * 2, dtype=torch.float32).view(10, 4, 2)
    tables = torch.tensor([[[3, 7, -1, -1], [5, -1, -1, -1]]])
    keys, values, valid = references.gather_slots(pool, pool, tables, torch.tensor([[6, 2]]))
    assert keys.shape == (1, 2, 8, 2)  # two blocks of 4: the longest head holds 6 slots
    assert torch.equal(keys[0, 0, :4], pool[3]) and torch.equal(keys[0, 0, 4:], pool[7])
    assert valid.sum(-1).tolist() == [[6, 2]]


def test_blocks_are_taken_on_demand_and_returned_on_release():
    cache = _cache(2, 2, 4, None, 16, block_size=4, num_blocks=10, dtype=torch.float32)
    row = cache.acquire_row()
    merge = torch.zeros(1, 2, 5)
    merge[0, 1, 1:] = 1  # head 1 merges everything after its first token
    states = torch.randn(1, 2, 5, 4)
    assert cache.commit(torch.tensor([row]), 0, states, states, merge, torch.tensor([5]))
    assert cache.lengths[row, 0].tolist() == [5, 1]
    assert cache.num_used_blocks == 3  # ceil(5/4) + ceil(1/4)
    torch.testing.assert_close(cache.key_pool[cache.block_tables[row, 0, 1, 0], 0], states[0, 1, 4])
    cache.release_row(row)
    assert cache.num_free_blocks == 10 and cache.num_free_rows == 2
    assert torch.all(cache.block_tables == -1) and torch.all(cache.lengths == 0)


def test_exhausted_pool_sets_overflow_and_writes_nothing():
    cache = _cache(1, 2, 4, None, 32, block_size=4, num_blocks=3, dtype=torch.float32)
    row = torch.tensor([cache.acquire_row()])
    states = torch.randn(1, 2, 9, 4)
    assert not cache.commit(row, 0, states, states, torch.zeros(1, 2, 9), torch.tensor([9]))
    assert cache.overflow and cache.num_free_blocks == 3
    assert torch.all(cache.lengths == 0) and torch.all(cache.key_pool == 0)


def test_memory_report_counts_logical_allocated_waste_and_open_state():
    cache = _cache(1, 2, 4, 3, 16, block_size=4, num_blocks=8, dtype=torch.float32)
    row = cache.acquire_row()
    merge = torch.tensor([[[0.0, 0, 0, 0, 0, 0], [0, 1, 1, 0, 1, 1]]])
    cache.commit(torch.tensor([row]), 0, torch.randn(1, 2, 6, 4), torch.randn(1, 2, 6, 4), merge,
                 torch.tensor([6]))
    cache.positions[row] = 6
    report = cache.memory()
    slot = 2 * 4 * 4  # key + value, head dim 4, fp32
    assert report.slots == 8 and report.logical == 8 * slot
    assert report.allocated == 3 * 4 * slot and report.waste == 4 * slot
    assert report.vanilla == 12 * slot and report.compression_ratio == pytest.approx(1.5)
    assert report.open_state == 2 * (3 * 9 * 4 + 8)  # 2 heads x (ring of W=3 entries + pointer)


@pytest.mark.parametrize("field,key", [("block_size", "engine.block_size"),
                                       ("num_blocks", "engine.num_blocks"),
                                       ("max_sequences", "engine.max_batch_size"),
                                       ("max_sequence_length", "engine.max_sequence_length")])
def test_bad_layout_names_its_key_in_conf_generate(field, key):
    sizes = dict(block_size=2, num_blocks=4, max_sequences=1, max_sequence_length=8)
    message = f"^cache {field} \\({key} in the engine config\\) must be >= 1"
    with pytest.raises(ValueError, match=message):
        CacheLayout(num_layers=1, kv_heads=1, head_dim=4, window=None, **{**sizes, field: 0})
