"""Tokenizer loading for the data pipeline.

One wrapper, :class:`Tokenizer`, over a Hugging Face ``transformers`` tokenizer, built from

* a Hugging Face tokenizer directory (``tokenizer.json`` / ``tokenizer_config.json``, loaded with
  ``AutoTokenizer``) or a bare ``tokenizer.json`` file,
* a GGUF file (``AutoTokenizer.from_pretrained(dir, gguf_file=name)``; needs the ``gguf`` package),
* a byte-level BPE trained with the ``tokenizers`` library (:func:`train_bpe_tokenizer`), which is
  saved as a Hugging Face directory and then loaded like the first case.

The wrapper also satisfies what megatron-core's ``GPTDatasetConfig`` reads from its tokenizer
(``eod`` and ``unique_identifiers``, the latter hashed into the dataset index cache names).
It deliberately has no ``pad`` attribute: ``GPTDataset`` then pads with its ``-1`` sentinel and
masks exactly the padded positions, instead of masking every label equal to a real pad id (for
most HF tokenizers pad == eos, which would silently drop the loss on every end-of-document).

Nothing is ever fetched from a hub: every load is ``local_files_only`` and a missing path raises
:class:`FileNotFoundError` naming it.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from megatron.core.tokenizers import MegatronTokenizerBase

DEFAULT_EOD_TOKEN = "<|endoftext|>"
"""End-of-document token of the BPE tokenizers trained by :func:`train_bpe_tokenizer`."""

_HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")

_GGUF_SPECIAL_TOKEN_FIELDS = {
    "bos_token_id": "tokenizer.ggml.bos_token_id",
    "eos_token_id": "tokenizer.ggml.eos_token_id",
    "pad_token_id": "tokenizer.ggml.padding_token_id",
    "add_bos_token": "tokenizer.ggml.add_bos_token",
}
"""Our special-token keys and the GGUF metadata fields that record them."""

DEFAULT_VOCAB_SIZE = 8192
"""Vocabulary size of the tiny built-in tokenizer (a small vocab keeps tiny models fast on CPU)."""


class Tokenizer(MegatronTokenizerBase):
    """A Hugging Face tokenizer with the small interface the data pipeline and megatron need.

    Args:
        hf_tokenizer: A loaded ``transformers`` tokenizer.
        source: Where it was loaded from (recorded in :attr:`unique_identifiers`).
        eod_token: The end-of-document token; defaults to the tokenizer's EOS token.

    Raises:
        ValueError: If no end-of-document token can be determined.
    """

    def __init__(self, hf_tokenizer: Any, source: str, eod_token: str | None = None) -> None:
        super().__init__(path=source, config={})
        self.hf_tokenizer = hf_tokenizer
        if eod_token is None:
            eod_id = hf_tokenizer.eos_token_id
            if eod_id is None:
                raise ValueError(
                    f"tokenizer {source!r} has no EOS token; pass eod_token= explicitly"
                )
        else:
            eod_id = hf_tokenizer.get_vocab().get(eod_token)
            if eod_id is None:
                raise ValueError(f"eod_token {eod_token!r} is not in the vocabulary of {source!r}")
        self._eod_id = int(eod_id)

    # -- the pipeline's interface ------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of token ids, including added/special tokens."""
        return len(self.hf_tokenizer)

    @property
    def eod_id(self) -> int:
        """Id appended after every document."""
        return self._eod_id

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``: no BOS/EOS added, special-token strings in text kept as text."""
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """:meth:`encode` for many texts at once (parallel in the Rust backend)."""
        if not texts:
            return []
        encoded = self.hf_tokenizer(
            list(texts),
            add_special_tokens=False,
            split_special_tokens=True,
            return_attention_mask=False,
        )
        return [list(ids) for ids in encoded["input_ids"]]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``, special tokens included, without whitespace clean-up."""
        return self.hf_tokenizer.decode(
            [int(i) for i in ids], skip_special_tokens=False, clean_up_tokenization_spaces=False
        )

    # -- megatron-core's tokenizer interface -------------------------------------------------

    @property
    def eod(self) -> int:
        """Alias of :attr:`eod_id` (read by megatron's GPTDataset)."""
        return self._eod_id

    @property
    def unique_identifiers(self) -> OrderedDict[str, Any]:
        """What identifies this tokenizer in megatron's dataset cache hash."""
        return OrderedDict(
            [
                ("class", type(self).__name__),
                ("tokenizer_path", self.path),
                ("vocab_size", self.vocab_size),
                ("eod", self.eod),
            ]
        )

    def tokenize(self, text: str) -> list[int]:
        """Alias of :meth:`encode` (megatron's name)."""
        return self.encode(text)

    def detokenize(self, ids: Iterable[int]) -> str:
        """Alias of :meth:`decode` (megatron's name)."""
        return self.decode(ids)

    @property
    def vocab(self) -> dict[str, int]:
        """Token string to id."""
        return dict(self.hf_tokenizer.get_vocab())

    @property
    def inv_vocab(self) -> dict[int, str]:
        """Id to token string."""
        return {i: t for t, i in self.hf_tokenizer.get_vocab().items()}

    def apply_chat_template(self, conversation: list[dict[str, str]], **kwargs: Any) -> Any:
        """Delegate to the Hugging Face tokenizer's chat template."""
        return self.hf_tokenizer.apply_chat_template(conversation, **kwargs)

    def save(self, output_dir: str | Path) -> Path:
        """Save as a Hugging Face directory (e.g. to avoid re-parsing a GGUF file, ~12 s).

        The directory loads back with :func:`load_tokenizer`; a non-default EOD token must be
        passed again as ``eod_token``.
        """
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        self.hf_tokenizer.save_pretrained(str(output_dir))
        return output_dir

    def __repr__(self) -> str:
        return f"Tokenizer(path={self.path!r}, vocab_size={self.vocab_size}, eod_id={self.eod_id})"


