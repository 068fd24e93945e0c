"""Building a DMC model for inference from our checkpoints, and finding its tokenizer.

Accepted ``checkpoint`` paths:

* a training run directory (``<run>/checkpoints/<stage>/step_N``: the latest checkpoint of the
  last stage that has one), a stage directory, or one ``step_N`` directory — loaded with
  ``nemo_dmc.convert.checkpoint_dir.load_weights_checkpoint``; the run's ``run_config.yaml``
  (written by the trainer into run_dir) or Hydra's ``.hydra/config.yaml``, if found above the
  checkpoint, supplies ``model``, ``dmc`` and the tokenizer;
* a NeMo 2 directory (``context/`` + ``weights/``, same loader); its context supplies
  ``model`` and, for a DMC model, ``dmc`` (the shape needs ``nemo`` installed; without it
  the ``model`` settings given are used);
* a weights checkpoint of ``python -m nemo_dmc.convert`` (``weights/`` + ``model_config.yaml``),
  loaded with ``nemo_dmc.convert.checkpoint_dir.load_weights_checkpoint``;
* a ``.pt``/``.pth`` file holding a full (TP=1) model ``state_dict`` (or ``{"model": ...}``).

dist_checkpointing checkpoints load at any tensor-parallel size. All of them load into models of
either layer spec, local or Transformer Engine (``nemo_dmc.convert.layout``).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Optional

import torch
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from omegaconf import OmegaConf

from nemo_dmc.core import DMCConfig
from nemo_dmc.megatron.model import ModelConfig, build_model
from nemo_dmc.training.config import RUN_CONFIG_FILE

# A run's config: the trainer's own copy in run_dir, else Hydra's (when run_dir is its output).
RUN_CONFIGS = (Path(RUN_CONFIG_FILE), Path(".hydra") / "config.yaml")
STAGES = ("pretrain", "zero_out", "retrofit", "finetune")
NEMO_CONTEXT = "context"  # a NeMo 2 checkpoint's serialised model and config


@dataclass
class ResolvedCheckpoint:
    """Where the weights are and what describes them.

    kind: ``"trainer"`` (dist checkpoint of the trainer or NeMo 2), ``"weights"`` (convert's
    weights checkpoint) or ``"state_dict"``. run_config: the training run's config, if found.
    model_config / dmc_config: the shape / DMC settings the checkpoint itself records
    (``model_config.yaml``, a NeMo 2 context).
    """

    kind: str
    path: Path
    run_config: Optional[Any] = None
    model_config: Optional[ModelConfig] = None
    key: str = "checkpoint"
    dmc_config: Optional[DMCConfig] = None

    def recorded_model_config(self) -> Optional[ModelConfig]:
        """The model shape the checkpoint records (``model_config.yaml``, else its run's
        config), or ``None``."""
        if self.model_config is not None:
            return self.model_config
        if self.run_config is not None:
            return _model_config_from(self.run_config, self.path)
        return None

    def recorded_dmc_config(self) -> Optional[DMCConfig]:
        """The DMC settings the checkpoint records (a NeMo 2 context, else the run's config
        when the checkpoint records no shape of its own), or ``None``."""
        if self.dmc_config is not None:
            return self.dmc_config
        if self.model_config is None and self.run_config is not None:
            return dmc_config_from_run(self.run_config)
        return None


def _find_run_config(path: Path) -> Optional[Any]:
    for parent in [path, *path.parents][:5]:
        for name in RUN_CONFIGS:
            if (parent / name).is_file():
                return OmegaConf.load(parent / name)
    return None


def _latest_in_run(path: Path) -> Optional[Path]:
    from nemo_dmc.training.checkpoint import latest_checkpoint

    if list(path.glob("step_*")):
        return latest_checkpoint(path)
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    for stage in reversed(STAGES):
        found = latest_checkpoint(root / stage)
        if found is not None:
            return found
    return None


def resolve_checkpoint(checkpoint: str | Path, key: str = "checkpoint") -> ResolvedCheckpoint:
    """Classify ``checkpoint`` (see module docstring); errors name the config ``key``."""
    path = Path(checkpoint).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{key}: {path} does not exist")
    if path.is_file():
        if path.suffix not in (".pt", ".pth"):
            raise ValueError(f"{key}: {path} is a file but not a .pt/.pth state_dict")
        return ResolvedCheckpoint("state_dict", path, _find_run_config(path.parent), key=key)
    from nemo_dmc.convert.checkpoint_dir import MODEL_CONFIG_FILE, read_model_config

    if (path / MODEL_CONFIG_FILE).is_file():
        return ResolvedCheckpoint("weights", path, None, read_model_config(path), key=key)
    if (path / NEMO_CONTEXT).is_dir() and (path / "weights" / "metadata.json").is_file():
        try:
            model, dmc = nemo_checkpoint_settings(path) or (None, None)
        except ValueError as err:
            raise ValueError(f"{key}: {err}") from err
        return ResolvedCheckpoint("trainer", path, _find_run_config(path), model, key=key,
                                  dmc_config=dmc)
    if (path / "metadata.json").is_file() or (path / "weights" / "metadata.json").is_file():
        return ResolvedCheckpoint("trainer", path, _find_run_config(path), key=key)
    latest = _latest_in_run(path)
    if latest is None:
        raise FileNotFoundError(f"{key}: no checkpoint found in {path} (expected a "
                                "run/stage/step directory, a weights checkpoint or a .pt file)")
    return ResolvedCheckpoint("trainer", latest, _find_run_config(latest), key=key)


def nemo_checkpoint_settings(path: Path) -> Optional[tuple[ModelConfig, Optional[DMCConfig]]]:
    """Shape and DMC settings a NeMo 2 checkpoint's ``context/`` records (see
    :func:`nemo_dmc.nemo.checkpoint.read_nemo_settings`); ``None`` without ``nemo`` installed
    (its ``weights/`` still load). Raises ValueError for an unreadable context."""
    try:
        from nemo_dmc.nemo.checkpoint import read_nemo_settings
    except ImportError:
        return None
    try:
        return read_nemo_settings(path)
    except Exception as err:  # fiddle/NeMo raise many types for an unreadable context
        raise ValueError(f"cannot read the NeMo 2 model config in {path / NEMO_CONTEXT}: "
                         f"{err}") from err


def _model_config_from(run_config: Any, source: Path) -> ModelConfig:
    data = OmegaConf.to_container(run_config.model, resolve=True)
    known = {f.name for f in fields(ModelConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{source}: unknown model config keys {unknown}")
    return ModelConfig(**data)


def dmc_config_from_run(run_config: Any) -> DMCConfig:
    """The DMC mechanism settings a training run used."""
    dmc = run_config.dmc
    return DMCConfig(init_offset=float(dmc.init_offset), temperature=float(dmc.temperature),
                     window=None if dmc.window is None else int(dmc.window),
                     decision_scale=float(dmc.get("decision_scale", 1.0)))


def load_weights(model: GPTModel, resolved: ResolvedCheckpoint) -> None:
    """Load the checkpoint's weights into ``model`` (built at the current TP size)."""
    if resolved.kind in ("weights", "trainer"):
        from nemo_dmc.convert.checkpoint_dir import load_weights_checkpoint

        load_weights_checkpoint(model, resolved.path)
    else:
        state = torch.load(resolved.path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and isinstance(state.get("model"), dict):
            state = state["model"]
        from nemo_dmc.convert.layout import match_layout

        state = match_layout(state, model.state_dict())  # local <-> Transformer Engine names
        if parallel_state.get_tensor_model_parallel_world_size() > 1:
            from nemo_dmc.convert.sharding import shard_full_state

            state = shard_full_state(state, model)
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.endswith("_extra_state")]
        if missing or unexpected:
            raise ValueError(f"{resolved.key}: {resolved.path} does not match the model "
                             f"(missing {missing[:5]}, unexpected {unexpected[:5]}); check model.*")


