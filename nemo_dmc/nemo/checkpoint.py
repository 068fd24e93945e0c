"""NeMo 2 checkpoint directories: ``context/`` (fiddle-serialised model + config) and
``weights/`` (megatron dist_checkpointing, keys ``module.*``)."""

from __future__ import annotations

from pathlib import Path

from megatron.core import dist_checkpointing
from torch import nn

from nemo_dmc.convert.checkpoint_dir import atomic_checkpoint_dir, is_rank0
from nemo_dmc.core import DMCConfig
from nemo_dmc.megatron.model import ModelConfig
from nemo_dmc.nemo.config import dmc_llama_config
from nemo_dmc.nemo.model import DMCGPTModel


def export_nemo_checkpoint(model: nn.Module, model_config: ModelConfig, dmc: DMCConfig,
                           output: Path, target_cr: float = 4.0, stage: str = "finetune",
                           stage_steps: int = 2000) -> Path:
    """Write a NeMo 2 checkpoint of a megatron DMC model (all ranks call; atomic rename).

    ``nemo.lightning.io.load_context(output / "context", subpath="model")`` restores a
    :class:`DMCGPTModel` with every DMC setting; ``weights/`` loads at any TP size.
    """
    config = dmc_llama_config(model_config, dmc, target_cr=target_cr, stage=stage,
                              stage_steps=stage_steps)
    nemo_model = DMCGPTModel(config, tokenizer=None)
    with atomic_checkpoint_dir(output, ("weights",)) as tmp:
        if is_rank0():
            nemo_model.io_dump(tmp / "context", yaml_attrs=["config"])
        dist_checkpointing.save(model.sharded_state_dict(prefix="module."), str(tmp / "weights"))
    return Path(output)


def load_nemo_model(path: Path) -> DMCGPTModel:
    """Restore a :class:`DMCGPTModel` from a NeMo 2 checkpoint, weights loaded
    (needs megatron's parallel state initialised, at any TP size)."""
    from nemo.lightning import io

    path = Path(path)
    if not (path / "context").is_dir() or not (path / "weights").is_dir():
        raise FileNotFoundError(f"{path} is not a NeMo 2 checkpoint (context/ and weights/)")
    model = io.load_context(path / "context", subpath="model")
    if not isinstance(model, DMCGPTModel):
        raise ValueError(f"{path} holds a {type(model).__name__}, not a DMCGPTModel")
    model.configure_model()
    loaded = dist_checkpointing.load(model.module.sharded_state_dict(prefix="module."),
                                     str(path / "weights"))
    model.module.load_state_dict({k.removeprefix("module."): v for k, v in loaded.items()})
    return model


def read_nemo_model_config(path: Path, vocab_size: int | None = None) -> ModelConfig:
    """Our :class:`ModelConfig` from a NeMo 2 checkpoint's context (no weights loaded).

    ``vocab_size`` is the tokenizer's; by default the checkpoint's (padded) vocabulary.
    """
    from nemo.lightning import io

    from nemo_dmc.nemo.config import model_config_from_nemo

    context = Path(path) / "context"
    if not context.is_dir():
        raise FileNotFoundError(f"{context} not found: not a NeMo 2 checkpoint")
    config = io.load_context(context, subpath="model").config
    return model_config_from_nemo(config, vocab_size or config.vocab_size)
