"""``convert import-megatron``: Megatron-LM torch-format checkpoints (NVIDIA's DMC releases)
become weights checkpoints with the run's DMC settings; bad or unsafe files are refused by name.

The checkpoints are written here in Megatron-LM's layout (``latest_checkpointed_iteration.txt``,
``iter_*/mp_rank_NN/model_optim_rng.pt`` with ``args``, ``model`` and the RNG state) from a
random transformers Llama, whose forward is the independent reference for the logits."""

import argparse
import io
import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from megatron.core.enums import ModelType
from transformers import LlamaForCausalLM

from nemo_dmc.checkpoints.safe_load import UnsafeCheckpointError
from nemo_dmc.checkpoints.weights import read_dmc_config
from nemo_dmc.convert.__main__ import main as convert_main
from nemo_dmc.convert.megatron_import import (
    dmc_settings_from_args,
    load_megatron_checkpoint,
    load_shard,
)
from nemo_dmc.core import DMCConfig, ModelConfig
from nemo_dmc.inference.loading import build_inference_model
from nemo_dmc.megatron import parallel
from nemo_dmc.megatron.model import build_model
from nemo_dmc.methods import settings_to_dict
from nemo_dmc.training.launch import free_port
from test_convert_hf import _cli_error, _megatron_logits, _tiny_llama

VOCAB, PADDED = 200, 256  # the tiny Llama's vocabulary; Megatron pads it to 128 x TP
REFERENCE_DMC = DMCConfig(init_offset=5.0, window=12, temperature=0.1, target_cr=8.0,
                          loss_reduction="sequence", zero_after_rope=True)


@pytest.fixture(autouse=True)
def _free_master_port(monkeypatch):
    monkeypatch.setenv("MASTER_PORT", str(free_port()))


def _args(hf, tp: int, **changes) -> argparse.Namespace:
    """Training args as the reference's dmc branch stores them (``--dmc-*`` included)."""
    cfg = hf.config
    args = dict(num_layers=cfg.num_hidden_layers, hidden_size=cfg.hidden_size,
                num_attention_heads=cfg.num_attention_heads, group_query_attention=True,
                num_query_groups=cfg.num_key_value_heads, kv_channels=None,
                ffn_hidden_size=cfg.intermediate_size, seq_length=64,
                max_position_embeddings=64, padded_vocab_size=PADDED,
                tensor_model_parallel_size=tp, pipeline_model_parallel_size=1, swiglu=True,
                add_bias_linear=False, disable_bias_linear=True, add_qkv_bias=False,
                normalization="RMSNorm", position_embedding_type="rope", rotary_percent=1.0,
                rotary_interleaved=False, rotary_base=int(cfg.rope_theta),
                norm_epsilon=cfg.rms_norm_eps, untie_embeddings_and_output_weights=True,
                params_dtype=torch.bfloat16, model_type=ModelType.encoder_or_decoder,
                dmc_init_val=5.0, dmc_window_size=12, dmc_temp=0.1, dmc_cr=8.0,
                dmc_finetune=True, dmc_is_stage_one=False, data_path=["1.0", "wiki"])
    args.update(changes)
    return argparse.Namespace(**args)


