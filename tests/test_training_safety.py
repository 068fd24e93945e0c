"""A run directory is one training's: its lock, its recorded config, one metrics record per
step after a resume, damaged checkpoints and data files named with their fix."""

from __future__ import annotations

import gc
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import List

import pytest
from omegaconf import OmegaConf

from nemo_dmc.checkpoints.run_dir import (
    DamagedCheckpointError,
    checkpoint_damage,
    latest_intact_checkpoint,
    read_progress,
)
from nemo_dmc.training.checkpoint import load_checkpoint, save_checkpoint
from nemo_dmc.training.config import (
    ConfigError,
    LoggingConfig,
    resume_changes,
    validate_config,
)
from nemo_dmc.training.metrics import RunLogger
from nemo_dmc.training.run_lock import LOCK_FILE, acquire_run_lock
from nemo_dmc.training.runner import write_run_config
from test_training_checkpoint import progress, trainer
from test_training_loop import indexed, micro_config, records, tiny_corpus, train  # noqa: F401

RETROFIT = ["stage=retrofit", "stage.retrofit.steps=4", "checkpoint.save_interval=2"]


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def write_lock(run_dir: Path, pid: int, host: str) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    path.write_text(json.dumps({"pid": pid, "host": host, "since": "2025-01-01 00:00:00 UTC"}))
    return path


def recorded_run(run_dir: Path, *overrides: str) -> Path:
    """A run directory as a run of ``overrides`` leaves it: its run_config.yaml and a
    (placeholder) checkpoint of the retrofit stage."""
    write_run_config(micro_config(run_dir, *RETROFIT, *overrides))
    step = run_dir / "checkpoints" / "retrofit" / "step_0000002"
    step.mkdir(parents=True)
    return step


# -- item 6: one training per run directory ----------------------------------------------------


def test_a_second_training_in_a_locked_run_dir_is_refused_naming_the_holder(train, tmp_path):
    held = acquire_run_lock(tmp_path)  # this process's first "training"
    try:
        with pytest.raises(ConfigError, match=rf"run_dir .*in use by pid {os.getpid()} on host "
                                               rf"{socket.gethostname()} \(since "):
            train(tmp_path, *RETROFIT)
    finally:
        held.release()
    assert not (tmp_path / LOCK_FILE).exists()
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "metrics.jsonl").exists()


def test_a_lock_of_a_live_process_on_this_host_is_refused(tmp_path):
    path = write_lock(tmp_path, os.getppid(), socket.gethostname())
    with pytest.raises(ConfigError, match=rf"pid {os.getppid()} .*still running.*delete {path}"):
        acquire_run_lock(tmp_path)
    assert json.loads(path.read_text())["pid"] == os.getppid()  # left as it was


def test_a_lock_from_another_host_is_refused_naming_it(tmp_path):
    path = write_lock(tmp_path, 4242, "node-17")
    with pytest.raises(ConfigError, match=rf"pid 4242 on host node-17 .*delete {path}"):
        acquire_run_lock(tmp_path)


def test_a_stale_lock_of_a_dead_process_on_this_host_is_taken_over_saying_so(tmp_path):
    pid = dead_pid()
    write_lock(tmp_path, pid, socket.gethostname())
    notes: List[str] = []
    lock = acquire_run_lock(tmp_path, notes.append)
    assert len(notes) == 1 and "stale lock" in notes[0] and f"pid {pid}" in notes[0]
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / LOCK_FILE).exists()


def test_resume_with_another_seed_shape_batch_or_dmc_setting_is_refused_naming_each(
        train, tmp_path):
    recorded_run(tmp_path)
    changed = ["seed=7", "model.num_layers=3", "data.global_batch_size=8", "dmc.window=4"]
    with pytest.raises(ConfigError) as info:
        train(tmp_path, *RETROFIT, *changed)
    message = str(info.value)
    for key, old, new in (("seed", 1234, 7), ("model.num_layers", 2, 3),
                          ("data.global_batch_size", 4, 8), ("dmc.window", 12, 4)):
        assert f"{key} {old!r} -> {new!r}" in message, (key, message)
    assert "checkpoint.allow_config_change=true" in message
    assert OmegaConf.load(tmp_path / "run_config.yaml").seed == 1234  # the record is kept
    assert not (tmp_path / LOCK_FILE).exists()  # released after the refusal


def test_allow_config_change_continues_and_records_the_new_config(train, tmp_path, capsys):
    recorded_run(tmp_path, "seed=1")
    # the placeholder checkpoint is not loadable: the run gets past the config check only
    with pytest.raises(ConfigError, match="checkpoint.resume"):
        train(tmp_path, *RETROFIT, "seed=2", "checkpoint.allow_config_change=true")
    assert "seed 1 -> 2" in capsys.readouterr().out
    assert OmegaConf.load(tmp_path / "run_config.yaml").seed == 2


