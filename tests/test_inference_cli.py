"""Loading our checkpoints for inference, and ``python -m nemo_dmc.generate``."""

import os
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from megatron.core import dist_checkpointing
from omegaconf import OmegaConf

from nemo_dmc.training.launch import free_port
from megatron_utils import TINY_GQA
from nemo_dmc.checkpoints.weights import save_weights_checkpoint
from nemo_dmc.core import DMCConfig
from nemo_dmc.data.tokenizer import load_tokenizer, train_bpe_tokenizer
from nemo_dmc.generate import GenerateConfig, length_warnings, run
from nemo_dmc.inference.config import EngineConfig, SamplingSettings
from nemo_dmc.inference.loading import build_inference_model
from nemo_dmc.megatron.cpu_shims import causal_attention_mask
from nemo_dmc.megatron.model import build_model
from nemo_dmc.megatron.parallel import seed_all
from nemo_dmc.methods import settings_for

REPO = Path(__file__).resolve().parents[1]
SHAPE = replace(TINY_GQA, vocab_size=384)
TEXTS = ["The list data type has some more methods.", "def main():\n    return 0\n"] * 20


def _trainer_run(run_dir: Path, window: int = 5,
                 stages=(("retrofit", 3), ("finetune", 2))) -> dict:
    """A run directory as the trainer leaves it: config, tokenizer, two stages of checkpoints."""
    seed_all(21)
    model = build_model(SHAPE, DMCConfig(init_offset=0.0, window=window))
    tokenizer = train_bpe_tokenizer(TEXTS, run_dir / "tokenizer", vocab_size=300)
    config = {"model": asdict(SHAPE), "dmc": {"target_cr": 4.0, "init_offset": 0.0,
                                              "temperature": 0.1, "window": window},
              "data": {"source": "indexed", "tokenizer": str(run_dir / "tokenizer")}}
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    for stage, step in stages:
        path = run_dir / "checkpoints" / stage / f"step_{step:07d}"
        path.mkdir(parents=True)
        dist_checkpointing.save({"model": model.sharded_state_dict(prefix="module.")}, str(path))
    assert tokenizer.vocab_size <= SHAPE.vocab_size
    return {k: v.clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}


def _same_weights(model, state) -> bool:
    return all(torch.equal(model.state_dict()[k], v) for k, v in state.items()
               if not k.endswith("_extra_state"))


def test_training_run_loads_latest_checkpoint_with_its_model_and_dmc_config(megatron_tp1,
                                                                            tmp_path):
    state = _trainer_run(tmp_path, window=5)
    model, shape, dmc, resolved = build_inference_model(tmp_path, TINY_GQA, DMCConfig())
    assert resolved.path.name == "step_0000002" and resolved.path.parent.name == "finetune"
    assert shape == SHAPE and dmc.window == 5 and dmc.init_offset == 0.0
    assert _same_weights(model, state)


def test_weights_checkpoint_and_state_dict_file_load(megatron_tp1, tmp_path):
    seed_all(22)
    source = build_model(SHAPE, method=None)
    state = {k: v.clone() for k, v in source.state_dict().items() if torch.is_tensor(v)}
    save_weights_checkpoint(source, SHAPE, tmp_path / "weights_ckpt")
    torch.save(source.state_dict(), tmp_path / "model.pt")
    loaded, shape, _, _ = build_inference_model(tmp_path / "weights_ckpt", TINY_GQA, DMCConfig())
    assert shape == SHAPE and _same_weights(loaded, state)
    loaded, _, _, _ = build_inference_model(tmp_path / "model.pt", SHAPE, DMCConfig())
    assert _same_weights(loaded, state)


def _greedy_tokens(model, prompt, new_tokens, vocab=None):
    """Greedy continuation by full-sequence forwards (no cache), below ``vocab``."""
    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(new_tokens):
            s = len(tokens)
            logits = model(torch.tensor([tokens]), torch.arange(s)[None], causal_attention_mask(s))
            tokens.append(int(logits[0, -1, :vocab].argmax()))
    return tokens[len(prompt):]