def build_inference_model(checkpoint: Optional[str | Path], model_config: ModelConfig,
                          dmc: DMCConfig, prefer_checkpoint_config: bool = True,
                          key: str = "checkpoint"):
    """Build the DMC model (current TP size) and load ``checkpoint`` into it.

    The model shape and DMC settings come from the checkpoint when it records them
    (``prefer_checkpoint_config``), else from the arguments. ``checkpoint=None`` keeps the
    random initialisation (smoke tests, benchmarks). Errors name the config ``key``.

    Returns:
        ``(model in eval mode, model_config, dmc_config, resolved checkpoint or None)``.
    """
    resolved = None
    if checkpoint is not None:
        resolved = resolve_checkpoint(checkpoint, key)
        if prefer_checkpoint_config:
            model_config = resolved.recorded_model_config() or model_config
            dmc = resolved.recorded_dmc_config() or dmc
    model = build_model(model_config, dmc)
    if resolved is not None:
        load_weights(model, resolved)
    return model.eval(), model_config, dmc, resolved


def find_tokenizer_path(tokenizer: Optional[str | Path],
                        resolved: Optional[ResolvedCheckpoint]) -> Optional[Path]:
    """``tokenizer`` if given, else the one a training run used (``data.tokenizer``, or the
    BPE the built-in corpus trained under ``data.cache_dir``), else ``None``."""
    if tokenizer is not None:
        path = Path(tokenizer).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"tokenizer: {path} does not exist")
        return path
    run = resolved.run_config if resolved is not None else None
    if run is None or "data" not in run:
        return None
    if run.data.get("tokenizer"):
        return Path(run.data.tokenizer)
    if run.data.get("source") != "pydocs":
        return None
    trained = Path(run.data.get("cache_dir") or "") / "tokenizer"
    return trained if trained.is_dir() else None