def _rank_states(hf, tp: int) -> list[dict]:
    """Each TP rank's megatron-core (local spec) tensors of ``hf``: QKV fused per query group
    and whole groups per rank, fc1 ``[gate_r; up_r]``, row-parallel weights split on dim 1,
    the vocabulary padded (with non-zero rows, as Megatron trains them) and split on dim 0."""
    cfg, w = hf.config, {k: v.detach().clone() for k, v in hf.state_dict().items()}
    groups, d = cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    pad = torch.randn(PADDED - VOCAB, cfg.hidden_size, generator=torch.Generator().manual_seed(3))
    ranks = [{} for _ in range(tp)]

    def split(name, tensor, dim):
        for r, part in enumerate(tensor.chunk(tp, dim)):
            ranks[r][name] = part.clone()

    def replicate(name, tensor):
        for r in range(tp):
            ranks[r][name] = tensor.clone()

    split("embedding.word_embeddings.weight", torch.cat([w["model.embed_tokens.weight"], pad]), 0)
    split("output_layer.weight", torch.cat([w["lm_head.weight"], pad]), 0)
    replicate("decoder.final_layernorm.weight", w["model.norm.weight"])
    for i in range(cfg.num_hidden_layers):
        src, dst = f"model.layers.{i}.", f"decoder.layers.{i}."
        q, k, v = (w[src + f"self_attn.{n}_proj.weight"] for n in "qkv")
        fused = torch.cat([q.view(groups, -1, cfg.hidden_size), k.view(groups, d, -1),
                           v.view(groups, d, -1)], dim=1)
        for r, part in enumerate(fused.chunk(tp, 0)):
            ranks[r][dst + "self_attention.linear_qkv.weight"] = part.flatten(0, 1).clone()
        gate, up = w[src + "mlp.gate_proj.weight"], w[src + "mlp.up_proj.weight"]
        for r in range(tp):
            ranks[r][dst + "mlp.linear_fc1.weight"] = torch.cat([gate.chunk(tp)[r],
                                                                 up.chunk(tp)[r]])
        split(dst + "self_attention.linear_proj.weight", w[src + "self_attn.o_proj.weight"], 1)
        split(dst + "mlp.linear_fc2.weight", w[src + "mlp.down_proj.weight"], 1)
        replicate(dst + "input_layernorm.weight", w[src + "input_layernorm.weight"])
        replicate(dst + "pre_mlp_layernorm.weight", w[src + "post_attention_layernorm.weight"])
    return ranks


def _transformer_engine_names(state: dict) -> dict:
    """megatron-core's TE spec: norms fused into the next linear, fp8 ``_extra_state``."""
    out = {}
    for name, tensor in state.items():
        name = name.replace("input_layernorm.weight", "self_attention.linear_qkv.layer_norm_weight")
        name = name.replace("pre_mlp_layernorm.weight", "mlp.linear_fc1.layer_norm_weight")
        out[name] = tensor
        if name.endswith("linear_qkv.weight"):
            out[name.replace(".weight", "._extra_state")] = io.BytesIO(b"fp8 meta")
            out[name.replace("linear_qkv.weight", "core_attention._extra_state")] = None
    return out


def _legacy_names(state: dict) -> dict:
    """The legacy model's nested ``language_model`` dict (``megatron/legacy/model``)."""
    renames = (("self_attention.linear_qkv.", "self_attention.query_key_value."),
               ("self_attention.linear_proj.", "self_attention.dense."),
               ("mlp.linear_fc1.", "mlp.dense_h_to_4h."), ("mlp.linear_fc2.", "mlp.dense_4h_to_h."),
               ("input_layernorm.", "input_norm."), ("pre_mlp_layernorm.", "post_attention_norm."),
               ("final_layernorm.", "final_norm."))
    encoder = {}
    for name, tensor in state.items():
        if name.startswith("decoder."):
            for old, new in renames:
                name = name.replace(old, new)
            encoder[name.removeprefix("decoder.")] = tensor
    return {"language_model": {
        "embedding": {"word_embeddings": {"weight": state["embedding.word_embeddings.weight"]}},
        "encoder": encoder, "output_layer": {"weight": state["output_layer.weight"]}}}


def _write(root: Path, hf, tp: int, names: str = "mcore", iteration: int = 250,
           **arg_changes) -> Path:
    """A Megatron-LM save directory of ``hf`` at ``tp`` ranks, keys named as ``names``."""
    rename = {"mcore": dict, "te": _transformer_engine_names, "legacy": _legacy_names}[names]
    (root / f"iter_{iteration:07d}").mkdir(parents=True)
    (root / "latest_checkpointed_iteration.txt").write_text(f"{iteration}\n")
    for rank, state in enumerate(_rank_states(hf, tp)):
        shard = root / f"iter_{iteration:07d}" / f"mp_rank_{rank:02d}" / "model_optim_rng.pt"
        shard.parent.mkdir()
        rng = {"random_rng_state": random.getstate(), "np_rng_state": np.random.get_state(),
               "torch_rng_state": torch.get_rng_state()}
        torch.save({"args": _args(hf, tp, **arg_changes), "checkpoint_version": 3.0,
                    "iteration": iteration, "model": rename(state), "rng_state": [rng]}, shard)
    return root


def _random_llama(tmp_path: Path, kv_heads: int) -> LlamaForCausalLM:
    return LlamaForCausalLM.from_pretrained(_tiny_llama(tmp_path, kv_heads, tied=False),
                                            dtype=torch.float32)


def _ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(1))