def test_nemo_checkpoint_generates_with_its_recorded_shape_and_dmc_settings(megatron_tp1,
                                                                            tmp_path):
    pytest.importorskip("nemo.collections.llm", reason="needs the `nemo` extra")
    from nemo_dmc.nemo.checkpoint import export_nemo_checkpoint

    seed_all(23)
    dmc = DMCConfig(init_offset=0.0, window=3)
    source = build_model(SHAPE, dmc).eval()
    export_nemo_checkpoint(source, SHAPE, dmc, tmp_path / "nemo")
    _, shape, loaded_dmc, _ = build_inference_model(tmp_path / "nemo", TINY_GQA, DMCConfig())
    assert shape == SHAPE and loaded_dmc == dmc
    prompt = [5, 17, 300, 9, 100, 3, 250]
    expected = _greedy_tokens(source, prompt, 6)
    # model.* and dmc.* left at other values: the checkpoint's context must supply them
    results = run(GenerateConfig(load=str(tmp_path / "nemo"), prompt_token_ids=[prompt],
                                 model=TINY_GQA, sampling=SamplingSettings(max_new_tokens=6),
                                 engine=EngineConfig(max_batch_size=1, max_sequence_length=16)))
    assert results[0].tokens == expected


def test_missing_checkpoint_is_an_error_naming_the_load_key(tmp_path, monkeypatch):
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    with pytest.raises(FileNotFoundError, match="^load: "):
        run(GenerateConfig(load=str(tmp_path / "nowhere"), prompt_token_ids=[[1, 2]]))


def test_generate_cli_prints_completions_with_achieved_ratio_and_kv_memory(megatron_tp1, tmp_path,
                                                                          capsys):
    _trainer_run(tmp_path / "run", stages=(("finetune", 2),))
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("generate", overrides=[
            f"load={tmp_path / 'run'}", "prompts=['The list data type','def main():']",
            "sampling.max_new_tokens=6", "sampling.temperature=0.8", "sampling.top_k=50",
            "engine.max_sequence_length=64", "engine.block_size=4"])
    results = run(OmegaConf.to_object(cfg))
    out = capsys.readouterr().out
    assert "finetune/step_0000002" in out and "tokenizer" in out
    for result in results:
        assert 1 <= len(result.tokens) <= 6
        assert f"[request {result.request_id}] completion ({len(result.tokens)} tokens" in out
        assert (f"[request {result.request_id}] achieved CR "
                f"{result.cache.compression_ratio:.2f} over {result.cache.tokens} tokens; "
                "KV cache") in out


