"""NeMo 2 checkpoint directories: ``context/`` (fiddle-serialised model + config) and
``weights/`` (megatron dist_checkpointing, keys ``module.*``)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import fiddle as fdl
from megatron.core import dist_checkpointing
from nemo.collections.llm import LlamaModel
from nemo.collections.llm.gpt.model.base import GPTModel
from torch import nn

from nemo_dmc.convert.checkpoint_dir import atomic_checkpoint_dir, is_rank0
from nemo_dmc.core import DMCConfig
from nemo_dmc.megatron.model import ModelConfig
from nemo_dmc.nemo.config import cpu_overrides, dmc_llama_config, llama_config
from nemo_dmc.nemo.model import DMCGPTModel
from nemo_dmc.training.checkpoint import read_progress

if TYPE_CHECKING:  # annotation only: no nemo -> inference import edge
    from nemo_dmc.inference.loading import ResolvedCheckpoint


def export_nemo_checkpoint(model: nn.Module, model_config: ModelConfig, dmc: Optional[DMCConfig],
                           output: Path, target_cr: float = 4.0, stage: str = "finetune",
                           stage_steps: int = 2000, loss_weight: float = 1.0) -> Path:
    """Write a NeMo 2 checkpoint of a megatron model (all ranks call; atomic rename).

    ``nemo.lightning.io.load_context(output / "context", subpath="model")`` restores a
    :class:`DMCGPTModel` with every DMC setting, or with ``dmc=None`` a plain NeMo
    ``LlamaModel``; ``weights/`` loads at any TP size. The context keeps NeMo's defaults for
    the settings of :func:`cpu_overrides` (see :func:`load_nemo_model`).
    """
    if dmc is None:
        nemo_model: GPTModel = LlamaModel(llama_config(model_config), tokenizer=None)
    else:
        config = dmc_llama_config(model_config, dmc, target_cr=target_cr, stage=stage,
                                  stage_steps=stage_steps, loss_weight=loss_weight)
        nemo_model = DMCGPTModel(config, tokenizer=None)
    for key in cpu_overrides():  # this machine's needs, not the model's
        delattr(nemo_model.__io__.config, key)
    with atomic_checkpoint_dir(output, ("weights",)) as tmp:
        if is_rank0():
            nemo_model.io_dump(tmp / "context", yaml_attrs=["config"])
        dist_checkpointing.save(model.sharded_state_dict(prefix="module."), str(tmp / "weights"))
    return Path(output)


def recorded_stage_settings(resolved: ResolvedCheckpoint) -> dict[str, Any]:
    """The training settings of the run that wrote ``resolved``, as keyword arguments of
    :func:`export_nemo_checkpoint`: ``loss_weight`` from its config (``dmc.loss_weight``),
    ``stage`` and ``stage_steps`` from the trainer's progress in the checkpoint. Settings
    the checkpoint does not record are left out."""
    settings: dict[str, Any] = {}
    run = resolved.run_config
    if run is not None and "dmc" in run:
        settings["loss_weight"] = float(run.dmc.get("loss_weight", 1.0))
    if resolved.kind == "trainer" and (resolved.path / "metadata.json").is_file():
        try:
            progress = read_progress(resolved.path)
        except ValueError:  # a dist checkpoint, but not one of our trainer's
            return settings
        settings.update(stage=progress.stage, stage_steps=progress.steps)
    return settings


def _load_model_context(path: Path) -> GPTModel:
    """The (unconfigured) NeMo model of a checkpoint's ``context/``, built with
    :func:`cpu_overrides`."""
    from nemo.lightning import io

    context = Path(path) / "context"
    if not context.is_dir():
        raise FileNotFoundError(f"{context} not found: not a NeMo 2 checkpoint")
    spec = io.load_context(context, subpath="model", build=False)
    for key, value in cpu_overrides().items():
        setattr(spec.config, key, value)
    model = fdl.build(spec)
    if not isinstance(model, GPTModel):
        raise ValueError(f"{context} holds a {type(model).__name__}, not a NeMo GPTModel")
    return model


def load_nemo_model(path: Path) -> GPTModel:
    """Restore the NeMo model of a NeMo 2 checkpoint (a :class:`DMCGPTModel`, or a plain
    ``LlamaModel``), weights loaded (needs megatron's parallel state initialised, any TP size)."""
    path = Path(path)
    if not (path / "weights").is_dir():
        raise FileNotFoundError(f"{path} is not a NeMo 2 checkpoint (context/ and weights/)")
    model = _load_model_context(path)
    model.configure_model()
    loaded = dist_checkpointing.load(model.module.sharded_state_dict(prefix="module."),
                                     str(path / "weights"))
    model.module.load_state_dict({k.removeprefix("module."): v for k, v in loaded.items()})
    return model


def read_nemo_settings(path: Path, vocab_size: int | None = None,
                       ) -> tuple[ModelConfig, Optional[DMCConfig]]:
    """Our :class:`ModelConfig` and the DMC settings (``None`` for a plain Llama) a NeMo 2
    checkpoint's context records (no weights loaded).

    ``vocab_size`` is the tokenizer's; by default the checkpoint's (padded) vocabulary.
    """
    from nemo_dmc.nemo.config import DMCLlamaConfig, model_config_from_nemo

    config = _load_model_context(path).config
    dmc = config.dmc_config() if isinstance(config, DMCLlamaConfig) else None
    return model_config_from_nemo(config, vocab_size or config.vocab_size), dmc


def read_nemo_model_config(path: Path, vocab_size: int | None = None) -> ModelConfig:
    """The shape part of :func:`read_nemo_settings`."""
    return read_nemo_settings(path, vocab_size)[0]
