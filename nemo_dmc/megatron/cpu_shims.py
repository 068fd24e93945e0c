"""The only place nemo_dmc patches anything: making megatron-core run on a CPU-only torch.

``apply_cpu_shims()`` does nothing when CUDA is available. On CPU it replaces a few
``torch.cuda`` entry points that megatron-core calls unconditionally, and the two places where
its pipeline-parallel code allocates on ``"cuda"`` by name. Call it before
building a megatron model (``nemo_dmc.megatron.parallel.initialize`` does).
"""

from __future__ import annotations

import functools
import types

import torch

_APPLIED = {"done": False}


def _cpu_rng_state(*_args, **_kwargs) -> torch.Tensor:
    return torch.get_rng_state()


def _noop(*_args, **_kwargs) -> None:
    return None


def apply_cpu_shims() -> None:
    """Install the CPU shims once per process; a no-op when CUDA is available."""
    if torch.cuda.is_available() or _APPLIED["done"]:
        return
    from megatron.core.tensor_parallel import random as mcore_random

    # RoPE, the tensor-parallel mappings and layer buffers allocate on
    # torch.cuda.current_device(); "cpu" is a valid device for all of them.
    torch.cuda.current_device = lambda: "cpu"
    # dist_checkpointing.save and parallel_state call synchronize(); nothing to wait for on CPU.
    torch.cuda.synchronize = _noop
    # The model-parallel RNG tracker (forked by DotProductAttention even at dropout 0, and
    # by activation recompute) reads the CUDA RNG state: hand it the CPU generator's state.
    torch.cuda.get_rng_state = _cpu_rng_state
    torch.cuda.random.get_rng_state = _cpu_rng_state
    mcore_random._get_cuda_rng_state = _cpu_rng_state
    # Setting a CUDA RNG state on CPU torch would queue a lazy CUDA call (with a stack
    # trace) forever; the CPU state itself is restored by megatron separately.
    mcore_random._set_cuda_rng_state = _noop
    _shim_pipeline_parallel()
    _APPLIED["done"] = True


class _CPUTorch(types.ModuleType):
    """``torch`` as megatron's schedules see it: ``zeros(device="cuda")`` lands on the CPU."""

    def __getattr__(self, name: str):
        return getattr(torch, name)

    @staticmethod
    def zeros(*args, device=None, **kwargs) -> torch.Tensor:
        return torch.zeros(*args, device="cpu" if device == "cuda" else device, **kwargs)


def _shim_pipeline_parallel() -> None:
    """megatron's forward/backward schedules count tokens in a ``device="cuda"`` tensor, and
    a pipeline's last stage copies the tied word embeddings with ``Tensor.cuda()`` before
    all-reducing them with the first stage's."""
    from megatron.core.models.common.language_module.language_module import LanguageModule
    from megatron.core.pipeline_parallel import schedules

    schedules.torch = _CPUTorch("torch")
    setup = LanguageModule.setup_embeddings_and_output_layer

    @functools.wraps(setup)
    def setup_on_cpu(self, *args, **kwargs):
        cuda = torch.Tensor.cuda
        torch.Tensor.cuda = lambda tensor, *_a, **_k: tensor
        try:
            return setup(self, *args, **kwargs)
        finally:
            torch.Tensor.cuda = cuda

    LanguageModule.setup_embeddings_and_output_layer = setup_on_cpu


def causal_attention_mask(seq_len: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Explicit causal mask ``[1, 1, s, s]`` (True = masked).

    megatron builds its own causal mask on device "cuda" when ``attention_mask`` is None,
    so callers always pass this one (harmless on GPU as well).
    """
    return torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).triu(1)[None, None]
