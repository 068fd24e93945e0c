"""Triton kernels of nemo-dmc (installed as ``nemo_dmc.kernels``).

Callers use :mod:`nemo_dmc.kernels.dispatch`, the one place that picks a Triton kernel (CUDA
tensors) or its PyTorch reference (everything else). The kernel modules themselves import
``triton`` and may be run on CPU tensors under ``TRITON_INTERPRET=1`` (the tests do).
"""