def test_generate_command_reports_a_full_cache_as_a_one_line_error(tmp_path):
    env = dict(os.environ, MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-m", "nemo_dmc.generate", "prompt_token_ids=[[1,2]]",
         "engine.num_blocks=1", "sampling.max_new_tokens=2"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and result.stderr.rstrip().endswith(errors[0]), result.stderr
    assert "does not fit the KV cache (engine.num_blocks=1" in errors[0]
    assert list(tmp_path.iterdir()) == []  # Hydra writes no outputs


@pytest.mark.parametrize("method", ["vanilla", "h2o", "tova", "streaming"])
def test_generate_cli_runs_the_chosen_kv_method(megatron_tp1, tmp_path, capsys, method):
    _trainer_run(tmp_path / "run", stages=(("finetune", 2),))
    prompt = [5, 17, 200, 9, 100, 3, 250, 8]
    model, *_ = build_inference_model(tmp_path / "run", TINY_GQA, DMCConfig(),
                                      method=lambda dmc: settings_for(method, dmc, 2.0, 1))
    vocab = load_tokenizer(tmp_path / "run" / "tokenizer").vocab_size  # generate samples below it
    expected = _greedy_tokens(model, prompt, 6, vocab)
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("generate", overrides=[
            f"load={tmp_path / 'run'}", f"prompt_token_ids=[{prompt}]", f"method={method}",
            "ratio=2", "sinks=1", "sampling.max_new_tokens=6", "sampling.stop_at_eod=false",
            "engine.max_sequence_length=32", "engine.block_size=2"])
    results = run(OmegaConf.to_object(cfg))
    assert f"method {method}" in capsys.readouterr().out
    assert results[0].tokens == expected
    assert (results[0].cache.compression_ratio == 1.0) == (method == "vanilla")


def test_generate_cli_runs_dms_with_its_window(megatron_tp1, tmp_path, capsys):
    _trainer_run(tmp_path / "run", stages=(("finetune", 2),))
    prompt = [5, 17, 200, 9, 100, 3, 250, 8]
    model, _, dmc, _ = build_inference_model(
        tmp_path / "run", TINY_GQA, DMCConfig(),
        method=lambda dmc: settings_for("dms", dmc, window=2))
    vocab = load_tokenizer(tmp_path / "run" / "tokenizer").vocab_size
    expected = _greedy_tokens(model, prompt, 6, vocab)
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("generate", overrides=[
            f"load={tmp_path / 'run'}", f"prompt_token_ids=[{prompt}]", "method=dms",
            "window=2", "sampling.max_new_tokens=6", "sampling.stop_at_eod=false",
            "engine.max_sequence_length=32", "engine.block_size=2"])
    results = run(OmegaConf.to_object(cfg))
    assert "method dms" in capsys.readouterr().out
    assert results[0].tokens == expected
    assert results[0].cache.compression_ratio >= 1.0
    assert (results[0].cache.head_lengths >= 2).all()


def test_a_window_for_a_method_other_than_dms_is_an_error_naming_the_key(tmp_path,
                                                                         monkeypatch):
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    with pytest.raises(ValueError, match="^window: "):
        run(GenerateConfig(method="dmc", window=4, prompt_token_ids=[[1, 2]]))


def test_an_eviction_method_without_a_ratio_is_an_error_naming_the_key(tmp_path, monkeypatch):
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    with pytest.raises(ValueError, match="^ratio: "):
        run(GenerateConfig(method="h2o", prompt_token_ids=[[1, 2]]))


def test_length_warnings_name_the_trained_length_and_the_engine_cap():
    assert length_warnings([10], 6, trained_length=32, engine_limit=64) == []
    past, capped = length_warnings([30], 6, trained_length=32, engine_limit=33)
    assert "model.seq_length=32" in past and "never trained" in past
    assert "stops after 4 new tokens at engine.max_sequence_length=33" in capped


def test_generate_warns_when_generation_passes_the_trained_length(megatron_tp1, tmp_path, capsys):
    _trainer_run(tmp_path / "run", stages=(("finetune", 2),))
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("generate", overrides=[
            f"load={tmp_path / 'run'}", f"prompt_token_ids=[{list(range(1, SHAPE.seq_length))}]",
            "sampling.max_new_tokens=4", "sampling.stop_at_eod=false",
            f"engine.max_sequence_length={SHAPE.seq_length + 1}"])
    (result,) = run(OmegaConf.to_object(cfg))
    err = capsys.readouterr().err
    assert f"model.seq_length={SHAPE.seq_length}" in err
    assert f"stops after 3 new tokens at engine.max_sequence_length={SHAPE.seq_length + 1}" in err
    assert len(result.tokens) == 3 and result.finish_reason == "length"


def test_prompt_token_ids_outside_the_vocabulary_are_an_error_naming_the_key(megatron_tp1,
                                                                              tmp_path):
    _trainer_run(tmp_path / "run", stages=(("finetune", 2),))
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("generate", overrides=[f"load={tmp_path / 'run'}",
                                             "prompt_token_ids=[[1,2,300,-1]]"])
    with pytest.raises(ValueError, match=r"prompt_token_ids: token id\(s\) \[-1, 300\] outside "
                                         r"the vocabulary \(0..299\)"):
        run(OmegaConf.to_object(cfg))
