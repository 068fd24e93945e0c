"""Structured config of ``python -m nemo_dmc.evaluate`` (``conf/evaluate.yaml``).

Hydra merges the YAML into :class:`EvaluateConfig` (registered as ``evaluate_schema``), so an
unknown key or a badly typed value stops the command with a message naming the key;
:meth:`EvaluateConfig.validate` then checks ranges, naming the offending key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from nemo_dmc.core import DMCConfig, ModelConfig
from nemo_dmc.inference.config import ParallelSettings
from nemo_dmc.methods import eviction_methods, method_names

KV_DTYPES = ("model", "fp32", "bf16", "fp16")
DEFAULT_MAX_SEQ_LENGTH = 1024
"""``seq_length: null`` scores ``min(model.seq_length, DEFAULT_MAX_SEQ_LENGTH)`` tokens per
sequence: an imported model's 4096 or 8192 would make every evaluation slow."""


@dataclass
class HeldOutData:
    """Held-out text (``data.*``). ``null`` keys take the checkpoint's training-run value,
    else the trainer's default (the built-in pydocs corpus); ``cache_dir`` (written to) is
    never taken from the run: ``null`` = the trainer's default, ``data_cache/pydocs``.

    source: ``pydocs``, ``indexed`` (``valid_prefixes`` + tokenizer) or ``random``;
        ``null`` with ``valid_prefixes`` given = ``indexed`` (your own preprocessed text).
    cache_dir: where the pydocs corpus is prepared (written to; never the run's).
    valid_prefixes: ``indexed``: the ``.bin/.idx`` prefixes of the text to score.
    max_documents: pydocs: use at most this many documents (as the run did: null = its).
    seed: seed of the held-out sample order (null = the run's).
    num_sequences: held-out sequences of ``seq_length`` tokens to score.
    micro_batch_size: sequences per forward.
    """

    source: Optional[str] = None
    cache_dir: Optional[str] = None
    valid_prefixes: Optional[List[str]] = None
    max_documents: Optional[int] = None
    seed: Optional[int] = None
    num_sequences: int = 16
    micro_batch_size: int = 4


