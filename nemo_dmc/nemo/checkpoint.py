"""NeMo 2 checkpoint directories: ``context/`` (fiddle-serialised model + config) and
``weights/`` (megatron dist_checkpointing, keys ``module.*``): export, and restoring the NeMo
model (reading only the recorded shape: :mod:`nemo_dmc.checkpoints.nemo_context`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from megatron.core import dist_checkpointing
from nemo.collections.llm import LlamaModel
from nemo.collections.llm.gpt.model.base import GPTModel
from torch import nn

from nemo_dmc.checkpoints.atomic import atomic_checkpoint_dir, is_rank0
from nemo_dmc.checkpoints.nemo_context import NEMO_CONTEXT, cpu_overrides, load_context_model
from nemo_dmc.checkpoints.resolve import ResolvedCheckpoint
from nemo_dmc.checkpoints.run_dir import read_progress
from nemo_dmc.checkpoints.safe_load import load_dist_checkpoint
from nemo_dmc.core import DMCConfig, ModelConfig
from nemo_dmc.nemo.config import dmc_llama_config, llama_config
from nemo_dmc.nemo.model import DMCGPTModel


def export_nemo_checkpoint(model: nn.Module, model_config: ModelConfig, dmc: Optional[DMCConfig],
                           output: Path, stage: str = "finetune", stage_steps: int = 2000,
                           tokenizer_dir: Optional[Path] = None) -> Path:
    """Write a NeMo 2 checkpoint of a megatron model (all ranks call; atomic rename).

    ``nemo.lightning.io.load_context(output / "context", subpath="model")`` restores a
    :class:`DMCGPTModel` with every DMC setting, or with ``dmc=None`` a plain NeMo
    ``LlamaModel``, in a fresh process with or without Transformer Engine; ``weights/`` loads
    at any TP size. The context keeps NeMo's defaults for the settings of
    :func:`cpu_overrides` (see :func:`load_nemo_model`) except RoPE fusion, recorded off: it
    needs Transformer Engine to load at all, and a GPU job may turn it on. With
    ``tokenizer_dir`` (a Hugging Face tokenizer folder) the model carries NeMo's
    ``AutoTokenizer`` of it, its files copied into ``context/``.
    """
    tokenizer = None
    if tokenizer_dir is not None:
        from nemo.collections.common.tokenizers import AutoTokenizer

        tokenizer = AutoTokenizer(str(tokenizer_dir))
    if dmc is None:
        nemo_model: GPTModel = LlamaModel(llama_config(model_config), tokenizer=tokenizer)
    else:
        config = dmc_llama_config(model_config, dmc, stage=stage, stage_steps=stage_steps)
        nemo_model = DMCGPTModel(config, tokenizer=tokenizer)
    for key in cpu_overrides():  # this machine's needs, not the model's
        delattr(nemo_model.__io__.config, key)
    nemo_model.__io__.config.apply_rope_fusion = False
    with atomic_checkpoint_dir(output, ("weights",)) as tmp:
        if is_rank0():
            nemo_model.io_dump(tmp / NEMO_CONTEXT, yaml_attrs=["config"])
        dist_checkpointing.save(model.sharded_state_dict(prefix="module."), str(tmp / "weights"))
    return Path(output)


def recorded_stage_settings(resolved: ResolvedCheckpoint) -> dict[str, Any]:
    """The training settings of the run that wrote ``resolved``, as keyword arguments of
    :func:`export_nemo_checkpoint`: ``stage`` and ``stage_steps`` from the trainer's progress
    in the checkpoint (the DMC settings travel in its :class:`~nemo_dmc.core.DMCConfig`).
    Settings the checkpoint does not record are left out."""
    settings: dict[str, Any] = {}
    if resolved.kind == "trainer" and (resolved.path / "metadata.json").is_file():
        try:
            progress = read_progress(resolved.path)
        except ValueError:  # a dist checkpoint, but not one of our trainer's
            return settings
        settings.update(stage=progress.stage, stage_steps=progress.steps)
    return settings


def load_nemo_model(path: Path) -> GPTModel:
    """Restore the NeMo model of a NeMo 2 checkpoint (a :class:`DMCGPTModel`, or a plain
    ``LlamaModel``), weights loaded (needs megatron's parallel state initialised, any TP size)."""
    path = Path(path)
    if not (path / "weights").is_dir():
        raise FileNotFoundError(f"{path} is not a NeMo 2 checkpoint (context/ and weights/)")
    model = load_context_model(path)
    model.configure_model()
    loaded = load_dist_checkpoint(model.module.sharded_state_dict(prefix="module."),
                                  path / "weights")
    model.module.load_state_dict({k.removeprefix("module."): v for k, v in loaded.items()})
    return model
