"""A training run's recorded config: the trainer's ``run_config.yaml`` in its run_dir, else
Hydra's ``.hydra/config.yaml`` (when run_dir is Hydra's output), and the settings read from it.
A checkpoint finds it only where the trainer's layout puts it (:func:`find_run_config`)."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any, Optional, Tuple

from omegaconf import OmegaConf

from nemo_dmc.checkpoints.run_dir import STAGES, list_checkpoints
from nemo_dmc.core import DMCConfig, ModelConfig
from nemo_dmc.core.config import with_legacy_defaults

# The resolved config of a run, written into its run_dir (checkpoints find it there).
RUN_CONFIG_FILE = "run_config.yaml"
# A run's config: the trainer's own copy in run_dir, else Hydra's (when run_dir is its output).
RUN_CONFIGS = (Path(RUN_CONFIG_FILE), Path(".hydra") / "config.yaml")


def run_dir_of(path: Path) -> Optional[Path]:
    """The run directory of ``path`` by the trainer's layout, ``<run>`` for
    ``<run>/checkpoints``, ``<run>/checkpoints/<stage>`` and ``<run>/checkpoints/<stage>/step_N``;
    ``None`` for any other path."""
    if path.name == "checkpoints":
        return path.parent
    if path.name in STAGES and path.parent.name == "checkpoints":
        return path.parent.parent
    stage = path.parent
    if (stage.name in STAGES and stage.parent.name == "checkpoints"
            and path in (found for _, found in list_checkpoints(stage))):
        return stage.parent.parent
    return None


def find_run_config(path: Path) -> Optional[Any]:
    """The config of the run ``path`` belongs to: :data:`RUN_CONFIGS` in ``path`` itself or in
    its run directory (:func:`run_dir_of`), never in other folders above it (a checkpoint
    copied into another run's tree must not pick up that run's shape or tokenizer); ``None``
    if neither has one."""
    path = Path(path)
    for folder in dict.fromkeys(p for p in (path, run_dir_of(path)) if p is not None):
        for name in RUN_CONFIGS:
            if (folder / name).is_file():
                return OmegaConf.load(folder / name)
    return None


def model_config_from_run(run_config: Any, source: Path) -> ModelConfig:
    """The run's ``model`` settings; unknown keys are an error naming ``source``."""
    data = OmegaConf.to_container(run_config.model, resolve=True)
    known = {f.name for f in fields(ModelConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{source}: unknown model config keys {unknown}")
    return ModelConfig(**data)


def dmc_config_from_run(run_config: Any) -> DMCConfig:
    """The DMC settings a training run used: its ``dmc`` section read into the typed
    :class:`~nemo_dmc.core.DMCConfig` (type-checked; the trainer's own ``dmc`` keys such as
    ``budget_pct`` are not the method's; settings a run predates keep their defaults, or the
    behaviour the run had: :data:`~nemo_dmc.core.config.LEGACY_DEFAULTS`)."""
    data = OmegaConf.to_container(run_config.dmc, resolve=True)
    known = {f.name for f in fields(DMCConfig)}
    recorded = with_legacy_defaults({k: v for k, v in data.items() if k in known}, known)
    typed = OmegaConf.merge(OmegaConf.structured(DMCConfig), recorded)
    return OmegaConf.to_object(typed)


def method_from_run(run_config: Any) -> Tuple[str, Optional[int]]:
    """``(method, window)`` the run trained: its ``method`` (``dmc`` for runs that predate the
    key) and, for ``dms``, its eviction ``window`` (``None`` = DMSConfig's default)."""
    method = run_config.get("method") or "dmc"
    window = run_config.get("window") if method == "dms" else None
    return str(method), (None if window is None else int(window))
