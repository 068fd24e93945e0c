"""What a ``checkpoint`` path holds, what describes it, and loading its weights.

Accepted ``checkpoint`` paths:

* a training run directory (``<run>/checkpoints/<stage>/step_N``: the latest checkpoint of the
  last stage that has one), a stage directory, or one ``step_N`` directory — loaded with
  :func:`nemo_dmc.checkpoints.weights.load_weights_checkpoint`; the run's ``run_config.yaml``
  (written by the trainer into run_dir) or Hydra's ``.hydra/config.yaml``, found only in that
  ``<run>`` (:func:`~nemo_dmc.checkpoints.run_config.find_run_config`), supplies ``model``,
  ``dmc``, the trained KV ``method`` (and DMS ``window``) and the tokenizer;
* a NeMo 2 directory (``context/`` + ``weights/``, same loader); its context supplies
  ``model`` and, for a DMC model, ``dmc`` (the shape needs ``nemo`` installed; without it
  the ``model`` settings given are used);
* a weights checkpoint of ``python -m nemo_dmc.convert`` (``weights/`` + ``model_config.yaml``,
  and ``dmc_config.yaml`` for a model retrofitted elsewhere: ``import-megatron``), loaded with
  :func:`nemo_dmc.checkpoints.weights.load_weights_checkpoint`;
* a ``.pt``/``.pth`` file holding a full (TP=1) model ``state_dict`` (or ``{"model": ...}``).

dist_checkpointing checkpoints load at any tensor-parallel size. All of them load into models of
either layer spec, local or Transformer Engine (:mod:`nemo_dmc.checkpoints.layout`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Tuple

import torch
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel

from nemo_dmc.checkpoints.layout import match_layout
from nemo_dmc.checkpoints.nemo_context import (
    NEMO_CONTEXT,
    NEMO_TOKENIZER,
    UntrustedContextError,
    nemo_checkpoint_settings,
)
from nemo_dmc.checkpoints.run_config import (
    dmc_config_from_run,
    find_run_config,
    method_from_run,
    model_config_from_run,
)
from nemo_dmc.checkpoints.run_dir import latest_in_run
from nemo_dmc.checkpoints.sharding import shard_full_state
from nemo_dmc.checkpoints.weights import (
    MODEL_CONFIG_FILE,
    load_weights_checkpoint,
    read_dmc_config,
    read_model_config,
)
from nemo_dmc.core import DMCConfig, ModelConfig


@dataclass
class ResolvedCheckpoint:
    """Where the weights are and what describes them.

    kind: ``"trainer"`` (dist checkpoint of the trainer or NeMo 2), ``"weights"`` (convert's
    weights checkpoint) or ``"state_dict"``. run_config: the training run's config, if found.
    model_config / dmc_config: the shape / DMC settings the checkpoint itself records
    (``model_config.yaml`` / ``dmc_config.yaml``, a NeMo 2 context).
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
            return model_config_from_run(self.run_config, self.path)
        return None

    def recorded_dmc_config(self) -> Optional[DMCConfig]:
        """The DMC settings the checkpoint records (``dmc_config.yaml``, a NeMo 2 context, else
        the run's config when the checkpoint records no shape of its own), or ``None``."""
        if self.dmc_config is not None:
            return self.dmc_config
        if self.model_config is None and self.run_config is not None:
            return dmc_config_from_run(self.run_config)
        return None

    def recorded_method(self) -> Optional[Tuple[str, Optional[int]]]:
        """``(method, window)`` of the KV method the checkpoint was trained with: ``("dmc",
        None)`` where it records DMC settings of its own (a NeMo 2 DMC context,
        ``dmc_config.yaml``), else the run's ``method``/``window`` (when the checkpoint records
        no shape of its own, as :meth:`recorded_dmc_config`), else ``None`` (nothing
        recorded: consumers then default to ``dmc``)."""
        if self.dmc_config is not None:
            return "dmc", None
        if self.model_config is None and self.run_config is not None:
            return method_from_run(self.run_config)
        return None


def resolve_checkpoint(checkpoint: str | Path, key: str = "checkpoint") -> ResolvedCheckpoint:
    """Classify ``checkpoint`` (see module docstring); errors name the config ``key``."""
    path = Path(checkpoint).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{key}: {path} does not exist")
    if path.is_file():
        if path.suffix not in (".pt", ".pth"):
            raise ValueError(f"{key}: {path} is a file but not a .pt/.pth state_dict")
        return ResolvedCheckpoint("state_dict", path, find_run_config(path.parent), key=key)
    if (path / MODEL_CONFIG_FILE).is_file():
        return ResolvedCheckpoint("weights", path, None, read_model_config(path), key=key,
                                  dmc_config=read_dmc_config(path))
    if (path / NEMO_CONTEXT).is_dir() and (path / "weights" / "metadata.json").is_file():
        try:
            model, dmc = nemo_checkpoint_settings(path) or (None, None)
        except UntrustedContextError as err:
            raise UntrustedContextError(f"{key}: {err}") from err
        except ValueError as err:
            raise ValueError(f"{key}: {err}") from err
        return ResolvedCheckpoint("trainer", path, find_run_config(path), model, key=key,
                                  dmc_config=dmc)
    if (path / "metadata.json").is_file() or (path / "weights" / "metadata.json").is_file():
        return ResolvedCheckpoint("trainer", path, find_run_config(path), key=key)
    latest = latest_in_run(path)
    if latest is None:
        raise FileNotFoundError(f"{key}: no checkpoint found in {path} (expected a "
                                "run/stage/step directory, a weights checkpoint or a .pt file)")
    return ResolvedCheckpoint("trainer", latest, find_run_config(latest), key=key)


def load_weights(model: GPTModel, resolved: ResolvedCheckpoint) -> None:
    """Load the checkpoint's weights into ``model`` (built at the current TP size)."""
    if resolved.kind in ("weights", "trainer"):
        load_weights_checkpoint(model, resolved.path)
    else:
        state = torch.load(resolved.path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and isinstance(state.get("model"), dict):
            state = state["model"]
        state = match_layout(state, model.state_dict())  # local <-> Transformer Engine names
        if parallel_state.get_tensor_model_parallel_world_size() > 1:
            state = shard_full_state(state, model)
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.endswith("_extra_state")]
        if missing or unexpected:
            raise ValueError(f"{resolved.key}: {resolved.path} does not match the model "
                             f"(missing {missing[:5]}, unexpected {unexpected[:5]}); check model.*")


def find_tokenizer_path(tokenizer: Optional[str | Path],
                        resolved: Optional[ResolvedCheckpoint]) -> Optional[Path]:
    """``tokenizer`` if given, else the one a NeMo 2 export carries (``context/nemo_tokenizer``),
    else the one a training run used (``data.tokenizer``, or the BPE the built-in corpus
    trained under ``data.cache_dir``), else ``None``."""
    if tokenizer is not None:
        path = Path(tokenizer).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"tokenizer: {path} does not exist")
        return path
    carried = resolved.path / NEMO_CONTEXT / NEMO_TOKENIZER if resolved is not None else None
    if carried is not None and carried.is_dir():
        return carried
    run = resolved.run_config if resolved is not None else None
    if run is None or "data" not in run:
        return None
    if run.data.get("tokenizer"):
        return Path(run.data.tokenizer)
    if run.data.get("source") != "pydocs":
        return None
    trained = Path(run.data.get("cache_dir") or "") / "tokenizer"
    return trained if trained.is_dir() else None
