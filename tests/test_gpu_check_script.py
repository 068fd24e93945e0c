"""bench/gpu_check.sh, cheaply: its syntax, and that every step's command names existing bench
scripts, flags those scripts define and test files that hold gpu-marked tests. The dry run
itself (a few CPU minutes) is not run here."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "bench" / "gpu_check.sh"
STEPS = ["setup", "gpu_tests", "kernels_decode", "decode", "kernels_training", "train_step"]

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def _steps(*flags: str) -> list[tuple[str, int, str]]:
    out = subprocess.run(["bash", str(SCRIPT), "--list", *flags], cwd=REPO, check=True,
                         capture_output=True, text=True, timeout=30).stdout
    rows = [line.split("\t") for line in out.splitlines()]
    return [(name, int(timeout), command) for name, timeout, command in rows]


def _defined_flags(script: Path) -> set[str]:
    return set(re.findall(r"add_argument\(\s*\"(--[a-z0-9-]+)\"", script.read_text()))


def test_script_parses_as_bash():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True, timeout=30)


# (not the id "gpu": conftest skips items whose keywords hold "gpu" on CPU machines)
@pytest.mark.parametrize("mode", [[], ["--dry-run"]], ids=["device", "dry"])
def test_every_step_names_existing_scripts_flags_and_tests(mode):
    steps = _steps(*mode)
    assert [name for name, _, _ in steps] == STEPS
    # the device tool returns at most 8 files from $OUT: one log per step and the summary
    assert len(steps) + 1 <= 8
    for name, timeout, command in steps:
        assert 0 < timeout <= 600, name
        for part in command.split("&&"):
            tokens = shlex.split(part)
            scripts = [i for i, t in enumerate(tokens) if t.endswith(".py")]
            if "pytest" in tokens:
                assert tokens[tokens.index("-m", tokens.index("pytest")) + 1] == "gpu"
                for path in (t for t in tokens if t.startswith("tests/")):
                    assert (REPO / path).is_file(), path
                continue
            if not scripts:
                continue
            # flags after the last script belong to it (gpu_check_args.py SCRIPT FLAGS...)
            target = REPO / tokens[scripts[-1]]
            assert target.is_file(), target
            for script_index in scripts:
                assert (REPO / tokens[script_index]).is_file(), tokens[script_index]
            flags = {t for t in tokens[scripts[-1] + 1:] if t.startswith("--")}
            missing = flags - _defined_flags(target)
            assert not missing, f"{name}: {target.name} lacks {sorted(missing)}"


def test_gpu_tests_step_covers_every_gpu_marked_test_file():
    command = dict((n, c) for n, _, c in _steps())["gpu_tests"]
    listed = {t for t in shlex.split(command) if t.startswith("tests/")}
    gpu_mark = re.compile(r"^\s*(@pytest\.mark\.gpu\b|pytestmark\s*=.*\bmark\.gpu\b)", re.M)
    marked = {f"tests/{p.name}" for p in (REPO / "tests").glob("test_*.py")
              if gpu_mark.search(p.read_text())}
    assert listed == marked


def test_carried_wheel_pins_match_setup_py():
    text = SCRIPT.read_text()
    pins = dict(p.split("==") for p in re.search(r"WHEEL_PINS=\(([^)]*)\)", text).group(1).split())
    setup = dict(re.findall(r"\"([a-z-]+)==([0-9.]+)\"", (REPO / "setup.py").read_text()))
    for name in ("megatron-core", "hydra-core", "omegaconf"):
        assert pins[name] == setup[name], name
    assert "numpy" not in pins  # the image's compiled packages need its own numpy 2
    budget = int(re.search(r"GPU_CHECK_BUDGET_S:-(\d+)", text).group(1))
    assert budget <= 570  # inside the device tool's 600 s per command, with setup margin
