"""torchrun with 2 CPU processes (gloo): data parallel, tensor parallel, and resharding on resume.

Every layout starts from the same base checkpoint (megatron's random init itself depends on
the TP size) and trains on the same global batches with the same Gumbel noise, so its
losses match the single-process run's up to floating-point reduction order.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Dict, List

import pytest
from trainer_runs import base_checkpoint, run_trainer
RUN = ["model=micro", "data=random", "logging=quiet", "data.micro_batch_size=2",
       "data.global_batch_size=4", "optim.lr=1e-2", "stage=[zero_out,retrofit]",
       "stage.zero_out.steps=2", "stage.retrofit.steps=4", "checkpoint.save_interval=2",
       "checkpoint.keep_last=3"]

pytestmark = pytest.mark.slow


def train(run_dir: Path, *overrides: str, processes: int = 1) -> str:
    """Run the trainer; return its stdout."""
    return run_trainer(run_dir, [*RUN, *overrides], processes)


def train_steps(run_dir: Path) -> List[tuple]:
    """``(stage, step)`` of every logged training record, in order."""
    records = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    return [(r["stage"], r["step"]) for r in records if r["split"] == "train"]


def losses(run_dir: Path) -> Dict[tuple, List[float]]:
    """The last logged (lm loss, dmc loss, CR) of every (stage, step)."""
    records = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    return {(r["stage"], r["step"]): [r["lm_loss"], r["dmc_loss"], r["cr"]]
            for r in records if r["split"] == "train"}


def assert_same_losses(actual: Dict[tuple, List[float]], expected: Dict[tuple, List[float]]):
    assert actual.keys() == expected.keys()
    for key in expected:
        assert actual[key] == pytest.approx(expected[key], rel=1e-4, abs=1e-6), key


def resume_from_step_2(run_dir: Path, copy: Path) -> Path:
    """``copy`` of a finished run whose retrofit stage must redo steps 3-4."""
    shutil.copytree(run_dir, copy)
    shutil.rmtree(copy / "checkpoints" / "retrofit" / "step_0000004")
    return copy


def assert_resumed_at_step_2(run_dir: Path, stdout: str, logged_before: List[tuple]) -> None:
    """The run said it resumed from retrofit step 2, and metrics.jsonl still holds one record
    per step (the replayed steps 3-4 replaced their old records)."""
    step_2 = run_dir / "checkpoints" / "retrofit" / "step_0000002"
    assert f"[retrofit] resumed from {step_2} (step 2)" in stdout
    assert train_steps(run_dir) == logged_before


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> str:
    """``checkpoint.pretrained=`` a one-step TP=1 model."""
    return base_checkpoint(tmp_path_factory.mktemp("base"), RUN)


@pytest.fixture(scope="module")
def single(tmp_path_factory, base) -> Path:
    run_dir = tmp_path_factory.mktemp("single")
    train(run_dir, base)
    return run_dir


@pytest.fixture(scope="module")
def tensor_parallel(tmp_path_factory, base) -> Path:
    run_dir = tmp_path_factory.mktemp("tp2")
    train(run_dir, base, "parallel=tp2", processes=2)
    return run_dir


def test_data_parallel_over_two_processes_matches_one_process(single, base, tmp_path):
    train(tmp_path, base, processes=2)
    assert_same_losses(losses(tmp_path), losses(single))


def test_tensor_parallel_over_two_processes_matches_one_process(single, tensor_parallel):
    assert_same_losses(losses(tensor_parallel), losses(single))


def test_checkpoint_saved_at_tp1_resumes_at_tp2(single, base, tmp_path):
    run_dir = resume_from_step_2(single, tmp_path / "run")
    logged = train_steps(run_dir)
    stdout = train(run_dir, base, "parallel=tp2", processes=2)
    assert_resumed_at_step_2(run_dir, stdout, logged)
    assert_same_losses(losses(run_dir), losses(single))


def test_checkpoint_saved_with_one_data_parallel_rank_resumes_with_two(single, base, tmp_path):
    run_dir = resume_from_step_2(single, tmp_path / "run")
    logged = train_steps(run_dir)
    stdout = train(run_dir, base, processes=2)
    assert_resumed_at_step_2(run_dir, stdout, logged)
    assert_same_losses(losses(run_dir), losses(single))


def test_checkpoint_saved_at_tp2_resumes_at_tp1(single, tensor_parallel, base, tmp_path):
    run_dir = resume_from_step_2(tensor_parallel, tmp_path / "run")
    logged = train_steps(run_dir)
    stdout = train(run_dir, base)
    assert_resumed_at_step_2(run_dir, stdout, logged)
    assert_same_losses(losses(run_dir), losses(single))
