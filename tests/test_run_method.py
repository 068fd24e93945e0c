"""A run's consumers run the KV method it trained: a DMS run (``method=dms window=4``)
evaluated, generated from, exported or scored by lm-eval without ``method=`` runs as DMS with
window 4 (its ``run_config.yaml``), and an explicit ``method=`` still overrides."""

import json
import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from nemo_dmc.convert.__main__ import main as convert_main
from nemo_dmc.core import DMCConfig, ModelConfig
from nemo_dmc.evaluate import run as evaluate
from nemo_dmc.evaluate.config import register_schema
from nemo_dmc.generate import run as generate
from nemo_dmc.inference.loading import build_inference_model
from nemo_dmc.methods import settings_for
from nemo_dmc.training.launch import free_port
from test_inference_cli import _greedy_tokens
from test_training_loop import micro_config

REPO = Path(__file__).resolve().parents[1]
PROMPT = [5, 17, 200, 9, 100, 3, 250, 8, 40, 77, 12, 3]


@pytest.fixture(scope="module")
def dms_run(tmp_path_factory):
    """A DMS run of the trainer: one retrofit step of the micro model (decision offset 0, so
    about half the tokens leave the window evicted), method=dms window=4."""
    from nemo_dmc.training.runner import run

    run_dir = tmp_path_factory.mktemp("dms") / "run"
    saved = dict(os.environ)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        os.environ.pop(key, None)
    try:
        run(micro_config(run_dir, "method=dms", "window=4", "dmc.init_offset=0.0",
                         "stage=retrofit", "stage.retrofit.steps=1", "model.vocab_size=384"))
    finally:
        os.environ.clear()
        os.environ.update(saved)
    recorded = OmegaConf.load(run_dir / "run_config.yaml")
    assert recorded.method == "dms" and recorded.window == 4
    return run_dir


register_schema()


def _compose(name: str, *overrides: str):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return OmegaConf.to_object(compose(name, overrides=list(overrides)))


def _evaluate(run_dir: Path, *overrides: str) -> dict:
    return evaluate(_compose("evaluate", f"load={run_dir}", "data.num_sequences=4",
                             "passkey.enabled=false", "heatmap=false", *overrides))


def test_evaluate_without_method_runs_the_runs_dms_and_records_it(dms_run, monkeypatch, capsys):
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    dms = _evaluate(dms_run)
    saved = json.loads((dms_run / "evaluation" / "dms_w4" / "results.json").read_text())
    assert saved["method"] == "dms" and saved["window"] == 4 and saved["method_source"] == "run"
    assert saved["method_settings"]["name"] == "dms" and saved["method_settings"]["window"] == 4
    assert saved["config"]["method"] == "dms" and saved["method_note"] is None
    assert "method: dms (window 4) (the checkpoint's trained method)" in capsys.readouterr().out
    # method=dmc: allowed, noted, tagged and recorded as dmc; the same weights hold other slots
    dmc = _evaluate(dms_run, "method=dmc")
    assert "trained with method=dms" in capsys.readouterr().out
    saved = json.loads((dms_run / "evaluation" / "dmc" / "results.json").read_text())
    assert saved["method"] == "dmc" and saved["method_source"] == "given"
    assert "different model" in saved["method_note"]
    assert dmc["compression"]["kv_bytes"]["slots"] != dms["compression"]["kv_bytes"]["slots"]
    # method=dms keeps the run's window; window= overrides it (and the output tag follows)
    assert _evaluate(dms_run, "method=dms", "output_dir=" + str(dms_run / "x"))[
        "method_settings"]["window"] == 4
    wide = _evaluate(dms_run, "window=8")
    assert wide["method_settings"]["window"] == 8
    assert (dms_run / "evaluation" / "dms_w8" / "results.json").is_file()
    vanilla = _evaluate(dms_run, "method=vanilla")
    assert vanilla["method"] == "vanilla" and vanilla["compression"]["cr"] == 1.0


