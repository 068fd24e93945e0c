"""DMC decisions from a separate decision adapter (``dmc.decision_source=adapter``): q/k stay
intact, the zero-initialised adapter starts from the original model exactly, the parallel
form equals token-by-token inference, gradients reach the adapter, TP=2 equals TP=1."""

import pytest
import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

from distributed import run_distributed
from megatron_utils import TINY_GQA
from nemo_dmc.checkpoints.sharding import gather_full_grads, shard_full_state
from nemo_dmc.core import DMCConfig, dmc_self_attention, rotate_half_rope, simulate_inference
from nemo_dmc.megatron import parallel
from nemo_dmc.megatron.attention import MethodSelfAttention, _to_bhsd, megatron_rope
from nemo_dmc.megatron.cpu_shims import causal_attention_mask
from nemo_dmc.megatron.model import build_model, transformer_config
from nemo_dmc.megatron.parallel import seed_all
from nemo_dmc.megatron.spec import method_layer_spec
from nemo_dmc.megatron.stages import set_dmc_phase
from nemo_dmc.megatron.stats import collect_dmc_stats

ADAPTER = DMCConfig(decision_source="adapter", window=4)


def _batch(batch=2, seq=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, TINY_GQA.vocab_size, (batch, seq), generator=g)
    return tokens, torch.arange(seq).expand(batch, seq), causal_attention_mask(seq)


def _randomise_adapters(model, seed=0, scale=1.0):
    """Random adapter weights whose decision bias sits at the offset: about half merge."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for attn in (m for m in model.modules() if isinstance(m, MethodSelfAttention)):
            linear = attn.decision_adapter.linear
            linear.weight.copy_(torch.randn(linear.weight.shape, generator=g) * scale)
            bias = linear.bias.view(-1, 2)
            bias[:, 0] = ADAPTER.init_offset
            bias[:, 1] = torch.randn(bias.shape[0], generator=g)


@pytest.mark.parametrize("hq,hk", [(4, 4), (8, 2)], ids=["mha", "gqa"])
@pytest.mark.parametrize("window", [None, 3])
def test_core_parallel_equals_token_by_token_with_adapter_signals(hq, hk, window):
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, h, 11, 8, generator=g, dtype=torch.float64) for h in (hq, hk, hk))
    signals = torch.randn(2, hk, 11, 2, generator=g, dtype=torch.float64)
    signals[..., 0] = 3.0 * signals[..., 0] + 5.0  # logit = x - 5: about half merge
    cfg, rope = DMCConfig(decision_source="adapter", window=window), rotate_half_rope()
    out, decisions = dmc_self_attention(q, k, v, cfg, training=False, rope=rope, signals=signals)
    ref = simulate_inference(q, k, v, cfg, rope=rope, signals=signals)
    assert 0.2 < decisions.hard.mean() < 0.8
    assert torch.equal(decisions.hard, ref.decisions)
    torch.testing.assert_close(out, ref.output, atol=1e-10, rtol=0)
    # q and k are used intact: with every token appending this is plain causal attention
    append = DMCConfig(decision_source="adapter", force_decision="append")
    out, _ = dmc_self_attention(q, k, v, append, training=False, rope=rope, signals=signals)
    plain = simulate_inference(q, k, v, append, rope=rope, signals=signals)
    torch.testing.assert_close(out, plain.output, atol=1e-10, rtol=0)


def test_adapter_source_needs_signals():
    q = k = v = torch.randn(1, 2, 3, 4)
    with pytest.raises(ValueError, match="adapter"):
        dmc_self_attention(q, k, v, ADAPTER, training=False)
    with pytest.raises(ValueError, match="decision_source"):
        DMCConfig(decision_source="probe")


def test_fresh_adapter_model_is_exactly_the_original_model(megatron_tp1):
    seed_all(3)
    vanilla = build_model(TINY_GQA, method=None)
    dmc = build_model(TINY_GQA, ADAPTER)
    missing, unexpected = dmc.load_state_dict(vanilla.state_dict(), strict=False)
    assert unexpected == [] and missing and all("decision_adapter" in k for k in missing)
    tokens, positions, mask = _batch()
    with torch.no_grad():
        vanilla.eval(), dmc.eval()
        torch.testing.assert_close(dmc(tokens, positions, mask), vanilla(tokens, positions, mask),
                                   atol=1e-5, rtol=1e-5)
        assert collect_dmc_stats(dmc).merge_fraction.item() == 0.0  # logits at -c: all append
        dmc.train()  # relaxed decisions: logistic noise above c = 5 merges now and then
        dmc(tokens, positions, mask)
        assert collect_dmc_stats(dmc).merge_fraction.item() < 0.03


class _ReferenceAttention(MethodSelfAttention):
    """The token-by-token simulator with this layer's adapter signals."""

    def forward(self, hidden_states, attention_mask, key_value_states=None,
                inference_context=None, rotary_pos_emb=None, **_):
        q, k, v = self.get_query_key_value_tensors(hidden_states)
        ref = simulate_inference(_to_bhsd(q), _to_bhsd(k), _to_bhsd(v), self.method.settings,
                                 rope=megatron_rope(rotary_pos_emb, self.config),
                                 signals=self.decision_signals(hidden_states))
        return self.linear_proj(ref.output.permute(2, 0, 1, 3).reshape(q.shape[0], q.shape[1], -1))


