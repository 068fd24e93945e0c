"""Shared pieces of the experiment scripts (reproduce.py, smollm2_quality.py): a runner of
the product's commands that logs each one, the store of their evaluation results, and the
writer of a results block in a document."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parents[1]
RESULTS_FILE = "results.json"
PYTHON = sys.executable


class Runner:
    """Runs (or, dry, only prints) commands from the repository root and appends each to
    ``<root>/commands.txt``; :meth:`parallel` runs independent tasks ``jobs`` at a time."""

    def __init__(self, root: Path, threads: int, dry: bool, jobs: int = 1) -> None:
        self.log, self.dry, self.jobs = REPO / root / "commands.txt", dry, jobs
        self.env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        self.log.parent.mkdir(parents=True, exist_ok=True)

    def __call__(self, args: Sequence[str], log_file: Optional[Path] = None) -> None:
        line = shlex.join(["python", *args[1:]] if args[0] == PYTHON else list(args))
        print(f"$ {line}", flush=True)
        if self.dry:
            return
        with self.log.open("a") as log:
            log.write(line + "\n")
        out = (REPO / log_file).open("a") if log_file else None
        try:
            subprocess.run(list(args), cwd=REPO, env=self.env, check=True, stdout=out,
                           stderr=subprocess.STDOUT if out else None)
        finally:
            if out:
                out.close()

    def parallel(self, tasks: Sequence[Callable[[], object]]) -> None:
        """Run independent tasks, ``jobs`` at a time; re-raise the first failure."""
        with ThreadPoolExecutor(max_workers=max(1, self.jobs)) as pool:
            for future in [pool.submit(task) for task in tasks]:
                future.result()


@dataclass(frozen=True)
class Evaluations:
    """An experiment's evaluation results: ``<runs>/<name>/results.json`` as
    ``nemo_dmc.evaluate`` writes it, and a tracked copy ``<kept>/<name>.json``. Run directories
    stay on the machine that made them; the kept copies travel with the repository, so a table
    can be rebuilt (and new rows added to it) without re-running what it already holds."""

    runs: Path
    kept: Path

    def _fresh(self, name: str) -> Path:
        return REPO / self.runs / name / RESULTS_FILE

    def load(self, name: str) -> Optional[dict]:
        """The result of ``name``: this machine's if it has one, else the kept copy."""
        for path in (self._fresh(name), REPO / self.kept / f"{name}.json"):
            if path.is_file():
                return json.loads(path.read_text())
        return None

    def ensure(self, run: Runner, name: str, args: Sequence[str],
               ratio: Optional[float] = None) -> None:
        """``python -m nemo_dmc.evaluate <args>`` into ``<runs>/<name>`` unless this machine
        has that result already (at ``ratio``, when given), then keep a copy of it."""
        done = self._fresh(name)
        if done.is_file() and ratio is not None and json.loads(done.read_text())["ratio"] != ratio:
            done.unlink()  # evaluated at another ratio (the retrofit's realised one changed)
        if not done.is_file():
            run([PYTHON, "-m", "nemo_dmc.evaluate", *args, f"output_dir={self.runs / name}",
                 *([f"ratio={ratio}"] if ratio is not None else [])])
        if not run.dry:
            kept = REPO / self.kept / f"{name}.json"
            kept.parent.mkdir(parents=True, exist_ok=True)
            partial = kept.with_suffix(".json.tmp")
            partial.write_text(done.read_text())
            partial.replace(kept)


def write_between_markers(path: Path, text: str, markers: Tuple[str, str]) -> None:
    """Replace the text between the two ``markers`` in ``path`` (which must contain both)."""
    content = path.read_text()
    start, end = (content.find(m) for m in markers)
    if start < 0 or end < start:
        raise ValueError(f"{path} lacks the markers {markers}")
    path.write_text(content[:start + len(markers[0])] + "\n" + text + "\n" + content[end:])


def final_checkpoint(run_dir: Path, stage: str, hint: str) -> Path:
    """The last checkpoint of a finished ``stage`` of ``run_dir`` (relative to the repository
    when inside it); ``hint`` says how to finish it when it is missing or unfinished."""
    from nemo_dmc.checkpoints.run_dir import latest_checkpoint, read_progress

    latest = latest_checkpoint(REPO / run_dir / "checkpoints" / stage)
    if latest is None:
        raise FileNotFoundError(f"no {stage} checkpoint in {run_dir} ({hint})")
    progress = read_progress(latest)
    if not progress.complete:
        raise SystemExit(f"{stage} in {run_dir} is unfinished (step {progress.step}/"
                         f"{progress.steps}): {hint}")
    return latest.relative_to(REPO) if latest.is_relative_to(REPO) else latest
