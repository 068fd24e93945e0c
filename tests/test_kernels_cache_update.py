"""The fused Triton cache update of one decode step against its PyTorch reference (CPU runs
use ``TRITON_INTERPRET=1``, see conftest), and the engine with Triton vs torch kernels."""

from dataclasses import dataclass

import pytest
import torch

from nemo_dmc.core import DMCConfig, rotate_half_rope
from nemo_dmc.kernels import references
from nemo_dmc.kernels.cache_update import decode_cache_update
from nemo_dmc.kvcache import ops

BS, D = 16, 16


@dataclass
class _State:
    """One layer's cache (``rows`` rows, ``hk`` heads) plus the free stack."""

    open_runs: torch.Tensor
    ring_next: torch.Tensor
    lengths: torch.Tensor
    block_tables: torch.Tensor
    key_pool: torch.Tensor
    value_pool: torch.Tensor
    free: references.FreeBlocks

    def clone(self) -> "_State":
        free = references.FreeBlocks(self.free.ids.clone(), self.free.top, self.free.taken.clone())
        return _State(*(getattr(self, f).clone() for f in
                        ("open_runs", "ring_next", "lengths", "block_tables", "key_pool",
                         "value_pool")), free)


def _state(lengths, window, dtype, seed=0):
    """Random open runs and pools; heads of ``lengths [rows, hk]`` own shuffled blocks."""
    g = torch.Generator().manual_seed(seed)
    rows, hk = lengths.shape
    m = 4
    n = rows * hk * m + 2
    order = torch.randperm(n, generator=g)
    held = -(-lengths // BS)
    tables = torch.full((rows, hk, m), -1, dtype=torch.int64)
    used = 0
    for r in range(rows):
        for h in range(hk):
            k = int(held[r, h])
            tables[r, h, :k] = order[used:used + k]
            used += k
    r_entries = ops.run_entries(window)
    runs = torch.rand(rows, hk, r_entries, 2 * D + 1, generator=g) + 0.1
    runs[..., D - 1] = 0.0  # the decision channel of stored keys is zero
    ring = torch.randint(0, r_entries, (rows, hk), generator=g)
    pool = lambda: torch.randn(n, BS, D, generator=g).to(dtype)  # noqa: E731
    free = references.FreeBlocks(order[used:].clone(), n - used, torch.zeros(1, dtype=torch.int32))
    return _State(runs, ring, lengths.clone(), tables, pool(), pool(), free)


def _token(b, hq, hk, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, D, generator=g) for h in (hq, hk, hk))
    k[..., -1] = 5.0 + 2.0 * torch.randn(b, hk, generator=g)  # about half merge, but
    k[:, 0, -1] = 0.0  # the first head appends and
    k[:, -1, -1] = 10.0 if hk > 1 else k[:, -1, -1]  # the last one merges
    q[..., -1] = 2.0 * torch.randn(b, hq, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _slots(state, rows):
    """Each head's slots ``[b, hk, t, d]`` read through its block table (zeros past its end)."""
    keys, values, valid = references.gather_slots(state.key_pool, state.value_pool,
                                                  state.block_tables[rows], state.lengths[rows])
    mask = valid.unsqueeze(-1)
    return keys * mask, values * mask


def _signals(b, hk, dtype, seed=2):
    """Decision-adapter signals ``[b, hk, 2]``: about half merge (logit ``x0 - 5``), the first
    head appends and the last one merges, as :func:`_token`'s key channel."""
    g = torch.Generator().manual_seed(seed)
    signals = torch.randn(b, hk, 2, generator=g)
    signals[..., 0] = 5.0 + 2.0 * signals[..., 0]
    signals[:, 0, 0] = 0.0
    signals[:, -1, 0] = 10.0 if hk > 1 else signals[:, -1, 0]
    return signals.to(dtype)


def _step(lengths, positions, hq, window, dtype=torch.float32, config=None, rows=None):
    """Run one decode step with the kernel and the reference on copies of one state
    (``config.decision_source="adapter"``: with :func:`_signals`)."""
    lengths, positions = torch.as_tensor(lengths), torch.as_tensor(positions)
    b, hk = lengths.shape
    state = _state(lengths, window, dtype)
    query, key, value = _token(b, hq, hk, dtype)
    rows = torch.arange(b).flip(0) if rows is None else rows  # rows in another order
    tables = ops.rope_tables(rotate_half_rope(), positions, D, dtype)
    config = config or DMCConfig(window=window)
    signals = _signals(b, hk, dtype) if config.decision_source == "adapter" else None
    out = {}
    for name, fn in (("triton", decode_cache_update), ("torch", references.decode_cache_update)):
        s = state.clone()
        fn(query, key, value, positions, rows, s.open_runs, s.ring_next, s.lengths,
           s.block_tables, s.key_pool, s.value_pool, s.free, tables, config, window, signals)
        out[name] = s
    return state, out["triton"], out["torch"], rows


def _assert_same(tri, ref, rows, dtype):
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    assert torch.equal(tri.lengths, ref.lengths)
    assert torch.equal(tri.ring_next, ref.ring_next)
    assert int(tri.free.taken) == int(ref.free.taken)
    taken = int(ref.free.taken)
    top = ref.free.top
    new_blocks = lambda s: set(s.block_tables[s.block_tables >= 0].tolist())  # noqa: E731
    assert new_blocks(tri) == new_blocks(ref)
    assert set(ref.free.ids[top - taken:top].tolist()) <= new_blocks(tri)  # the stack's top
    torch.testing.assert_close(tri.open_runs, ref.open_runs, atol=1e-6, rtol=1e-6)
    for a, b in zip(_slots(tri, rows), _slots(ref, rows)):
        torch.testing.assert_close(a.float(), b.float(), **tol)


@pytest.mark.parametrize("window", [None, 3], ids=["unbounded", "window3"])
@pytest.mark.parametrize("ratio", [1, 2, 4, 8])
def test_update_matches_reference_at_block_boundaries(window, ratio):
    # lengths around one and two 16-slot blocks; an append at 16 or 32 takes a new block
    lengths = [[15, 16], [17, 31], [32, 33]]
    before, tri, ref, rows = _step(lengths, [40, 50, 60], 2 * ratio, window)
    _assert_same(tri, ref, rows, torch.float32)
    merged = tri.lengths == before.lengths
    assert merged.any() and (~merged).any()  # both decisions were exercised
    assert int(tri.free.taken) > 0


def test_strided_positions_and_rows_are_read_by_element():
    # views, not [b] arrays: a stride-0 expansion and every other element of a longer tensor
    positions = torch.tensor(45).expand(3)
    rows = torch.tensor([2, 9, 1, 9, 0, 9])[::2]
    _, tri, ref, rows = _step([[15, 16], [17, 31], [32, 33]], positions, 4, 3, rows=rows)
    _assert_same(tri, ref, rows, torch.float32)


def test_new_sequence_heads_append_their_first_slot_into_a_new_block():
    # rows are flipped: batch entry 1 (position 0) is row 0, whose heads hold nothing yet
    before, tri, ref, rows = _step([[0, 0], [1, 16]], [7, 0], hq=4, window=2)
    _assert_same(tri, ref, rows, torch.float32)
    assert torch.all(tri.lengths[0] == 1)
    assert int(tri.free.taken) >= 2


@pytest.mark.parametrize("force", ["append", "merge"])
def test_forced_decisions_match_reference(force):
    config = DMCConfig(window=None, force_decision=force)
    before, tri, ref, rows = _step([[16, 1], [3, 32]], [20, 9], 4, None, config=config)
    _assert_same(tri, ref, rows, torch.float32)
    grew = tri.lengths - before.lengths
    assert torch.all(grew == (1 if force == "append" else 0))


@pytest.mark.parametrize("scale", [2.0, 0.75])
def test_decision_scale_matches_reference(scale):
    config = DMCConfig(window=3, decision_scale=scale)
    lengths = [[15, 16], [17, 31], [32, 33]]
    before, tri, ref, rows = _step(lengths, [40, 50, 60], 4, 3, config=config)
    _assert_same(tri, ref, rows, torch.float32)
    _, _, unscaled, _ = _step(lengths, [40, 50, 60], 4, 3)
    assert not torch.equal(ref.open_runs, unscaled.open_runs)  # the scale changed omega


@pytest.mark.parametrize("window", [None, 3], ids=["unbounded", "window3"])
@pytest.mark.parametrize("ratio", [1, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_adapter_signals_update_matches_reference(window, ratio, dtype):
    config = DMCConfig(window=window, decision_source="adapter", decision_scale=1.5)
    lengths = [[15, 16], [17, 31], [32, 33]]
    before, tri, ref, rows = _step(lengths, [40, 50, 60], 2 * ratio, window, dtype, config)
    _assert_same(tri, ref, rows, dtype)
    grew = tri.lengths - before.lengths
    assert torch.all(grew[rows, 0] == 1) and torch.all(grew[rows, -1] == 0)  # from the signals
    # importance and keys differ from the channel source's (omega from q[D-1], k[D-1] zeroed)
    _, _, channel, _ = _step(lengths, [40, 50, 60], 2 * ratio, window, dtype,
                             DMCConfig(window=window, decision_scale=1.5))
    assert torch.equal(channel.lengths, ref.lengths)  # _token's keys decide as the signals do
    assert not torch.allclose(channel.open_runs, ref.open_runs)


def test_adapter_update_keeps_key_channel_and_weighs_by_the_importance_signal():
    # an independent computation of one merge with the adapter source (unbounded run)
    config = DMCConfig(window=None, force_decision="merge", decision_source="adapter")
    before, tri, _, rows = _step([[5]], [9], 2, None, config=config)
    _, key, value = _token(1, 2, 1, torch.float32)
    omega = torch.sigmoid(_signals(1, 1, torch.float32)[0, 0, 1] + config.init_offset)
    run = before.open_runs[0, 0, 0] + omega * torch.cat([key[0, 0], value[0, 0], torch.ones(1)])
    slot = run[:-1] / run[-1]
    expected_key = rotate_half_rope()(slot[:D].view(1, 1, D), torch.tensor([9]))[0, 0]
    block = tri.block_tables[0, 0, 0]
    torch.testing.assert_close(tri.key_pool[block, 4], expected_key, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tri.value_pool[block, 4], slot[D:], atol=1e-5, rtol=1e-5)


def test_adapter_source_needs_signals():
    config = DMCConfig(window=None, decision_source="adapter")
    state = _state(torch.tensor([[3]]), None, torch.float32)
    query, key, value = _token(1, 2, 1, torch.float32)
    positions = torch.tensor([4])
    tables = ops.rope_tables(rotate_half_rope(), positions, D, torch.float32)
    for fn in (decode_cache_update, references.decode_cache_update):
        with pytest.raises(ValueError, match="adapter"):
            fn(query, key, value, positions, torch.tensor([0]), state.open_runs, state.ring_next,
               state.lengths, state.block_tables, state.key_pool, state.value_pool, state.free,
               tables, config, None)


def test_bf16_pools_match_reference_within_bf16_precision():
    _, tri, ref, rows = _step([[15, 16], [31, 2]], [30, 40], 8, 4, dtype=torch.bfloat16)
    _assert_same(tri, ref, rows, torch.bfloat16)


def test_merged_slot_is_the_weighted_mean_of_the_ring_rotated_at_the_position():
    # guards the reference comparison with an independent computation (unbounded, merge)
    config = DMCConfig(window=None, force_decision="merge")
    before, tri, _, rows = _step([[5]], [9], 2, None, config=config)
    query, key, value = _token(1, 2, 1, torch.float32)
    omega = torch.sigmoid(query[0, :, -1].mean() + config.init_offset)
    k = torch.cat([key[0, 0, :-1], torch.zeros(1)])
    run = before.open_runs[0, 0, 0] + omega * torch.cat([k, value[0, 0], torch.ones(1)])
    slot = run[:-1] / run[-1]
    expected_key = rotate_half_rope()(slot[:D].view(1, 1, D), torch.tensor([9]))[0, 0]
    block = tri.block_tables[0, 0, 0]
    torch.testing.assert_close(tri.key_pool[block, 4], expected_key, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tri.value_pool[block, 4], slot[D:], atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("source", ["channel", "adapter"])
@pytest.mark.parametrize("window", [None, 12], ids=["unbounded", "window12"])
def test_cuda_kernel_matches_reference(window, source):
    lengths = torch.tensor([[15, 16, 17, 1], [31, 32, 33, 64]])
    state = _state(lengths, window, torch.bfloat16)
    state = _State(*(t.cuda() for t in (state.open_runs, state.ring_next, state.lengths,
                                        state.block_tables, state.key_pool, state.value_pool)),
                   references.FreeBlocks(state.free.ids.cuda(), state.free.top,
                                         state.free.taken.cuda()))
    query, key, value = (t.cuda() for t in _token(2, 16, 4, torch.bfloat16))
    positions, rows = torch.tensor([70, 90]).cuda(), torch.tensor([1, 0]).cuda()
    tables = ops.rope_tables(rotate_half_rope(), positions, D, torch.bfloat16)
    config = DMCConfig(window=window, decision_source=source)
    signals = _signals(2, 4, torch.bfloat16).cuda() if source == "adapter" else None
    tri, ref = state.clone(), state.clone()
    for s, fn in ((tri, decode_cache_update), (ref, references.decode_cache_update)):
        fn(query, key, value, positions, rows, s.open_runs, s.ring_next, s.lengths,
           s.block_tables, s.key_pool, s.value_pool, s.free, tables, config, window, signals)
    _assert_same(tri, ref, rows, torch.bfloat16)


def test_engine_generates_the_same_tokens_with_triton_and_torch_kernels(megatron_tp1,
                                                                       monkeypatch):
    from dataclasses import replace

    from megatron_utils import TINY_GQA
    from nemo_dmc.inference import EngineConfig, InferenceEngine, SamplingParams
    from nemo_dmc.megatron.model import build_model
    from nemo_dmc.megatron.parallel import seed_all

    seed_all(7)
    shape = replace(TINY_GQA, num_layers=1)
    model = build_model(shape, DMCConfig(init_offset=0.0, window=3)).eval()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, shape.vocab_size, (n,), generator=g).tolist() for n in (14, 3)]
    import nemo_dmc.kernels.cache_update as update_module
    import nemo_dmc.kernels.decode_attention as attention_module

    launches = []
    for module, name in ((update_module, "decode_cache_update"),
                         (attention_module, "paged_decode_attention")):
        kernel = getattr(module, name)
        monkeypatch.setattr(module, name,
                            lambda *a, _k=kernel, **kw: launches.append(1) or _k(*a, **kw))
    results = {}
    for mode in ("torch", "triton"):
        monkeypatch.setenv("NEMO_DMC_KERNELS", mode)
        engine = InferenceEngine(model, EngineConfig(max_batch_size=2, max_sequence_length=24,
                                                     block_size=4), vocab_size=shape.vocab_size)
        out = engine.generate(prompts, SamplingParams(max_new_tokens=6))
        results[mode] = ([r.tokens for r in out], [r.cache.head_lengths for r in out])
    assert len(launches) == 5 * 2  # 5 batched decode steps x (update + attention), 1 layer
    heads = results["torch"][1][0]  # [layers, kv_heads] slots for 19 tokens, 4-slot blocks
    assert heads.min() > 4 and heads.max() < 19  # merges happened, appends crossed blocks
    assert results["triton"][0] == results["torch"][0]
    for a, b in zip(results["triton"][1], results["torch"][1]):
        assert torch.equal(a, b)
