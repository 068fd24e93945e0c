"""The one dispatch point between the Triton kernels and their PyTorch references.

Each public function here takes the same arguments as its reference and runs the Triton
kernel when :func:`use_triton` says so, else the reference. ``NEMO_DMC_KERNELS`` overrides
the choice: ``auto`` (default: Triton for CUDA tensors), ``torch`` (always the reference) or
``triton`` (always Triton; on CPU this needs ``TRITON_INTERPRET=1``, as in the tests).
"""

from __future__ import annotations

import os
from functools import lru_cache
from importlib import import_module
from importlib.util import find_spec
from types import ModuleType

import torch

_MODES = ("auto", "torch", "triton")


@lru_cache(maxsize=1)
def triton_available() -> bool:
    """Whether ``triton`` imports (it is a dependency, but a broken install must not crash)
    and the kernels sit beside this module (an HF export bundles this file without them)."""
    try:
        import triton  # noqa: F401
    except Exception:  # pragma: no cover - environment dependent
        return False
    return bool(__package__) and find_spec(f"{__package__}.decode_attention") is not None


def _kernel(module: str) -> ModuleType:
    """The Triton kernel module ``module`` beside this one (imported by name, so that code
    bundles, which omit the kernels, list no import of them)."""
    return import_module(f".{module}", __package__)


def kernel_mode() -> str:
    """The ``NEMO_DMC_KERNELS`` setting, checked."""
    mode = os.environ.get("NEMO_DMC_KERNELS", "auto").lower()
    if mode not in _MODES:
        raise ValueError(f"NEMO_DMC_KERNELS must be one of {_MODES}, got {mode!r}")
    return mode


def use_triton(tensor: torch.Tensor) -> bool:
    """Whether the kernels should run in Triton for inputs like ``tensor``."""
    mode = kernel_mode()
    if mode == "torch" or not triton_available():
        return False
    if mode == "triton":
        return True
    return tensor.is_cuda


# -- training: partial accumulation and DMC attention -------------------------------------------

_TRAINING_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def partial_accumulate(x: torch.Tensor, alpha: torch.Tensor, omega: torch.Tensor,
                       window) -> torch.Tensor:
    """Partial accumulation of keys/values; see :func:`nemo_dmc.core.partial_accumulate`.
    fp64 inputs always take the reference."""
    if use_triton(x) and x.dtype in _TRAINING_DTYPES:
        return _kernel("partial_accumulation").partial_accumulate(x, alpha, omega, window)
    from nemo_dmc.core.accumulation import partial_accumulate as reference

    return reference(x, alpha, omega, window)


def _max_head_dim(dtype: torch.dtype) -> int:
    """Largest head dim of the fused attention kernel: its (64, 64)-tiles of fp32 at head dim
    256 need ~340 KB of shared memory on sm_90 (limit 227 KB); 16-bit ones fit up to 256."""
    return 128 if dtype == torch.float32 else 256


def dmc_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  state_bias: torch.Tensor, softmax_scale=None, mask=None,
                  dropout_p: float = 0.0, bias_window: int = 0) -> torch.Tensor:
    """Causal attention with the DMC per-key bias (applied where ``t - i > bias_window``:
    DMS's window); see :func:`nemo_dmc.core.dmc_attention`. The fused kernel covers the
    training case (no extra mask, no dropout, equal q/k/v dtypes other than fp64); anything
    else takes the reference."""
    fused = (mask is None and dropout_p == 0.0 and query.dtype in _TRAINING_DTYPES
             and query.dtype == key.dtype == value.dtype
             and query.shape[-1] <= _max_head_dim(query.dtype)
             and query.shape[0] * query.shape[1] <= 65535)  # the kernel's grid axis 1
    if fused and use_triton(query):
        kernel = _kernel("dmc_attention").dmc_attention
        return kernel(query, key, value, state_bias, softmax_scale, bias_window=bias_window)
    from nemo_dmc.core.attention import dmc_attention as reference

    return reference(query, key, value, state_bias, softmax_scale, mask, dropout_p, bias_window)


# -- inference: decode step ---------------------------------------------------------------------

_DECODE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def paged_decode_attention(query: torch.Tensor, key_pool: torch.Tensor,
                           value_pool: torch.Tensor, block_tables: torch.Tensor,
                           lengths: torch.Tensor, scale: float, workspace=None,
                           max_slots=None) -> torch.Tensor:
    """Decode attention over the per-head paged cache; see
    :func:`nemo_dmc.kernels.references.paged_decode_attention` (``workspace`` is used by the
    reference only, ``max_slots``, a bound of ``lengths``, by the kernel only). fp64 pools
    always take the reference."""
    if (use_triton(query) and key_pool.dtype in _DECODE_DTYPES
            and value_pool.dtype == key_pool.dtype and query.dtype in _DECODE_DTYPES):
        kernel = _kernel("decode_attention").paged_decode_attention
        return kernel(query, key_pool, value_pool, block_tables, lengths, scale, max_slots)
    from nemo_dmc.kernels.references import paged_decode_attention as reference

    return reference(query, key_pool, value_pool, block_tables, lengths, scale, workspace)


def decode_cache_update(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        positions: torch.Tensor, rows: torch.Tensor, open_runs: torch.Tensor,
                        ring_next: torch.Tensor, lengths: torch.Tensor,
                        block_tables: torch.Tensor, key_pool: torch.Tensor,
                        value_pool: torch.Tensor, free, tables, config, window,
                        signals=None) -> None:
    """Fused cache update of one decode token per sequence; see
    :func:`nemo_dmc.kernels.references.decode_cache_update` (``signals``: the decision
    adapter's ``[b, hk, 2]`` for ``decision_source="adapter"``). fp64 caches take the
    reference."""
    if (use_triton(key) and key_pool.dtype in _DECODE_DTYPES
            and open_runs.dtype == torch.float32):
        kernel = _kernel("cache_update").decode_cache_update
    else:
        from nemo_dmc.kernels.references import decode_cache_update as kernel
    kernel(query, key, value, positions, rows, open_runs, ring_next, lengths, block_tables,
           key_pool, value_pool, free, tables, config, window, signals)
