"""The one dispatch point between the Triton kernels and their PyTorch references.

Each public function here takes the same arguments as its reference and runs the Triton
kernel when :func:`use_triton` says so, else the reference. ``NEMO_DMC_KERNELS`` overrides
the choice: ``auto`` (default: Triton for CUDA tensors), ``torch`` (always the reference) or
``triton`` (always Triton; on CPU this needs ``TRITON_INTERPRET=1``, as in the tests).
"""

from __future__ import annotations

import os
from functools import lru_cache

import torch

_MODES = ("auto", "torch", "triton")


@lru_cache(maxsize=1)
def triton_available() -> bool:
    """Whether ``triton`` imports (it is a dependency, but a broken install must not crash)."""
    try:
        import triton  # noqa: F401
    except Exception:  # pragma: no cover - environment dependent
        return False
    return True


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
