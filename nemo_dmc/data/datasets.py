"""Train/valid/test GPT datasets over megatron-core indexed datasets, and batches by sample index.

Datasets are built by megatron-core's ``BlendedMegatronDatasetBuilder`` with ``GPTDataset``:

* one blend split by document ranges (``blend=[...]``, ``split="969,30,1"``), or
* one blend per split (``train_blend=``, ``valid_blend=``, ``test_blend=``), e.g. the train and
  valid files of :mod:`nemo_dmc.data.corpus`.

A blend is a prefix, a list of prefixes, a list of ``(weight, prefix)`` pairs, or megatron's flat
list ``["30", "a", "70", "b"]``. Weighted blends need a sample count for their split.

The sample order is a pure function of the data, the split, the sequence length, the sample
counts and ``seed``. Sample ``i`` of a split is always the same, so a training loop resumes
exactly by asking for samples from its saved "consumed samples" position (:func:`get_batch`,
:func:`iter_batches`). :func:`build_train_epochs` removes the dependence on the sample count
(megatron shuffles all requested epochs together), so a run may change its length.

Every ``.bin``/``.idx`` pair is checked before megatron opens it (:func:`check_indexed_dataset`):
a missing, truncated or inconsistent file raises an error that names it and the fix, instead of
megatron's bare ``AssertionError`` or ``ValueError`` from numpy (and the ``IndexedDataset.__del__``
error a half-opened dataset prints after it).
"""

from __future__ import annotations

import os
import struct
import subprocess
import sysconfig
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np
import torch

from nemo_dmc.data.tokenizer import Tokenizer

BlendSpec = str | os.PathLike | Sequence[str | float | int] | Sequence[tuple[float, str]]
"""A prefix, prefixes, ``(weight, prefix)`` pairs, or megatron's flat ``[w1, p1, w2, p2]`` list."""

Blend = tuple[list[str], list[float] | None]
"""megatron's blend: prefixes and optional weights."""

SPLIT_NAMES = ("train", "valid", "test")
_INDEX_HEADER_BYTES = 9 + 8 + 1 + 8 + 8  # magic, version, dtype code, sequence and document counts
_REMAKE = "re-create it with python -m nemo_dmc.data.preprocess"


class CorruptDatasetError(ValueError):
    """A ``.bin``/``.idx`` file is truncated or inconsistent; the message names the file and
    how to re-create it."""

    def __init__(self, problem: str) -> None:
        super().__init__(f"{problem}; {_REMAKE}")
        self.problem = problem


# -- megatron's C++ helpers ------------------------------------------------------------------


def compile_dataset_helpers(output_dir: str | Path | None = None) -> Path:
    """Compile megatron's ``helpers.cpp`` into the ``helpers_cpp`` extension module.

    Only needed when the installed megatron-core lacks the compiled module (the 0.15.3 wheel
    ships it; a source install may not, and the wheel ships no Makefile for megatron's own
    ``compile_helpers()``). Needs ``pybind11`` (``pip install pybind11``) and a C++ compiler.

    Args:
        output_dir: Where to write the module; defaults to megatron's ``datasets`` package
            directory, where ``megatron.core.datasets.helpers`` imports it from.

    Returns:
        The path of the compiled module (written atomically).

    Raises:
        RuntimeError: If pybind11 is missing or the compiler fails (with its output).
    """
    import megatron.core.datasets as mcore_datasets

    try:
        import pybind11
    except ImportError as err:
        raise RuntimeError(
            "compiling megatron's dataset helpers needs `pip install pybind11`"
        ) from err
    source = Path(mcore_datasets.__file__).parent / "helpers.cpp"
    target_dir = Path(output_dir) if output_dir is not None else source.parent
    target = target_dir / f"helpers_cpp{sysconfig.get_config_var('EXT_SUFFIX')}"
    with tempfile.TemporaryDirectory(dir=target_dir) as tmp:
        tmp_target = Path(tmp) / target.name
        command = [
            os.environ.get("CXX", "c++"), "-O3", "-Wall", "-shared", "-std=c++17", "-fPIC",
            f"-I{pybind11.get_include()}", f"-I{sysconfig.get_paths()['include']}",
            str(source), "-o", str(tmp_target),
        ]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(
                f"compiling {source} failed:\n{' '.join(command)}\n{result.stdout}{result.stderr}"
            )
        os.replace(tmp_target, target)
    return target


