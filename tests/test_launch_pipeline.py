"""Pipeline parallelism through the trainer: torchrun with 2 and 4 CPU processes (gloo).

Every layout starts from the same base checkpoint and draws the same Gumbel noise per layer,
so its losses, realised CR and per-layer CR match the single-process run's up to
floating-point reduction order; checkpoints saved under one layout resume under another. The
model ties its output layer to the embedding, which a pipeline keeps on two stages.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

import pytest

from nemo_dmc.checkpoints.run_dir import latest_checkpoint, read_progress

REPO = Path(__file__).resolve().parents[1]
RUN = ["model=micro", "model.share_embeddings_and_output_weights=true", "data=random",
       "logging=quiet", "data.micro_batch_size=2", "data.global_batch_size=8", "optim.lr=1e-2",
       "stage=[zero_out,retrofit]", "stage.zero_out.steps=2", "stage.retrofit.steps=12",
       "checkpoint.save_interval=3", "checkpoint.keep_last=4", "dmc.loss_weight=20"]

pytestmark = pytest.mark.slow


def command(run_dir: Path, *overrides: str, processes: int = 1) -> List[str]:
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
    return [*launcher, "-m", "nemo_dmc.train", f"hydra.run.dir={run_dir}", *RUN, *overrides]


def train(run_dir: Path, *overrides: str, processes: int = 1) -> str:
    result = subprocess.run(command(run_dir, *overrides, processes=processes), cwd=REPO,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def records(run_dir: Path) -> List[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]
    return [r for r in lines if r["split"] == "train"]


def metrics(run_dir: Path) -> Dict[tuple, List[float]]:
    """(lm loss, dmc loss, CR, per-layer CR...) of every (stage, step)."""
    return {(r["stage"], r["step"]): [r["lm_loss"], r["dmc_loss"], r["cr"], *r["layer_cr"]]
            for r in records(run_dir)}


def assert_same_metrics(actual: Dict[tuple, List[float]], expected: Dict[tuple, List[float]]):
    assert actual.keys() == expected.keys()
    for key in expected:
        assert actual[key] == pytest.approx(expected[key], rel=1e-4, abs=1e-6), key
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
    steps = [(r["stage"], r["step"]) for r in records(run_dir)]
    assert steps == [("zero_out", 1), ("zero_out", 2)] + [("retrofit", s) for s in range(1, 13)]


def kill_run(run_dir: Path) -> None:
    """SIGKILL every process of a run: torchrun and its ranks (which torchrun starts in
    sessions of their own), found by the run directory on their command line."""
    marker = f"hydra.run.dir={run_dir}".encode()
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and marker in (proc / "cmdline").read_bytes().split(b"\0"):
                os.kill(int(proc.name), signal.SIGKILL)
        except (OSError, ProcessLookupError):
            continue


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> str:
    run_dir = tmp_path_factory.mktemp("base")
    train(run_dir, "stage=zero_out", "stage.zero_out.steps=1")
    return f"checkpoint.pretrained={run_dir / 'checkpoints' / 'zero_out' / 'step_0000001'}"


@pytest.fixture(scope="module")
def single(tmp_path_factory, base) -> Path:
    run_dir = tmp_path_factory.mktemp("single")
    train(run_dir, base)
    return run_dir


@pytest.fixture(scope="module")
def tp2_pp2(tmp_path_factory, base) -> Path:
    run_dir = tmp_path_factory.mktemp("tp2_pp2")
    train(run_dir, base, "parallel=tp2_pp2", processes=4)
    return run_dir


def test_two_pipeline_stages_match_one_process_across_a_kill(single, base, tmp_path):
    """A PP=2 run killed mid-stage (every rank SIGKILLed) resumes from its latest checkpoint;
    its metrics, before and after the kill, are the single process's."""
    run_dir = tmp_path / "pp2"
    process = subprocess.Popen(command(run_dir, base, "parallel=pp2", processes=2), cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while not any(r["stage"] == "retrofit" and r["step"] >= 7 for r in records(run_dir)):
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


def test_tp2_pp2_on_four_processes_matches_one_process(single, tp2_pp2):
    assert_same_metrics(metrics(tp2_pp2), metrics(single))


def test_checkpoint_saved_at_tp2_pp2_resumes_at_tp1_pp1(single, tp2_pp2, base, tmp_path):
    run_dir = resume_from_step_6(tp2_pp2, tmp_path / "run")
    assert_resumed_at_step_6(run_dir, train(run_dir, base))
    assert_same_metrics(metrics(run_dir), metrics(single))


def test_checkpoint_saved_at_tp1_pp1_resumes_at_pp2(single, base, tmp_path):
    run_dir = resume_from_step_6(single, tmp_path / "run")
    assert_resumed_at_step_6(run_dir, train(run_dir, base, "parallel=pp2", processes=2))
    assert_same_metrics(metrics(run_dir), metrics(single))
