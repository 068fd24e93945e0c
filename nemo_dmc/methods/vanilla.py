"""``vanilla``: plain attention with a full KV cache (the base hooks, unchanged)."""

from __future__ import annotations

from dataclasses import dataclass

from nemo_dmc.methods.base import KVMethod, register


@dataclass(frozen=True)
class VanillaSettings:
    """Plain attention has no settings."""


@register
class VanillaMethod(KVMethod):
    """Every token keeps its own slot; channel D-1 of q/k is used as is."""

    name = "vanilla"
    settings_class = VanillaSettings
