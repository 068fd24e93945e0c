"""The held-out split an evaluation scores: the training run's ``valid`` split by default.

Settings left ``null`` in ``data.*`` (except ``cache_dir``, which evaluation writes to) come
from the checkpoint's training run, else from the trainer's defaults (the built-in pydocs
corpus), so ``evaluate`` reads the same held-out samples the trainer validated on (sample ``i``
of a split is always the same).
"""

from __future__ import annotations

from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist
from torch.utils.data import Dataset

from nemo_dmc.data.datasets import get_batch
from nemo_dmc.evaluate.config import HeldOutData
from nemo_dmc.core import ModelConfig
from nemo_dmc.training.batches import Batch, RandomTokens
from nemo_dmc.training.config import DATA_SOURCES, DataConfig, TrainConfig


def resolve_data(settings: HeldOutData, run_config: Optional[Any],
                 tokenizer: Optional[str] = None,
                 checkpoint_tokenizer: Optional[Path] = None) -> DataConfig:
    """The trainer's :class:`DataConfig` for the held-out split: its defaults, overlaid by the
    run's ``data`` (if recorded), overlaid by the non-null ``data.*`` settings.

    ``data.valid_prefixes`` without ``data.source`` means ``source=indexed`` (your own text);
    an indexed split without ``data.tokenizer`` reads with ``checkpoint_tokenizer`` (the one
    the checkpoint records), if any.

    ``cache_dir`` (where the pydocs corpus is prepared, i.e. written) is never the run's: a
    downloaded run config must not choose where evaluation writes. It is ``data.cache_dir``,
    else the trainer's default."""
    values = asdict(DataConfig())
    known = set(values)
    if run_config is not None and "data" in run_config:
        from omegaconf import OmegaConf

        recorded = OmegaConf.to_container(run_config.data, resolve=True)
        values.update({k: v for k, v in recorded.items() if k in known - {"cache_dir"}})
    for f in fields(HeldOutData):
        value = getattr(settings, f.name)
        if f.name in known and value is not None:
            values[f.name] = list(value) if isinstance(value, (list, tuple)) else value
    if settings.source is None and settings.valid_prefixes:
        values["source"] = "indexed"
    if tokenizer is not None:
        values["tokenizer"] = tokenizer
    if values["source"] == "indexed" and not values["tokenizer"] and checkpoint_tokenizer:
        values["tokenizer"] = str(checkpoint_tokenizer)
    data = DataConfig(**values)
    if data.source not in DATA_SOURCES:
        raise ValueError(f"data.source: must be one of {', '.join(DATA_SOURCES)}, "
                         f"got {data.source!r}")
    if data.source == "indexed" and not (data.valid_prefixes and data.tokenizer):
        raise ValueError("data.valid_prefixes: data.source=indexed needs valid_prefixes and a "
                         "tokenizer (tokenizer=...)")
    return data


def data_tokenizer_path(data: DataConfig) -> Optional[Path]:
    """The tokenizer of the held-out data: ``data.tokenizer``, else the BPE the pydocs corpus
    trained under ``data.cache_dir`` (if prepared), else ``None``."""
    if data.tokenizer:
        return Path(data.tokenizer)
    trained = Path(data.cache_dir) / "tokenizer"
    return trained if data.source == "pydocs" and trained.is_dir() else None


def heldout_dataset(data: DataConfig, model: ModelConfig, num_samples: int) -> Dataset:
    """The ``valid`` split of ``data`` in samples of ``model.seq_length`` tokens (on every
    rank; the pydocs corpus is prepared once, by rank 0, if missing)."""
    if data.source == "random":
        return RandomTokens(model.vocab_size, model.seq_length, num_samples, data.seed + 1)
    from nemo_dmc.data.datasets import build_gpt_datasets
    from nemo_dmc.data.tokenizer import load_tokenizer

    if data.source == "pydocs":
        from nemo_dmc.training.batches import prepare_pydocs

        cfg = TrainConfig(model=model, data=data)
        if dist.is_initialized() and dist.get_rank() != 0:
            dist.barrier()
            tokenizer_path, _, valid_prefixes = prepare_pydocs(cfg)
        else:
            tokenizer_path, _, valid_prefixes = prepare_pydocs(cfg)
            if dist.is_initialized():
                dist.barrier()
    else:
        tokenizer_path, valid_prefixes = data.tokenizer, list(data.valid_prefixes)
    tokenizer = load_tokenizer(tokenizer_path)
    split = build_gpt_datasets(tokenizer, model.seq_length, data.seed, valid_blend=valid_prefixes,
                               valid_samples=num_samples).valid
    if split is None or len(split) < num_samples:
        raise ValueError(f"data.num_sequences: the valid split has "
                         f"{0 if split is None else len(split)} samples, fewer than {num_samples}")
    return split


def heldout_batches(dataset: Dataset, num_sequences: int, micro_batch_size: int,
                    device: torch.device | str = "cpu") -> Iterator[Batch]:
    """Samples ``0 .. num_sequences-1`` in micro-batches (the last one may be smaller)."""
    available = len(dataset)  # type: ignore[arg-type]
    if available < num_sequences:
        raise ValueError(f"data.num_sequences: the held-out split has {available} samples, "
                         f"fewer than {num_sequences}")
    for start in range(0, num_sequences, micro_batch_size):
        batch = get_batch(dataset, start, min(start + micro_batch_size, num_sequences))
        yield {key: batch[key].to(device)
               for key in ("tokens", "labels", "loss_mask", "position_ids")}
