"""Pipeline parallelism through the trainer: torchrun with 2 and 4 CPU processes (gloo).

Every layout starts from the same base checkpoint and draws the same Gumbel noise per layer,
so its losses, realised CR and per-layer CR match the single-process run's up to
floating-point reduction order; checkpoints saved under one layout resume under another. The
model ties its output layer to the embedding, which a pipeline keeps on two stages.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path
from typing import Dict, List

import pytest
from trainer_runs import (
    REPO,
    base_checkpoint,
    kill_run,
    run_trainer,
    train_records,
    trainer_command,
)

from nemo_dmc.checkpoints.run_dir import latest_checkpoint, read_progress
RUN = ["model=micro", "model.num_layers=4", "model.share_embeddings_and_output_weights=true",
       "data=random",
       "logging=quiet", "data.micro_batch_size=2", "data.global_batch_size=8", "optim.lr=1e-2",
       "stage=[zero_out,retrofit]", "stage.zero_out.steps=2", "stage.retrofit.steps=12",
       "checkpoint.save_interval=3", "checkpoint.keep_last=4", "dmc.loss_weight=20"]

pytestmark = pytest.mark.slow


def command(run_dir: Path, *overrides: str, processes: int = 1) -> List[str]:
    return trainer_command(run_dir, [*RUN, *overrides], processes)


def train(run_dir: Path, *overrides: str, processes: int = 1) -> str:
    return run_trainer(run_dir, [*RUN, *overrides], processes)


def metrics(run_dir: Path) -> Dict[tuple, List[float]]:
    """(lm loss, dmc loss, CR, per-layer CR...) of every (stage, step)."""
    return {(r["stage"], r["step"]): [r["lm_loss"], r["dmc_loss"], r["cr"], *r["layer_cr"]]
            for r in train_records(run_dir)}


def assert_same_metrics(actual: Dict[tuple, List[float]], expected: Dict[tuple, List[float]]):
    """Equal up to reduction order: the LM loss to 1e-3; the compression loss and the CRs
    count hard decisions, and after a dozen steps a decision at its threshold may flip under
    another summation order (TP x PP), so they agree to 0.02. (Exact equality of losses and
    gradients across layouts: tests/test_pipeline_parallel.py.)"""
    assert actual.keys() == expected.keys()
    for key in expected:
        assert actual[key][0] == pytest.approx(expected[key][0], rel=1e-3), key
        assert actual[key][1:] == pytest.approx(expected[key][1:], abs=0.02), key
    assert max(v[2] for v in expected.values()) > 1.05  # decisions did compress


def resume_from_step_6(run_dir: Path, copy: Path) -> Path:
    """``copy`` of a finished run whose retrofit must redo steps 7-12."""
    shutil.copytree(run_dir, copy)
    for step in (9, 12):
        shutil.rmtree(copy / "checkpoints" / "retrofit" / f"step_{step:07d}")
    return copy


def assert_resumed_at_step_6(run_dir: Path, stdout: str) -> None:
    assert f"[retrofit] resumed from {run_dir / 'checkpoints' / 'retrofit' / 'step_0000006'} " \
           "(step 6)" in stdout
    steps = [(r["stage"], r["step"]) for r in train_records(run_dir)]
    assert steps == [("zero_out", 1), ("zero_out", 2)] + [("retrofit", s) for s in range(1, 13)]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> str:
    return base_checkpoint(tmp_path_factory.mktemp("base"), RUN)


@pytest.fixture(scope="module")
def single(tmp_path_factory, base) -> Path:
    run_dir = tmp_path_factory.mktemp("single")
    train(run_dir, base)
    return run_dir


def test_two_pipeline_stages_match_one_process_across_a_kill(single, base, tmp_path):
    """A PP=2 run killed mid-stage (every rank SIGKILLed) resumes from its latest checkpoint;
    its metrics, before and after the kill, are the single process's."""
    run_dir = tmp_path / "pp2"
    process = subprocess.Popen(command(run_dir, base, "parallel=pp2", processes=2), cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while not any(r["stage"] == "retrofit" and r["step"] >= 7 for r in train_records(run_dir)):
        assert process.poll() is None and time.monotonic() < deadline, "run ended too early"
        time.sleep(0.05)
    kill_run(run_dir)
    process.wait()
    step = read_progress(latest_checkpoint(run_dir / "checkpoints" / "retrofit")).step
    assert 6 <= step < 12
    stdout = train(run_dir, base, "parallel=pp2", processes=2)
    assert f"[retrofit] resumed from {run_dir / 'checkpoints' / 'retrofit'}" in stdout
    assert f"(step {step})" in stdout
    assert_same_metrics(metrics(run_dir), metrics(single))


def resume_at_step_9(run_dir: Path, base: str, *layout: str, processes: int = 1) -> None:
    """Drop the run's step-12 checkpoint and redo steps 10-12 under another layout."""
    shutil.rmtree(run_dir / "checkpoints" / "retrofit" / "step_0000012")
    stdout = train(run_dir, base, *layout, processes=processes)
    assert f"{run_dir / 'checkpoints' / 'retrofit' / 'step_0000009'} (step 9)" in stdout


def test_checkpoints_move_between_layouts_and_every_layout_matches_one_process(
        single, base, tmp_path):
    """One run, resumed under four layouts in turn: TP1 x PP1 (steps 1-6) -> PP2 x 2
    interleaved chunks (7-12; 4 layers, 1 per chunk) -> TP2 x PP2 on four processes (10-12,
    from step 9) -> TP1 x PP1 (10-12 again). Every step matches the single process."""
    run_dir = resume_from_step_6(single, tmp_path / "run")
    assert_resumed_at_step_6(run_dir, train(run_dir, base, "parallel=pp2",
                                            "parallel.virtual_pipeline_model_parallel_size=2",
                                            processes=2))
    assert_same_metrics(metrics(run_dir), metrics(single))
    resume_at_step_9(run_dir, base, "parallel=tp2_pp2", processes=4)
    assert_same_metrics(metrics(run_dir), metrics(single))
    resume_at_step_9(run_dir, base)
    assert_same_metrics(metrics(run_dir), metrics(single))
