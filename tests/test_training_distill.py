"""Trainer runs with distillation, per-step per-layer CR, and the noisy-vs-hard validation gap."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from nemo_dmc.checkpoints.run_dir import latest_checkpoint
from test_training_loop import records, train  # noqa: F401 (train: the fixture)


@pytest.fixture
def base(train, tmp_path) -> Path:
    """A pretrained plain-attention checkpoint (one pretraining step)."""
    train(tmp_path / "base", "stage=pretrain", "stage.pretrain.steps=1")
    return latest_checkpoint(tmp_path / "base" / "checkpoints" / "pretrain")


def test_distillation_logs_kl_in_training_and_validation(train, tmp_path, base, capsys):
    run_dir = tmp_path / "distill"
    [summary] = train(run_dir, "stage=retrofit", "stage.retrofit.steps=2", "distill=kl",
                      f"checkpoint.pretrained={base}", "dmc.init_offset=0")
    out = capsys.readouterr().out
    assert "[distill] frozen teacher in plain attention" in out and "MiB" in out
    steps = records(run_dir, "retrofit")
    assert all(r["kl"] > 0 for r in steps)
    [valid] = records(run_dir, "retrofit", "valid")
    assert valid["kl"] > 0 and summary.validation.kl == pytest.approx(valid["kl"])
    assert "kl " in out.splitlines()[-1]


def test_kl_alone_trains_without_the_cross_entropy(train, tmp_path, base):
    [summary] = train(tmp_path / "kl", "stage=retrofit", "stage.retrofit.steps=1", "distill=kl",
                      "distill.lm_weight=0", f"distill.teacher={base}")
    assert math.isfinite(summary.validation.lm_loss) and summary.validation.kl >= 0


def test_validation_reports_the_noisy_decision_loss_and_its_gap(train, tmp_path):
    [summary] = train(tmp_path, "stage=retrofit", "stage.retrofit.steps=2", "dmc.init_offset=0")
    val = summary.validation
    assert val.lm_loss_noisy is not None and val.lm_loss_noisy != val.lm_loss
    [valid] = records(tmp_path, "retrofit", "valid")
    assert valid["lm_loss_noisy"] == pytest.approx(val.lm_loss_noisy)
    assert valid["noisy_gap"] == pytest.approx(val.lm_loss - val.lm_loss_noisy)
    assert "kl" not in valid


def test_per_layer_cr_reaches_tensorboard_every_step_and_the_progress_bar(train, tmp_path,
                                                                         capsys):
    train(tmp_path, "stage=retrofit", "stage.retrofit.steps=3", "logging=default",
          "logging.log_interval=2", "logging.progress_bar=true")
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    for layer in (0, 1):
        logged = [e.step for e in events.Scalars(f"retrofit/train/layer_cr/{layer}")]
        assert logged == [1, 2, 3]
    assert "layer_cr=" in capsys.readouterr().err


def test_a_dms_student_distils_from_the_same_teacher(train, tmp_path, base):
    run_dir = tmp_path / "dms"
    [summary] = train(run_dir, "method=dms", "window=4", "stage=retrofit",
                      "stage.retrofit.steps=2", "distill=kl", f"checkpoint.pretrained={base}",
                      "dmc.balance=layer")  # a DMC-only loss form: DMS keeps the global one
    assert all(r["kl"] >= 0 for r in records(run_dir, "retrofit"))
    assert summary.validation.kl is not None and summary.validation.lm_loss_noisy is not None
