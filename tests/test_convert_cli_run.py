"""``python -m nemo_dmc.convert export-hf --input runs/<name>``: a training run exports as DMC."""

import json

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from nemo_dmc.convert.__main__ import main as convert_main
from nemo_dmc.core import DMCConfig
from nemo_dmc.hf import DMCLlamaForCausalLM
from nemo_dmc.megatron import parallel
from nemo_dmc.megatron.model import build_model
from nemo_dmc.checkpoints.run_config import RUN_CONFIG_FILE
from nemo_dmc.training.launch import free_port
from test_convert_hf import _megatron_logits
from test_inference_cli import SHAPE, _trainer_run


def test_export_hf_of_a_training_run_is_dmc_with_its_tokenizer_and_logits(tmp_path, monkeypatch):
    run = tmp_path / "run"
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    ids = torch.randint(0, 300, (2, 10), generator=torch.Generator().manual_seed(4))
    parallel.initialize(tensor_parallel_size=1, seed=0)
    try:
        state = _trainer_run(run, window=5)  # the trainer's layout, DMC init_offset 0, window 5
        (run / ".hydra" / "config.yaml").rename(run / RUN_CONFIG_FILE)
        model = build_model(SHAPE, DMCConfig(init_offset=0.0, window=5))
        model.load_state_dict(state, strict=False)
        expected = _megatron_logits(model, ids, SHAPE.vocab_size)
    finally:
        parallel.shutdown()

    out = tmp_path / "hf"
    assert convert_main(["export-hf", "--input", str(run), "--output", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "dmc_llama" and config["kv_method"]["window"] == 5
    eos = AutoTokenizer.from_pretrained(out).eos_token_id  # the run's BPE: <|endoftext|> is 0
    assert eos != 2 and config["eos_token_id"] == eos
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == eos
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    assert isinstance(hf, DMCLlamaForCausalLM)
    with torch.no_grad():
        logits = hf(ids, use_cache=False).logits
    torch.testing.assert_close(logits, expected, atol=2e-5, rtol=1e-5)


def test_export_hf_method_writes_the_chosen_kv_method(tmp_path, monkeypatch):
    run = tmp_path / "run"
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    parallel.initialize(tensor_parallel_size=1, seed=0)
    try:
        _trainer_run(run, window=5)
    finally:
        parallel.shutdown()
    out = tmp_path / "hf"
    assert convert_main(["export-hf", "--input", str(run), "--output", str(out),
                         "--method", "streaming", "--ratio", "3", "--sinks", "2"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["kv_method"] == {"name": "streaming", "ratio": 3.0, "min_slots": None,
                                   "sinks": 2}
    assert convert_main(["export-hf", "--input", str(run), "--output", str(tmp_path / "bad"),
                         "--method", "h2o"]) == 2  # an eviction method needs --ratio
    assert convert_main(["export-hf", "--input", str(run), "--output", str(tmp_path / "dms"),
                         "--method", "dms", "--window", "16"]) == 0
    dms = json.loads((tmp_path / "dms" / "config.json").read_text())["kv_method"]
    assert dms["name"] == "dms" and dms["window"] == 16