def test_adapter_model_eval_matches_token_by_token_simulator(megatron_tp1):
    seed_all(7)
    model = build_model(TINY_GQA, ADAPTER).eval()
    _randomise_adapters(model)
    spec = method_layer_spec(get_gpt_layer_local_spec(normalization="RMSNorm"), ADAPTER)
    spec.submodules.self_attention.module = _ReferenceAttention
    reference = GPTModel(config=transformer_config(TINY_GQA), transformer_layer_spec=spec,
                         vocab_size=TINY_GQA.padded_vocab_size(),
                         max_sequence_length=TINY_GQA.seq_length, position_embedding_type="rope",
                         rotary_base=int(TINY_GQA.rotary_base)).eval()
    reference.load_state_dict(model.state_dict())
    tokens, positions, mask = _batch()
    with torch.no_grad():
        got = model(tokens, positions, mask)
        stats = collect_dmc_stats(model)
        want = reference(tokens, positions, mask)
    assert 0.2 < stats.merge_fraction.item() < 0.8
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)


def test_gradients_reach_the_adapter_and_zero_out_is_refused(megatron_tp1):
    seed_all(6)
    model = build_model(TINY_GQA, ADAPTER).train()
    tokens, positions, mask = _batch()
    lm_loss = model(tokens, positions, mask, labels=tokens).mean()
    (lm_loss + collect_dmc_stats(model).loss(4.0)).backward()
    for attn in (m for m in model.modules() if isinstance(m, MethodSelfAttention)):
        grad = attn.decision_adapter.linear.weight.grad.view(-1, 2, TINY_GQA.hidden_size)
        assert grad[:, 0].abs().sum() > 0 and grad[:, 1].abs().sum() > 0  # decision, importance
        assert attn.decision_adapter.linear.bias.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="zero-out"):
        set_dmc_phase(model, "zero_out", 0.5)


def _tp_run(model) -> dict:
    tokens, positions, mask = _batch()
    model.eval()
    with torch.no_grad():
        logits = gather_from_tensor_model_parallel_region(model(tokens, positions, mask))
        head_cr = collect_dmc_stats(model).head_cr
    model.train()
    torch.manual_seed(123)
    lm_loss = model(tokens, positions, mask, labels=tokens).mean()
    stats = collect_dmc_stats(model)
    (lm_loss + stats.loss(4.0)).backward()
    return {"logits": logits, "head_cr": head_cr, "lm_loss": lm_loss.detach(),
            "merge_fraction": stats.merge_fraction.detach(), "grads": gather_full_grads(model)}


def _tp_worker(rank: int, world: int) -> None:
    parallel.initialize(tensor_parallel_size=1, seed=0)
    model = build_model(TINY_GQA, ADAPTER)
    _randomise_adapters(model, scale=0.5)
    full = {k: v.clone() if torch.is_tensor(v) else v for k, v in model.state_dict().items()}
    want = _tp_run(model)
    parallel.initialize(tensor_parallel_size=2, seed=0)
    sharded = build_model(TINY_GQA, ADAPTER)
    sharded.load_state_dict(shard_full_state(full, sharded))
    got = _tp_run(sharded)
    assert 0.1 < want["merge_fraction"] < 0.9
    for key in ("logits", "head_cr", "lm_loss", "merge_fraction"):
        torch.testing.assert_close(got[key], want[key], atol=2e-6, rtol=1e-5, msg=key)
    assert any("decision_adapter" in name for name in want["grads"])
    for name, grad in want["grads"].items():
        torch.testing.assert_close(got["grads"][name], grad, atol=2e-6, rtol=1e-4, msg=name)
    parallel.shutdown()


def test_tp2_matches_tp1_with_decision_adapters():
    run_distributed(_tp_worker, 2)
