"""Process groups and seeding for megatron-core, on GPU (NCCL) or CPU (gloo)."""

from __future__ import annotations

import os
import socket
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

from nemo_dmc.megatron.cpu_shims import apply_cpu_shims


def initialize(tensor_parallel_size: int = 1, seed: int = 1234,
               pipeline_parallel_size: int = 1,
               virtual_pipeline_parallel_size: Optional[int] = None) -> None:
    """Initialise ``torch.distributed`` (from torchrun/SLURM env, or a single process),
    megatron's model-parallel groups (tensor x pipeline, the rest data parallel) and RNG
    tracker; ``virtual_pipeline_parallel_size``: model chunks per stage (interleaved).

    A world of one process (no launcher, or a launcher with one task) rendezvouses on its
    own :func:`loopback_store`, whatever ``MASTER_PORT`` it inherited; a larger world uses
    the launcher's ``MASTER_ADDR``/``MASTER_PORT``.

    Raises ``ValueError`` if the world size is not divisible by ``tensor_parallel_size x
    pipeline_parallel_size``.
    """
    apply_cpu_shims()
    if not dist.is_initialized():
        rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0)))
        world = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", 1)))
        if torch.cuda.is_available():
            local_rank = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0)))
            torch.cuda.set_device(local_rank)
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if world == 1:  # nobody to meet: a private store, so concurrent commands never collide
            dist.init_process_group(backend=backend, store=loopback_store(), rank=0,
                                    world_size=1)
        else:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", "29533")
            dist.init_process_group(backend=backend, rank=rank, world_size=world)
    world = dist.get_world_size()
    if world % (tensor_parallel_size * pipeline_parallel_size):
        raise ValueError(f"world size {world} is not divisible by "
                         f"parallel.tensor_model_parallel_size={tensor_parallel_size} x "
                         f"parallel.pipeline_model_parallel_size={pipeline_parallel_size}")
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_parallel_size,
        pipeline_model_parallel_size=pipeline_parallel_size,
        virtual_pipeline_model_parallel_size=virtual_pipeline_parallel_size)
    seed_all(seed)


def loopback_store() -> dist.TCPStore:
    """The rendezvous store of a one-process world, listening on the loopback interface only,
    on a port the kernel picks and the store keeps from bind to close (no other process can
    take it in between). ``MASTER_ADDR``/``MASTER_PORT`` are set to it."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    port = sock.getsockname()[1]
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    return dist.TCPStore("127.0.0.1", port, world_size=1, is_master=True,
                         master_listen_fd=sock.detach())


def seed_all(seed: int) -> None:
    """Seed torch's default generator (same on all TP ranks) and megatron's RNG tracker."""
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def shutdown() -> None:
    """Destroy megatron's groups and the process group (if any)."""
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
