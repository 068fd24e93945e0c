"""Run a function on N gloo processes (torch.multiprocessing) and re-raise worker failures."""

from __future__ import annotations

import os
import traceback
from typing import Any, Callable

import torch.multiprocessing as mp

from nemo_dmc.training.launch import free_port


def _worker(rank: int, world: int, port: int, fn: Callable, args: tuple, errors) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    try:
        fn(rank, world, *args)
    except BaseException:  # report every failure, assertion or crash, to the parent
        errors.put(f"rank {rank}:\n{traceback.format_exc()}")
        raise


def run_distributed(fn: Callable[..., Any], world_size: int, *args: Any) -> None:
    """Call ``fn(rank, world_size, *args)`` in ``world_size`` spawned processes."""
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    port = free_port()
    try:
        mp.start_processes(_worker, args=(world_size, port, fn, args, errors),
                           nprocs=world_size, start_method="spawn")
    except Exception as exc:
        details = [] if errors.empty() else [errors.get()]
        raise AssertionError("distributed worker failed:\n" + "\n".join(details)) from exc
