"""A run killed mid-stage resumes from its latest checkpoint and replays the same losses."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Dict, List

import pytest
from trainer_runs import REPO, train_records, trainer_command

from nemo_dmc.checkpoints.run_dir import latest_checkpoint, read_progress
RUN = ["model=micro", "data=random", "logging=quiet", "data.micro_batch_size=2",
       "data.global_batch_size=4", "optim.lr=1e-2", "stage=[zero_out,retrofit]",
       "stage.zero_out.steps=2", "stage.retrofit.steps=16", "checkpoint.save_interval=3"]


def command(run_dir: Path) -> List[str]:
    return trainer_command(run_dir, RUN)


def losses_by_step(run_dir: Path) -> Dict[tuple, tuple]:
    """The last logged (lm loss, dmc loss, CR) of every (stage, step)."""
    return {(r["stage"], r["step"]): (r["lm_loss"], r["dmc_loss"], r["cr"])
            for r in train_records(run_dir)}


@pytest.mark.slow
def test_killed_run_resumes_with_the_same_losses_step_for_step(tmp_path):
    uninterrupted, killed = tmp_path / "uninterrupted", tmp_path / "killed"
    subprocess.run(command(uninterrupted), cwd=REPO, check=True, capture_output=True, timeout=600)

    # Its own session, so SIGKILL reaches the helper processes dist_checkpointing spawns.
    process = subprocess.Popen(command(killed), cwd=REPO, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 600
    while not any(r["stage"] == "retrofit" and r["step"] >= 7 for r in train_records(killed)):
        assert process.poll() is None and time.monotonic() < deadline, "run ended too early"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    before_kill = train_records(killed)
    steps_before_kill = {(r["stage"], r["step"]) for r in before_kill if r["stage"] == "retrofit"}
    assert 7 <= len(steps_before_kill) < 16
    saved = latest_checkpoint(killed / "checkpoints" / "retrofit")
    step = read_progress(saved).step
    assert step >= 6 and step % 3 == 0

    resumed = subprocess.run(command(killed), cwd=REPO, check=True, capture_output=True,
                             text=True, timeout=600)
    assert f"[retrofit] resumed from {saved} (step {step})" in resumed.stdout
    # the records up to the checkpoint, then the replayed steps once each (no duplicates)
    after = train_records(killed)
    kept = [r for r in before_kill if r["stage"] == "zero_out" or r["step"] <= step]
    assert after[:len(kept)] == kept
    assert [(r["stage"], r["step"]) for r in after[len(kept):]] == \
        [("retrofit", s) for s in range(step + 1, 17)]
    assert losses_by_step(killed) == losses_by_step(uninterrupted)
