"""Saving and restoring the trainer's state with megatron-core ``dist_checkpointing``.

Layout: ``<checkpoint dir>/<stage>/step_<NNNNNNN>/`` (a ``torch_dist`` checkpoint; found and
read by :mod:`nemo_dmc.checkpoints.run_dir`). Model and optimizer state are sharded tensors
keyed like the model (``module.*``, NeMo 2's layout), so a checkpoint saved at one
tensor-, pipeline- or data-parallel layout loads at another. Scheduler and progress live in the common state; RNG
states are sharded objects per data-parallel rank (and per TP rank for megatron's
model-parallel tracker). A save is written to ``.tmp-step_<N>`` and renamed into place when
complete, so a killed run never leaves a partial ``step_*`` directory.
"""

from __future__ import annotations

import random
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.distributed import DistributedDataParallel
from megatron.core.optimizer import MegatronOptimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from nemo_dmc.checkpoints.atomic import atomic_checkpoint_dir, is_rank0
from nemo_dmc.checkpoints.run_dir import (
    DamagedCheckpointError,
    Progress,
    checkpoint_damage,
    list_checkpoints,
    read_progress,
    step_dir_name,
)
from nemo_dmc.checkpoints.safe_load import load_dist_checkpoint
from nemo_dmc.training.optim import prime_state_for_loading


def _rng_objects(progress: Progress, include_common: bool, include_tracker: bool) -> Dict[str, Any]:
    """RNG states as sharded objects.

    The default generators (torch, CUDA, numpy, python) are identical on the TP ranks of a DP
    rank, so one copy per DP rank (and pipeline stage) is kept: it restores at any TP size.
    megatron's model-parallel tracker differs per TP rank and restores only at the same
    layout. Without a pipeline the objects keep the shapes of checkpoints that predate it.
    """
    tp, tp_rank = progress.tensor_parallel_size, parallel_state.get_tensor_model_parallel_rank()
    dp, dp_rank = progress.data_parallel_size, parallel_state.get_data_parallel_rank()
    pp, pp_rank = progress.pipeline_parallel_size, parallel_state.get_pipeline_model_parallel_rank()
    stage = ((pp,), (pp_rank,)) if pp > 1 else ((), ())
    out: Dict[str, Any] = {}
    if include_common:
        state = {"torch": torch.get_rng_state(), "random": random.getstate(),
                 "numpy": np.random.get_state(),
                 "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
        out["rng"] = ShardedObject("rng_state.default", state, (*stage[0], dp),
                                   (*stage[1], dp_rank), replica_id=tp_rank)
    if include_tracker:
        tracker = tensor_parallel.get_cuda_rng_tracker().get_states()
        out["rng_tracker"] = ShardedObject("rng_state.tracker", tracker, (tp, *stage[0], dp),
                                           (tp_rank, *stage[1], dp_rank))
    return out


def _restore_rng(loaded: Dict[str, Any]) -> None:
    if "rng" in loaded:
        state = loaded["rng"]
        torch.set_rng_state(state["torch"])
        random.setstate(state["random"])
        np.random.set_state(state["numpy"])
        if state["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])
    if "rng_tracker" in loaded:
        tensor_parallel.get_cuda_rng_tracker().set_states(loaded["rng_tracker"])


def _load_model_state(model: DistributedDataParallel, state: Dict[str, Any]) -> None:
    """Load a state keyed like the DDP wrapper's sharded state (``module.*``) into the
    wrapped model (megatron's DDP forwards ``load_state_dict`` without the prefix); model
    chunks (``chunks``) each from their ``chunk<i>`` part."""
    for index, chunk in enumerate(getattr(model, "chunks", None) or [model]):
        part = state[f"chunk{index}"] if hasattr(model, "chunks") else state
        chunk.module.load_state_dict({key.removeprefix("module."): value
                                      for key, value in part.items()})


def _training_state(model: DistributedDataParallel, optimizer: MegatronOptimizer, is_loading: bool) -> Dict[str, Any]:
    model_state = model.sharded_state_dict()
    return {"model": model_state,
            "optimizer": optimizer.sharded_state_dict(model_state, is_loading=is_loading)}


def save_checkpoint(stage_dir: Path, model: DistributedDataParallel, optimizer: MegatronOptimizer,
                    scheduler: OptimizerParamScheduler, progress: Progress, keep_last: int) -> Path:
    """Save atomically to ``stage_dir/step_<N>`` (all ranks call) and keep the newest
    ``keep_last`` checkpoints of the stage."""
    final = stage_dir / step_dir_name(progress.step)
    with atomic_checkpoint_dir(final) as tmp:
        state = _training_state(model, optimizer, is_loading=False)
        state.update(_rng_objects(progress, include_common=True, include_tracker=True))
        state["scheduler"] = scheduler.state_dict()
        state["progress"] = asdict(progress)
        dist_checkpointing.save(state, str(tmp))
    if is_rank0():
        for _, old in list_checkpoints(stage_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def load_checkpoint(path: Path, model: DistributedDataParallel, optimizer: MegatronOptimizer,
                    scheduler: OptimizerParamScheduler) -> Progress:
    """Restore model, optimizer, scheduler and RNG from ``path``; return its progress.

    RNG states are restored when the data- and pipeline-parallel sizes match the checkpoint's
    (the model-parallel tracker only when the tensor-parallel size matches too). A checkpoint
    with a missing or truncated file raises :class:`DamagedCheckpointError` naming it,
    before anything is loaded.
    """
    problem = checkpoint_damage(path)
    if problem is not None:
        raise DamagedCheckpointError(problem)
    saved = read_progress(path)
    now = Progress(**{**asdict(saved),
                      "tensor_parallel_size": parallel_state.get_tensor_model_parallel_world_size(),
                      "data_parallel_size": parallel_state.get_data_parallel_world_size(),
                      "pipeline_parallel_size":
                          parallel_state.get_pipeline_model_parallel_world_size()})
    same_dp_pp = (saved.data_parallel_size == now.data_parallel_size
                  and saved.pipeline_parallel_size == now.pipeline_parallel_size)
    same_tp = saved.tensor_parallel_size == now.tensor_parallel_size
    prime_state_for_loading(optimizer)
    request = _training_state(model, optimizer, is_loading=True)
    request.update(_rng_objects(now, include_common=same_dp_pp,
                                include_tracker=same_dp_pp and same_tp))
    loaded = load_dist_checkpoint(request, path)
    _load_model_state(model, loaded["model"])
    optimizer.load_state_dict(loaded["optimizer"])
    scheduler.load_state_dict(loaded["scheduler"])
    _restore_rng(loaded)
    return saved