def test_settings_that_keep_the_model_and_data_order_may_change_on_resume(tmp_path):
    old = micro_config(tmp_path, *RETROFIT)
    new = micro_config(tmp_path, "stage=retrofit", "stage.retrofit.steps=40", "optim.lr=1e-3",
                       "model.pretrain_tokens=1000000", "dmc.budget_pct=4",
                       "data.micro_batch_size=1", "logging.log_interval=5",
                       "checkpoint.save_interval=7")
    assert resume_changes(OmegaConf.structured(old), new) == []
    split = micro_config(tmp_path, *RETROFIT, "data.split='90,10,0'", "data.seed=5")
    assert [key for key, _, _ in resume_changes(OmegaConf.structured(old), split)] == \
        ["data.seed", "data.split"]


def test_a_recorded_config_without_a_newer_setting_still_resumes(tmp_path):
    recorded = OmegaConf.to_container(OmegaConf.structured(micro_config(tmp_path, *RETROFIT)))
    del recorded["dmc"]["hard_bias"]
    assert resume_changes(OmegaConf.create(recorded), micro_config(tmp_path, *RETROFIT)) == []


# -- item 7: one metrics record per step after a resume ----------------------------------------


def logged(path: Path) -> List[tuple]:
    return [(r["stage"], r["split"], r["step"])
            for r in map(json.loads, (path / "metrics.jsonl").read_text().splitlines())]


def log_steps(run_dir: Path, stage: str, steps: range, final: int, valid_at=()) -> None:
    logger = RunLogger(run_dir, LoggingConfig(tensorboard=False, progress_bar=False), True)
    logger.start_stage(stage, final, steps.start - 1, "")
    for step in steps:
        logger.log(stage, "train", step, {"lm_loss": 1.0})
        if step in valid_at:
            logger.log(stage, "valid", step, {"lm_loss": 1.0})
    logger.close()


def test_a_resumed_stage_replaces_the_records_after_its_resume_step(tmp_path):
    log_steps(tmp_path, "zero_out", range(1, 3), final=2, valid_at=(2,))
    log_steps(tmp_path, "retrofit", range(1, 6), final=8, valid_at=(2, 4))  # killed after 5
    with (tmp_path / "metrics.jsonl").open("a") as torn:
        torn.write('{"stage": "retrofit", "split": "tr')  # the kill tore the last line
    log_steps(tmp_path, "retrofit", range(5, 9), final=8, valid_at=(8,))  # resumed from 4
    assert logged(tmp_path) == [
        ("zero_out", "train", 1), ("zero_out", "train", 2), ("zero_out", "valid", 2),
        ("retrofit", "train", 1), ("retrofit", "train", 2), ("retrofit", "valid", 2),
        ("retrofit", "train", 3), ("retrofit", "train", 4), ("retrofit", "valid", 4),
        *[("retrofit", "train", s) for s in range(5, 9)], ("retrofit", "valid", 8)]


def test_a_finished_stage_run_again_logs_its_final_validation_once(tmp_path):
    log_steps(tmp_path, "zero_out", range(1, 3), final=2, valid_at=(2,))
    logger = RunLogger(tmp_path, LoggingConfig(tensorboard=False, progress_bar=False), True)
    logger.start_stage("zero_out", 2, 2, "")  # resumed at its last step: only validates
    logger.log("zero_out", "valid", 2, {"lm_loss": 0.5})
    logger.close()
    assert logged(tmp_path) == [("zero_out", "train", 1), ("zero_out", "train", 2),
                                ("zero_out", "valid", 2)]


