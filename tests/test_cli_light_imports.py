"""The command-line entry points answer ``--help`` and reject bad config keys without
importing megatron (issue 17 item 11): each runs here with megatron, NeMo and Transformer
Engine made unimportable by a shim earlier on ``PYTHONPATH``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("megatron", "nemo", "transformer_engine")
CLIS = ("nemo_dmc.train", "nemo_dmc.generate", "nemo_dmc.evaluate")


@pytest.fixture
def without_megatron(tmp_path: Path) -> dict:
    """An environment in which ``import megatron`` (and nemo, transformer_engine) fails."""
    for name in HEAVY:
        package = tmp_path / "shim" / name
        package.mkdir(parents=True)
        (package / "__init__.py").write_text(
            f"raise ImportError('{name} is blocked: the CLI imported it too early')\n")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path / "shim"), str(REPO),
                                         env.get("PYTHONPATH", "")])
    return env


def _run(module: str, args: list[str], env: dict, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("module", CLIS)
def test_help_runs_without_megatron(module, without_megatron, tmp_path):
    result = _run(module, ["--help"], without_megatron, tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "== Keys ==" in result.stdout and "== Config ==" in result.stdout
    assert "blocked" not in result.stderr


@pytest.mark.parametrize("module", CLIS)
def test_unknown_key_is_rejected_without_megatron(module, without_megatron, tmp_path):
    result = _run(module, ["no_such_key=1"], without_megatron, tmp_path)
    assert result.returncode != 0
    assert "no_such_key" in result.stderr
    assert "blocked" not in result.stderr


def test_evaluate_validates_its_config_without_megatron(without_megatron, tmp_path):
    result = _run("nemo_dmc.evaluate", ["load=somewhere", "method=nope"], without_megatron,
                  tmp_path)
    assert result.returncode != 0
    assert "method:" in result.stderr and "blocked" not in result.stderr


@pytest.mark.parametrize("module", ["nemo_dmc.training.config", "nemo_dmc.inference.config",
                                    "nemo_dmc.evaluate.config"])
def test_config_modules_import_without_megatron(module):
    code = (f"import sys, {module}; "
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in "
            f"{HEAVY!r}); print(heavy); sys.exit(1 if heavy else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]


def test_train_help_and_key_check_import_no_torch(tmp_path):
    """``nemo_dmc.core``'s settings import without torch (its math loads on first use), so
    the trainer's help and key check skip torch's seconds of import too."""
    shim = tmp_path / "shim" / "torch"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError('torch is blocked: imported too early')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "shim"), str(REPO)])}
    result = _run("nemo_dmc.train", ["--help"], env, tmp_path)
    assert result.returncode == 0 and "blocked" not in result.stderr, result.stderr[-2000:]
    result = _run("nemo_dmc.train", ["no_such_key=1"], env, tmp_path)
    assert "no_such_key" in result.stderr and "blocked" not in result.stderr, result.stderr[-2000:]
