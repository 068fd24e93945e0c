"""A training run's checkpoint directories and the progress each one records.

Layout: ``<run>/checkpoints/<stage>/step_<NNNNNNN>/`` (megatron-core ``dist_checkpointing``);
the trainer (:mod:`nemo_dmc.training.checkpoint`) writes them and stores a :class:`Progress`
in each one's common state.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

from nemo_dmc.checkpoints.safe_load import load_common_state

STAGES = ("pretrain", "zero_out", "retrofit", "finetune")
_STEP_DIR = re.compile(r"^step_(\d{7})$")


@dataclass
class Progress:
    """Where a stage stands; saved in every checkpoint's common state."""

    stage: str
    step: int
    steps: int
    consumed_samples: int
    tensor_parallel_size: int
    data_parallel_size: int

    @property
    def complete(self) -> bool:
        return self.step >= self.steps


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


def list_checkpoints(stage_dir: Path) -> List[Tuple[int, Path]]:
    """Complete checkpoints of a stage as ``(step, path)``, oldest first."""
    if not stage_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in stage_dir.iterdir()
             if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return sorted(found)


def latest_checkpoint(stage_dir: Path) -> Optional[Path]:
    """The newest complete checkpoint of a stage, or ``None``."""
    found = list_checkpoints(stage_dir)
    return found[-1][1] if found else None


def latest_in_run(path: Path) -> Optional[Path]:
    """The newest checkpoint under ``path``: a stage directory's, else that of the last stage
    (:data:`STAGES`) with one in a run directory (or its ``checkpoints/``); ``None`` if none."""
    if list(path.glob("step_*")):
        return latest_checkpoint(path)
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    for stage in reversed(STAGES):
        found = latest_checkpoint(root / stage)
        if found is not None:
            return found
    return None


def read_progress(path: Path) -> Progress:
    """The :class:`Progress` stored in a checkpoint (common state only, no tensors read)."""
    common = load_common_state(path)
    if "progress" not in common:
        raise ValueError(f"{path} is not a checkpoint of this trainer (no 'progress' entry)")
    return Progress(**common["progress"])
