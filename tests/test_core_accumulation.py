"""Partial accumulation in parallel over the sequence (nemo_dmc.core.accumulation)."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from nemo_dmc.core import linear_scan, partial_accumulate, windowed_scan


def _scan_loop(alpha, x, window=None):
    """acc_i = sum over the last `window` j<=i of prod_{m=j+1..i} alpha_m * x_j (plain loops)."""
    s = x.shape[-2]
    out = torch.zeros_like(x)
    for i in range(s):
        first = 0 if window is None else max(0, i - window + 1)
        for j in range(first, i + 1):
            w = torch.ones_like(alpha[..., 0])
            for m in range(j + 1, i + 1):
                w = w * alpha[..., m]
            out[..., i, :] += w.unsqueeze(-1) * x[..., j, :]
    return out


@pytest.mark.parametrize("seq", [1, 2, 5, 16, 33])
def test_linear_scan_matches_sequential_recursion(seq):
    alpha, x = torch.rand(2, 3, seq, dtype=torch.float64), torch.randn(2, 3, seq, 4, dtype=torch.float64)
    assert torch.allclose(linear_scan(alpha, x), _scan_loop(alpha, x))


@pytest.mark.parametrize("seq,window", [(1, 3), (7, 1), (7, 3), (13, 12), (9, 20)])
def test_windowed_scan_keeps_only_last_window_terms(seq, window):
    alpha, x = torch.rand(2, 2, seq, dtype=torch.float64), torch.randn(2, 2, seq, 3, dtype=torch.float64)
    assert torch.allclose(windowed_scan(alpha, x, window), _scan_loop(alpha, x, window))


def test_all_append_states_are_the_tokens_themselves():
    x = torch.randn(1, 2, 9, 4)
    alpha, omega = torch.zeros(1, 2, 9), torch.rand(1, 2, 9) + 0.1
    assert torch.allclose(partial_accumulate(x, alpha, omega, window=None), x)


def test_all_merge_unbounded_is_importance_weighted_prefix_mean():
    x, omega = torch.randn(1, 1, 6, 3), torch.rand(1, 1, 6) + 0.1
    alpha = torch.ones(1, 1, 6)
    alpha[..., 0] = 0
    expected = (omega.unsqueeze(-1) * x).cumsum(-2) / omega.cumsum(-1).unsqueeze(-1)
    assert torch.allclose(partial_accumulate(x, alpha, omega, window=None), expected, atol=1e-6)


def test_all_merge_windowed_averages_last_w_tokens():
    x, omega = torch.randn(1, 1, 8, 2, dtype=torch.float64), torch.rand(1, 1, 8, dtype=torch.float64) + 0.1
    alpha = torch.ones(1, 1, 8, dtype=torch.float64)
    out = partial_accumulate(x, alpha, omega, window=3)
    for i in range(8):
        j = slice(max(0, i - 2), i + 1)
        expected = (omega[0, 0, j, None] * x[0, 0, j]).sum(0) / omega[0, 0, j].sum()
        assert torch.allclose(out[0, 0, i], expected)


def test_accumulation_keeps_input_dtype_and_is_differentiable():
    x = torch.randn(1, 2, 5, 4, dtype=torch.bfloat16, requires_grad=True)
    alpha = torch.rand(1, 2, 5, requires_grad=True)
    omega = torch.rand(1, 2, 5, requires_grad=True)
    out = partial_accumulate(x, alpha, omega, window=4)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (x, alpha, omega))


class _LargestTensor(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("window", [None, 12])
def test_accumulation_never_materialises_seq_by_seq_tensor(window):
    seq, dim = 2048, 4
    x = torch.randn(1, 1, seq, dim, requires_grad=True)
    alpha = torch.rand(1, 1, seq, requires_grad=True)
    omega = torch.rand(1, 1, seq)
    with _LargestTensor() as probe:
        partial_accumulate(x, alpha, omega, window).sum().backward()
    assert probe.largest < seq * seq / 16
