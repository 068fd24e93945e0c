"""A checkpoint finds its run's config only where the trainer's layout puts it, and evaluation
writes its data cache only where the user says (never where a loaded run config says)."""

from __future__ import annotations

from pathlib import Path

import yaml
from omegaconf import OmegaConf

from nemo_dmc.checkpoints.resolve import resolve_checkpoint
from nemo_dmc.checkpoints.run_config import RUN_CONFIG_FILE, find_run_config
from nemo_dmc.evaluate.config import HeldOutData
from nemo_dmc.evaluate.data import resolve_data
from nemo_dmc.training.config import DataConfig


def _run_config(folder: Path, hidden_size: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / RUN_CONFIG_FILE).write_text(yaml.safe_dump({"model": {"hidden_size": hidden_size}}))


def _dist_checkpoint(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "metadata.json").write_text('{"sharded_backend": "torch_dist"}')
    return path


def test_a_step_checkpoint_finds_its_runs_config(tmp_path):
    _run_config(tmp_path / "run", 64)
    step = _dist_checkpoint(tmp_path / "run" / "checkpoints" / "retrofit" / "step_0000005")
    for path in (step, step.parent, step.parent.parent, tmp_path / "run"):
        assert resolve_checkpoint(path).run_config.model.hidden_size == 64, path


def test_a_checkpoint_outside_the_run_layout_does_not_pick_up_a_config_above_it(tmp_path):
    _run_config(tmp_path / "someone_elses_run", 4096)
    for inside in ("downloads/ckpt", "a/b/ckpt", "checkpoints/not_a_stage/step_0000001",
                   "checkpoints/retrofit/not_a_step"):
        path = _dist_checkpoint(tmp_path / "someone_elses_run" / inside)
        assert find_run_config(path) is None, inside
        assert resolve_checkpoint(path).run_config is None, inside


def test_a_state_dict_file_reads_only_its_own_folders_run_config(tmp_path):
    _run_config(tmp_path / "run", 64)
    (tmp_path / "run" / "model.pt").write_bytes(b"")
    (tmp_path / "run" / "exports").mkdir()
    (tmp_path / "run" / "exports" / "model.pt").write_bytes(b"")
    assert resolve_checkpoint(tmp_path / "run" / "model.pt").run_config.model.hidden_size == 64
    assert resolve_checkpoint(tmp_path / "run" / "exports" / "model.pt").run_config is None


def test_evaluation_never_writes_into_the_cache_dir_a_run_config_names(tmp_path):
    run = OmegaConf.create({"data": {"source": "pydocs", "cache_dir": str(tmp_path / "theirs"),
                                     "seed": 7}})
    data = resolve_data(HeldOutData(), run)
    assert data.cache_dir == DataConfig().cache_dir and data.seed == 7
    assert resolve_data(HeldOutData(cache_dir=str(tmp_path / "mine")), run).cache_dir == str(
        tmp_path / "mine")