@dataclass
class PasskeySettings:
    """Passkey retrieval (``passkey.*``).

    lengths: prompt lengths in tokens (``[]`` = 1/4, 1/2 and all of ``model.seq_length``).
    depths: needle position as a fraction of the filler (0 = start, 1 = end).
    samples: prompts per (length, depth), each with its own pass key.
    enabled: run passkey retrieval.
    digits: digits of the pass key.
    seed: seed of the pass keys and filler.
    """

    enabled: bool = True
    lengths: List[int] = field(default_factory=list)
    depths: List[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    samples: int = 2
    digits: int = 5
    seed: int = 0


@dataclass
class KVSettings:
    """How KV bytes are counted (``kv.*``).

    Attributes:
        dtype: the cache's dtype (``model`` = the weights' dtype).
        block_size: slots per block of the paged cache (for allocated bytes).
    """

    dtype: str = "model"
    block_size: int = 16


@dataclass
class EvaluateConfig:
    """Root of ``conf/evaluate.yaml``.

    load: the checkpoint (as for ``nemo_dmc.generate``: run / stage / step dir, NeMo 2 dir,
        convert weights dir, or ``.pt``).
    tokenizer: HF dir, tokenizer.json or .gguf; ``null`` = the training run's.
    ratio: eviction methods: the compression ratio (required for them).
    sinks: ``streaming``: first tokens always kept.
    seed: seed of torch's and megatron's generators (random weights without ``load``).
    method: ``dmc`` | ``dms`` (learned eviction delayed by ``window``) | ``vanilla`` (plain
        attention) | ``h2o`` | ``tova`` | ``streaming`` (eviction at compression ``ratio``,
        keeping ``sinks`` first tokens); ``null`` = the method the checkpoint's training run
        recorded (``dmc`` or ``dms``, see :func:`nemo_dmc.methods.choose_method`), else ``dmc``.
    window: ``dms``'s eviction delay (``null`` = the run's when it trained ``dms``, else
        DMSConfig's).
    output_dir: ``null`` = ``<checkpoint dir>/evaluation/<method>[_w<window>|_<ratio>]`` of
        the method that runs.
    heatmap: write the per-(layer, KV head) CR heatmap PNG (not for ``vanilla``; matplotlib).
    seq_length: tokens per held-out sequence and longest passkey prompt (``null`` = the
        checkpoint's ``model.seq_length``, at most 1024), e.g. to compare an imported model
        with its retrofit trained at a shorter length.
    """

    load: Optional[str] = None
    tokenizer: Optional[str] = None
    method: Optional[str] = None
    ratio: Optional[float] = None
    sinks: int = 4
    window: Optional[int] = None
    output_dir: Optional[str] = None
    seed: int = 1234
    heatmap: bool = True
    seq_length: Optional[int] = None
    model: ModelConfig = field(default_factory=ModelConfig)
    dmc: DMCConfig = field(default_factory=DMCConfig)
    data: HeldOutData = field(default_factory=HeldOutData)
    passkey: PasskeySettings = field(default_factory=PasskeySettings)
    kv: KVSettings = field(default_factory=KVSettings)
    parallel: ParallelSettings = field(default_factory=ParallelSettings)

    def sequence_length(self, model_seq_length: int) -> int:
        """Tokens per held-out sequence: ``seq_length``, else ``model_seq_length`` capped at
        :data:`DEFAULT_MAX_SEQ_LENGTH`."""
        if self.seq_length is not None:
            return self.seq_length
        return min(model_seq_length, DEFAULT_MAX_SEQ_LENGTH)

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad key (before anything is built)."""
        if self.load is None:
            raise ValueError("load: give the checkpoint to evaluate (load=<run or checkpoint>)")
        if self.seq_length is not None and self.seq_length < 1:
            raise ValueError(f"seq_length: must be >= 1 (or null), got {self.seq_length}")
        if self.method is not None and self.method not in method_names():
            raise ValueError(f"method: must be one of {', '.join(method_names())} (or null: "
                             f"the checkpoint's own), got {self.method!r}")
        if self.method in eviction_methods():
            if self.ratio is None or self.ratio < 1.0:
                raise ValueError(f"ratio: method={self.method} needs a compression ratio >= 1 "
                                 f"(e.g. ratio=4), got {self.ratio}")
        elif self.ratio is not None:
            method = self.method or "null (the checkpoint's own method)"
            raise ValueError(f"ratio: only the eviction methods ({', '.join(eviction_methods())}) "
                             f"take a ratio; method={method} sets its own")
        # method=null: the run's method decides (window on a dmc run fails once it is known)
        if self.window is not None and (self.method not in (None, "dms") or self.window < 1):
            raise ValueError(f"window: only method=dms takes an eviction window (>= 1), got "
                             f"window={self.window} with method={self.method}")
        if self.sinks < 0:
            raise ValueError(f"sinks: must be >= 0, got {self.sinks}")
        if self.data.valid_prefixes and self.data.source not in (None, "indexed"):
            raise ValueError(f"data.source: data.valid_prefixes are read only with "
                             f"data.source=indexed, got data.source={self.data.source}; drop "
                             f"data.source (indexed is then implied) or the valid_prefixes")
        for key in ("num_sequences", "micro_batch_size"):
            if getattr(self.data, key) < 1:
                raise ValueError(f"data.{key}: must be >= 1, got {getattr(self.data, key)}")
        if self.passkey.samples < 1:
            raise ValueError(f"passkey.samples: must be >= 1, got {self.passkey.samples}")
        if not 1 <= self.passkey.digits <= 12:
            raise ValueError(f"passkey.digits: must be in 1..12, got {self.passkey.digits}")
        if any(n < 1 for n in self.passkey.lengths):
            raise ValueError(f"passkey.lengths: give token counts >= 1 ([] = seq_length / 4, / 2 "
                             f"and seq_length), got {self.passkey.lengths}")
        if any(not 0.0 <= d <= 1.0 for d in self.passkey.depths) or not self.passkey.depths:
            raise ValueError(f"passkey.depths: give fractions in [0, 1], got {self.passkey.depths}")
        if self.kv.dtype not in KV_DTYPES:
            raise ValueError(f"kv.dtype: must be one of {', '.join(KV_DTYPES)}, "
                             f"got {self.kv.dtype!r}")
        if self.kv.block_size < 1:
            raise ValueError(f"kv.block_size: must be >= 1, got {self.kv.block_size}")


def register_schema() -> None:
    """Register :class:`EvaluateConfig` in Hydra's ConfigStore as ``evaluate_schema``."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="evaluate_schema", node=EvaluateConfig)
