"""Evaluating your own text (issue 17 item 4): ``data.valid_prefixes`` implies
``data.source=indexed``, the built-in corpus cache is keyed by tokenizer, and a long-context
model is scored on at most 1024-token sequences unless ``seq_length`` says otherwise."""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from megatron.core import dist_checkpointing
from omegaconf import OmegaConf

from megatron_utils import TINY_GQA
from nemo_dmc.data.preprocess import preprocess
from nemo_dmc.data.tokenizer import train_bpe_tokenizer
from nemo_dmc.evaluate import EvaluateConfig, run
from nemo_dmc.evaluate.config import register_schema
from nemo_dmc.evaluate.runner import summary
from nemo_dmc.megatron.model import build_model
from nemo_dmc.megatron.parallel import seed_all
from nemo_dmc.methods import VanillaSettings
from nemo_dmc.training.batches import prepare_pydocs
from nemo_dmc.training.config import DataConfig, TrainConfig

REPO = Path(__file__).resolve().parents[1]
TEXTS = [f"Paragraph {i}: the list data type has some more methods; the grass is green."
         for i in range(200)]

register_schema()  # as `python -m nemo_dmc.evaluate` does


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_bpe_tokenizer(TEXTS, tmp_path_factory.mktemp("tok") / "tokenizer", vocab_size=300)


def _run_dir(path: Path, tokenizer, seq_length: int) -> Path:
    """A plain-attention run (recorded data: random tokens) whose model is ``seq_length`` long."""
    shape = replace(TINY_GQA, vocab_size=384, seq_length=seq_length)
    seed_all(5)
    model = build_model(shape, VanillaSettings()).eval()
    tokenizer.save(path / "tokenizer")
    config = {"model": asdict(shape), "dmc": {"window": 5},
              "data": {"source": "random", "tokenizer": str(path / "tokenizer"), "seed": 7}}
    (path / ".hydra").mkdir(parents=True)
    (path / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    step = path / "checkpoints" / "finetune" / "step_0000001"
    step.mkdir(parents=True)
    dist_checkpointing.save({"model": model.sharded_state_dict(prefix="module.")}, str(step))
    return path


def _compose(*overrides: str) -> EvaluateConfig:
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return OmegaConf.to_object(compose("evaluate", overrides=list(overrides)))


def test_valid_prefixes_without_source_score_your_own_text(megatron_tp1, tmp_path, tokenizer):
    run_dir = _run_dir(tmp_path / "run", tokenizer, seq_length=64)
    (tmp_path / "mine.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    preprocess([tmp_path / "mine.jsonl"], tmp_path / "mine", tokenizer, show_progress=False)
    results = run(_compose(f"load={run_dir}", "method=vanilla", "passkey.enabled=false",
                           f"data.valid_prefixes=[{tmp_path / 'mine'}]", "data.num_sequences=2",
                           f"output_dir={tmp_path / 'out'}"))
    assert results["perplexity"]["source"] == "indexed"  # not the run's random tokens


def test_valid_prefixes_with_another_source_are_an_error_naming_data_source():
    cfg = _compose("load=x", "data.source=pydocs", "data.valid_prefixes=[some/prefix]")
    with pytest.raises(ValueError, match="^data.source: .*valid_prefixes"):
        cfg.validate()


def test_long_model_is_scored_on_1024_token_sequences_by_default(megatron_tp1, tmp_path,
                                                                 tokenizer):
    run_dir = _run_dir(tmp_path / "run", tokenizer, seq_length=2048)
    results = run(_compose(f"load={run_dir}", "method=vanilla", "passkey.enabled=false",
                           "data.num_sequences=1", f"output_dir={tmp_path / 'out'}"))
    assert results["model"]["seq_length"] == 1024
    assert results["perplexity"]["tokens"] <= 1024
    assert "sequence length: 1024 tokens (default: the model's 2048 capped at 1024" \
        in summary(results)
    explicit = run(_compose(f"load={run_dir}", "method=vanilla", "passkey.enabled=false",
                            "data.num_sequences=1", "seq_length=1536",
                            f"output_dir={tmp_path / 'explicit'}"))
    assert explicit["model"]["seq_length"] == 1536
    assert "sequence length: 1536 tokens\n" in summary(explicit)


def test_pydocs_cache_of_another_tokenizer_does_not_block_the_default_one(tmp_path, tokenizer):
    cache = str(tmp_path / "pydocs")
    model = replace(TINY_GQA, vocab_size=384)
    tokenizer.save(tmp_path / "theirs")
    theirs = TrainConfig(model=model, data=DataConfig(cache_dir=cache, max_documents=12,
                                                      tokenizer=str(tmp_path / "theirs")))
    prepare_pydocs(theirs)
    ours = TrainConfig(model=model, data=DataConfig(cache_dir=cache, max_documents=12))
    tokenizer_path, _, valid = prepare_pydocs(ours)  # used to fail: "was prepared with ..."
    assert tokenizer_path == Path(cache) / "tokenizer"
    assert Path(valid[0] + ".bin").is_file()
    assert prepare_pydocs(theirs)[0] == tmp_path / "theirs"
