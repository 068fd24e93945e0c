"""Weights-only checkpoint directories: ``weights/`` (megatron dist_checkpointing, keys
prefixed ``module.`` as in NeMo 2) beside ``model_config.yaml`` (our model shape) and, for
imported checkpoints, ``special_tokens.yaml`` (the source's bos/eos/pad token ids) and
``dmc_config.yaml`` (the DMC settings of a model retrofitted elsewhere, e.g. NVIDIA's).

Any tensor-parallel size can load them (dist_checkpointing reshards), into a model of either
layer spec, local or Transformer Engine (megatron saves both under the same names, see
:mod:`nemo_dmc.checkpoints.layout`);
:func:`load_weights_checkpoint` also reads the weights of trainer and NeMo 2 checkpoints.
"""

from __future__ import annotations

from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, Optional

import yaml
from megatron.core import dist_checkpointing
from torch import nn

from nemo_dmc.checkpoints.atomic import atomic_checkpoint_dir, is_rank0
from nemo_dmc.checkpoints.safe_load import load_dist_checkpoint, read_metadata
from nemo_dmc.core import DMCConfig, ModelConfig
from nemo_dmc.methods import ADAPTER_MODULE, DMCMethod, settings_from_dict

MODEL_CONFIG_FILE = "model_config.yaml"
WEIGHTS_DIR = "weights"
SPECIAL_TOKENS_FILE = "special_tokens.yaml"
DMC_CONFIG_FILE = "dmc_config.yaml"
SPECIAL_TOKEN_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


def save_weights_checkpoint(model: nn.Module, model_config: ModelConfig, output: Path,
                            special_tokens: Optional[dict[str, Any]] = None,
                            dmc: Optional[DMCConfig] = None) -> Path:
    """Write ``output/{weights,model_config.yaml}`` atomically (all ranks call);
    ``special_tokens`` (:data:`SPECIAL_TOKEN_KEYS`) go to ``special_tokens.yaml``, the DMC
    settings the weights were trained with (``dmc``) to ``dmc_config.yaml``."""
    with atomic_checkpoint_dir(output, (WEIGHTS_DIR,)) as tmp:
        if is_rank0():
            (tmp / MODEL_CONFIG_FILE).write_text(yaml.safe_dump(asdict(model_config),
                                                                sort_keys=False))
            if special_tokens is not None:
                (tmp / SPECIAL_TOKENS_FILE).write_text(yaml.safe_dump(
                    {key: special_tokens.get(key) for key in SPECIAL_TOKEN_KEYS}))
            if dmc is not None:
                (tmp / DMC_CONFIG_FILE).write_text(yaml.safe_dump(asdict(dmc), sort_keys=False))
        dist_checkpointing.save({"model": model.sharded_state_dict(prefix="module.")},
                                str(tmp / WEIGHTS_DIR))
    return Path(output)


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


def read_dmc_config(checkpoint: Path) -> Optional[DMCConfig]:
    """The DMC settings recorded beside a weights checkpoint (``dmc_config.yaml``), or
    ``None`` (read as :func:`~nemo_dmc.methods.settings_from_dict` reads stored settings:
    fields the file predates take their :data:`~nemo_dmc.core.config.LEGACY_DEFAULTS`,
    unknown ones are an error)."""
    path = Path(checkpoint) / DMC_CONFIG_FILE
    if not path.is_file():
        return None
    data = yaml.safe_load(path.read_text()) or {}
    try:
        return settings_from_dict({**data, "name": "dmc"}, key="dmc")
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None


def read_special_tokens(checkpoint: Path) -> Optional[dict[str, Any]]:
    """The bos/eos/pad token ids recorded beside a weights checkpoint, or ``None``."""
    path = Path(checkpoint) / SPECIAL_TOKENS_FILE
    if not path.is_file():
        return None
    data = yaml.safe_load(path.read_text()) or {}
    return {key: data.get(key) for key in SPECIAL_TOKEN_KEYS}


def _dist_source(checkpoint: Path) -> Path:
    """The dist_checkpointing directory of a checkpoint (``weights/`` inside, or itself)."""
    checkpoint = Path(checkpoint)
    source = checkpoint / WEIGHTS_DIR if (checkpoint / WEIGHTS_DIR).is_dir() else checkpoint
    if not (source / "metadata.json").is_file():
        raise FileNotFoundError(f"no dist_checkpointing checkpoint at {source} "
                                "(metadata.json missing)")
    return source


def stores_decision_adapters(checkpoint: Path) -> bool:
    """Whether a checkpoint :func:`load_weights_checkpoint` reads holds decision-adapter
    weights (it was trained with ``dmc.decision_source=adapter``)."""
    stored = read_metadata(_dist_source(checkpoint)).state_dict_metadata
    return any(ADAPTER_MODULE in key for key in stored)


def _decides_from_channel(model: nn.Module) -> bool:
    return any(isinstance(getattr(m, "method", None), DMCMethod)
               and m.method.settings.decision_source == "channel" for m in model.modules())


def load_weights_checkpoint(model: nn.Module, checkpoint: Path) -> Path:
    """Load only the model weights of a checkpoint, at any TP size; return the dir read.

    ``checkpoint``: a weights checkpoint or NeMo 2 checkpoint (``weights/`` inside), or a
    dist_checkpointing directory of the trainer (model keys ``module.*``). ``model`` is a
    megatron GPT model, bare or wrapped in megatron's DDP, or model chunks (``chunks``).

    A checkpoint without decision adapters (an original model) loads into a model with them:
    the adapters keep their zero init (the retrofit's starting point); any other missing
    weight is an error. A checkpoint with decision adapters loads into a model without them
    (its base weights: plain attention, eviction, GQA pooling), but not into a DMC model that
    decides from channel D-1, which would ignore what the adapters learned (an error).
    """
    source = _dist_source(checkpoint)
    if hasattr(model, "chunks"):  # interleaved pipeline stages: each chunk its own layers
        for chunk in model.chunks:
            load_weights_checkpoint(chunk, checkpoint)
        return source
    bare = getattr(model, "module", model)
    request = bare.sharded_state_dict(prefix="module.")
    stored = read_metadata(source).state_dict_metadata
    if any(ADAPTER_MODULE in key for key in stored) and _decides_from_channel(bare):
        raise ValueError(f"{source} holds decision adapters (trained with "
                         "dmc.decision_source=adapter), but the model decides from channel "
                         "D-1: set dmc.decision_source=adapter")
    fresh = [name for name, item in request.items()
             if ADAPTER_MODULE in name and getattr(item, "key", name) not in stored]
    for name in fresh:
        del request[name]
    loaded = load_dist_checkpoint({"model": request}, source)
    state = {k.removeprefix("module."): v for k, v in loaded["model"].items()}
    missing, unexpected = bare.load_state_dict(state, strict=not fresh)
    if fresh and (unexpected or any(ADAPTER_MODULE not in key for key in missing)):
        raise RuntimeError(f"{source}: weights do not match the model (missing {missing}, "
                           f"unexpected {unexpected})")
    return source
