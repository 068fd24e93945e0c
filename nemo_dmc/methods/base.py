"""The seam every KV-compression method plugs into (plain attention, DMC, eviction, ...).

A method is one small class with a settings dataclass. The attention module of every model
(megatron, the inference engine, the transformers export) builds one method object per layer
from those settings when the model is built, and calls two hooks on each forward:

1. :meth:`KVMethod.prepare`, on the pre-RoPE ``q, k, v`` ``[b, h, s, d]`` (and, for a method
   with :attr:`KVMethod.adapter_outputs`, the layer's decision-adapter signals
   ``[b, hk, s, n]``): returns the tensors attention sees and an optional per-key score bias
   ``[b, hk, s]`` (DMC's survival bias);
2. :meth:`KVMethod.attend`, only for methods with ``simulates_cache = True``: causal attention
   through the method's own cache, simulated token by token (the eviction policies).

Each forward leaves the layer's :class:`LayerRecord` on :attr:`KVMethod.record` (slots held
per KV head, and whatever the method's loss and statistics need). megatron's ``GPTModel``
returns only the LM loss, so the model-level statistics read these records after the forward
(``nemo_dmc.megatron.stats``), like megatron's own MoE auxiliary-loss tracker.

A method's settings dataclass is the only place its fields and defaults are declared;
:func:`settings_to_dict` / :func:`settings_from_dict` carry it through every config and
checkpoint format (run config, NeMo context, HF ``config.json``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Callable, ClassVar, Dict, Optional, Type

from torch import Tensor

from nemo_dmc.core import Decisions
from nemo_dmc.core.config import with_legacy_defaults
from nemo_dmc.core.attention import Accumulate

ADAPTER_MODULE = "decision_adapter"
"""Attribute name of a layer's decision adapter on its attention module (and so the prefix
of its parameters' names), for methods with :attr:`KVMethod.adapter_outputs`."""

Noise = Callable[[], Tensor]
"""``noise()`` -> ``[b, hk, s]`` logistic noise for this rank's KV heads (training only)."""


@dataclass
class LayerRecord:
    """What one layer's last forward leaves for statistics and losses.

    slots: ``[b, hk]`` cache slots each KV head holds after the last position.
    """

    slots: Tensor


@dataclass
class DecisionRecord(LayerRecord):
    """A layer that took trained per-token decisions (DMC merges, DMS evictions): its
    :class:`~nemo_dmc.core.Decisions` (``[b, hk, s]`` each), which the model-level statistics
    and the compression loss read (``hard``, ``straight_through``; 1 = compress)."""

    decisions: Decisions


@dataclass
class Prepared:
    """Tensors attention sees (pre-RoPE, ``[b, h, s, d]``) and the per-key score bias
    ``[b, hk, s]`` (``None``: plain causal attention), added to the score of query ``t`` and
    key ``i`` where ``t - i > bias_window`` (0: every later query, as DMC; DMS: its window).
    ``zero_after_rope``: zero channel D-1 of the rotated q/k again
    (:func:`nemo_dmc.core.after_rope`; :attr:`~nemo_dmc.core.DMCConfig.zero_after_rope`)."""

    query: Tensor
    key: Tensor
    value: Tensor
    bias: Optional[Tensor] = None
    bias_window: int = 0
    zero_after_rope: bool = False


class KVMethod:
    """Base of a KV-compression method; subclasses set ``name`` and ``settings_class``.

    The default hooks are plain attention. ``simulates_cache`` methods replace the attention
    itself (:meth:`attend`); ``trains_decisions`` methods have a loss of their own.
    """

    name: ClassVar[str]
    settings_class: ClassVar[type]
    simulates_cache: ClassVar[bool] = False
    trains_decisions: ClassVar[bool] = False

    def __init__(self, settings: Any = None) -> None:
        if settings is None:
            settings = self.settings_class()
        if not isinstance(settings, self.settings_class):
            raise TypeError(f"method {self.name!r} takes {self.settings_class.__name__}, "
                            f"got {type(settings).__name__}")
        self.settings = settings
        self.record: Optional[LayerRecord] = None

    @property
    def adapter_outputs(self) -> int:
        """Signals per KV head the layer's decision adapter must give :meth:`prepare`
        (0: the layer has no adapter)."""
        return 0

    def prepare(self, query: Tensor, key: Tensor, value: Tensor, *, training: bool,
                noise: Noise, accumulate: Accumulate,
                signals: Optional[Tensor] = None) -> Prepared:
        """Pre-RoPE ``q [b, hq, s, d]``, ``k, v [b, hk, s, d]`` -> what attention sees;
        ``signals [b, hk, s, adapter_outputs]`` from the decision adapter, if any."""
        self.record = LayerRecord(slots=key.new_full(key.shape[:2], key.shape[2]))
        return Prepared(query, key, value)

    def attend(self, query: Tensor, key: Tensor, value: Tensor, scale: float) -> Tensor:
        """Causal attention through the method's cache (``simulates_cache`` methods only):
        q ``[b, hq, s, d]``, k/v ``[b, hk, s, d]`` (RoPE applied) -> ``[b, hq, s, d]``."""
        raise NotImplementedError(f"method {self.name!r} does not simulate its own cache")


_REGISTRY: Dict[str, Type[KVMethod]] = {}


def register(method: Type[KVMethod]) -> Type[KVMethod]:
    """Class decorator: make ``method`` available under ``method.name``."""
    if method.name in _REGISTRY:
        raise ValueError(f"KV method {method.name!r} is registered twice")
    _REGISTRY[method.name] = method
    return method


def method_names() -> tuple[str, ...]:
    """Names of the registered methods."""
    return tuple(_REGISTRY)


def method_class(name: str) -> Type[KVMethod]:
    """The method registered as ``name`` (error naming the known ones)."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown KV method {name!r}; known: {', '.join(_REGISTRY)}") from None


def method_of(settings: Any) -> Type[KVMethod]:
    """The method whose settings class ``settings`` is an instance of."""
    for method in _REGISTRY.values():
        if type(settings) is method.settings_class:
            return method
    raise TypeError(f"{type(settings).__name__} is not the settings class of a registered "
                    f"KV method ({', '.join(_REGISTRY)})")


def build_method(settings: Any) -> KVMethod:
    """A fresh method object (one per layer) for ``settings``."""
    return method_of(settings)(settings)


def settings_to_dict(settings: Any) -> Dict[str, Any]:
    """``{"name": <method>, <field>: <value>, ...}`` for any config or checkpoint format."""
    return {"name": method_of(settings).name, **asdict(settings)}


def settings_from_dict(values: Dict[str, Any], key: str = "method") -> Any:
    """Inverse of :func:`settings_to_dict`; unknown fields are an error naming ``key``.
    ``values`` are stored settings: fields they predate take
    :data:`~nemo_dmc.core.config.LEGACY_DEFAULTS` (the behaviour they were written with)."""
    values = dict(values)
    name = values.pop("name", None)
    if name is None:
        raise ValueError(f"{key}: the settings name no method ('name' is missing)")
    cls = method_class(str(name)).settings_class
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{key}: method {name!r} has no setting(s) {', '.join(unknown)} "
                         f"(known: {', '.join(sorted(known))})")
    return cls(**with_legacy_defaults(values, known))
