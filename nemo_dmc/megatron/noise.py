"""Where the Gumbel noise of training decisions comes from.

Inside :func:`noise_scope` every layer draws its noise from its own generator, seeded from
``(scope key, global layer number)``: a layer's noise is then the same whichever pipeline stage
holds it and in whatever order the stages run their micro-batches (and a resumed step draws
what it drew before). The trainer opens one scope per micro-batch, keyed by the step and the
micro-batch's position in the global batch (:func:`noise_seed`). Outside a scope the layers
draw from torch's default generator.
"""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from typing import Iterator, Optional

import torch

_SCOPE: dict = {"key": None}


def noise_seed(key: str, position: int) -> int:
    """A 63-bit seed for ``key`` and ``position`` (e.g. a step and a global micro-batch)."""
    digest = hashlib.blake2b(f"{key}/{position}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@contextmanager
def noise_scope(key: str) -> Iterator[None]:
    """Seed every layer's noise from ``key`` and its layer number while inside."""
    previous, _SCOPE["key"] = _SCOPE["key"], key
    try:
        yield
    finally:
        _SCOPE["key"] = previous


def layer_generator(layer_number: int, device: torch.device) -> Optional[torch.Generator]:
    """The generator of layer ``layer_number`` in the current scope (``None`` outside one:
    use the default generator)."""
    if _SCOPE["key"] is None:
        return None
    return torch.Generator(device).manual_seed(noise_seed(_SCOPE["key"], layer_number))