def _generate(run_dir: Path, *overrides: str):
    return generate(_compose("generate", f"load={run_dir}", f"prompt_token_ids=[{PROMPT}]",
                             "sampling.max_new_tokens=6", "sampling.stop_at_eod=false",
                             "engine.max_sequence_length=32", "engine.block_size=2",
                             *overrides))


def _expected(run_dir: Path, method: str, **kwargs):
    model, _, _, _ = build_inference_model(run_dir, ModelConfig(), DMCConfig(),
                                           method=lambda dmc: settings_for(method, dmc, **kwargs))
    return _greedy_tokens(model, PROMPT, 6, 384)


def test_generate_without_method_runs_the_runs_dms(dms_run, megatron_tp1, capsys):
    dms, dmc = _expected(dms_run, "dms", window=4), _expected(dms_run, "dmc")
    [result] = _generate(dms_run)
    out = capsys.readouterr().out
    assert "method dms, window 4 (the checkpoint's trained method)" in out
    assert "note:" not in out
    assert result.tokens == dms
    assert (result.cache.head_lengths >= 4).all()  # the window is always held
    [result] = _generate(dms_run, "method=dmc")
    out = capsys.readouterr().out
    assert "DMC window" in out and "trained with method=dms" in out
    assert result.tokens == dmc


def test_generate_with_a_window_on_a_dmc_checkpoint_is_an_error(tmp_path, monkeypatch):
    from test_inference_cli import _trainer_run

    from nemo_dmc.megatron import parallel

    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    parallel.initialize(tensor_parallel_size=1, seed=0)
    try:
        _trainer_run(tmp_path / "run", stages=(("finetune", 2),))  # records no method: dmc
    finally:
        parallel.shutdown()
    with pytest.raises(ValueError, match="^window: "):
        _generate(tmp_path / "run", "window=4")


def test_export_hf_without_method_writes_the_runs_dms(dms_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    assert convert_main(["export-hf", "--input", str(dms_run), "--output",
                         str(tmp_path / "hf")]) == 0
    kv = json.loads((tmp_path / "hf" / "config.json").read_text())["kv_method"]
    assert kv["name"] == "dms" and kv["window"] == 4
    assert convert_main(["export-hf", "--input", str(dms_run), "--output",
                         str(tmp_path / "dmc"), "--method", "dmc"]) == 0
    assert "trained with method=dms" in capsys.readouterr().out
    kv = json.loads((tmp_path / "dmc" / "config.json").read_text())["kv_method"]
    assert kv["name"] == "dmc"
    assert convert_main(["export-hf", "--input", str(dms_run), "--output",
                         str(tmp_path / "w8"), "--window", "8"]) == 0
    kv = json.loads((tmp_path / "w8" / "config.json").read_text())["kv_method"]
    assert kv["name"] == "dms" and kv["window"] == 8


def test_export_nemo_of_a_dms_run_is_refused_unless_the_format_is_given(dms_run, tmp_path,
                                                                      monkeypatch, capsys):
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    assert convert_main(["export-nemo", "--input", str(dms_run), "--output",
                         str(tmp_path / "nemo")]) == 2
    err = capsys.readouterr().err
    assert "trained with method=dms" in err and "--format plain" in err
    assert not (tmp_path / "nemo").exists() or not any((tmp_path / "nemo").iterdir())


def test_lm_eval_model_runs_the_runs_dms(dms_run, tmp_path):
    pytest.importorskip("lm_eval")
    from test_evaluation import TEXTS

    from nemo_dmc.data.tokenizer import train_bpe_tokenizer
    from nemo_dmc.evaluate.lm_eval_adapter import NemoDMCLM
    from nemo_dmc.megatron import parallel

    train_bpe_tokenizer(TEXTS, tmp_path / "tok", vocab_size=300)
    os.environ["MASTER_PORT"] = str(free_port())
    try:
        lm = NemoDMCLM(load=str(dms_run), tokenizer=str(tmp_path / "tok"))
        assert (lm.method, lm.window) == ("dms", 4)
        assert all(layer.self_attention.method.settings.window == 4
                   for layer in lm.model.decoder.layers)
    finally:
        parallel.shutdown()
