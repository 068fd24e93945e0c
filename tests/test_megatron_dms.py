"""DMS inside megatron-core: the GPTModel equals the token-by-token reference, its records feed
the model statistics and compression loss like DMC's, and the stage schedule drives it."""

from dataclasses import replace

import pytest
import torch
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

from megatron_utils import TINY_GQA
from nemo_dmc.core import ModelConfig
from nemo_dmc.megatron.attention import MethodSelfAttention, _to_bhsd, megatron_rope
from nemo_dmc.megatron.cpu_shims import causal_attention_mask
from nemo_dmc.megatron.model import build_model, transformer_config
from nemo_dmc.megatron.parallel import seed_all
from nemo_dmc.megatron.spec import method_layer_spec
from nemo_dmc.megatron.stages import apply_stage, finish_stage, set_dmc_phase
from nemo_dmc.megatron.stats import collect_dmc_stats, layer_slots, method_loss
from nemo_dmc.methods import DMSConfig, DMSRecord
from nemo_dmc.methods.dms_reference import simulate_dms

TINY_MHA = replace(TINY_GQA, num_query_groups=None)
DMS = DMSConfig(window=4, init_offset=0.0)  # offset 0: a random init evicts about half


def _batch(cfg: ModelConfig, batch=2, seq=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq), generator=g)
    return tokens, torch.arange(seq).expand(batch, seq), causal_attention_mask(seq)


class ReferenceDMSSelfAttention(MethodSelfAttention):
    """DMS attention computed token by token (:func:`simulate_dms`)."""

    def forward(self, hidden_states, attention_mask, key_value_states=None,
                inference_context=None, rotary_pos_emb=None, **_):
        q, k, v = self.get_query_key_value_tensors(hidden_states)
        ref = simulate_dms(_to_bhsd(q), _to_bhsd(k), _to_bhsd(v), self.method.settings,
                           rope=megatron_rope(rotary_pos_emb, self.config))
        return self.linear_proj(ref.output.permute(2, 0, 1, 3).reshape(q.shape[0], q.shape[1], -1))


def _reference_model(cfg: ModelConfig, settings: DMSConfig):
    from megatron.core.models.gpt import GPTModel

    spec = method_layer_spec(get_gpt_layer_local_spec(normalization="RMSNorm"), settings)
    spec.submodules.self_attention.module = ReferenceDMSSelfAttention
    return GPTModel(config=transformer_config(cfg), transformer_layer_spec=spec,
                    vocab_size=cfg.padded_vocab_size(), max_sequence_length=cfg.seq_length,
                    position_embedding_type="rope", rotary_base=int(cfg.rotary_base))


@pytest.mark.parametrize("shape", [TINY_MHA, TINY_GQA], ids=["mha", "gqa"])
def test_dms_gptmodel_eval_matches_token_by_token_reference(megatron_tp1, shape):
    seed_all(7)
    model = build_model(shape, DMS).eval()
    reference = _reference_model(shape, DMS).eval()
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        logits = model(*_batch(shape))
        stats = collect_dmc_stats(model)
        expected = reference(*_batch(shape))
    assert 0.2 < stats.merge_fraction.item() < 0.8
    torch.testing.assert_close(logits, expected, atol=2e-5, rtol=1e-5)


def test_records_count_window_plus_survivors_and_feed_stats_and_loss(megatron_tp1):
    seed_all(3)
    model = build_model(TINY_GQA, DMS).train()
    tokens, positions, mask = _batch(TINY_GQA)
    model(tokens, positions, mask, labels=tokens).mean().backward()
    records = [m.method.record for m in model.modules() if isinstance(m, MethodSelfAttention)]
    assert all(isinstance(r, DMSRecord) for r in records)
    hard = torch.stack([r.decisions.hard for r in records], dim=1)  # [b, layers, hk, s]
    survivors = (1 - hard[..., :16 - DMS.window]).sum(-1)
    assert torch.equal(layer_slots(model), (DMS.window + survivors).long())
    loss = method_loss(model, target_cr=8.0)
    assert loss is not None and loss.loss > 0
    torch.testing.assert_close(loss.stats.merge_fraction, hard.mean())
    model.zero_grad()
    model(tokens, positions, mask, labels=tokens)
    method_loss(model, target_cr=8.0).weighted.backward()
    qkv = model.decoder.layers[0].self_attention.linear_qkv.weight
    assert qkv.grad is not None and qkv.grad.abs().sum() > 0


def test_stage_schedule_drives_dms_layers_through_plain_zero_out_and_decide(megatron_tp1):
    model = build_model(TINY_GQA, DMSConfig(window=4)).eval()
    batch = _batch(TINY_GQA)
    assert apply_stage(model, "pretrain", 0, 10, 4.0) is None
    with torch.no_grad():
        model(*batch)
    assert collect_dmc_stats(model) is None  # plain attention: no decisions
    assert apply_stage(model, "zero_out", 0, 10, 4.0) is None
    finish_stage(model, "zero_out")
    target = apply_stage(model, "retrofit", 4, 10, 4.0)
    assert target is not None and 1.0 < target <= 4.0
    with torch.no_grad():
        model(*batch)
    stats = collect_dmc_stats(model)
    assert stats.merge_fraction.item() == 0.0  # zeroed channel: logit -c, nothing evicted
    set_dmc_phase(model, "plain")