def _nothing_written(tmp_path: Path) -> bool:
    return not (tmp_path / "out").exists() and not list(tmp_path.glob(".tmp-*"))


@pytest.fixture(scope="module")
def imported(tmp_path_factory) -> tuple[Path, LlamaForCausalLM]:
    """A TP=2 GQA checkpoint in Transformer Engine names, imported by the CLI."""
    root = tmp_path_factory.mktemp("imported")
    hf = _random_llama(root, kv_heads=2)
    source = _write(root / "megatron", hf, tp=2, names="te")
    with pytest.MonkeyPatch.context() as patch:  # as _free_master_port, at module scope
        patch.setenv("MASTER_PORT", str(free_port()))
        assert convert_main(["import-megatron", "--input", str(source),
                             "--output", str(root / "out"), "--vocab-size", str(VOCAB)]) == 0
    return root / "out", hf


def test_imported_tp2_gqa_checkpoint_gives_transformers_logits_and_its_dmc_settings(imported):
    out, hf = imported
    assert read_dmc_config(out) == REFERENCE_DMC
    parallel.initialize(tensor_parallel_size=1, seed=0)
    try:  # as generate/evaluate load it: shape and DMC settings from the checkpoint
        model, shape, dmc, _ = build_inference_model(out, ModelConfig(), DMCConfig(),
                                                     method=lambda settings: None)
        assert dmc == REFERENCE_DMC and shape.vocab_size == VOCAB and shape.kv_heads == 2
        with torch.no_grad():
            expected = hf.eval()(_ids()).logits
        torch.testing.assert_close(_megatron_logits(model, _ids(), VOCAB), expected,
                                   atol=1e-5, rtol=1e-5)
    finally:
        parallel.shutdown()


def test_recorded_dmc_settings_without_zero_after_rope_load_as_the_old_convention(tmp_path):
    (tmp_path / "dmc_config.yaml").write_text("init_offset: 5.0\nwindow: 12\n")
    assert read_dmc_config(tmp_path).zero_after_rope is False
    (tmp_path / "dmc_config.yaml").write_text("zero_after_rope: true\n")
    assert read_dmc_config(tmp_path).zero_after_rope is True


def test_export_hf_of_an_imported_dmc_model_is_dmc_with_its_settings(imported, tmp_path):
    out, _ = imported
    assert convert_main(["export-hf", "--input", str(out), "--output", str(tmp_path / "hf")]) == 0
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["model_type"] == "dmc_llama"
    assert config["kv_method"] == settings_to_dict(REFERENCE_DMC)


def test_export_nemo_of_an_imported_dmc_model_records_its_settings(imported, tmp_path):
    pytest.importorskip("nemo", reason="NeMo export needs the `nemo` extra")
    from nemo_dmc.checkpoints.nemo_context import nemo_checkpoint_settings

    out, _ = imported
    assert convert_main(["export-nemo", "--input", str(out), "--output",
                         str(tmp_path / "nemo")]) == 0
    shape, dmc = nemo_checkpoint_settings(tmp_path / "nemo")
    assert dmc == REFERENCE_DMC and shape.num_query_groups == 2


@pytest.mark.parametrize("tp,kv_heads,names", [(1, 8, "legacy"), (2, 8, "legacy"),
                                               (1, 2, "mcore")],
                         ids=["tp1-mha-legacy", "tp2-mha-legacy", "tp1-gqa-mcore"])
def test_merged_shards_give_transformers_logits(megatron_tp1, tmp_path, tp, kv_heads, names):
    hf = _random_llama(tmp_path, kv_heads)
    checkpoint = load_megatron_checkpoint(_write(tmp_path / "m", hf, tp, names), VOCAB)
    model = build_model(checkpoint.model, method=None)
    result = model.load_state_dict(checkpoint.state, strict=False)
    assert not result.unexpected_keys
    assert all(k.endswith("_extra_state") for k in result.missing_keys)
    with torch.no_grad():
        expected = hf.eval()(_ids()).logits
    torch.testing.assert_close(_megatron_logits(model, _ids(), VOCAB), expected,
                               atol=1e-5, rtol=1e-5)


def test_dmc_settings_come_from_the_reference_args_and_plain_runs_have_none(tmp_path):
    hf = _random_llama(tmp_path, kv_heads=2)
    assert dmc_settings_from_args(_args(hf, 1), tmp_path) == REFERENCE_DMC
    plain = {k: v for k, v in vars(_args(hf, 1)).items() if not k.startswith("dmc_")}
    assert dmc_settings_from_args(argparse.Namespace(**plain), tmp_path) is None