def ensure_dataset_helpers() -> ModuleType:
    """Import megatron's compiled ``helpers_cpp``, compiling it once if it is missing."""
    try:
        from megatron.core.datasets import helpers_cpp
    except ImportError:
        compile_dataset_helpers()
        from megatron.core.datasets import helpers_cpp
    return helpers_cpp


# -- indexed dataset validation --------------------------------------------------------------


@dataclass(frozen=True)
class IndexedDatasetInfo:
    """Summary of a validated ``.bin``/``.idx`` pair."""

    prefix: str
    num_documents: int
    num_tokens: int
    sequence_lengths: np.ndarray
    """Tokens per sequence; :mod:`~nemo_dmc.data.preprocess` writes one sequence per document."""


def indexed_dataset_files(prefix: str | Path) -> tuple[Path, Path]:
    """``(prefix.idx, prefix.bin)``; raises FileNotFoundError naming a missing one."""
    from megatron.core.datasets.indexed_dataset import get_bin_path, get_idx_path

    paths = Path(get_idx_path(str(prefix))), Path(get_bin_path(str(prefix)))
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"indexed dataset file does not exist: {path}")
    return paths


def _check_index_header(idx_path: Path) -> None:
    """The ``.idx`` header is megatron's (magic, version 1, a known dtype code) and the file
    has exactly the bytes its sequence and document counts imply."""
    from megatron.core.datasets.indexed_dataset import _INDEX_HEADER, DType

    size = idx_path.stat().st_size
    with idx_path.open("rb") as stream:
        header = stream.read(_INDEX_HEADER_BYTES)
    if len(header) < _INDEX_HEADER_BYTES:
        raise CorruptDatasetError(f"{idx_path}: truncated index ({size} bytes, shorter than "
                                  f"its {_INDEX_HEADER_BYTES}-byte header)")
    magic, (version, code, sequences, documents) = header[:9], struct.unpack("<QBQQ", header[9:])
    if magic != _INDEX_HEADER or version != 1:
        raise CorruptDatasetError(f"{idx_path}: not a megatron index (bad header or version)")
    try:
        DType.dtype_from_code(code)
    except ValueError as err:
        raise CorruptDatasetError(f"{idx_path}: unknown token dtype code {code}") from err
    expected = _INDEX_HEADER_BYTES + 12 * sequences + 8 * documents
    if size != expected:
        raise CorruptDatasetError(f"{idx_path}: {size} bytes, but its header implies {expected} "
                                  "(truncated or trailing data)")


def check_indexed_dataset(prefix: str | Path) -> IndexedDatasetInfo:
    """Validate ``prefix.idx`` and ``prefix.bin``.

    Checks the header, that the index file has exactly the size its counts imply (before
    megatron reads it), that the sequence pointers are consistent with the lengths, and that
    ``.bin`` has exactly the bytes the index points to.

    Raises:
        FileNotFoundError: If either file is missing (naming it).
        CorruptDatasetError: If either file is truncated or inconsistent (naming it).
    """
    from megatron.core.datasets.indexed_dataset import _IndexReader

    prefix = str(prefix)
    idx_path, bin_path = indexed_dataset_files(prefix)
    _check_index_header(idx_path)
    # megatron's index reader alone (no .bin mmap; its cleanup tolerates a failed read)
    try:
        index = _IndexReader(str(idx_path), multimodal=False)
    except (AssertionError, ValueError, IndexError) as err:
        raise CorruptDatasetError(f"{idx_path}: corrupt index ({err})") from err
    lengths = np.asarray(index.sequence_lengths, dtype=np.int64)
    pointers = np.asarray(index.sequence_pointers, dtype=np.int64)
    documents = np.asarray(index.document_indices, dtype=np.int64)
    byte_lengths = lengths * index.dtype_size
    if (
        (lengths < 0).any()
        or len(documents) == 0
        or documents[0] != 0
        or (np.diff(documents) < 0).any()
        or (len(pointers) and (pointers[0] != 0 or (np.diff(pointers) != byte_lengths[:-1]).any()))
    ):
        raise CorruptDatasetError(f"{idx_path}: inconsistent lengths, pointers or document indices")
    expected_bin_size = int(byte_lengths.sum())
    if bin_path.stat().st_size != expected_bin_size:
        raise CorruptDatasetError(
            f"{bin_path}: {bin_path.stat().st_size} bytes, but {idx_path.name} indexes "
            f"{expected_bin_size} (truncated, or .bin and .idx come from different runs)"
        )
    return IndexedDatasetInfo(prefix, len(documents) - 1, int(lengths.sum()), lengths)


