"""The trainer as a subprocess (one process, or torchrun with several), and its metrics."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import List, Sequence

REPO = Path(__file__).resolve().parents[1]


def trainer_command(run_dir: Path, args: Sequence[str], processes: int = 1) -> List[str]:
    """``python -m nemo_dmc.train`` into ``run_dir``, under torchrun for ``processes > 1``."""
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
    return [*launcher, "-m", "nemo_dmc.train", f"hydra.run.dir={run_dir}", *args]


def run_trainer(run_dir: Path, args: Sequence[str], processes: int = 1) -> str:
    """Train to the end (must succeed); return stdout."""
    result = subprocess.run(trainer_command(run_dir, args, processes), cwd=REPO,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def base_checkpoint(run_dir: Path, args: Sequence[str]) -> str:
    """``checkpoint.pretrained=`` a one-step zero-out run with ``args`` (every layout then
    starts from the same weights: megatron's random init depends on the layout)."""
    run_trainer(run_dir, [*args, "stage=zero_out", "stage.zero_out.steps=1"])
    return f"checkpoint.pretrained={run_dir / 'checkpoints' / 'zero_out' / 'step_0000001'}"


def train_records(run_dir: Path) -> List[dict]:
    """The training records of ``metrics.jsonl`` (a torn last line of a killed run skipped)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]
    return [r for r in lines if r["split"] == "train"]


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
