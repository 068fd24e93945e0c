"""A training run's checkpoint directories and the progress each one records.

Layout: ``<run>/checkpoints/<stage>/step_<NNNNNNN>/`` (megatron-core ``dist_checkpointing``);
the trainer (:mod:`nemo_dmc.training.checkpoint`) writes them and stores a :class:`Progress`
in each one's common state. :func:`latest_intact_checkpoint` skips checkpoints with a
missing or truncated file (:func:`checkpoint_damage`).
"""

from __future__ import annotations

import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from megatron.core.dist_checkpointing.core import CheckpointingException

from nemo_dmc.checkpoints.safe_load import UnsafeCheckpointError, load_common_state, read_metadata

STAGES = ("pretrain", "zero_out", "retrofit", "finetune")
_STEP_DIR = re.compile(r"^step_(\d{7})$")
COMMON_FILE = "common.pt"  # dist_checkpointing's common (non-sharded) state
METADATA_FILE = ".metadata"  # torch_dist's index of the tensors in the shard files
_READ_ERRORS = (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError,
                CheckpointingException)


class DamagedCheckpointError(ValueError):
    """A checkpoint file is missing, truncated or unreadable; the message names it."""


@dataclass
class Progress:
    """Where a stage stands; saved in every checkpoint's common state."""

    stage: str
    step: int
    steps: int
    consumed_samples: int
    tensor_parallel_size: int
    data_parallel_size: int
    pipeline_parallel_size: int = 1

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


def _first_sentence(err: Exception) -> str:
    return str(err).split(". ")[0].strip() or type(err).__name__


def read_progress(path: Path) -> Progress:
    """The :class:`Progress` stored in a checkpoint (common state only, no tensors read).

    Raises:
        DamagedCheckpointError: ``common.pt`` is missing, truncated or unreadable.
        ValueError: The checkpoint is not one of this trainer's.
    """
    common_file = Path(path) / COMMON_FILE
    if not common_file.is_file():
        raise DamagedCheckpointError(f"{common_file} is missing")
    try:
        common = load_common_state(path)
    except UnsafeCheckpointError:
        raise
    except _READ_ERRORS as err:
        raise DamagedCheckpointError(f"{common_file} is truncated or unreadable "
                                     f"({_first_sentence(err)})") from err
    if "progress" not in common:
        raise ValueError(f"{path} is not a checkpoint of this trainer (no 'progress' entry)")
    return Progress(**common["progress"])


def checkpoint_damage(path: Path) -> Optional[str]:
    """Why the trainer checkpoint at ``path`` cannot be loaded (``common.pt`` or ``.metadata``
    unreadable, a shard file missing or shorter than the bytes ``.metadata`` indexes in it),
    naming the file; ``None`` if it is intact. Reads no tensors."""
    try:
        read_progress(path)
    except DamagedCheckpointError as err:
        return str(err)
    index = path / METADATA_FILE
    if not index.is_file():
        return f"{index} is missing"
    try:
        metadata = read_metadata(path)  # never torch's reader: it unpickles without limits
    except UnsafeCheckpointError:
        raise
    except _READ_ERRORS as err:
        return f"{index} is truncated or unreadable ({_first_sentence(err)})"
    needed: Dict[str, int] = {}
    for item in metadata.storage_data.values():
        end = item.offset + item.length
        needed[item.relative_path] = max(needed.get(item.relative_path, 0), end)
    for name, size in sorted(needed.items()):
        shard = path / name
        if not shard.is_file():
            return f"shard {shard} is missing"
        if shard.stat().st_size < size:
            return f"shard {shard} is truncated ({shard.stat().st_size} of {size} bytes)"
    return None


def latest_intact_checkpoint(stage_dir: Path) -> Tuple[Optional[Path], List[Tuple[Path, str]]]:
    """The newest checkpoint of a stage that :func:`checkpoint_damage` finds intact (``None``
    if there is none), and the newer damaged ones skipped, each with what is wrong with it."""
    damaged: List[Tuple[Path, str]] = []
    for _, path in reversed(list_checkpoints(stage_dir)):
        problem = checkpoint_damage(path)
        if problem is None:
            return path, damaged
        damaged.append((path, problem))
    return None, damaged