# -- blends and building ---------------------------------------------------------------------


def parse_blend(spec: BlendSpec) -> Blend:
    """Normalise a blend spec to megatron's ``(prefixes, weights or None)``.

    ``"a"`` and ``["a", "b"]`` give unweighted blends; ``[(0.3, "a"), (0.7, "b")]`` and
    ``["0.3", "a", "0.7", "b"]`` (megatron's ``--data-path`` style) give weighted ones.
    """
    if isinstance(spec, (str, os.PathLike)):
        return [str(spec)], None
    items = list(spec)
    if not items:
        raise ValueError("empty blend")
    if all(isinstance(item, (tuple, list)) and len(item) == 2 for item in items):
        return [str(prefix) for _, prefix in items], [float(weight) for weight, _ in items]
    flat = [str(item).strip() for item in items]
    if len(flat) % 2 == 0 and all(_is_number(weight) for weight in flat[0::2]):
        return flat[1::2], [float(weight) for weight in flat[0::2]]
    return flat, None


def _is_blended(blend: Blend | None) -> bool:
    """Whether megatron wraps this blend in a BlendedDataset (several or weighted prefixes)."""
    return blend is not None and (len(blend[0]) > 1 or blend[1] is not None)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class GPTDatasets:
    """The built splits; a split is None when it was not requested (or has zero weight)."""

    train: torch.utils.data.Dataset | None
    valid: torch.utils.data.Dataset | None
    test: torch.utils.data.Dataset | None


def build_gpt_datasets(
    tokenizer: Tokenizer,
    seq_length: int,
    seed: int,
    blend: BlendSpec | None = None,
    split: str = "969,30,1",
    train_blend: BlendSpec | None = None,
    valid_blend: BlendSpec | None = None,
    test_blend: BlendSpec | None = None,
    train_samples: int | None = None,
    valid_samples: int | None = None,
    test_samples: int | None = None,
    cache_dir: str | Path | None = None,
    eod_mask_loss: bool = False,
    reset_position_ids: bool = False,
    reset_attention_mask: bool = False,
    create_attention_mask: bool = False,
) -> GPTDatasets:
    """Build GPT train/valid/test datasets with megatron-core.

    Give either ``blend`` (+ ``split``) or per-split blends. Each sample is a dict of
    ``tokens``, ``labels`` (tokens shifted by one), ``loss_mask`` and ``position_ids`` (plus
    ``attention_mask``, True = masked, if ``create_attention_mask``), all of length
    ``seq_length``; samples pack documents back to back, separated by EOD.

    Args:
        tokenizer: Provides the EOD id (and identifies the index cache).
        seq_length: Tokens per sample.
        seed: Seed of the document and sample shuffles.
        blend: Dataset prefix(es) for all splits, divided by ``split``.
        split: Relative train/valid/test sizes, as contiguous sequence ranges of each dataset
            (sequences are documents in files written by :mod:`~nemo_dmc.data.preprocess`).
        train_blend, valid_blend, test_blend: Per-split blends (instead of ``blend``).
        train_samples, valid_samples, test_samples: Minimum samples per split; None = one
            epoch. megatron builds whole epochs (each reshuffled), so ``len()`` may be larger:
            stop the training loop at its own sample count. Required for weighted blends.
        cache_dir: Where megatron caches its indices; None = ``<dataset dir>/cache/``. With a
            multi-dataset blend, megatron-core 0.15.3 needs torch.distributed initialised to
            use a cache dir (it calls ``get_rank()``); otherwise pass None.
        eod_mask_loss: Zero the loss mask where the input token is EOD.
        reset_position_ids: Restart position ids after each EOD.
        reset_attention_mask: Block attention across EOD (implies ``create_attention_mask``).
        create_attention_mask: Include a per-sample ``[1, s, s]`` boolean mask.

    Raises:
        FileNotFoundError, CorruptDatasetError: For a missing or corrupt ``.bin``/``.idx``.
        ValueError: For inconsistent arguments or a split with samples but no tokens.
    """
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    per_split_specs = (train_blend, valid_blend, test_blend)
    if (blend is None) == all(b is None for b in per_split_specs):
        raise ValueError(
            "give either blend= (with split=) or per-split blends, not both or neither"
        )
    sizes = [train_samples, valid_samples, test_samples]
    single = parse_blend(blend) if blend is not None else None
    per_split = (
        None
        if blend is not None
        else [None if b is None else parse_blend(b) for b in per_split_specs]
    )
    if (
        cache_dir is not None
        and not torch.distributed.is_initialized()
        and any(_is_blended(b) for b in ([single] if single else per_split or []))
    ):
        raise ValueError(
            "cache_dir with a multi-dataset blend needs torch.distributed initialised "
            "(megatron-core's BlendedDataset calls get_rank()); pass cache_dir=None"
        )

    ensure_dataset_helpers()
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=single,
        blend_per_split=per_split,
        split=split if single is not None else None,
        path_to_cache=None if cache_dir is None else str(cache_dir),
        tokenizer=tokenizer,
        reset_position_ids=reset_position_ids,
        reset_attention_mask=reset_attention_mask,
        eod_mask_loss=eod_mask_loss,
        create_attention_mask=create_attention_mask or reset_attention_mask,
    )
    split_matrix = config.split_matrix or [None] * len(SPLIT_NAMES)
    if single is not None:
        # A split asked for no samples is not built: megatron-core computes the epoch count of
        # an empty split asked for 0 samples by looping forever (it still wants one extra
        # token), which a small corpus's 1% test split hits.
        split_matrix = [None if size == 0 else bounds
                        for bounds, size in zip(split_matrix, sizes, strict=True)]
        config.split_matrix = split_matrix
        # megatron wants a size even for an unbuilt split of a weighted blend
        sizes = [
            0 if bounds is None else size for bounds, size in zip(split_matrix, sizes, strict=True)
        ]
    _check_blends(single, per_split, split_matrix, sizes)
    builder = BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, config)
    train, valid, test = builder.build()
    return GPTDatasets(train=train, valid=valid, test=test)


