"""DMC inside megatron-core: spec transform, model-level invariant, DMC-off == vanilla, grads."""

import copy
from dataclasses import replace

import pytest
import torch
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_utils import TINY_GQA
from nemo_dmc.core import DMCConfig, ModelConfig, simulate_inference
from nemo_dmc.megatron.attention import (
    BiasedCoreAttention,
    MethodSelfAttention,
    _to_bhsd,
    megatron_rope,
)
from nemo_dmc.megatron.cpu_shims import causal_attention_mask
from nemo_dmc.megatron.model import build_model, transformer_config
from nemo_dmc.megatron.parallel import seed_all
from nemo_dmc.megatron.spec import method_layer_spec
from nemo_dmc.megatron.stages import set_dmc_phase
from nemo_dmc.megatron.stats import collect_dmc_stats
from nemo_dmc.megatron.zero_out import decision_channel_rows, zero_decision_projections

TINY_MHA = replace(TINY_GQA, num_query_groups=None)


def _batch(cfg: ModelConfig, batch=2, seq=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq), generator=g)
    positions = torch.arange(seq).expand(batch, seq)
    return tokens, positions, causal_attention_mask(seq)


def _logits(model, cfg, **kw):
    tokens, positions, mask = _batch(cfg, **kw)
    return model(tokens, positions, mask)


class ReferenceMethodSelfAttention(MethodSelfAttention):
    """DMC attention computed by the token-by-token simulator instead of the parallel path."""

    def forward(self, hidden_states, attention_mask, key_value_states=None,
                inference_context=None, rotary_pos_emb=None, **_):
        q, k, v = self.get_query_key_value_tensors(hidden_states)
        ref = simulate_inference(_to_bhsd(q), _to_bhsd(k), _to_bhsd(v), self.method.settings,
                                 rope=megatron_rope(rotary_pos_emb, self.config))
        out = ref.output.permute(2, 0, 1, 3).reshape(q.shape[0], q.shape[1], -1)
        return self.linear_proj(out)


def _reference_model(cfg: ModelConfig, dmc: DMCConfig):
    from megatron.core.models.gpt import GPTModel

    spec = method_layer_spec(get_gpt_layer_local_spec(normalization="RMSNorm"), dmc)
    spec.submodules.self_attention.module = ReferenceMethodSelfAttention
    return GPTModel(config=transformer_config(cfg), transformer_layer_spec=spec,
                    vocab_size=cfg.padded_vocab_size(), max_sequence_length=cfg.seq_length,
                    position_embedding_type="rope", rotary_base=int(cfg.rotary_base))


def test_spec_transform_swaps_attention_classes_and_leaves_base_untouched():
    base = get_gpt_layer_local_spec(normalization="RMSNorm")
    before = copy.deepcopy(base)
    spec = method_layer_spec(base, DMCConfig(window=5))
    attn = spec.submodules.self_attention
    assert attn.module is MethodSelfAttention and attn.params["method_settings"].window == 5
    assert attn.submodules.core_attention.module is BiasedCoreAttention
    assert attn.submodules.linear_qkv is base.submodules.self_attention.submodules.linear_qkv
    assert base.submodules.self_attention.module is SelfAttention
    assert base.submodules.self_attention.submodules.core_attention is DotProductAttention
    assert repr(base) == repr(before)


def test_spec_transform_rejects_spec_without_self_attention():
    spec = get_gpt_layer_local_spec()
    spec.submodules.self_attention = ModuleSpec(module=torch.nn.Identity)
    with pytest.raises(ValueError, match="SelfAttention"):
        method_layer_spec(spec, DMCConfig())


@pytest.mark.parametrize("shape", [TINY_MHA, TINY_GQA], ids=["mha", "gqa"])
@pytest.mark.parametrize("window", [None, 3])
def test_dmc_gptmodel_eval_matches_token_by_token_simulator(megatron_tp1, shape, window):
    # offset 0: decision logit = k[D-1] itself, so a random init gives a mix of merges
    dmc = DMCConfig(init_offset=0.0, window=window)
    seed_all(7)
    model = build_model(shape, dmc).eval()
    reference = _reference_model(shape, dmc).eval()
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        parallel_logits = _logits(model, shape)
        stats = collect_dmc_stats(model)
        reference_logits = _logits(reference, shape)
    assert 0.2 < stats.merge_fraction.item() < 0.8
    torch.testing.assert_close(parallel_logits, reference_logits, atol=2e-5, rtol=1e-5)


