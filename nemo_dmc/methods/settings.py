"""Method settings from a method name and the few knobs the CLIs expose (``method=``,
``ratio=``, ``sinks=``, ``window=`` of ``python -m nemo_dmc.evaluate`` and ``python -m nemo_dmc.generate``):

* ``dmc``: the checkpoint's own :class:`~nemo_dmc.core.DMCConfig` (hard decisions);
* ``dms``: :class:`~nemo_dmc.methods.dms.DMSConfig` taking the decision parameterisation
  (offset, scale, temperature, hard bias, target, loss weight, decision source) from that
  ``DMCConfig``, and
  the eviction ``window`` (default: the settings class's);
* ``vanilla``: plain attention, no compression (channel D-1 used as is);
* an eviction method (``h2o``, ``tova``, ``streaming``, or any registered
  :class:`~nemo_dmc.methods.eviction.EvictionMethod`): plain attention through its evicting
  cache at ``ratio`` (``sinks`` where the policy has them).
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any, Optional

from nemo_dmc.core import DMCConfig
from nemo_dmc.methods.base import method_class, method_names
from nemo_dmc.methods.dms import DMSConfig
from nemo_dmc.methods.eviction import EvictionMethod
from nemo_dmc.methods.vanilla import VanillaSettings


def settings_for(method: str, dmc: DMCConfig, ratio: Optional[float] = None,
                 sinks: int = 4, window: Optional[int] = None) -> Any:
    """Settings of ``method`` (``dmc``: ``dmc`` itself; ``dms``: its ``window``; eviction:
    ``ratio`` and, where the policy has them, ``sinks``). Errors name the ``method`` /
    ``ratio`` / ``window`` keys."""
    if window is not None and method != "dms":
        raise ValueError(f"window: only method=dms takes an eviction window, not {method!r}")
    if method == "dmc":
        return dmc
    if method == "dms":
        shared = ("init_offset", "decision_scale", "temperature", "hard_bias", "target_cr",
                  "loss_weight", "decision_source")
        values = {name: getattr(dmc, name) for name in shared}
        return DMSConfig(**values) if window is None else DMSConfig(window=window, **values)
    if method == "vanilla":
        return VanillaSettings()
    evicting = [n for n in method_names() if issubclass(method_class(n), EvictionMethod)]
    if method not in evicting:
        raise ValueError(f"method: must be dmc, dms, vanilla or one of {', '.join(evicting)}, "
                         f"got {method!r}")
    if ratio is None:
        raise ValueError(f"ratio: method {method!r} evicts at a compression ratio; set "
                         "ratio=<r >= 1>")
    cls = method_class(method).settings_class
    values = {"ratio": float(ratio), "sinks": sinks}
    return cls(**{f.name: values[f.name] for f in fields(cls) if f.name in values})
