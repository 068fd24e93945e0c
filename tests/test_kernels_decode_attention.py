"""The Triton paged decode attention (flash-decoding over the per-head cache) against its
PyTorch reference; on CPU it runs under ``TRITON_INTERPRET=1`` (see conftest)."""

import pytest
import torch

from nemo_dmc.kernels import dispatch, references
from nemo_dmc.kernels.decode_attention import paged_decode_attention

TOLERANCE = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def _paged(lengths, hq, d=16, bs=16, dtype=torch.float32, seed=0):
    """Random pools and shuffled block tables for ``lengths [b, hk]`` (unused blocks = -1)."""
    g = torch.Generator().manual_seed(seed)
    b, hk = lengths.shape
    m = max(1, -(-int(lengths.max()) // bs)) + 1  # one spare table column stays -1
    n = b * hk * m + 3
    key_pool = torch.randn(n, bs, d, generator=g).to(dtype)
    value_pool = torch.randn(n, bs, d, generator=g).to(dtype)
    ids = torch.randperm(n, generator=g)[:b * hk * m].view(b, hk, m)
    used = torch.arange(m) < (-(-lengths // bs)).unsqueeze(-1)
    tables = torch.where(used, ids, -1)
    query = torch.randn(b, hq, d, generator=g).to(dtype)
    return query, key_pool, value_pool, tables


def _check(lengths, hq, dtype=torch.float32, split=16, **kw):
    lengths = torch.as_tensor(lengths)
    query, kp, vp, tables = _paged(lengths, hq, dtype=dtype, **kw)
    scale = query.shape[-1] ** -0.5
    out = paged_decode_attention(query, kp, vp, tables, lengths, scale, split=split)
    ref = references.paged_decode_attention(query, kp, vp, tables, lengths, scale)
    assert out.dtype == ref.dtype == kp.dtype
    torch.testing.assert_close(out.float(), ref.float(), **TOLERANCE[dtype])
    return out


@pytest.mark.parametrize("ratio", [1, 2, 4, 8])
def test_gqa_groups_match_reference_across_block_boundaries(ratio):
    # lengths on both sides of one and two 16-slot pages, several splits per head
    _check([[15, 16], [17, 31], [32, 33]][: 3 if ratio < 8 else 2], hq=2 * ratio)


@pytest.mark.parametrize("block_size", [4, 16, 32])
def test_any_page_size_matches_reference(block_size):
    _check([[1, 9, 40]], hq=3, bs=block_size)


def test_heads_of_length_one_and_a_single_split_match_reference():
    _check([[1, 1], [1, 2]], hq=4, split=64)


def test_a_head_of_length_zero_gives_zeros_and_leaves_the_others_exact():
    out = _check([[0, 5], [3, 0]], hq=4)
    assert torch.all(out[0, :2] == 0) and torch.all(out[1, 2:] == 0)
    assert out[0, 2:].abs().sum() > 0


def test_bf16_matches_reference_within_bf16_precision():
    _check([[15, 33], [17, 2]], hq=8, dtype=torch.bfloat16)


def test_splits_past_a_head_end_do_not_change_the_result():
    lengths = torch.tensor([[20, 3]])
    query, kp, vp, tables = _paged(lengths, 4)
    a = paged_decode_attention(query, kp, vp, tables, lengths, 0.25, max_slots=20, split=16)
    b = paged_decode_attention(query, kp, vp, tables, lengths, 0.25, max_slots=400, split=16)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_wrong_slots_would_be_detected():
    # guards the comparison: a pool change inside a head's length changes the output
    lengths = torch.tensor([[17]])
    query, kp, vp, tables = _paged(lengths, 2)
    before = paged_decode_attention(query, kp, vp, tables, lengths, 1.0, split=16)
    vp[tables[0, 0, 1], 0] += 10.0  # slot 16: the second page's first slot
    after = paged_decode_attention(query, kp, vp, tables, lengths, 1.0, split=16)
    assert (after - before).abs().max() > 1e-3


def test_dispatch_picks_triton_when_forced_and_the_reference_for_fp64(monkeypatch):
    lengths = torch.tensor([[5, 9]])
    query, kp, vp, tables = _paged(lengths, 4)
    calls = []
    import nemo_dmc.kernels.decode_attention as module

    monkeypatch.setattr(module, "paged_decode_attention",
                        lambda *a, **k: calls.append(1) or torch.zeros(1))
    monkeypatch.setenv("NEMO_DMC_KERNELS", "triton")
    dispatch.paged_decode_attention(query, kp, vp, tables, lengths, 0.5)
    assert calls == [1]
    dispatch.paged_decode_attention(query.double(), kp.double(), vp.double(), tables, lengths,
                                    0.5)
    monkeypatch.setenv("NEMO_DMC_KERNELS", "torch")
    dispatch.paged_decode_attention(query, kp, vp, tables, lengths, 0.5)
    assert calls == [1]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_kernel_matches_reference_at_default_splits(dtype):
    lengths = torch.randint(1, 700, (4, 4), generator=torch.Generator().manual_seed(3))
    query, kp, vp, tables = (t.cuda() for t in _paged(lengths, 16, d=128, dtype=dtype))
    lengths = lengths.cuda()
    out = paged_decode_attention(query, kp, vp, tables, lengths, 0.1)
    ref = references.paged_decode_attention(query, kp, vp, tables, lengths, 0.1)
    torch.testing.assert_close(out.float(), ref.float(), **TOLERANCE[dtype])
