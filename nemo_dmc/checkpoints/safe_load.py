"""Loading megatron ``dist_checkpointing`` (``torch_dist``) checkpoints without running code
stored in them: every dist checkpoint nemo-dmc reads (weights, NeMo 2 ``weights/``, trainer
resume, the progress record) goes through :func:`load_dist_checkpoint` or
:func:`load_common_state`.

A ``torch_dist`` checkpoint holds three pickled kinds of data, and each is read restricted:

* ``.metadata`` (torch's distributed-checkpoint reader unpickles it with plain ``pickle``):
  read first with :class:`MetadataUnpickler`, which allows only the checkpoint metadata
  classes (:data:`METADATA_GLOBALS`, torch dtypes/layouts/memory formats);
* sharded objects inside the ``*.distcp`` files (torch reads them with
  ``torch.load(weights_only=False)``): each one is first read with ``weights_only=True``;
* ``common.pt``: read with ``torch.load(weights_only=True)`` (whatever
  ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` says).

A forbidden global stops the load with :class:`UnsafeCheckpointError` naming the file. The
checks run just before megatron reads the same files: they protect against a downloaded or
shared checkpoint, not against one rewritten while it loads.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.strategies.common import (
    COMMON_STATE_FNAME,
    TorchCommonLoadStrategy,
)
from megatron.core.dist_checkpointing.strategies.torch import TorchDistLoadShardedStrategy
from megatron.core.dist_checkpointing.validation import verify_checkpoint_and_load_strategy
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata

METADATA_FILE = ".metadata"

# (module, name) globals a torch_dist ``.metadata`` may name: torch's checkpoint metadata and
# plan dataclasses/enums, megatron's subclasses of them, torch.Size and torch's layout lookup.
METADATA_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    [("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "MetadataIndex", "ChunkStorageMetadata", "TensorProperties",
        "TensorStorageMetadata", "BytesStorageMetadata", "StorageMeta", "_MEM_FORMAT_ENCODING")]
    + [("torch.distributed.checkpoint.planner", name) for name in (
        "WriteItem", "WriteItemType", "TensorWriteData", "BytesIOWriteData", "SavePlan",
        "ReadItem", "LoadItemType", "LoadPlan")]
    + [("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
       ("megatron.core.dist_checkpointing.strategies.torch", "MCoreMetadata"),
       ("megatron.core.dist_checkpointing.strategies.torch", "MCoreSavePlan"),
       ("torch", "Size"), ("torch.serialization", "_get_layout"),
       ("collections", "OrderedDict")])


class UnsafeCheckpointError(ValueError):
    """A checkpoint file names a Python global outside the allow-list (or cannot be read
    safely); the message names the file."""


def _fix(path: Path) -> str:
    return (f"{path} is not a checkpoint nemo-dmc can load safely (corrupt, written by an "
            "unsupported tool, or crafted to run code); re-create it from a trusted source "
            "(e.g. python -m nemo_dmc.convert import-hf)")


def unpickling_reason(err: Exception) -> str:
    """The line of a weights-only load error that names the refused global (else its first)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [repr(err)]
    return next((line for line in lines if "GLOBAL" in line), lines[0])


class MetadataUnpickler(pickle.Unpickler):
    """Unpickles a ``.metadata`` file allowing only :data:`METADATA_GLOBALS` and torch's
    dtypes, layouts and memory formats (``torch.float32``, ...)."""

    def __init__(self, file: io.BufferedIOBase, path: Path) -> None:
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in METADATA_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None),
                                            (torch.dtype, torch.layout, torch.memory_format)):
            return getattr(torch, name)
        raise UnsafeCheckpointError(f"{self.path}: refusing to load the global "
                                    f"{module}.{name}; {_fix(self.path)}")


def read_metadata(checkpoint_dir: str | Path) -> Metadata:
    """The ``.metadata`` of a ``torch_dist`` checkpoint, read with :class:`MetadataUnpickler`."""
    path = Path(checkpoint_dir) / METADATA_FILE
    try:
        with open(path, "rb") as file:
            metadata = MetadataUnpickler(file, path).load()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} not found: not a complete torch_dist checkpoint") from None
    except UnsafeCheckpointError:
        raise
    except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError) as err:
        raise ValueError(f"{path} is truncated or unreadable ({err}): copy the checkpoint "
                         "again") from err
    if not isinstance(metadata, Metadata):
        raise UnsafeCheckpointError(f"{path} holds a {type(metadata).__name__}, not checkpoint "
                                    f"metadata; {_fix(path)}")
    return metadata