@pytest.mark.slow
def test_a_run_resumed_from_an_earlier_checkpoint_has_one_record_per_step(train, tmp_path, capsys):
    """Also: a truncated shard of the latest checkpoint falls back to the previous one."""
    train(tmp_path, *RETROFIT)
    assert not (tmp_path / LOCK_FILE).exists()
    step2, step4 = (tmp_path / "checkpoints" / "retrofit" / f"step_000000{s}" for s in (2, 4))
    shard = sorted(step4.glob("*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[:100])
    capsys.readouterr()
    train(tmp_path, *RETROFIT)
    out = capsys.readouterr().out
    assert f"skipping the damaged checkpoint step_0000004 (shard {shard} is truncated" in out
    assert f"[retrofit] resumed from {step2} (step 2)" in out
    assert [r["step"] for r in records(tmp_path, "retrofit")] == [1, 2, 3, 4]
    assert [r["step"] for r in records(tmp_path, "retrofit", "valid")] == [4]
    assert checkpoint_damage(step4) is None  # saved again


# -- item 9: damaged checkpoints, data files and run_dir ---------------------------------------


def test_a_checkpoint_with_a_missing_or_truncated_file_is_named_and_skipped(megatron_tp1,
                                                                            tmp_path):
    ddp, optimizer, scheduler = trainer()
    for step in (3, 6):
        save_checkpoint(tmp_path, ddp, optimizer, scheduler, progress(step), keep_last=2)
    step3, step6 = tmp_path / "step_0000003", tmp_path / "step_0000006"
    assert checkpoint_damage(step6) is None
    assert latest_intact_checkpoint(tmp_path) == (step6, [])
    shard = sorted(step6.glob("*.distcp"))[-1]
    shard.write_bytes(shard.read_bytes()[:-1])
    assert checkpoint_damage(step6) == f"shard {shard} is truncated " \
        f"({shard.stat().st_size} of {shard.stat().st_size + 1} bytes)"
    shard.unlink()
    assert checkpoint_damage(step6) == f"shard {shard} is missing"
    assert latest_intact_checkpoint(tmp_path) == (step3, [(step6, f"shard {shard} is missing")])
    with pytest.raises(DamagedCheckpointError, match=rf"{shard} is missing"):
        load_checkpoint(step6, *trainer())  # before loading anything


def test_a_truncated_common_pt_is_named_not_a_zip_traceback(megatron_tp1, tmp_path):
    ddp, optimizer, scheduler = trainer()
    path = save_checkpoint(tmp_path, ddp, optimizer, scheduler, progress(3), keep_last=2)
    common = path / "common.pt"
    common.write_bytes(common.read_bytes()[:500])
    with pytest.raises(DamagedCheckpointError, match=rf"{common} is truncated or unreadable"):
        read_progress(path)
    assert checkpoint_damage(path).startswith(f"{common} is truncated or unreadable")
    assert latest_intact_checkpoint(tmp_path) == (None, [(path, checkpoint_damage(path))])


def test_a_run_whose_checkpoints_are_all_damaged_stops_naming_them(train, tmp_path):
    step = recorded_run(tmp_path)  # a step directory without its files
    with pytest.raises(ConfigError, match=rf"checkpoint.resume: no intact checkpoint in "
                                          rf".*{step / 'common.pt'} is missing.*move"):
        train(tmp_path, *RETROFIT)


def test_an_unwritable_run_dir_is_a_config_error_before_any_compute(tmp_path):
    (tmp_path / "file").write_text("")
    cfg = micro_config(tmp_path / "file" / "run", *RETROFIT)
    with pytest.raises(ConfigError, match=r"^run_dir: .*file/run cannot be created: "
                                          r".*file is a file"):
        validate_config(cfg, world_size=1, cuda_available=False)
    cfg = micro_config(tmp_path / "run", *RETROFIT, f"checkpoint.dir={tmp_path / 'file'}")
    with pytest.raises(ConfigError, match=r"^checkpoint.dir: "):
        validate_config(cfg, world_size=1, cuda_available=False)


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_a_read_only_run_dir_is_a_config_error(tmp_path):
    (tmp_path / "ro").mkdir(mode=0o500)
    cfg = micro_config(tmp_path / "ro" / "run", *RETROFIT)
    with pytest.raises(ConfigError, match=r"^run_dir: .*not writable"):
        validate_config(cfg, world_size=1, cuda_available=False)


def truncated_copy(source: Path, directory: Path, suffix: str, keep: int) -> Path:
    for ext in (".bin", ".idx"):
        shutil.copy(source.with_suffix(ext), directory / f"cut{ext}")
    damaged = directory / f"cut{suffix}"
    damaged.write_bytes(damaged.read_bytes()[:keep])
    return directory / "cut"


@pytest.mark.parametrize("suffix, keep", [(".idx", 20), (".idx", -8), (".bin", -2)])
def test_a_truncated_indexed_dataset_is_named_with_its_fix_and_no_del_error(
        tiny_corpus, tmp_path, monkeypatch, suffix, keep):
    from nemo_dmc.data.datasets import CorruptDatasetError, check_indexed_dataset

    unraisable: List[object] = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    prefix = truncated_copy(tiny_corpus / "a", tmp_path, suffix, keep)
    with pytest.raises(CorruptDatasetError, match=rf"cut\{suffix}: .*python -m "
                                                  r"nemo_dmc.data.preprocess"):
        check_indexed_dataset(prefix)
    gc.collect()
    assert unraisable == []


def test_training_on_a_truncated_dataset_is_a_config_error_naming_the_file(
        train, tiny_corpus, tmp_path):
    prefix = truncated_copy(tiny_corpus / "b", tmp_path, ".bin", -2)
    data = indexed(tiny_corpus, str(tiny_corpus / "a"), str(prefix))
    with pytest.raises(ConfigError, match=r"^data.valid_prefixes: .*cut\.bin.*preprocess"):
        train(tmp_path / "run", *data, "stage=retrofit", "stage.retrofit.steps=1")
