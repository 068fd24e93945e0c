"""bench/bench_commands.Evaluations: results kept beside the repository outlive the run
directory that produced them, and a finished evaluation is not run twice."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import List, Sequence

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from bench_commands import Evaluations  # noqa: E402


class FakeRunner:
    """Records each evaluate command and writes the results.json it would have written."""

    dry = False

    def __init__(self, ratio_seen: float) -> None:
        self.calls: List[List[str]] = []
        self.ratio_seen = ratio_seen

    def __call__(self, args: Sequence[str]) -> None:
        self.calls.append(list(args))
        out = Path(next(a for a in args if a.startswith("output_dir=")).split("=", 1)[1])
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps({"ratio": self.ratio_seen,
                                                       "perplexity": {"perplexity": 12.5}}))


def test_a_kept_result_outlives_its_run_directory(tmp_path):
    store = Evaluations(tmp_path / "runs" / "eval", tmp_path / "kept")
    assert store.load("dms_cr4") is None
    run = FakeRunner(ratio_seen=4.0)
    store.ensure(run, "dms_cr4", ["load=x", "method=dms"], ratio=4.0)
    assert run.calls[0][1:5] == ["-m", "nemo_dmc.evaluate", "load=x", "method=dms"]
    assert run.calls[0][-2:] == [f"output_dir={tmp_path / 'runs' / 'eval' / 'dms_cr4'}",
                                 "ratio=4.0"]
    assert json.loads((tmp_path / "kept" / "dms_cr4.json").read_text())["ratio"] == 4.0
    store.ensure(run, "dms_cr4", ["load=x", "method=dms"], ratio=4.0)
    assert len(run.calls) == 1  # done on this machine: not evaluated again

    shutil.rmtree(tmp_path / "runs")  # a fresh machine: only the kept copy is left
    assert store.load("dms_cr4")["perplexity"]["perplexity"] == 12.5


def test_a_result_at_another_ratio_is_evaluated_again(tmp_path):
    store = Evaluations(tmp_path / "eval", tmp_path / "kept")
    run = FakeRunner(ratio_seen=3.0)
    store.ensure(run, "h2o_cr4", ["load=x", "method=h2o"], ratio=3.0)
    run.ratio_seen = 3.5
    store.ensure(run, "h2o_cr4", ["load=x", "method=h2o"], ratio=3.5)
    assert len(run.calls) == 2
    assert store.load("h2o_cr4")["ratio"] == 3.5
    assert json.loads((tmp_path / "kept" / "h2o_cr4.json").read_text())["ratio"] == 3.5
