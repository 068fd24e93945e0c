"""Method settings from a method name and the few knobs the CLIs expose (``method=``,
``ratio=``, ``sinks=``, ``window=`` of ``python -m nemo_dmc.evaluate`` and ``python -m nemo_dmc.generate``):

* ``dmc``: the checkpoint's own :class:`~nemo_dmc.core.DMCConfig` (hard decisions);
* ``dms``: :class:`~nemo_dmc.methods.dms.DMSConfig` taking the decision parameterisation
  (offset, scale, temperature, hard bias, target, loss weight, decision source,
  ``zero_after_rope``) and the compression loss's form from that ``DMCConfig``, and the eviction ``window`` (default: the
  settings class's);
* ``vanilla``: plain attention, no compression (channel D-1 used as is);
* an eviction method (``h2o``, ``tova``, ``streaming``, or any registered
  :class:`~nemo_dmc.methods.eviction.EvictionMethod`): plain attention through its evicting
  cache at ``ratio`` (``sinks`` where the policy has them).

:func:`choose_method` picks the method a CLI runs: the one given, else the one the checkpoint's
training run recorded (``method``/``window`` of its ``run_config.yaml``), else ``dmc``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Optional, Tuple

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
                  "loss_weight", "decision_source", "zero_after_rope", "loss_reduction",
                  "balance", "balance_cap")
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


TRAINED_METHODS = ("dmc", "dms")
"""The methods a run trains (the trainer's ``method``): the weights are that method's model."""


@dataclass(frozen=True)
class MethodChoice:
    """The KV method a consumer of a checkpoint runs (:func:`choose_method`).

    method / window: what runs (``window``: the DMS eviction delay, ``None`` = DMSConfig's).
    source: ``"given"`` (``method=`` set), ``"run"`` (the checkpoint's training run recorded
    it) or ``"default"`` (``dmc``: nothing given, nothing recorded).
    note: a line to print when the choice is not the model the run trained, else ``None``.
    """

    method: str
    window: Optional[int]
    source: str
    note: Optional[str] = None


def choose_method(method: Optional[str], window: Optional[int],
                  recorded: Optional[Tuple[str, Optional[int]]],
                  method_key: str = "method", window_key: str = "window") -> MethodChoice:
    """The method to run: ``method``, else the ``recorded`` one (``(method, window)`` of the
    checkpoint's training run, ``None`` when the checkpoint records none), else ``dmc``.

    ``dms`` on a run that trained ``dms`` keeps the run's eviction window unless ``window`` is
    given. A given ``dmc`` on a ``dms`` run (or the reverse), or another DMS window than the
    trained one, is allowed with a ``note`` (not the model that was trained). A ``window``
    with a method other than ``dms`` is a ``ValueError`` naming ``window_key``."""
    run_method, run_window = recorded if recorded is not None else (None, None)
    if method is not None:
        source = "given"
    elif run_method is not None:
        method, source = run_method, "run"
    else:
        method, source = "dmc", "default"
    if window is not None and method != "dms":
        why = (f" (the checkpoint's run trained {method}; give {method_key}=dms to run DMS)"
               if source == "run" else "")
        raise ValueError(f"{window_key}: only {method_key}=dms takes an eviction window, got "
                         f"{window_key}={window} with {method_key}={method}{why}")
    if method == "dms" and run_method == "dms" and window is None:
        window = run_window
    note = None
    if run_method in TRAINED_METHODS and method in TRAINED_METHODS and method != run_method:
        note = (f"note: the checkpoint was trained with method={run_method}; running it as "
                f"{method_key}={method} is a different model from the one trained")
    elif method == "dms" and run_method == "dms":
        trained, used = (run_window or DMSConfig.window), (window or DMSConfig.window)
        if trained != used:
            note = (f"note: the checkpoint was trained with DMS window {trained}; running it "
                    f"with {window_key}={used} is a different model from the one trained")
    return MethodChoice(method, window, source, note)