def test_dmc_off_reproduces_vanilla_gptmodel(megatron_tp1):
    # zeroed projection rows zero channel D-1 before RoPE only: vanilla attention's convention
    seed_all(3)
    vanilla = build_model(TINY_GQA, method=None)
    dmc = build_model(TINY_GQA, DMCConfig(force_decision="append", zero_after_rope=False))
    dmc.load_state_dict(vanilla.state_dict())
    assert zero_decision_projections(vanilla) == zero_decision_projections(dmc) == 2
    tokens, positions, mask = _batch(TINY_GQA)
    for mode in ("train", "eval"):
        for m in (vanilla, dmc):
            getattr(m, mode)()
        torch.testing.assert_close(dmc(tokens, positions, mask), vanilla(tokens, positions, mask),
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
def test_transformer_engine_spec_becomes_dmc_and_dmc_off_matches_vanilla(megatron_tp1):
    """The Transformer Engine layer spec (chosen automatically when TE is installed)."""
    pytest.importorskip("transformer_engine")
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_with_transformer_engine_spec,
    )

    spec = method_layer_spec(get_gpt_layer_with_transformer_engine_spec(), DMCConfig())
    assert spec.submodules.self_attention.module is MethodSelfAttention
    assert spec.submodules.self_attention.submodules.core_attention.module is BiasedCoreAttention
    seed_all(3)
    vanilla = build_model(TINY_GQA, method=None, use_transformer_engine=True).cuda()
    dmc = build_model(TINY_GQA, DMCConfig(force_decision="append", zero_after_rope=False),
                      use_transformer_engine=True).cuda()
    dmc.load_state_dict(vanilla.state_dict())
    # TE fuses the input norm into linear_qkv (TELayerNormColumnParallelLinear): rows found
    assert zero_decision_projections(vanilla) == zero_decision_projections(dmc) == 2
    tokens, positions, mask = (t.cuda() for t in _batch(TINY_GQA))
    with torch.no_grad():
        for m in (vanilla, dmc):
            m.eval()
        torch.testing.assert_close(dmc(tokens, positions, mask), vanilla(tokens, positions, mask),
                                   atol=1e-4, rtol=1e-4)


def test_zero_out_phase_at_full_scale_is_vanilla_attention(megatron_tp1):
    seed_all(4)
    vanilla = build_model(TINY_GQA, method=None).eval()
    dmc = build_model(TINY_GQA, DMCConfig()).eval()
    dmc.load_state_dict(vanilla.state_dict())
    set_dmc_phase(dmc, "zero_out", 1.0)
    with torch.no_grad():
        torch.testing.assert_close(_logits(dmc, TINY_GQA), _logits(vanilla, TINY_GQA),
                                   atol=1e-5, rtol=1e-5)
        assert collect_dmc_stats(dmc) is None
        set_dmc_phase(dmc, "zero_out", 0.0)
        scaled = _logits(dmc, TINY_GQA)
        zero_decision_projections(vanilla)
        torch.testing.assert_close(scaled, _logits(vanilla, TINY_GQA), atol=1e-5, rtol=1e-5)


def test_zeroed_projections_make_every_token_append_with_default_offset(megatron_tp1):
    seed_all(5)
    model = build_model(TINY_GQA, DMCConfig()).eval()
    zero_decision_projections(model)
    attn = next(m for m in model.modules() if isinstance(m, MethodSelfAttention))
    rows = decision_channel_rows(4, 2, TINY_GQA.head_dim)
    assert torch.all(attn.linear_qkv.weight[rows] == 0)
    with torch.no_grad():
        _logits(model, TINY_GQA)
    stats = collect_dmc_stats(model)
    assert stats.merge_fraction.item() == 0.0 and torch.all(stats.head_cr == 1.0)


def test_decision_channel_rows_follow_megatron_qkv_layout():
    # 2 groups x (2 query heads + k + v) x head_dim 4: channel 3 of q0, q1, k per group
    assert decision_channel_rows(2, 2, 4).tolist() == [3, 7, 11, 19, 23, 27]


