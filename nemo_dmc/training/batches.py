"""Training and validation batches addressed by global sample index.

Sample ``i`` of a split is always the same (megatron ``GPTDataset`` epochs, each shuffled on
its own by :func:`~nemo_dmc.data.datasets.build_train_epochs`, or seeded random tokens), however
many samples the run reads, so resuming from a saved ``consumed_samples`` replays the
uninterrupted run exactly, also with other stage lengths or stages run one at a time. A step takes
``global_batch_size`` consecutive samples; micro-step ``m`` of data-parallel rank ``r``
reads ``micro_batch_size`` of them at offset ``(m * dp + r) * micro_batch_size``
(megatron's pretraining-sampler layout).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Tuple, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import Dataset

from nemo_dmc.data.datasets import get_batch
from nemo_dmc.training.config import ConfigError, DataConfig, TrainConfig

Batch = Dict[str, Tensor]
T = TypeVar("T")


class RandomTokens(Dataset):
    """Uniform random tokens; sample ``i`` depends only on ``(seed, i)``."""

    def __init__(self, vocab_size: int, seq_length: int, num_samples: int, seed: int) -> None:
        self.vocab_size, self.seq_length = vocab_size, seq_length
        self.num_samples, self.seed = num_samples, seed

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> Batch:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        text = torch.randint(self.vocab_size, (self.seq_length + 1,), generator=generator)
        return {"tokens": text[:-1], "labels": text[1:],
                "loss_mask": torch.ones(self.seq_length),
                "position_ids": torch.arange(self.seq_length)}


def pydocs_cache_root(data: DataConfig) -> Path:
    """Where the built-in corpus is prepared: ``data.cache_dir`` with the corpus's own BPE,
    ``<data.cache_dir>/tokenizers/<name>-<hash of its path>`` with a given ``data.tokenizer``,
    so runs with different tokenizers never share (and invalidate) one cache."""
    root = Path(data.cache_dir)
    if not data.tokenizer:
        return root
    path = Path(data.tokenizer).expanduser().resolve()
    digest = hashlib.sha256(str(path).encode()).hexdigest()[:12]
    return root / "tokenizers" / f"{path.name}-{digest}"


def prepare_pydocs(cfg: TrainConfig) -> Tuple[Path, List[str], List[str]]:
    """Build (once, on the calling rank) the Python-docs corpus, its BPE tokenizer (or use
    ``data.tokenizer``) and the train/valid ``.bin/.idx`` files under ``data.cache_dir``.

    Returns ``(tokenizer path, train prefixes, valid prefixes)``.
    """
    from nemo_dmc.data.corpus import build_python_docs_corpus
    from nemo_dmc.data.preprocess import iter_documents, preprocess
    from nemo_dmc.data.tokenizer import load_tokenizer, train_bpe_tokenizer

    root = pydocs_cache_root(cfg.data)
    manifest = {"max_documents": cfg.data.max_documents, "tokenizer": cfg.data.tokenizer,
                "vocab_size": cfg.model.vocab_size}
    tokenizer_path = Path(cfg.data.tokenizer) if cfg.data.tokenizer else root / "tokenizer"
    prefixes = [str(root / "train")], [str(root / "valid")]
    manifest_file = root / "manifest.json"
    if manifest_file.is_file():
        found = json.loads(manifest_file.read_text())
        if found != manifest:
            raise ConfigError("data.cache_dir", f"{root} was prepared with {found}, not {manifest}: "
                              "choose another data.cache_dir or delete it")
        return tokenizer_path, *prefixes
    corpus = build_python_docs_corpus(root / "text", max_documents=cfg.data.max_documents)
    if cfg.data.tokenizer:
        tokenizer = load_tokenizer(cfg.data.tokenizer)
    else:
        tokenizer = train_bpe_tokenizer(iter_documents(corpus.train), tokenizer_path,
                                        vocab_size=cfg.model.vocab_size)
    preprocess([corpus.train], root / "train", tokenizer, show_progress=False)
    preprocess([corpus.valid], root / "valid", tokenizer, show_progress=False)
    manifest_file.write_text(json.dumps(manifest))
    return tokenizer_path, *prefixes


def on_rank0(fn: Callable[[TrainConfig], T], cfg: TrainConfig) -> T:
    """``fn(cfg)`` computed on global rank 0 and shared with every rank; an exception on
    rank 0 is raised on every rank."""
    outcome: List[object] = [None]
    if dist.get_rank() == 0:
        try:
            outcome[0] = ("ok", fn(cfg))
        except Exception as err:  # re-raised below, on every rank
            outcome[0] = ("error", err)
    dist.broadcast_object_list(outcome, src=0)
    status, value = outcome[0]  # type: ignore[misc]
    if status == "error":
        raise value  # type: ignore[misc]
    return value  # type: ignore[return-value]


@dataclass
class Splits:
    """The datasets a run reads."""

    train: Dataset
    valid: Dataset


def build_splits(cfg: TrainConfig, train_samples: int, valid_samples: int) -> Splits:
    """Datasets of ``data.source`` (collective: call on every rank after process groups).
    A missing or damaged ``.bin``/``.idx`` is a :class:`ConfigError` naming the file."""
    from nemo_dmc.data.datasets import CorruptDatasetError

    try:
        return _build_splits(cfg, train_samples, valid_samples)
    except (CorruptDatasetError, FileNotFoundError) as err:
        if cfg.data.source == "pydocs":
            problem = getattr(err, "problem", str(err))
            raise ConfigError("data.cache_dir", f"{problem}: the data cache is damaged; delete "
                              f"{cfg.data.cache_dir} to prepare it again") from err
        key = "data.valid_prefixes" if _names_prefix(cfg.data.valid_prefixes, str(err)) \
            else "data.train_prefixes"
        raise ConfigError(key, str(err)) from err


def _names_prefix(blend: List[str], message: str) -> bool:
    """Whether ``message`` names a file of one of the prefixes of ``blend``."""
    return any(f"{prefix}." in message for prefix in blend)


def _build_splits(cfg: TrainConfig, train_samples: int, valid_samples: int) -> Splits:
    data = cfg.data
    if data.source == "random":
        vocab = cfg.model.vocab_size
        return Splits(RandomTokens(vocab, cfg.model.seq_length, train_samples, data.seed),
                      RandomTokens(vocab, cfg.model.seq_length, valid_samples, data.seed + 1))
    from nemo_dmc.data.datasets import build_gpt_datasets, build_train_epochs
    from nemo_dmc.data.tokenizer import load_tokenizer

    if data.source == "pydocs":
        tokenizer_path, train_prefixes, valid_prefixes = on_rank0(prepare_pydocs, cfg)
    else:
        tokenizer_path = Path(data.tokenizer)
        train_prefixes, valid_prefixes = list(data.train_prefixes), list(data.valid_prefixes)
    try:
        tokenizer = load_tokenizer(tokenizer_path)
    except (OSError, ValueError) as err:
        if data.tokenizer:
            raise ConfigError("data.tokenizer", f"cannot load {tokenizer_path}: {err}") from err
        raise ConfigError("data.cache_dir", f"cannot load the cached tokenizer {tokenizer_path} "
                          f"({err}); delete {data.cache_dir} to prepare it again") from err
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError("model.vocab_size", f"{cfg.model.vocab_size} is smaller than the "
                          f"tokenizer's {tokenizer.vocab_size} ({tokenizer_path})")
    seq_length = cfg.model.seq_length
    if valid_prefixes:
        train = build_train_epochs(tokenizer, seq_length, data.seed, train_samples,
                                   train_blend=train_prefixes)
        valid = build_gpt_datasets(tokenizer, seq_length, data.seed, valid_blend=valid_prefixes,
                                   valid_samples=valid_samples).valid
    else:  # one blend, split by data.split
        train = build_train_epochs(tokenizer, seq_length, data.seed, train_samples,
                                   blend=train_prefixes, split=data.split)
        valid = build_gpt_datasets(tokenizer, seq_length, data.seed, blend=train_prefixes,
                                   split=data.split, train_samples=0, valid_samples=valid_samples,
                                   test_samples=0).valid
    return Splits(train, valid)


class MicroBatches:
    """This rank's micro-batches of a step, and its share of the validation batches."""

    def __init__(self, splits: Splits, micro_batch_size: int, global_batch_size: int,
                 dp_rank: int, dp_size: int, device: torch.device) -> None:
        self.splits, self.mbs, self.device = splits, micro_batch_size, device
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.num_micro = global_batch_size // (micro_batch_size * dp_size)

    def _read(self, dataset: Dataset, start: int) -> Batch:
        batch = get_batch(dataset, start, start + self.mbs)
        return {key: batch[key].to(self.device)
                for key in ("tokens", "labels", "loss_mask", "position_ids")}

    def position(self, micro: int) -> int:
        """Index of this rank's micro-batch ``micro`` among the global batch's micro-batches."""
        return micro * self.dp_size + self.dp_rank

    def train(self, consumed_samples: int, micro: int) -> Batch:
        """Micro-batch ``micro`` of the step that starts at ``consumed_samples``."""
        return self._read(self.splits.train, consumed_samples + self.position(micro) * self.mbs)

    def valid(self, index: int) -> Batch:
        """Validation micro-batch ``index`` of this rank."""
        return self._read(self.splits.valid, self.position(index) * self.mbs)
