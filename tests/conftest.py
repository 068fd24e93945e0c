"""Shared fixtures: a single-process megatron (TP=1) and tiny model shapes."""

import os
import warnings

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")
# Triton reads TRITON_INTERPRET when it is imported: without a GPU, run kernels in its
# interpreter on CPU tensors (tests/test_kernels_*). Must precede any import of triton.
if os.environ.get("CUDA_VISIBLE_DEVICES") == "" or not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("TRITON_INTERPRET", "1")
warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine|unified memory).*")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than ~30 s on a 2-core CPU")
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def megatron_tp1():
    """megatron parallel state for one process (TP=1), torn down after the test."""
    from nemo_dmc.megatron import parallel
    from nemo_dmc.training.launch import free_port

    os.environ["MASTER_PORT"] = str(free_port())
    parallel.initialize(tensor_parallel_size=1, seed=1234)
    yield
    parallel.shutdown()