def test_gradients_reach_decision_and_importance_channels(megatron_tp1):
    seed_all(6)
    model = build_model(TINY_GQA, DMCConfig(init_offset=0.0)).train()
    tokens, positions, mask = _batch(TINY_GQA)
    lm_loss = model(tokens, positions, mask, labels=tokens).mean()
    stats = collect_dmc_stats(model)
    (lm_loss + stats.loss(8.0)).backward()
    d, block = TINY_GQA.head_dim, (2 + 2) * TINY_GQA.head_dim
    for attn in (m for m in model.modules() if isinstance(m, MethodSelfAttention)):
        grad = attn.linear_qkv.weight.grad
        key_rows = [g * block + 2 * d + d - 1 for g in range(4)]
        query_rows = [g * block + j * d + d - 1 for g in range(4) for j in range(2)]
        for rows in (key_rows, query_rows):
            assert torch.isfinite(grad[rows]).all() and grad[rows].abs().sum() > 0


def test_stats_report_model_layer_and_head_ratios(megatron_tp1):
    seed_all(8)
    model = build_model(TINY_GQA, DMCConfig(init_offset=0.0)).eval()
    with torch.no_grad():
        _logits(model, TINY_GQA, batch=3, seq=10)
    stats = collect_dmc_stats(model)
    assert stats.layer_cr.shape == (2,) and stats.head_cr.shape == (2, 4)
    hard = torch.stack([m.method.record.decisions.hard for m in model.modules()
                        if isinstance(m, MethodSelfAttention)])
    torch.testing.assert_close(stats.merge_fraction, hard.mean())
    torch.testing.assert_close(stats.head_cr, 1 / (1 - hard.mean(dim=(1, 3))))
    torch.testing.assert_close(stats.cr, 1 / (1 - hard.mean()))


def test_stats_describe_the_most_recent_forward(megatron_tp1):
    """With several micro-batches, stats must be collected after each forward."""
    seed_all(9)
    model = build_model(TINY_GQA, DMCConfig(init_offset=0.0)).eval()
    with torch.no_grad():
        _logits(model, TINY_GQA, batch=2, seq=12, seed=1)
        first = collect_dmc_stats(model)
        _logits(model, TINY_GQA, batch=1, seq=7, seed=2)
        second = collect_dmc_stats(model)
    hard = torch.stack([m.method.record.decisions.hard for m in model.modules()
                        if isinstance(m, MethodSelfAttention)])
    assert hard.shape[1:] == (1, 4, 7)
    torch.testing.assert_close(second.merge_fraction, hard.mean())
    assert not torch.equal(first.head_cr, second.head_cr)


def test_tp_not_dividing_query_groups_is_a_clear_error():
    cfg = replace(TINY_GQA, num_attention_heads=6, num_query_groups=3, hidden_size=48)
    with pytest.raises(ValueError, match="num_query_groups.*not divisible.*tensor_model_parallel"):
        cfg.validate(tensor_parallel_size=2)


def test_sequence_parallel_without_fused_norms_is_a_clear_error():
    pytest.importorskip("torch")
    try:
        import apex  # noqa: F401
        pytest.skip("Apex installed: sequence parallel is supported")
    except ImportError:
        pass
    try:
        import transformer_engine  # noqa: F401
        pytest.skip("Transformer Engine installed: sequence parallel is supported")
    except ImportError:
        pass
    with pytest.raises(ValueError, match="parallel.sequence_parallel"):
        transformer_config(TINY_GQA, tensor_parallel_size=2, sequence_parallel=True)


def test_full_activation_recompute_is_rejected(megatron_tp1):
    config = transformer_config(TINY_GQA)
    config.recompute_granularity, config.recompute_method, config.recompute_num_layers = (
        "full", "uniform", 1)
    from megatron.core.models.gpt import GPTModel

    spec = method_layer_spec(get_gpt_layer_local_spec(normalization="RMSNorm"), DMCConfig())
    with pytest.raises(ValueError, match="recompute_granularity"):
        GPTModel(config=config, transformer_layer_spec=spec, vocab_size=256,
                 max_sequence_length=32, position_embedding_type="rope")


def test_selective_core_attention_recompute_gives_same_gradients(megatron_tp1):
    dmc = DMCConfig(init_offset=0.0, force_decision=None)
    seed_all(9)
    plain = build_model(TINY_GQA, dmc).train()
    recompute = build_model(TINY_GQA, dmc, recompute_core_attention=True).train()
    recompute.load_state_dict(plain.state_dict())
    tokens, positions, mask = _batch(TINY_GQA)
    for m in (plain, recompute):
        torch.manual_seed(11)
        loss = m(tokens, positions, mask, labels=tokens).mean()
        (loss + collect_dmc_stats(m).loss(4.0)).backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), recompute.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name, atol=1e-6, rtol=1e-5)
