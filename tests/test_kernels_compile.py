"""Every Triton kernel compiles for an sm_90 GPU (ahead of time; no GPU needed)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

CHECK = Path(__file__).with_name("kernel_compile_check.py")


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
def test_kernels_compile_for_sm90_in_bf16(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(tmp_path)}
    result = subprocess.run([sys.executable, str(CHECK), "bf16"], env=env,
                            capture_output=True, text=True, timeout=600)
    lines = [line for line in result.stdout.splitlines() if line.startswith(("OK", "FAIL"))]
    assert result.returncode == 0, "\n".join(lines) + result.stderr[-2000:]
    assert len(lines) == 20 and all(line.startswith("OK") for line in lines)