def load_tokenizer(
    path: str | Path,
    eod_token: str | None = None,
    special_tokens: Mapping[str, Any] | None = None,
) -> Tokenizer:
    """Load a tokenizer from a local Hugging Face directory, ``tokenizer.json`` or GGUF file.

    A GGUF file's own special tokens (:func:`gguf_special_tokens`) replace the ones
    ``transformers`` guesses for it (SmolLM2: eos ``<|im_start|>`` and add_bos, where the file
    says eos ``<|im_end|>`` and no BOS); ``special_tokens`` win over both.

    Args:
        path: A directory holding a Hugging Face tokenizer, a ``tokenizer.json`` file, or a
            ``.gguf`` file (its tokenizer is read by ``transformers``; needs ``gguf``).
        eod_token: End-of-document token; defaults to the tokenizer's EOS token.
        special_tokens: Token ids recorded with a checkpoint (``bos_token_id``,
            ``eos_token_id``, ``pad_token_id``; ``None`` values are ignored), e.g. the
            ``special_tokens.yaml`` that ``import-hf`` writes.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        ValueError: If ``path`` is neither a directory, a ``.json`` nor a ``.gguf`` file, or a
            special token id is outside the vocabulary.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"tokenizer path does not exist: {path}")
    resolved = path.resolve()
    if resolved.is_dir():
        if not any((resolved / name).is_file() for name in _HF_TOKENIZER_FILES):
            raise FileNotFoundError(
                f"no tokenizer files ({', '.join(_HF_TOKENIZER_FILES)}) in directory {path}"
            )
        hf = AutoTokenizer.from_pretrained(str(resolved), local_files_only=True)
    elif resolved.suffix == ".gguf":
        hf = AutoTokenizer.from_pretrained(
            str(resolved.parent), gguf_file=resolved.name, local_files_only=True
        )
    elif resolved.suffix == ".json":
        eos = _eos_from_tokenizer_json(resolved) if eod_token is None else eod_token
        hf = PreTrainedTokenizerFast(tokenizer_file=str(resolved), eos_token=eos)
    else:
        raise ValueError(
            f"unsupported tokenizer path {path}: expected a directory, a tokenizer.json or a .gguf"
        )
    recorded = gguf_special_tokens(resolved) if resolved.suffix == ".gguf" else {}
    recorded.update({k: v for k, v in (special_tokens or {}).items() if v is not None})
    _set_special_tokens(hf, recorded, str(resolved))
    return Tokenizer(hf, source=str(resolved), eod_token=eod_token)


def gguf_special_tokens(path: str | Path) -> dict[str, Any]:
    """The bos/eos/pad token ids and ``add_bos_token`` a GGUF file's metadata records
    (``tokenizer.ggml.*``); keys the file lacks are left out."""
    from gguf import GGUFReader

    fields = GGUFReader(str(path)).fields
    return {
        key: fields[name].contents()
        for key, name in _GGUF_SPECIAL_TOKEN_FIELDS.items()
        if name in fields
    }


def _set_special_tokens(hf_tokenizer: Any, special: Mapping[str, Any], source: str) -> None:
    """Make ``hf_tokenizer``'s bos/eos/pad tokens (and ``add_bos_token``) those of ``special``."""
    for name in ("bos", "eos", "pad"):
        token_id = special.get(f"{name}_token_id")
        if token_id is None:
            continue
        if not 0 <= int(token_id) < len(hf_tokenizer):
            raise ValueError(
                f"{name}_token_id={token_id} (recorded for {source}) is outside the tokenizer's "
                f"vocabulary of {len(hf_tokenizer)}: fix special_tokens.yaml or pass the "
                "matching tokenizer"
            )
        setattr(hf_tokenizer, f"{name}_token", hf_tokenizer.convert_ids_to_tokens(int(token_id)))
    if special.get("add_bos_token") is not None and hasattr(hf_tokenizer, "add_bos_token"):
        hf_tokenizer.add_bos_token = bool(special["add_bos_token"])


def _eos_from_tokenizer_json(path: Path) -> str | None:
    """The conventional end-of-text special token of a bare ``tokenizer.json``, if it has one."""
    try:
        added = json.loads(path.read_text(encoding="utf-8")).get("added_tokens", [])
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read tokenizer file {path}: {err}") from err
    specials = {t["content"] for t in added if t.get("special")}
    for candidate in (DEFAULT_EOD_TOKEN, "</s>", "<eos>", "<|end_of_text|>"):
        if candidate in specials:
            return candidate
    return None


def train_bpe_tokenizer(
    texts: Iterable[str],
    output_dir: str | Path,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    min_frequency: int = 2,
    eod_token: str = DEFAULT_EOD_TOKEN,
) -> Tokenizer:
    """Train a byte-level BPE with the ``tokenizers`` library and save it as a HF directory.

    Training is deterministic: the same texts and settings give the same ``tokenizer.json``.
    Every byte is in the initial alphabet, so any text round-trips through encode/decode.

    Args:
        texts: Training documents.
        output_dir: Directory to write ``tokenizer.json`` and ``tokenizer_config.json`` to.
        vocab_size: Target vocabulary size, special token included.
        min_frequency: Minimum pair count for a merge.
        eod_token: The single special token, used as EOS / end of document.

    Returns:
        The tokenizer, loaded back from ``output_dir`` with :func:`load_tokenizer`.
    """
    from tokenizers import Tokenizer as BackendTokenizer
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = BackendTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[eod_token],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    hf = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=eod_token)
    hf.save_pretrained(str(output_dir))
    return load_tokenizer(output_dir)
