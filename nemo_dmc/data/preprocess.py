"""Tokenize text into megatron-core indexed datasets (``PREFIX.bin`` + ``PREFIX.idx``).

Usage::

    python -m nemo_dmc.data.preprocess --input train.jsonl --output-prefix out/train \\
        --tokenizer path/to/hf_dir_or_tokenizer.json_or.gguf
    python -m nemo_dmc.data.preprocess --input train.jsonl --output-prefix out/train \\
        --train-tokenizer out/tokenizer --vocab-size 8192

Input formats, by extension:

* ``.jsonl`` / ``.json``: one JSON object per line with a string field (``--json-key``, default
  ``text``); blank lines are skipped.
* ``.txt``: the whole file is one document.

Every document becomes one sequence: its token ids followed by the tokenizer's EOD id. Documents
whose text is empty are skipped. Output files are written under temporary names in the output
directory and renamed into place only once complete (``.bin`` first, then ``.idx``), so a crash
never leaves a half-written dataset under the final names.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from nemo_dmc.data.tokenizer import (
    DEFAULT_VOCAB_SIZE,
    Tokenizer,
    load_tokenizer,
    train_bpe_tokenizer,
)

JSONL_SUFFIXES = (".jsonl", ".json")
TEXT_SUFFIXES = (".txt",)
_ENCODE_BATCH = 64


class InputFormatError(ValueError):
    """An input file is not in the expected format; the message names the file and line."""


@dataclass(frozen=True)
class PreprocessResult:
    """What :func:`preprocess` wrote."""

    output_prefix: Path
    num_documents: int
    num_tokens: int
    """Tokens written, EOD ids included."""
    dtype: type[np.number]


def _iter_sized_documents(path: Path, json_key: str) -> Iterator[tuple[str, int]]:
    """Yield ``(text, bytes_read_for_it)`` from one input file."""
    if not path.is_file():
        raise FileNotFoundError(f"input file does not exist: {path}")
    suffix = path.suffix.lower()
    if suffix in TEXT_SUFFIXES:
        raw = path.read_bytes()
        try:
            yield raw.decode("utf-8"), len(raw)
        except UnicodeDecodeError as err:
            raise InputFormatError(f"{path}: not valid UTF-8 ({err})") from err
        return
    if suffix not in JSONL_SUFFIXES:
        raise InputFormatError(
            f"{path}: unsupported input type {suffix!r}; expected one of "
            f"{', '.join(JSONL_SUFFIXES + TEXT_SUFFIXES)}"
        )
    with path.open("rb") as f:
        for line_number, raw_line in enumerate(f, start=1):
            if not raw_line.strip():
                continue
            try:
                record = json.loads(raw_line.decode("utf-8"))
            except UnicodeDecodeError as err:
                raise InputFormatError(f"{path}:{line_number}: not valid UTF-8 ({err})") from err
            except json.JSONDecodeError as err:
                raise InputFormatError(f"{path}:{line_number}: not valid JSON ({err})") from err
            if not isinstance(record, dict) or not isinstance(record.get(json_key), str):
                raise InputFormatError(
                    f"{path}:{line_number}: expected a JSON object with a string {json_key!r} field"
                )
            yield record[json_key], len(raw_line)


def iter_documents(path: str | Path, json_key: str = "text") -> Iterator[str]:
    """Yield the documents of a ``.jsonl``/``.json`` or ``.txt`` file (see module docstring).

    Raises:
        FileNotFoundError: If the file does not exist.
        InputFormatError: For an unsupported extension, invalid UTF-8 or JSON, or a record
            without a string ``json_key`` field (the message names the file and line number).
    """
    for text, _ in _iter_sized_documents(Path(path), json_key):
        yield text


def _batched_documents(paths: Sequence[Path], json_key: str, progress: tqdm) -> Iterator[list[str]]:
    """Non-empty documents of all inputs, in order, in lists of up to ``_ENCODE_BATCH``."""
    batch: list[str] = []
    for path in paths:
        for text, size in _iter_sized_documents(path, json_key):
            progress.update(size)
            if text:
                batch.append(text)
            if len(batch) == _ENCODE_BATCH:
                yield batch
                batch = []
    if batch:
        yield batch


def preprocess(
    inputs: Sequence[str | Path],
    output_prefix: str | Path,
    tokenizer: Tokenizer,
    json_key: str = "text",
    show_progress: bool = True,
) -> PreprocessResult:
    """Tokenize ``inputs`` (in order) into ``output_prefix.bin`` / ``output_prefix.idx``.

    Token ids are stored as ``uint16`` when the vocabulary fits, else ``int32`` (megatron's
    ``DType.optimal_dtype``). Existing output files are replaced only on success.

    Raises:
        FileNotFoundError: If an input file does not exist (checked before writing anything).
        InputFormatError: If an input file is malformed; no output is left behind.
        ValueError: If the inputs contain no non-empty document.
    """
    from megatron.core.datasets.indexed_dataset import (
        DType,
        IndexedDatasetBuilder,
        get_bin_path,
        get_idx_path,
    )

    paths = [Path(p) for p in inputs]
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"input file does not exist: {path}")
    output_prefix = Path(output_prefix)
    output_prefix.parent.mkdir(parents=True, exist_ok=True)
    bin_path, idx_path = (
        Path(get_bin_path(str(output_prefix))),
        Path(get_idx_path(str(output_prefix))),
    )
    tmp_bin = bin_path.with_name(f".{bin_path.name}.tmp-{os.getpid()}")
    tmp_idx = idx_path.with_name(f".{idx_path.name}.tmp-{os.getpid()}")

    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    eod = tokenizer.eod_id
    num_documents = num_tokens = 0
    builder = IndexedDatasetBuilder(str(tmp_bin), dtype=dtype)
    total_bytes = sum(p.stat().st_size for p in paths)
    try:
        with tqdm(
            total=total_bytes, unit="B", unit_scale=True, desc="tokenize", disable=not show_progress
        ) as progress:
            for batch in _batched_documents(paths, json_key, progress):
                for ids in tokenizer.encode_batch(batch):
                    ids.append(eod)
                    builder.add_document(np.asarray(ids, dtype=dtype), [len(ids)])
                    num_documents += 1
                    num_tokens += len(ids)
        if num_documents == 0:
            raise ValueError(f"no non-empty documents in {', '.join(map(str, paths))}")
        builder.finalize(str(tmp_idx))
        os.replace(tmp_bin, bin_path)
        os.replace(tmp_idx, idx_path)
    finally:
        builder.data_file.close()
        tmp_bin.unlink(missing_ok=True)
        tmp_idx.unlink(missing_ok=True)
    return PreprocessResult(output_prefix, num_documents, num_tokens, dtype)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the process exit status."""
    from nemo_dmc.quiet import quiet_third_party

    quiet_third_party()
    parser = argparse.ArgumentParser(
        prog="python -m nemo_dmc.data.preprocess",
        description="Tokenize .jsonl/.txt files into a megatron indexed dataset (.bin/.idx).",
    )
    parser.add_argument(
        "--input", nargs="+", required=True, type=Path, help=".jsonl/.json/.txt files"
    )
    parser.add_argument(
        "--output-prefix", required=True, type=Path, help="writes PREFIX.bin and PREFIX.idx"
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--tokenizer", type=Path, help="HF tokenizer dir, tokenizer.json or .gguf file"
    )
    source.add_argument(
        "--train-tokenizer",
        type=Path,
        metavar="DIR",
        help="train a byte-level BPE on the inputs, save it to DIR and use it",
    )
    parser.add_argument(
        "--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE, help="with --train-tokenizer"
    )
    parser.add_argument(
        "--eod-token", default=None, help="end-of-document token (default: the EOS token)"
    )
    parser.add_argument("--json-key", default="text", help="JSONL field holding the text")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)

    try:
        if args.train_tokenizer is not None:
            documents = (
                text for path in args.input for text in iter_documents(path, args.json_key)
            )
            tokenizer = train_bpe_tokenizer(documents, args.train_tokenizer, args.vocab_size)
        else:
            tokenizer = load_tokenizer(args.tokenizer, eod_token=args.eod_token)
        result = preprocess(
            args.input,
            args.output_prefix,
            tokenizer,
            args.json_key,
            show_progress=not args.no_progress,
        )
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(
        f"wrote {result.num_documents} documents, {result.num_tokens} tokens "
        f"({np.dtype(result.dtype).name}) to {result.output_prefix}.bin/.idx"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
