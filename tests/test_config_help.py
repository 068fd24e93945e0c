"""Every config key's default and meaning readable from the CLI and docs/CONFIG.md (issue 17
item 10), read from the schema dataclasses' docstrings."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

import pytest

from nemo_dmc.config_help import field_docs, keys, markdown

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "docs"))
import config_reference  # noqa: E402


@pytest.mark.parametrize("tool", list(config_reference.SCHEMAS))
def test_every_key_has_a_meaning(tool):
    found = list(keys(config_reference.SCHEMAS[tool]))
    assert len(found) > 20
    assert not [key for key, _, doc in found if not doc]


def test_docs_config_md_is_current():
    result = subprocess.run([sys.executable, str(REPO / "docs" / "config_reference.py"), "--check"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-1000:]
    assert "| `dmc.target_cr` | `4.0` |" in (REPO / "docs" / "CONFIG.md").read_text()


def test_field_docs_read_entries_continuations_and_bases():
    @dataclasses.dataclass
    class Base:
        """Base.

        Attributes:
            alpha: first line
                continued here.
            beta (int): typed entry.
        """

        alpha: int = 1
        beta: int = 2

    @dataclasses.dataclass
    class Child(Base):
        """Child.

        beta: overridden here.
        gamma: a nested one; ``null`` = off. Not a field: delta: ignored.
        """

        gamma: Optional["Base"] = None

    assert field_docs(Child) == {"alpha": "first line continued here.",
                                 "beta": "overridden here.",
                                 "gamma": "a nested one; ``null`` = off. Not a field: delta: ignored."}
    assert list(keys(Child)) == [("alpha", "1", "first line continued here."),
                                 ("beta", "2", "overridden here."),
                                 ("gamma", "null", "a nested one; `null` = off. Not a field: delta: ignored.")]
    assert "| `gamma` | `null` |" in markdown({"tool": Child})


def test_help_prints_each_key_with_default_and_meaning(tmp_path):
    result = subprocess.run([sys.executable, "-m", "nemo_dmc.train", "--help"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    at = lines.index("dmc.target_cr = 4.0")
    assert "compression ratio" in lines[at + 1]
    assert "optim.decision_lr_mult = 1.0" in lines and "== Config ==" in result.stdout