def _check_blends(
    single: Blend | None,
    per_split: list[Blend | None] | None,
    split_matrix: Sequence[tuple[float, float] | None],
    sizes: Sequence[int | None],
) -> None:
    """Validate every prefix once, and the sample counts each split needs.

    Refuses a weighted blend without a sample count, and a split that must draw samples from
    zero tokens (megatron-core loops forever computing the epoch count of such a split).
    """
    infos: dict[str, IndexedDatasetInfo] = {}
    for i, name in enumerate(SPLIT_NAMES):
        blend = single if single is not None else per_split[i]  # type: ignore[index]
        bounds = split_matrix[i] if single is not None else (0.0, 1.0)
        if blend is None or bounds is None:
            continue
        prefixes, weights = blend
        if weights is not None and sizes[i] is None:
            raise ValueError(f"the {name} blend is weighted, so {name}_samples must be given")
        for prefix in prefixes:
            if prefix not in infos:
                infos[prefix] = check_indexed_dataset(prefix)
            info = infos[prefix]
            if sizes[i] is None or (len(prefixes) > 1 and weights is None):
                continue  # megatron builds exactly one epoch here, empty or not
            num_sequences = len(info.sequence_lengths)  # megatron splits GPT data by sequence
            begin, end = (int(round(b * num_sequences)) for b in bounds)
            if info.sequence_lengths[begin:end].sum() == 0:
                raise ValueError(
                    f"the {name} split of {prefix} has no tokens (sequences [{begin}, {end}) of "
                    f"{num_sequences}) but {sizes[i]} samples were requested; "
                    f"change split= or give more data"
                )


# -- a training split of reshuffled epochs ---------------------------------------------------


