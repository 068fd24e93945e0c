"""Third-party noise of the command-line tools, hidden unless ``NEMO_DMC_VERBOSE=1``.

Importing megatron-core, NeMo, torch and transformers prints a dozen lines that are no
problem of the user's run (optional fused kernels absent, deprecations inside those
libraries, INFO lines such as "Detected Megatron Core"). Each entry point calls
:func:`quiet_third_party` before its heavy imports; its Hydra configs log at WARNING, so
third-party INFO lines stay out too. Warnings not listed here still show.

``NEMO_DMC_VERBOSE=1`` shows everything (and ``hydra.verbose=true``, Hydra's own flag, turns
every logger to DEBUG). Library users who import ``nemo_dmc`` are never affected.
"""

from __future__ import annotations

import logging
import os
import re
import warnings

VERBOSE_ENV = "NEMO_DMC_VERBOSE"

# Python warnings: message patterns (matched from the start) and the modules whose own
# deprecation notices (FutureWarning) concern their internals, not the user's run.
NOISE_WARNINGS = (
    r".*(Apex|apex|Transformer Engine|transformer_engine|TransformerEngine)",
    r".*unified memory",
    r"The pynvml package is deprecated",
)
CHILD_WARNINGS = ("ignore:The pynvml package is deprecated:FutureWarning",)
NOISE_MODULES = r"(torch|megatron|nemo|transformers|lightning|pytorch_lightning|modelopt)\b"

# logging: INFO of these libraries stays out (their levels become WARNING); the records below,
# warnings about the libraries' own internals, are dropped where they are logged.
QUIET_LOGGERS = ("megatron", "nemo", "nemo_logger", "numexpr", "datasets", "lightning",
                 "pytorch_lightning", "torch.distributed.elastic")
# Only errors from these: telemetry nobody enabled, and a model family NeMo imports eagerly.
ERRORS_ONLY = ("nv_one_logger", "nemo.collections.llm.gpt.model.megatron.hyena")
NOISE_RECORDS = {
    "megatron.core.utils": re.compile(r".* has reached end of life\. Please migrate"),
    # NeMo 2.7's llm package names its optional deploy / evaluate extras on every import
    "nemo_logger": re.compile(r"The (deploy|evaluate) module could not be imported"),
    # a notice, not a problem: SmolLM2/Llama tokenizers loaded from a GGUF or a tokenizer.json
    "transformers.models.llama.tokenization_llama_fast": re.compile(r"You are using the default legacy"),
    "transformers.models.llama.tokenization_llama": re.compile(r"You are using the default legacy"),
}


def verbose() -> bool:
    """Whether ``NEMO_DMC_VERBOSE`` asks for every third-party line."""
    return os.environ.get(VERBOSE_ENV, "").strip().lower() not in ("", "0", "false", "no")


class _Drop(logging.Filter):
    def __init__(self, pattern: re.Pattern) -> None:
        super().__init__()
        self.pattern = pattern

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.match(record.getMessage())


def quiet_third_party() -> None:
    """Hide the known third-party warnings and notices (see the module docstring)."""
    if verbose():
        return
    for pattern in NOISE_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    warnings.filterwarnings("ignore", category=FutureWarning, module=NOISE_MODULES)
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=NOISE_MODULES)
    # Worker processes (dist_checkpointing's writers, dataloaders) import torch afresh.
    inherited = [w for w in os.environ.get("PYTHONWARNINGS", "").split(",") if w]
    os.environ["PYTHONWARNINGS"] = ",".join(dict.fromkeys([*inherited, *CHILD_WARNINGS]))
    for name in QUIET_LOGGERS:
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.WARNING)
    for name in ERRORS_ONLY:
        logging.getLogger(name).setLevel(logging.ERROR)
    for name, pattern in NOISE_RECORDS.items():
        logging.getLogger(name).addFilter(_Drop(pattern))
