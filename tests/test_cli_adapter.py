"""``python -m nemo_dmc.generate`` and ``python -m nemo_dmc.evaluate`` on a run trained with
decision adapters (``dmc.decision_source=adapter``): the run's settings build an adapter
model, generation equals greedy full forwards, evaluation reports the adapters' compression."""

import json
from dataclasses import asdict, replace
from pathlib import Path

import yaml
from megatron.core import dist_checkpointing

from megatron_utils import TINY_GQA
from test_decision_adapter import _randomise_adapters
from test_evaluation import _compose, tokenizer  # noqa: F401 (fixture)
from test_inference_cli import _greedy_tokens
from nemo_dmc.core import DMCConfig
from nemo_dmc.evaluate import run as evaluate
from nemo_dmc.generate import GenerateConfig, run as generate
from nemo_dmc.inference.config import EngineConfig, SamplingSettings
from nemo_dmc.megatron.model import build_model
from nemo_dmc.megatron.parallel import seed_all
from nemo_dmc.megatron.stats import collect_dmc_stats

SHAPE = replace(TINY_GQA, vocab_size=384, seq_length=128)
ADAPTER = DMCConfig(decision_source="adapter", window=5)


def _adapter_run(path: Path, tokenizer=None):  # noqa: F811
    """A run directory as the trainer leaves it, trained with decision adapters."""
    seed_all(41)
    model = build_model(SHAPE, ADAPTER).eval()
    _randomise_adapters(model, seed=41)
    data = {"source": "random", "seed": 7}
    if tokenizer is not None:
        tokenizer.save(path / "tokenizer")
        data["tokenizer"] = str(path / "tokenizer")
    config = {"model": asdict(SHAPE), "data": data,
              "dmc": {"target_cr": 4.0, "window": 5, "decision_source": "adapter"}}
    (path / ".hydra").mkdir(parents=True)
    (path / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    step = path / "checkpoints" / "finetune" / "step_0000002"
    step.mkdir(parents=True)
    dist_checkpointing.save({"model": model.sharded_state_dict(prefix="module.")}, str(step))
    return model


def test_generate_on_an_adapter_run_equals_greedy_full_forwards(megatron_tp1, tmp_path):
    source = _adapter_run(tmp_path / "run")
    prompt = [5, 17, 300, 9, 100, 3, 250, 44, 8, 61]
    expected = _greedy_tokens(source, prompt, 8)
    assert 0.2 < collect_dmc_stats(source).merge_fraction.item() < 0.8
    results = generate(GenerateConfig(load=str(tmp_path / "run"), prompt_token_ids=[prompt],
                                      sampling=SamplingSettings(max_new_tokens=8),
                                      engine=EngineConfig(max_batch_size=1,
                                                          max_sequence_length=32)))
    assert results[0].tokens == expected
    assert results[0].cache.compression_ratio > 1.2


def test_evaluate_on_an_adapter_run_reports_the_adapters_compression(megatron_tp1, tmp_path,
                                                                    tokenizer):  # noqa: F811
    _adapter_run(tmp_path / "run", tokenizer)
    results = evaluate(_compose(f"load={tmp_path / 'run'}", "data.num_sequences=4",
                                "passkey.enabled=false"))
    saved = json.loads((tmp_path / "run" / "evaluation" / "dmc" / "results.json").read_text())
    assert saved["compression"]["cr"] > 1.2  # the adapters' merges (a fresh adapter: CR 1)
    assert results["compression"] == saved["compression"]
