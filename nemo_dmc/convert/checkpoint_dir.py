"""Weights-only checkpoint directories: ``weights/`` (megatron dist_checkpointing, keys
prefixed ``module.`` as in NeMo 2) beside ``model_config.yaml`` (our model shape).

Any tensor-parallel size can load them (dist_checkpointing reshards);
:func:`load_weights_checkpoint` also reads the weights of trainer and NeMo 2 checkpoints.
"""

from __future__ import annotations

import shutil
from dataclasses import asdict, fields
from pathlib import Path

import torch.distributed as dist
import yaml
from megatron.core import dist_checkpointing
from torch import nn

from nemo_dmc.megatron.model import ModelConfig

MODEL_CONFIG_FILE = "model_config.yaml"
WEIGHTS_DIR = "weights"


def save_weights_checkpoint(model: nn.Module, model_config: ModelConfig, output: Path) -> Path:
    """Write ``output/{weights,model_config.yaml}`` atomically (temp dir, then rename).

    All ranks must call it. An existing ``output`` is replaced only once the new one is
    complete.
    """
    output = Path(output)
    tmp = output.with_name(f".tmp-{output.name}")
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    if rank0:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / WEIGHTS_DIR).mkdir(parents=True)
        (tmp / MODEL_CONFIG_FILE).write_text(yaml.safe_dump(asdict(model_config), sort_keys=False))
    if dist.is_initialized():
        dist.barrier()
    dist_checkpointing.save({"model": model.sharded_state_dict(prefix="module.")},
                            str(tmp / WEIGHTS_DIR))
    if dist.is_initialized():
        dist.barrier()
    if rank0:
        shutil.rmtree(output, ignore_errors=True)
        tmp.rename(output)
    if dist.is_initialized():
        dist.barrier()
    return output


def read_model_config(checkpoint: Path) -> ModelConfig:
    """The :class:`ModelConfig` stored beside a weights checkpoint."""
    path = Path(checkpoint) / MODEL_CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: not a nemo-dmc weights checkpoint")
    data = yaml.safe_load(path.read_text()) or {}
    known = {f.name for f in fields(ModelConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{path}: unknown model config keys {unknown}")
    return ModelConfig(**data)


def load_weights_checkpoint(model: nn.Module, checkpoint: Path) -> Path:
    """Load only the model weights of a checkpoint, at any TP size; return the dir read.

    ``checkpoint``: a weights checkpoint or NeMo 2 checkpoint (``weights/`` inside), or a
    dist_checkpointing directory of the trainer (model keys ``module.*``). ``model`` is a
    megatron GPT model, bare or wrapped in megatron's DDP.
    """
    checkpoint = Path(checkpoint)
    source = checkpoint / WEIGHTS_DIR if (checkpoint / WEIGHTS_DIR).is_dir() else checkpoint
    if not (source / "metadata.json").is_file():
        raise FileNotFoundError(f"no dist_checkpointing checkpoint at {source} "
                                "(metadata.json missing)")
    bare = getattr(model, "module", model)
    loaded = dist_checkpointing.load({"model": bare.sharded_state_dict(prefix="module.")},
                                     str(source))
    bare.load_state_dict({k.removeprefix("module."): v for k, v in loaded["model"].items()})
    return source
