"""The KV method a checkpoint is evaluated under (``method=``), as method settings the model
is built with (:mod:`nemo_dmc.methods`):

* ``dmc``: the model's own hard decisions (eval mode), i.e. DMC's compressed cache;
* ``vanilla``: plain attention, no compression (channel D-1 used as is);
* ``h2o`` | ``tova`` | ``streaming``: plain attention through a training-free evicting cache
  at ``ratio`` (``sinks`` for streaming).

In every case one parallel forward scores a whole sequence exactly as token-by-token
inference under that cache would.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any, Optional

from nemo_dmc.core import DMCConfig
from nemo_dmc.methods import VanillaSettings, eviction_methods, method_class


def method_settings(method: str, dmc: DMCConfig, ratio: Optional[float] = None,
                    sinks: int = 4) -> Any:
    """Settings of ``method`` (``dmc``: the checkpoint's ``dmc``; eviction: ``ratio`` and,
    where the policy has them, ``sinks``)."""
    if method == "dmc":
        return dmc
    if method == "vanilla":
        return VanillaSettings()
    if method not in eviction_methods():
        raise ValueError(f"method: must be dmc, vanilla or one of {', '.join(eviction_methods())}, "
                         f"got {method!r}")
    cls = method_class(method).settings_class
    values = {"ratio": float(ratio), "sinks": sinks}
    return cls(**{f.name: values[f.name] for f in fields(cls) if f.name in values})