def check_sharded_objects(checkpoint_dir: str | Path, metadata: Metadata) -> None:
    """Read every sharded object of the checkpoint with ``torch.load(weights_only=True)`` (torch
    later unpickles the requested ones without that restriction)."""
    root = Path(checkpoint_dir)
    for index, info in (metadata.storage_data or {}).items():
        if not isinstance(metadata.state_dict_metadata.get(index.fqn), BytesStorageMetadata):
            continue
        path = root / info.relative_path
        if Path(info.relative_path).name != info.relative_path or info.transform_descriptors:
            raise UnsafeCheckpointError(f"{root / METADATA_FILE}: object {index.fqn} is stored "
                                        f"as {info.relative_path!r} (transformed or outside the "
                                        f"checkpoint); {_fix(root)}")
        try:
            with open(path, "rb") as file:
                file.seek(info.offset)
                data = file.read(info.length)
            torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            raise UnsafeCheckpointError(f"{path}: object {index.fqn} names globals outside "
                                        f"torch's safe set ({unpickling_reason(err)}); "
                                        f"{_fix(path)}") from err
        except (OSError, RuntimeError) as err:  # missing file; truncated zip
            raise ValueError(f"{path}: object {index.fqn} is unreadable ({err}): the "
                             "checkpoint is incomplete, copy it again") from err


def check_dist_checkpoint(checkpoint_dir: str | Path) -> Metadata:
    """Check a ``torch_dist`` checkpoint's pickled metadata and sharded objects; return the
    metadata. Raises :class:`UnsafeCheckpointError` naming the offending file."""
    metadata = read_metadata(checkpoint_dir)
    check_sharded_objects(checkpoint_dir, metadata)
    return metadata


class SafeCommonLoadStrategy(TorchCommonLoadStrategy):
    """megatron's common-state loading with ``torch.load(weights_only=True)``."""

    def load_common(self, checkpoint_dir: str | Path) -> dict:
        path = Path(checkpoint_dir) / COMMON_STATE_FNAME
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: not a complete torch_dist checkpoint")
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            raise UnsafeCheckpointError(f"{path}: {unpickling_reason(err)}; "
                                        f"{_fix(path)}") from err

    def load_sharded_objects(self, sharded_objects_state_dict: Any, checkpoint_dir: Any) -> None:
        raise UnsafeCheckpointError(f"{checkpoint_dir}: sharded objects stored as separate .pt "
                                    f"files are not loaded; {_fix(Path(checkpoint_dir))}")


class SafeTorchDistLoadStrategy(TorchDistLoadShardedStrategy):
    """megatron's ``torch_dist`` loading, after :func:`check_dist_checkpoint`."""

    def load(self, sharded_state_dict: Any, checkpoint_dir: Path) -> Any:
        check_dist_checkpoint(checkpoint_dir)
        return super().load(sharded_state_dict, checkpoint_dir)

    def load_tensors_metadata(self, checkpoint_dir: Path, metadata: Metadata = None) -> Any:
        if metadata is None:
            metadata = read_metadata(checkpoint_dir)
        return super().load_tensors_metadata(checkpoint_dir, metadata)

    def load_sharded_metadata(self, checkpoint_dir: Path) -> Any:
        check_dist_checkpoint(checkpoint_dir)
        return super().load_sharded_metadata(checkpoint_dir)


def load_dist_checkpoint(sharded_state_dict: dict, checkpoint_dir: str | Path) -> dict:
    """``dist_checkpointing.load`` through the safe strategies (any TP size, as megatron's)."""
    return dist_checkpointing.load(sharded_state_dict, str(checkpoint_dir),
                                   sharded_strategy=SafeTorchDistLoadStrategy(),
                                   common_strategy=SafeCommonLoadStrategy())


def load_common_state(checkpoint_dir: str | Path) -> dict:
    """``dist_checkpointing.load_common_state_dict``, read with ``weights_only=True``."""
    _, common = verify_checkpoint_and_load_strategy(
        str(checkpoint_dir), SafeTorchDistLoadStrategy(), SafeCommonLoadStrategy())
    return common.load_common(checkpoint_dir)
