"""Write docs/CONFIG.md, the reference of every config key of the command-line tools, from
their schema dataclasses (``nemo_dmc.config_help``): ``python docs/config_reference.py``.
``--check`` exits 1 when the file is out of date (tests/test_config_help.py runs it)."""

from __future__ import annotations

import sys
from pathlib import Path

from nemo_dmc.config_help import markdown
from nemo_dmc.evaluate.config import EvaluateConfig
from nemo_dmc.generate import GenerateConfig
from nemo_dmc.training.config import TrainConfig

PATH = Path(__file__).resolve().with_name("CONFIG.md")
SCHEMAS = {"nemo_dmc.train": TrainConfig, "nemo_dmc.evaluate": EvaluateConfig,
           "nemo_dmc.generate": GenerateConfig}


def main(argv: list[str]) -> int:
    text = markdown(SCHEMAS) + "\n"
    if "--check" in argv:
        current = PATH.read_text() if PATH.is_file() else ""
        if current != text:
            print(f"{PATH} is out of date: run python docs/config_reference.py", file=sys.stderr)
            return 1
        return 0
    PATH.write_text(text)
    print(f"wrote {PATH}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