def _shard(root: Path) -> Path:
    return root / "iter_0000250" / "mp_rank_00" / "model_optim_rng.pt"


def test_truncated_shard_is_refused_by_name_and_nothing_is_written(tmp_path, capsys):
    source = _write(tmp_path / "m", _random_llama(tmp_path, 2), tp=1)
    data = _shard(source).read_bytes()
    _shard(source).write_bytes(data[:len(data) // 2])
    assert convert_main(["import-megatron", "--input", str(source),
                         "--output", str(tmp_path / "out")]) == 2
    error = _cli_error(capsys)
    assert str(_shard(source)) in error and "truncated" in error
    assert _nothing_written(tmp_path)


@pytest.mark.parametrize("content,message", [
    (b"not a checkpoint\n", "not a complete PyTorch checkpoint"),
    ({"state_dict": {"w": torch.ones(2)}}, "not a Megatron-LM checkpoint"),
], ids=["text-file", "foreign-dict"])
def test_foreign_shard_is_refused_by_name_and_nothing_is_written(tmp_path, capsys, content,
                                                                 message):
    source = _write(tmp_path / "m", _random_llama(tmp_path, 2), tp=1)
    if isinstance(content, bytes):
        _shard(source).write_bytes(content)
    else:
        torch.save(content, _shard(source))
    assert convert_main(["import-megatron", "--input", str(source),
                         "--output", str(tmp_path / "out")]) == 2
    error = _cli_error(capsys)
    assert str(_shard(source)) in error and message in error
    assert _nothing_written(tmp_path)


class _RunsCode:
    """Unpickles as a call that creates ``marker``: code a crafted checkpoint could run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def test_loading_a_shard_leaves_the_process_safe_globals_as_they_were(tmp_path):
    import torch.serialization as serialization

    hf = _random_llama(tmp_path, kv_heads=2)
    source = _write(tmp_path / "megatron", hf, tp=1, names="mcore")
    before = set(map(repr, serialization.get_safe_globals()))
    assert "<class 'numpy.ndarray'>" in before  # megatron.core marks it at import
    load_shard(next(source.rglob("model_optim_rng.pt")))
    assert set(map(repr, serialization.get_safe_globals())) == before


def test_pickled_code_is_refused_unless_trusted_and_the_error_names_the_flag(tmp_path, capsys):
    source = _write(tmp_path / "m", _random_llama(tmp_path, 2), tp=1)
    shard = torch.load(_shard(source), weights_only=False)
    marker = tmp_path / "code-ran"
    torch.save({**shard, "hook": _RunsCode(marker)}, _shard(source))
    assert convert_main(["import-megatron", "--input", str(source),
                         "--output", str(tmp_path / "out")]) == 2
    error = _cli_error(capsys)
    assert str(_shard(source)) in error and "--trust-pickle" in error and "mkdir" in error
    assert not marker.exists() and _nothing_written(tmp_path)
    with pytest.raises(UnsafeCheckpointError, match="--trust-pickle"):
        load_shard(_shard(source))
    load_shard(_shard(source), trust_pickle=True)  # the opt-in loads it, running its code
    assert marker.exists()


@pytest.mark.parametrize("change,names", [
    ({"ffn_hidden_size": 128}, ("ffn_hidden_size=128", "mlp.linear_fc1.weight", "(256, 64)")),
    ({"num_query_groups": 4}, ("num_query_groups=4", "linear_qkv.weight")),
    ({"tensor_model_parallel_size": 2}, ("tensor_model_parallel_size=2", "1 mp_rank")),
    ({"normalization": "LayerNorm"}, ("normalization='LayerNorm'",)),
], ids=["ffn", "groups", "tp", "layernorm"])
def test_args_that_disagree_with_the_tensors_are_named(tmp_path, capsys, change, names):
    source = _write(tmp_path / "m", _random_llama(tmp_path, 2), tp=1, **change)
    assert convert_main(["import-megatron", "--input", str(source),
                         "--output", str(tmp_path / "out")]) == 2
    error = _cli_error(capsys)
    assert str(_shard(source)) in error and all(name in error for name in names), error
    assert _nothing_written(tmp_path)
