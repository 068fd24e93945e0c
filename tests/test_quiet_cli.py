"""Command-line output: third-party notices hidden, NEMO_DMC_VERBOSE=1 shows them (issue 17 item 9)."""

from __future__ import annotations

import os
import subprocess
import sys

from nemo_dmc.quiet import VERBOSE_ENV

# Lines megatron-core / torch / NeMo print on import in this stack, none a problem of the run.
NOISE = ("has reached end of life", "pynvml", "Apex is not installed", "Transformer Engine",
         "unified memory", "Detected Megatron Core", "multistorageclient", "NumExpr")
GENERATE = [sys.executable, "-m", "nemo_dmc.generate", "prompt_token_ids=[[1,2,3]]",
            "sampling.max_new_tokens=2"]


def _run(verbose: bool) -> str:
    env = {k: v for k, v in os.environ.items() if k != VERBOSE_ENV}
    if verbose:
        env[VERBOSE_ENV] = "1"
    done = subprocess.run(GENERATE, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout + done.stderr


def test_a_command_prints_its_own_lines_only_unless_verbose():
    quiet = _run(verbose=False)
    assert "[request 0] completion" in quiet
    assert not [n for n in NOISE if n in quiet], quiet
    assert len(quiet.strip().splitlines()) == 4, quiet  # model line, prompt, completion, CR
    loud = _run(verbose=True)
    assert "[request 0] completion" in loud
    assert "has reached end of life" in loud and "Apex is not installed" in loud
