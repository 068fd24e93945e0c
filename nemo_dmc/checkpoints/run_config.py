"""A training run's recorded config: the trainer's ``run_config.yaml`` in its run_dir, else
Hydra's ``.hydra/config.yaml`` (when run_dir is Hydra's output), and the settings read from it."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf

from nemo_dmc.core import DMCConfig, ModelConfig

# The resolved config of a run, written into its run_dir (checkpoints find it there).
RUN_CONFIG_FILE = "run_config.yaml"
# A run's config: the trainer's own copy in run_dir, else Hydra's (when run_dir is its output).
RUN_CONFIGS = (Path(RUN_CONFIG_FILE), Path(".hydra") / "config.yaml")


def find_run_config(path: Path) -> Optional[Any]:
    """The config of the run ``path`` belongs to (:data:`RUN_CONFIGS` in ``path`` or up to
    four directories above), or ``None``."""
    for parent in [path, *path.parents][:5]:
        for name in RUN_CONFIGS:
            if (parent / name).is_file():
                return OmegaConf.load(parent / name)
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
    ``budget_pct`` are not the method's; settings a run predates keep their defaults)."""
    data = OmegaConf.to_container(run_config.dmc, resolve=True)
    known = {f.name for f in fields(DMCConfig)}
    typed = OmegaConf.merge(OmegaConf.structured(DMCConfig),
                            {k: v for k, v in data.items() if k in known})
    return OmegaConf.to_object(typed)