def epoch_seed(seed: int, epoch: int) -> int:
    """Shuffle seed of epoch ``epoch`` of :func:`build_train_epochs`: ``seed`` for the first,
    then derived from both numbers (so nearby seeds never share an epoch's order)."""
    if epoch == 0:
        return seed
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def build_train_epochs(
    tokenizer: Tokenizer,
    seq_length: int,
    seed: int,
    num_samples: int,
    blend: BlendSpec | None = None,
    split: str = "969,30,1",
    train_blend: BlendSpec | None = None,
    cache_dir: str | Path | None = None,
) -> torch.utils.data.ConcatDataset:
    """A train split of at least ``num_samples`` samples whose order does not depend on it.

    megatron's GPTDataset shuffles all the epochs it builds together (and a short final epoch
    apart), so the sample at index ``i`` changes with the number of samples asked for. Here
    every epoch is a build of its own, shuffled with :func:`epoch_seed`: one epoch of the data,
    or for a weighted blend as many samples as its train tokens fill. Epochs are appended
    until ``num_samples`` are covered, so sample ``i`` depends only on the data, the split,
    ``seq_length`` and ``seed``: a run may change its length or run its stages one at a time.

    Give ``blend`` (its train part by ``split``) or ``train_blend``, as for
    :func:`build_gpt_datasets`. Each epoch is one megatron index build (cached under
    ``cache_dir``), so a run over many epochs of a small corpus builds that many at start-up.
    """
    if (blend is None) == (train_blend is None):
        raise ValueError("give either blend= (with split=) or train_blend=, not both or neither")
    spec = blend if blend is not None else train_blend
    prefixes, weights = parse_blend(spec)  # type: ignore[arg-type]
    epoch_samples = None  # one epoch of the data
    if weights is not None:
        fraction = 1.0 if blend is None else _train_fraction(split)
        tokens = sum(check_indexed_dataset(prefix).num_tokens for prefix in prefixes)
        epoch_samples = max(1, int(tokens * fraction) // seq_length)
    blends = (
        {"train_blend": train_blend}
        if blend is None
        else {"blend": blend, "split": split, "valid_samples": 0, "test_samples": 0}
    )
    epochs: list[torch.utils.data.Dataset] = []
    while sum(len(epoch) for epoch in epochs) < max(num_samples, 1):  # type: ignore[arg-type]
        built = build_gpt_datasets(
            tokenizer, seq_length, epoch_seed(seed, len(epochs)), train_samples=epoch_samples,
            cache_dir=cache_dir, **blends,
        ).train  # fmt: skip
        if built is None or len(built) == 0:  # type: ignore[arg-type]
            raise ValueError(f"the train split of {prefixes} holds no {seq_length}-token sample")
        epochs.append(built)
    return torch.utils.data.ConcatDataset(epochs)  # sample i of epoch e: start(e) + i


def _train_fraction(split: str) -> float:
    from megatron.core.datasets.blended_megatron_dataset_config import parse_and_normalize_split

    return parse_and_normalize_split(split)[0]


# -- batches by global sample index ----------------------------------------------------------


def get_batch(dataset: torch.utils.data.Dataset, start: int, end: int) -> dict[str, torch.Tensor]:
    """Stack samples ``start .. end-1`` of ``dataset`` into ``[end - start, seq_length]`` tensors.

    Keys: ``tokens``, ``labels``, ``loss_mask``, ``position_ids`` (and ``attention_mask`` /
    ``dataset_id`` when the dataset provides them).

    Raises:
        IndexError: If the range is empty or goes past the end of the dataset.
    """
    if not 0 <= start < end <= len(dataset):  # type: ignore[arg-type]
        raise IndexError(f"sample range [{start}, {end}) is outside [0, {len(dataset)})")  # type: ignore[arg-type]
    samples = [dataset[i] for i in range(start, end)]
    return {
        key: torch.stack([torch.as_tensor(sample[key]) for sample in samples]) for key in samples[0]
    }


def iter_batches(
    dataset: torch.utils.data.Dataset,
    micro_batch_size: int,
    consumed_samples: int = 0,
    data_parallel_rank: int = 0,
    data_parallel_size: int = 1,
) -> Iterator[dict[str, torch.Tensor]]:
    """Yield this rank's micro-batches, in order, starting after ``consumed_samples``.

    Like megatron's pretraining sampler: each step consumes ``micro_batch_size *
    data_parallel_size`` consecutive global samples, rank ``r`` taking the ``r``-th slice.
    Stops before a step that would not fit entirely in the dataset. Resuming from a saved
    ``consumed_samples`` yields exactly the continuation of the uninterrupted sequence.
    """
    if micro_batch_size < 1 or not 0 <= data_parallel_rank < data_parallel_size:
        raise ValueError(
            f"bad micro_batch_size={micro_batch_size} or data parallel rank "
            f"{data_parallel_rank}/{data_parallel_size}"
        )
    step = micro_batch_size * data_parallel_size
    for begin in range(consumed_samples, len(dataset) - step + 1, step):  # type: ignore[arg-type]
        start = begin + data_parallel_rank * micro_batch_size
        yield get_batch(dataset, start, start + micro_batch_size)
