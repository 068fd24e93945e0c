"""A checkpoint finds its run's config only where the trainer's layout puts it, and evaluation
writes its data cache only where the user says (never where a loaded run config says)."""

from __future__ import annotations

from pathlib import Path

import pytest
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


# -- the trained KV method: consumers run the run's own unless method= says otherwise ----------


def _method_run(folder: Path, **keys) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / RUN_CONFIG_FILE).write_text(yaml.safe_dump({"model": {"hidden_size": 64}, **keys}))
    return _dist_checkpoint(folder / "checkpoints" / "retrofit" / "step_0000001")


def test_a_checkpoint_records_the_method_and_window_its_run_trained(tmp_path):
    dms = _method_run(tmp_path / "dms", method="dms", window=4)
    assert resolve_checkpoint(dms).recorded_method() == ("dms", 4)
    dmc = _method_run(tmp_path / "dmc", method="dmc", window=None)
    assert resolve_checkpoint(dmc).recorded_method() == ("dmc", None)
    old = _method_run(tmp_path / "old")  # a run from before `method` was recorded
    assert resolve_checkpoint(old).recorded_method() == ("dmc", None)
    bare = _dist_checkpoint(tmp_path / "downloads" / "ckpt")
    assert resolve_checkpoint(bare).recorded_method() is None


def test_choose_method_defaults_to_the_runs_method_and_window():
    from nemo_dmc.methods import choose_method

    choice = choose_method(None, None, ("dms", 4))
    assert (choice.method, choice.window, choice.source, choice.note) == ("dms", 4, "run", None)
    choice = choose_method(None, None, None)  # nothing recorded: dmc, as before
    assert (choice.method, choice.window, choice.source) == ("dmc", None, "default")
    choice = choose_method("dms", None, ("dms", 4))  # method=dms keeps the run's window
    assert (choice.method, choice.window, choice.note) == ("dms", 4, None)
    choice = choose_method(None, 8, ("dms", 4))  # window= overrides it, with a note
    assert (choice.method, choice.window) == ("dms", 8) and "window=8" in choice.note
    choice = choose_method("dmc", None, ("dms", 4))  # allowed, but not the trained model
    assert (choice.method, choice.window, choice.source) == ("dmc", None, "given")
    assert "trained with method=dms" in choice.note and "different model" in choice.note
    assert "method=dms" in choose_method("dms", None, ("dmc", None)).note
    choice = choose_method("vanilla", None, ("dms", 4))  # other methods: no note
    assert (choice.method, choice.window, choice.note) == ("vanilla", None, None)
    assert choose_method("h2o", None, ("dms", 4)).note is None


def test_a_window_on_a_run_that_trained_dmc_is_an_error_naming_the_key():
    from nemo_dmc.methods import choose_method

    with pytest.raises(ValueError, match="^window: .*trained dmc"):
        choose_method(None, 4, ("dmc", None))
    with pytest.raises(ValueError, match="^--window: "):
        choose_method("vanilla", 4, None, method_key="--method", window_key="--window")
