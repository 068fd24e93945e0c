"""KV-compression methods behind one seam (:mod:`.base`); a method is one file here.

Registered: ``vanilla`` (plain attention), ``dmc`` (Dynamic Memory Compression), ``dms``
(Dynamic Memory Sparsification: learned, delayed eviction), and the
training-free eviction policies ``h2o``, ``tova``, ``streaming`` (:mod:`.eviction`).
"""

from nemo_dmc.methods.base import (
    ADAPTER_MODULE,
    DecisionRecord,
    KVMethod,
    LayerRecord,
    Prepared,
    build_method,
    method_class,
    method_names,
    method_of,
    register,
    settings_from_dict,
    settings_to_dict,
)
from nemo_dmc.methods.vanilla import VanillaMethod, VanillaSettings
from nemo_dmc.methods.dmc import DMCMethod, DMCPhase, DMCRecord, PhasedMethod
from nemo_dmc.methods.dms import DMSConfig, DMSMethod, DMSRecord
from nemo_dmc.methods.eviction import (
    EvictionMethod,
    EvictionRecord,
    EvictionSettings,
    EvictionState,
    evicted_attention,
    simulate_eviction,
)
from nemo_dmc.methods.h2o import H2OMethod, H2OSettings
from nemo_dmc.methods.tova import TOVAMethod, TOVASettings
from nemo_dmc.methods.streaming import StreamingMethod, StreamingSettings
from nemo_dmc.methods.settings import MethodChoice, choose_method, settings_for


def eviction_methods() -> tuple[str, ...]:
    """Names of the registered eviction methods (they take a ``ratio``)."""
    return tuple(n for n in method_names() if issubclass(method_class(n), EvictionMethod))


__all__ = [
    "ADAPTER_MODULE",
    "DMCMethod", "DMCPhase", "DMCRecord", "DMSConfig", "DMSMethod", "DMSRecord",
    "DecisionRecord", "EvictionMethod",
    "EvictionRecord", "EvictionSettings", "EvictionState", "H2OMethod", "H2OSettings", "KVMethod",
    "LayerRecord", "MethodChoice", "PhasedMethod", "Prepared", "StreamingMethod",
    "StreamingSettings", "TOVAMethod", "TOVASettings", "VanillaMethod", "VanillaSettings",
    "build_method", "choose_method", "evicted_attention",
    "eviction_methods",
    "method_class", "method_names", "method_of", "register", "settings_from_dict",
    "settings_for", "settings_to_dict", "simulate_eviction",
]
