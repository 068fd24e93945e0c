"""Fused DMC attention (nemo_dmc.kernels) == nemo_dmc.core.dmc_attention, values and grads.

On CPU the kernels run under TRITON_INTERPRET=1 (tests/conftest.py); sizes stay tiny.
"""

import pytest
import torch

from nemo_dmc.core import DMCConfig
from nemo_dmc.core import dmc_attention as reference
from nemo_dmc.kernels import dispatch
from nemo_dmc.kernels.dmc_attention import dmc_attention as kernel

SMALL_BLOCKS = dict(block_m=16, block_n=16, block_bwd=(16, 16, 16))


def _inputs(b, hq, hk, s, d, dtype=torch.float32, hard=False, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, s, d, generator=g) for h in (hq, hk, hk))
    if hard:
        bias = (torch.rand(b, hk, s, generator=g) > 0.5).float() * DMCConfig().hard_bias
    else:
        bias = torch.randn(b, hk, s, generator=g) - 1.0
    tensors = [t.to(device, dtype) for t in (q, k, v)] + [bias.to(device)]
    return [t.requires_grad_() for t in tensors]


def _grads(fn, inputs, seed=1):
    out = fn(*inputs)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out)
    return out, torch.autograd.grad(out, inputs, g)


def _assert_matches(inputs, atol=2e-5, rtol=1e-4, scale=None, **blocks):
    out, grads = _grads(lambda *a: kernel(*a, softmax_scale=scale, **(blocks or SMALL_BLOCKS)), inputs)
    ref_inputs = [t.detach().clone().requires_grad_() for t in inputs]
    ref_out, ref_grads = _grads(lambda *a: reference(*a, softmax_scale=scale), ref_inputs)
    assert out.dtype == ref_out.dtype and out.shape == ref_out.shape
    torch.testing.assert_close(out, ref_out, atol=atol, rtol=rtol)
    for name, got, want in zip(("q", "k", "v", "state_bias"), grads, ref_grads):
        assert torch.isfinite(got).all(), name
        assert got.dtype == want.dtype, name
        torch.testing.assert_close(got, want, atol=atol, rtol=rtol, msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("groups", [1, 2, 4, 8])
def test_kernel_matches_reference_for_gqa_ratios(groups):
    _assert_matches(_inputs(1, groups, 1, 17, 16))


@pytest.mark.parametrize("seq", [1, 16, 33])
def test_kernel_matches_reference_for_lengths_around_block_size(seq):
    _assert_matches(_inputs(seq // 16 + 1, 2, 1, seq, 16))


def test_kernel_pads_head_dim_and_takes_explicit_scale():
    _assert_matches(_inputs(1, 2, 2, 12, 24), scale=0.3)


def test_hard_bias_gives_no_nans_and_matches_reference():
    _assert_matches(_inputs(1, 2, 1, 21, 16, hard=True))


def test_kernel_matches_reference_bf16():
    _assert_matches(_inputs(1, 4, 2, 18, 32, dtype=torch.bfloat16), atol=3e-2, rtol=3e-2)


def test_kernel_reads_megatron_permuted_layout_without_copies():
    q, k, v, bias = _inputs(2, 2, 1, 17, 16)
    # [s, b, h, d] storage seen as [b, h, s, d], as BiasedCoreAttention passes it
    q, k, v = (t.detach().permute(2, 0, 1, 3).contiguous().permute(1, 2, 0, 3).requires_grad_()
               for t in (q, k, v))
    out = kernel(q, k, v, bias, **SMALL_BLOCKS)
    assert out.stride() == q.stride()
    _assert_matches([q, k, v, bias])


def test_dispatch_runs_kernel_only_without_mask_and_dropout(monkeypatch):
    calls = []
    import nemo_dmc.kernels.dmc_attention as module

    monkeypatch.setattr(module.DMCAttention, "apply",
                        lambda *a: calls.append(a) or reference(*a[:5]))
    monkeypatch.setenv("NEMO_DMC_KERNELS", "triton")
    q, k, v, bias = _inputs(1, 2, 1, 5, 16)
    dispatch.dmc_attention(q, k, v, bias)
    assert len(calls) == 1
    mask = torch.zeros(1, 1, 5, 5, dtype=torch.bool)
    dispatch.dmc_attention(q, k, v, bias, None, mask)
    dispatch.dmc_attention(q, k, v, bias, None, None, 0.1)
    assert len(calls) == 1
    monkeypatch.setenv("NEMO_DMC_KERNELS", "torch")
    dispatch.dmc_attention(q, k, v, bias)
    assert len(calls) == 1


def _assert_bf16_error_within_reference_error(inputs, factor=3.0, **blocks):
    """bf16: against the reference run in fp32 on the same (bf16-rounded) inputs, the kernel's
    largest error in the output and each gradient is at most ``factor`` x that of the
    reference run in bf16 (plus 1e-3 of the tensor's scale).

    An elementwise bf16-vs-bf16 tolerance fails on the reference's own rounding: on an H100,
    one of 8000 bias-gradient sums differed by 0.07 (of 1.05) between kernel and bf16 torch.
    """
    def run(fn, tensors):
        tensors = [t.detach().clone().requires_grad_() for t in tensors]
        out = fn(*tensors)
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
        g = g.to(inputs[0].dtype).to(out)  # the same bf16-rounded values in every run
        return [out, *torch.autograd.grad(out, tensors, g)]

    got = run(lambda *a: kernel(*a, **blocks), inputs)
    low = run(reference, inputs)
    exact = run(reference, [t.detach().float() for t in inputs])
    for name, k, r, e in zip(("out", "dq", "dk", "dv", "dstate_bias"), got, low, exact):
        assert torch.isfinite(k).all(), name
        kernel_err = (k.float() - e).abs().max().item()
        reference_err = (r.float() - e).abs().max().item()
        bound = factor * reference_err + 1e-3 * e.abs().max().item()
        assert kernel_err <= bound, f"{name}: kernel error {kernel_err:.3g} > {bound:.3g} " \
            f"({factor} x bf16 reference error {reference_err:.3g})"


@pytest.mark.gpu
@pytest.mark.parametrize("groups", [1, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_matches_reference_on_cuda(groups, dtype):
    inputs = _inputs(2, 4 * groups, 4, 1000, 128, dtype=dtype, device="cuda")
    blocks = dict(block_m=64, block_n=64, block_bwd=(32, 64, 64))
    if dtype == torch.float32:
        _assert_matches(inputs, atol=2e-4, rtol=1e-3, **blocks)
    else:
        _assert_bf16_error_within_reference_error(inputs, **blocks)


def test_bf16_criterion_passes_the_kernel_and_fails_a_perturbed_one(monkeypatch):
    """The bf16 criterion of the GPU test, under the interpreter at a small size."""
    inputs = _inputs(1, 4, 2, 40, 16, dtype=torch.bfloat16)
    _assert_bf16_error_within_reference_error(inputs, **SMALL_BLOCKS)
    exact_kernel = kernel
    monkeypatch.setitem(globals(), "kernel", lambda *a, **k: exact_kernel(*a, **k) * 1.05)
    with pytest.raises(AssertionError, match="out: kernel error"):
        _assert_bf16_error_within_reference_error(inputs, **SMALL_BLOCKS)


def test_megatron_dmc_training_step_through_kernels_matches_torch(megatron_tp1, monkeypatch):
    from megatron_utils import TINY_GQA
    from nemo_dmc.megatron.cpu_shims import causal_attention_mask
    from nemo_dmc.megatron.model import build_model
    from nemo_dmc.megatron.parallel import seed_all
    from nemo_dmc.megatron.stats import collect_dmc_stats

    import nemo_dmc.kernels.dmc_attention as attention_kernels
    import nemo_dmc.kernels.partial_accumulation as accumulation_kernels

    calls = []
    for fn in (attention_kernels.DMCAttention, accumulation_kernels.PartialAccumulation):
        monkeypatch.setattr(fn, "apply", lambda *a, _apply=fn.apply: calls.append(1) or _apply(*a))
    seed_all(3)
    model = build_model(TINY_GQA, DMCConfig(init_offset=0.0)).train()
    tokens = torch.randint(0, TINY_GQA.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    positions, mask = torch.arange(12)[None], causal_attention_mask(12)
    losses, grads = [], []
    for mode in ("torch", "triton"):
        monkeypatch.setenv("NEMO_DMC_KERNELS", mode)
        torch.manual_seed(11)  # same Gumbel noise
        loss = model(tokens, positions, mask, labels=tokens).mean()
        loss = loss + collect_dmc_stats(model).loss(4.0)
        losses.append(loss.detach())
        grads.append(torch.autograd.grad(loss, list(model.parameters())))
    assert len(calls) == 2 * TINY_GQA.num_layers  # both kernels in every layer, triton run only
    torch.testing.assert_close(losses[1], losses[0], atol=1e-5, rtol=1e-5)
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("window", [1, 5, 20], ids=lambda w: f"window{w}")
@pytest.mark.parametrize("hard", [False, True], ids=["soft", "hard"])
def test_kernel_matches_reference_with_a_windowed_bias_as_dms_uses(window, hard):
    inputs = _inputs(1, 4, 2, 37, 16, hard=hard)
    out, grads = _grads(lambda *a: kernel(*a, bias_window=window, **SMALL_BLOCKS), inputs)
    ref_inputs = [t.detach().clone().requires_grad_() for t in inputs]
    ref_out, ref_grads = _grads(lambda *a: reference(*a, bias_window=window), ref_inputs)
    torch.testing.assert_close(out, ref_out, atol=2e-5, rtol=1e-4)
    for name, got, want in zip(("q", "k", "v", "state_bias"), grads, ref_grads):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4, msg=lambda m: f"d{name}: {m}")
    assert grads[3][..., -window:].abs().max() == 0  # the last keys never left the window
