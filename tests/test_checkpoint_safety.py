"""Loading other people's checkpoints runs no code from them: a pickled call in a torch_dist
``.metadata``, in a sharded object or in ``common.pt`` is refused, naming the file, on every
load path (weights for generate/evaluate/convert/checkpoint.pretrained, trainer resume, NeMo 2).

Each payload would create a marker file; the tests assert it was never created."""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import BytesStorageMetadata

from megatron_utils import TINY_GQA
from nemo_dmc.checkpoints.resolve import load_weights, resolve_checkpoint
from nemo_dmc.checkpoints.run_dir import read_progress
from nemo_dmc.checkpoints.safe_load import UnsafeCheckpointError, read_metadata
from nemo_dmc.checkpoints.weights import save_weights_checkpoint
from nemo_dmc.megatron.model import build_model
from nemo_dmc.megatron.parallel import seed_all
from nemo_dmc.training.checkpoint import load_checkpoint, save_checkpoint
from test_training_checkpoint import one_step, progress, trainer


class MarkerPayload:
    """Unpickling this calls ``os.system("touch <marker>")``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _weights_checkpoint(path: Path) -> Path:
    seed_all(3)
    save_weights_checkpoint(build_model(TINY_GQA, method=None), TINY_GQA, path)
    return path


def _trainer_checkpoint(tmp_path: Path) -> Path:
    state = trainer()
    one_step(*state)
    return save_checkpoint(tmp_path / "retrofit", *state, progress(1), keep_last=1)


def _poison_metadata(checkpoint_dir: Path, marker: Path) -> None:
    (checkpoint_dir / ".metadata").write_bytes(pickle.dumps(MarkerPayload(marker)))


def _poison_sharded_object(checkpoint_dir: Path, marker: Path) -> str:
    """Point one sharded object's entry in ``.metadata`` at a pickled call appended to its
    shard file (``.metadata`` itself stays made of allowed classes); return its key."""
    metadata = read_metadata(checkpoint_dir)
    index = next(i for i in metadata.storage_data
                 if isinstance(metadata.state_dict_metadata[i.fqn], BytesStorageMetadata))
    info = metadata.storage_data[index]
    shard = checkpoint_dir / info.relative_path
    payload = io.BytesIO()
    torch.save(MarkerPayload(marker), payload)
    offset = shard.stat().st_size
    with open(shard, "ab") as file:
        file.write(payload.getvalue())
    metadata.storage_data[index] = _StorageInfo(info.relative_path, offset, len(payload.getvalue()))
    with open(checkpoint_dir / ".metadata", "wb") as file:
        pickle.dump(metadata, file)
    return index.fqn


def test_own_weights_checkpoint_loads_through_the_safe_reader(megatron_tp1, tmp_path):
    source = _weights_checkpoint(tmp_path / "ckpt")
    model = build_model(TINY_GQA, method=None)
    load_weights(model, resolve_checkpoint(source))
    expected = build_model(TINY_GQA, method=None)
    load_weights(expected, resolve_checkpoint(source))
    for (name, a), b in zip(model.state_dict().items(), expected.state_dict().values()):
        if torch.is_tensor(a):
            assert torch.equal(a, b), name


def test_weights_load_refuses_a_metadata_pickle_that_runs_code(megatron_tp1, tmp_path):
    source = _weights_checkpoint(tmp_path / "ckpt")
    marker = tmp_path / "pwned"
    _poison_metadata(source / "weights", marker)
    with pytest.raises(UnsafeCheckpointError, match=r"\.metadata.*posix\.system|\.metadata.*os\.system"):
        load_weights(build_model(TINY_GQA, method=None), resolve_checkpoint(source))
    assert not marker.exists()


def test_weights_load_refuses_a_sharded_object_that_runs_code(megatron_tp1, tmp_path):
    source = _weights_checkpoint(tmp_path / "ckpt")
    marker = tmp_path / "pwned"
    key = _poison_sharded_object(source / "weights", marker)
    with pytest.raises(UnsafeCheckpointError, match=r"distcp.*" + key.split("/")[0]):
        load_weights(build_model(TINY_GQA, method=None), resolve_checkpoint(source))
    assert not marker.exists()


def test_common_state_is_read_weights_only_even_when_torch_is_told_otherwise(
        megatron_tp1, tmp_path, monkeypatch):
    source = _weights_checkpoint(tmp_path / "ckpt") / "weights"
    marker = tmp_path / "pwned"
    torch.save({"progress": MarkerPayload(marker)}, source / "common.pt")
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(UnsafeCheckpointError, match="common.pt"):
        read_progress(source)
    assert not marker.exists()


def test_trainer_resume_refuses_a_metadata_pickle_that_runs_code(megatron_tp1, tmp_path):
    path = _trainer_checkpoint(tmp_path)
    load_checkpoint(path, *trainer())  # our own checkpoint loads (RNG objects included)
    marker = tmp_path / "pwned"
    _poison_metadata(path, marker)
    with pytest.raises(UnsafeCheckpointError, match=r"step_0000001/\.metadata"):
        load_checkpoint(path, *trainer())
    assert not marker.exists()


def test_trainer_resume_refuses_a_poisoned_rng_object(megatron_tp1, tmp_path):
    path = _trainer_checkpoint(tmp_path)
    marker = tmp_path / "pwned"
    _poison_sharded_object(path, marker)
    with pytest.raises(UnsafeCheckpointError, match="distcp"):
        load_checkpoint(path, *trainer())
    assert not marker.exists()


def test_nemo_checkpoint_weights_refuse_a_metadata_pickle_that_runs_code(megatron_tp1, tmp_path):
    pytest.importorskip("nemo.collections.llm", reason="needs the `nemo` extra")
    from nemo_dmc.nemo.checkpoint import export_nemo_checkpoint, load_nemo_model

    export_nemo_checkpoint(build_model(TINY_GQA, method=None), TINY_GQA, None, tmp_path / "nemo")
    marker = tmp_path / "pwned"
    _poison_metadata(tmp_path / "nemo" / "weights", marker)
    with pytest.raises(UnsafeCheckpointError, match=r"weights/\.metadata"):
        load_nemo_model(tmp_path / "nemo")
    with pytest.raises(UnsafeCheckpointError, match=r"weights/\.metadata"):
        load_weights(build_model(TINY_GQA, method=None), resolve_checkpoint(tmp_path / "nemo"))
    assert not marker.exists()
