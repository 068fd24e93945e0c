"""Progress lines for long conversions: ``[convert] layer 3/30 (1.2 s)`` on stderr."""

from __future__ import annotations

import sys
import time
from typing import Callable

ProgressFn = Callable[[str], None]
"""Takes one progress message; the conversion functions default to :func:`silent`."""


def silent(message: str) -> None:
    """A :data:`ProgressFn` that prints nothing (library calls, tests)."""


class Progress:
    """A :data:`ProgressFn` printing each message with the seconds since its creation."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def __call__(self, message: str) -> None:
        elapsed = time.perf_counter() - self.start
        print(f"[convert] {message} ({elapsed:.1f} s)", file=sys.stderr, flush=True)
