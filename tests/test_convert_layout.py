"""Checkpoints cross the local / Transformer Engine layer-spec layouts (CPU import, GPU
training, CPU export): norm names and TE's ``_extra_state`` entries."""

import pytest
import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

from megatron_utils import TINY_GQA
from nemo_dmc.checkpoints.layout import LOCAL_TO_TE, match_layout, to_local_names
from nemo_dmc.checkpoints.resolve import load_weights, resolve_checkpoint
from nemo_dmc.checkpoints.sharding import gather_full_state
from nemo_dmc.checkpoints.weights import load_weights_checkpoint, save_weights_checkpoint
from nemo_dmc.convert.hf_export import megatron_to_hf
from nemo_dmc.megatron.cpu_shims import causal_attention_mask
from nemo_dmc.megatron.model import build_model
from nemo_dmc.megatron.parallel import seed_all

FP8_META = torch.tensor(list(b"fp8 scaling factors"), dtype=torch.uint8)


def _transformer_engine_layout(state: dict) -> dict:
    """A local-spec state dict as a Transformer Engine model saves it: fused norm names, fp8
    metadata in every ``_extra_state`` and one more for each layer's core attention."""
    out = {}
    for key, value in state.items():
        key = key.replace(".input_layernorm.", ".self_attention.linear_qkv.layer_norm_")
        key = key.replace(".pre_mlp_layernorm.", ".mlp.linear_fc1.layer_norm_")
        out[key] = FP8_META.clone() if key.endswith("_extra_state") else value
    for i in range(TINY_GQA.num_layers):
        out[f"decoder.layers.{i}.self_attention.core_attention._extra_state"] = FP8_META.clone()
    return out


def _logits(model) -> torch.Tensor:
    ids = torch.randint(0, TINY_GQA.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = causal_attention_mask(12)
    positions = torch.arange(12).expand_as(ids)
    if next(model.parameters()).is_cuda:
        ids, positions, mask = ids.cuda(), positions.cuda(), mask.cuda()
    with torch.no_grad():
        return model.eval()(ids, positions, mask)


def test_norm_names_are_megatrons_local_spec_keys_map():
    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    assert LOCAL_TO_TE == spec.submodules.sharded_state_dict_keys_map


def test_match_layout_renames_norms_both_ways_and_drops_extra_states_the_target_lacks(
        megatron_tp1):
    local = build_model(TINY_GQA, method=None).state_dict()
    te = _transformer_engine_layout(local)
    assert "decoder.layers.1.mlp.linear_fc1.layer_norm_weight" in te
    assert match_layout(te, local.keys()).keys() == local.keys()
    assert match_layout(local, te.keys()).keys() == te.keys() - {
        f"decoder.layers.{i}.self_attention.core_attention._extra_state"
        for i in range(TINY_GQA.num_layers)}
    assert to_local_names(te).keys() - local.keys() == {
        f"decoder.layers.{i}.self_attention.core_attention._extra_state"
        for i in range(TINY_GQA.num_layers)}
    renamed = match_layout(te, local.keys())
    assert renamed["decoder.layers.0.input_layernorm.weight"] is \
        te["decoder.layers.0.self_attention.linear_qkv.layer_norm_weight"]


def test_match_layout_keeps_unknown_keys_and_rejects_a_norm_under_both_names():
    keys = ["decoder.layers.0.input_layernorm.weight"]
    assert match_layout({"decoder.layers.0.bogus.weight": 1}, keys) == {
        "decoder.layers.0.bogus.weight": 1}
    both = {"decoder.layers.0.input_layernorm.weight": 1,
            "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight": 2}
    with pytest.raises(ValueError, match="input_layernorm.weight"):
        match_layout(both, keys)


def test_transformer_engine_state_dict_file_loads_into_local_model_with_identical_logits(
        megatron_tp1, tmp_path):
    seed_all(11)
    source = build_model(TINY_GQA, method=None)
    torch.save(_transformer_engine_layout(source.state_dict()), tmp_path / "model.pt")
    loaded = build_model(TINY_GQA, method=None)
    load_weights(loaded, resolve_checkpoint(tmp_path / "model.pt"))
    assert torch.equal(_logits(loaded), _logits(source))


def test_dist_checkpoints_store_transformer_engine_names_and_load_te_extra_states(
        megatron_tp1, tmp_path):
    """A local-spec model saves its norms under TE's names (megatron's keys map), so one
    saved by a TE model, fp8 metadata included, loads into a local model."""
    seed_all(12)
    source = build_model(TINY_GQA, method=None)
    sharded = source.sharded_state_dict(prefix="module.")
    for value in sharded.values():
        if isinstance(value, ShardedObject) and value.key.endswith("_extra_state"):
            value.data = FP8_META.clone()
    dist_checkpointing.save({"model": sharded}, str(tmp_path))
    saved = dist_checkpointing.load_tensors_metadata(str(tmp_path))
    assert "module.decoder.layers.self_attention.linear_qkv.layer_norm_weight" in saved
    assert not any("input_layernorm" in key for key in saved)
    loaded = build_model(TINY_GQA, method=None)
    load_weights_checkpoint(loaded, tmp_path)
    assert torch.equal(_logits(loaded), _logits(source))


def test_megatron_to_hf_of_transformer_engine_names_equals_local_names(megatron_tp1):
    seed_all(13)
    local = gather_full_state(build_model(TINY_GQA, method=None))
    expected = megatron_to_hf(local, TINY_GQA)
    exported = megatron_to_hf(_transformer_engine_layout(local), TINY_GQA)
    assert exported.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(exported[name], tensor), name


@pytest.mark.gpu
def test_local_spec_checkpoints_load_into_transformer_engine_model(megatron_tp1, tmp_path):
    """A checkpoint imported on CPU (local spec) trains on a GPU cluster (TE spec)."""
    pytest.importorskip("transformer_engine")
    seed_all(14)
    local = build_model(TINY_GQA, method=None, use_transformer_engine=False).cuda()
    save_weights_checkpoint(local, TINY_GQA, tmp_path / "weights_ckpt")
    torch.save(local.state_dict(), tmp_path / "model.pt")
    expected = {k: v for k, v in local.state_dict().items() if torch.is_tensor(v)}
    reference = _logits(local)
    for name in ("weights_ckpt", "model.pt"):
        te = build_model(TINY_GQA, method=None, use_transformer_engine=True).cuda()
        assert "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight" in te.state_dict()
        load_weights(te, resolve_checkpoint(tmp_path / name))
        got = to_local_names(te.state_dict())
        for key, tensor in expected.items():
            assert torch.equal(got[key], tensor), f"{name}: {key}"
        # different kernels (TE's fused norm + GEMM, attention): close, not bitwise
        torch.testing.assert_close(_logits(te), reference, atol=2e-3, rtol=2e-3)
