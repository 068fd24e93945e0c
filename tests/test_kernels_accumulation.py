"""Triton partial accumulation (nemo_dmc.kernels) == the pure-torch reference, values and grads.

On CPU the kernels run under TRITON_INTERPRET=1 (tests/conftest.py); sizes stay tiny.
"""

import pytest
import torch

from nemo_dmc.core import partial_accumulate as reference
from nemo_dmc.kernels import dispatch
from nemo_dmc.kernels.partial_accumulation import partial_accumulate as kernel

SMALL_BLOCKS = dict(block_s=8, block_d=8)  # several row chunks and channel blocks at tiny sizes


def _inputs(shape, dtype=torch.float32, hard=False, seed=0, device="cpu"):
    b, h, s, d = shape
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, h, s, d, generator=g).to(device, dtype)
    alpha = (torch.rand(b, h, s, generator=g) > 0.4).float() if hard else torch.rand(b, h, s, generator=g)
    alpha[..., 0] = 0
    omega = torch.rand(b, h, s, generator=g) * 0.9 + 0.1
    return [t.to(device).requires_grad_() for t in (x, alpha.to(device), omega.to(device))]


def _grads(fn, inputs, window, grad_seed=1):
    out = fn(*inputs, window)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed)).to(out)
    grads = torch.autograd.grad(out, inputs, g, allow_unused=True)
    return out, [torch.zeros_like(t) if d is None else d for t, d in zip(inputs, grads)]


def _assert_matches(shape, window, dtype=torch.float32, hard=False, atol=2e-5, rtol=1e-4):
    inputs = _inputs(shape, dtype, hard)
    out, grads = _grads(lambda *a: kernel(*a, **SMALL_BLOCKS), inputs, window)
    ref_inputs = [t.detach().clone().requires_grad_() for t in inputs]
    ref_out, ref_grads = _grads(reference, ref_inputs, window)
    assert out.dtype == ref_out.dtype and out.shape == ref_out.shape
    torch.testing.assert_close(out, ref_out, atol=atol, rtol=rtol)
    for name, got, want in zip(("x", "alpha", "omega"), grads, ref_grads):
        assert torch.isfinite(got).all(), name
        torch.testing.assert_close(got, want, atol=atol, rtol=rtol, msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("seq,window", [(1, 12), (9, 1), (11, 2), (13, 12), (5, 20)])
def test_windowed_kernel_matches_reference_fp32(seq, window):
    _assert_matches((1, 2, seq, 5), window)


@pytest.mark.parametrize("seq", [1, 7, 19])
def test_unbounded_kernel_matches_reference_fp32(seq):
    _assert_matches((2, 1, seq, 6), None)


@pytest.mark.parametrize("window", [2, None])
def test_kernel_matches_reference_with_hard_decisions(window):
    _assert_matches((1, 1, 17, 4), window, hard=True)


@pytest.mark.parametrize("window", [3, None])
def test_kernel_matches_reference_bf16(window):
    _assert_matches((1, 1, 10, 8), window, dtype=torch.bfloat16, atol=2e-2, rtol=2e-2)


def test_dispatch_runs_kernel_when_forced(monkeypatch):
    calls = []
    import nemo_dmc.kernels.partial_accumulation as module

    monkeypatch.setattr(module.PartialAccumulation, "apply",
                        lambda *a: calls.append(a) or reference(*a[:4]))
    monkeypatch.setenv("NEMO_DMC_KERNELS", "triton")
    x, alpha, omega = _inputs((1, 1, 4, 2))
    dispatch.partial_accumulate(x, alpha, omega, 2)
    assert len(calls) == 1
    monkeypatch.setenv("NEMO_DMC_KERNELS", "torch")
    dispatch.partial_accumulate(x, alpha, omega, 2)
    assert len(calls) == 1


def test_dispatch_keeps_fp64_on_reference(monkeypatch):
    monkeypatch.setenv("NEMO_DMC_KERNELS", "triton")
    x, alpha, omega = (t.double() for t in _inputs((1, 1, 6, 3)))
    torch.testing.assert_close(dispatch.partial_accumulate(x, alpha, omega, 4),
                               reference(x, alpha, omega, 4), rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("window", [12, None])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_matches_reference_on_cuda(window, dtype):
    inputs = _inputs((2, 4, 1000, 256), dtype, device="cuda")
    out, grads = _grads(kernel, inputs, window)
    ref_inputs = [t.detach().clone().requires_grad_() for t in inputs]
    ref_out, ref_grads = _grads(reference, ref_inputs, window)
    tol = dict(atol=1e-4, rtol=1e-3) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(out, ref_out, **tol)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, **tol)
