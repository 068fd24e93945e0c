"""The built-in real-text corpus: the Python 3.11 documentation sources.

Debian's ``python3.11-doc`` package (installed by name, ~6 s) ships the reStructuredText sources
of the Python documentation as ``/usr/share/doc/python3.11/html/_sources/**/*.rst.txt``: about
500 documents, 11 MB of English prose and code, no HTML parsing needed.

Held-out split: this module splits by *document*, deterministically: documents are sorted by
their path relative to the sources directory, and the one at sorted index ``i`` goes to
validation iff ``i % valid_every == 0`` (default 20, i.e. 5 %). Interleaving spreads the held-out
documents over every part of the documentation (tutorial, library, reference, whatsnew, ...),
which megatron's contiguous ``split`` ranges over sorted files would not; it is also independent
of the tokenizer and the sequence length. The two JSONL files are then preprocessed separately
and given to :func:`nemo_dmc.data.datasets.build_gpt_datasets` as per-split blends.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

PYTHON_DOC_PACKAGE = "python3.11-doc"
"""Debian package providing the corpus."""

PYTHON_DOC_SOURCES = Path("/usr/share/doc/python3.11/html/_sources")
"""Where ``python3.11-doc`` installs the reStructuredText sources."""

DEFAULT_VALID_EVERY = 20
"""Every 20th sorted document (index % 20 == 0) is held out for validation."""


def ensure_python_docs(
    sources_dir: str | Path = PYTHON_DOC_SOURCES, package: str = PYTHON_DOC_PACKAGE
) -> Path:
    """Return the documentation sources directory, installing the Debian package if missing.

    ``apt-get`` runs only when ``sources_dir`` does not exist: first ``apt-get install``, and if
    that fails, ``apt-get update`` and the install again.

    Raises:
        RuntimeError: If the directory is missing and the package cannot be installed (no
            ``apt-get``, not root, or apt failed), with apt's output.
    """
    sources_dir = Path(sources_dir)
    if sources_dir.is_dir():
        return sources_dir
    hint = f"install it with `apt-get install -y {package}` (provides {sources_dir})"
    if shutil.which("apt-get") is None:
        raise RuntimeError(f"{sources_dir} is missing and apt-get is not available; {hint}")
    if os.geteuid() != 0:
        raise RuntimeError(f"{sources_dir} is missing and apt-get needs root; {hint}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "--no-install-recommends", package]
    result = subprocess.run(install, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        subprocess.run(["apt-get", "update"], env=env, capture_output=True, text=True)
        result = subprocess.run(install, env=env, capture_output=True, text=True)
    if result.returncode != 0 or not sources_dir.is_dir():
        output = (result.stdout + result.stderr).strip()[-2000:]
        raise RuntimeError(f"could not install {package} to get {sources_dir}:\n{output}")
    return sources_dir


def iter_python_doc_sources(
    sources_dir: str | Path = PYTHON_DOC_SOURCES,
) -> Iterator[tuple[str, str]]:
    """Yield ``(relative_path, text)`` of every non-empty ``*.rst.txt``, sorted by path."""
    sources_dir = Path(sources_dir)
    paths = sorted(
        sources_dir.rglob("*.rst.txt"), key=lambda p: p.relative_to(sources_dir).as_posix()
    )
    for path in paths:
        text = path.read_text(encoding="utf-8")
        if text.strip():
            yield path.relative_to(sources_dir).as_posix(), text


def write_jsonl(texts: Iterable[str], path: str | Path) -> int:
    """Atomically write one ``{"text": ...}`` object per line; return the number of lines."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    count = 0
    try:
        with tmp.open("w", encoding="utf-8") as f:
            for text in texts:
                f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
                count += 1
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return count


@dataclass(frozen=True)
class CorpusFiles:
    """The JSONL files written by :func:`build_python_docs_corpus`."""

    train: Path
    valid: Path
    num_train: int
    num_valid: int


def split_documents(
    texts: Iterable[str], valid_every: int = DEFAULT_VALID_EVERY
) -> tuple[list[str], list[str]]:
    """Split ordered documents into ``(train, valid)``: index ``i`` is valid iff
    ``i % valid_every == 0``."""
    if valid_every < 2:
        raise ValueError(f"valid_every must be >= 2, got {valid_every}")
    train: list[str] = []
    valid: list[str] = []
    for i, text in enumerate(texts):
        (valid if i % valid_every == 0 else train).append(text)
    return train, valid


def build_python_docs_corpus(
    output_dir: str | Path,
    valid_every: int = DEFAULT_VALID_EVERY,
    max_documents: int | None = None,
    sources_dir: str | Path = PYTHON_DOC_SOURCES,
) -> CorpusFiles:
    """Write ``train.jsonl`` and ``valid.jsonl`` from the Python documentation sources.

    Installs ``python3.11-doc`` first if needed. The output is a pure function of the installed
    package version and the arguments.

    Args:
        output_dir: Directory for the two JSONL files.
        valid_every: Held-out rate, see :func:`split_documents`.
        max_documents: Use only the first ``max_documents`` sorted documents (for quick tests).
        sources_dir: The documentation sources directory.
    """
    sources = ensure_python_docs(sources_dir)
    texts = [text for _, text in iter_python_doc_sources(sources)][:max_documents]
    train, valid = split_documents(texts, valid_every)
    output_dir = Path(output_dir)
    return CorpusFiles(
        train=output_dir / "train.jsonl",
        valid=output_dir / "valid.jsonl",
        num_train=write_jsonl(train, output_dir / "train.jsonl"),
        num_valid=write_jsonl(valid, output_dir / "valid.jsonl"),
    )


def main(argv: list[str] | None = None) -> int:
    """CLI: ``python -m nemo_dmc.data.corpus --output-dir data/pydocs``."""
    from nemo_dmc.quiet import quiet_third_party

    quiet_third_party()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", type=Path, required=True)
    parser.add_argument("--valid-every", type=int, default=DEFAULT_VALID_EVERY)
    parser.add_argument("--max-documents", type=int, default=None)
    args = parser.parse_args(argv)
    files = build_python_docs_corpus(args.output_dir, args.valid_every, args.max_documents)
    print(f"wrote {files.num_train} documents to {files.train}, {files.num_valid} to {files.valid}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
