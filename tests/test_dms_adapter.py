"""DMS with eviction decisions from a decision adapter (``decision_source=adapter``): q/k
intact, a fresh adapter is the original model, training form == token-by-token reference ==
paged engine."""

from dataclasses import replace

import pytest
import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

from megatron_utils import TINY_GQA
from nemo_dmc.inference import DMCModelRunner
from nemo_dmc.megatron.attention import MethodSelfAttention, _to_bhsd, megatron_rope
from nemo_dmc.megatron.cpu_shims import causal_attention_mask
from nemo_dmc.megatron.model import build_model, transformer_config
from nemo_dmc.megatron.parallel import seed_all
from nemo_dmc.megatron.spec import method_layer_spec
from nemo_dmc.megatron.stats import collect_dmc_stats
from nemo_dmc.methods import DMSConfig
from nemo_dmc.methods.dms_reference import simulate_dms
from test_inference_engine import _full_logits, prefill_and_decode_match

TINY_MHA = replace(TINY_GQA, num_query_groups=None)
DMS = DMSConfig(window=3, decision_source="adapter")


def _batch(seq=16):
    tokens = torch.randint(0, TINY_GQA.vocab_size, (2, seq), generator=torch.Generator().manual_seed(0))
    return tokens, torch.arange(seq).expand(2, seq), causal_attention_mask(seq)


def _randomise_adapters(model, seed=0):
    """Random adapter weights with the eviction bias at the offset: about half evicted."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for attn in (m for m in model.modules() if isinstance(m, MethodSelfAttention)):
            linear = attn.decision_adapter.linear
            assert linear.weight.shape[0] == attn.num_query_groups_per_partition  # 1 signal
            linear.weight.copy_(torch.randn(linear.weight.shape, generator=g))
            linear.bias.fill_(DMS.init_offset)


class _Reference(MethodSelfAttention):
    def forward(self, hidden_states, attention_mask, key_value_states=None,
                inference_context=None, rotary_pos_emb=None, **_):
        q, k, v = self.get_query_key_value_tensors(hidden_states)
        ref = simulate_dms(_to_bhsd(q), _to_bhsd(k), _to_bhsd(v), self.method.settings,
                           rope=megatron_rope(rotary_pos_emb, self.config),
                           signals=self.decision_signals(hidden_states))
        return self.linear_proj(ref.output.permute(2, 0, 1, 3).reshape(q.shape[0], q.shape[1], -1))


@pytest.mark.parametrize("shape", [TINY_MHA, TINY_GQA], ids=["mha", "gqa"])
def test_dms_adapter_model_equals_reference_and_engine(megatron_tp1, shape):
    seed_all(7)
    model = build_model(shape, DMS).eval()
    _randomise_adapters(model)
    spec = method_layer_spec(get_gpt_layer_local_spec(normalization="RMSNorm"), DMS)
    spec.submodules.self_attention.module = _Reference
    reference = GPTModel(config=transformer_config(shape), transformer_layer_spec=spec,
                         vocab_size=shape.padded_vocab_size(), max_sequence_length=shape.seq_length,
                         position_embedding_type="rope", rotary_base=int(shape.rotary_base)).eval()
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        got = model(*_batch())
        evicted = collect_dmc_stats(model).merge_fraction.item()
        want = reference(*_batch())
    assert 0.2 < evicted < 0.8
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)

    tokens = torch.randint(0, shape.vocab_size, (3, 16), generator=torch.Generator().manual_seed(1))
    full = _full_logits(model, tokens)
    runner = DMCModelRunner(model, block_size=2, num_blocks=400, max_sequences=3,
                            max_sequence_length=16)
    prefill_and_decode_match(runner, tokens, full, [5, 11, 8], chunk=3)


def test_fresh_dms_adapter_model_is_the_original_model(megatron_tp1):
    seed_all(3)
    vanilla = build_model(TINY_GQA, method=None).eval()
    dms = build_model(TINY_GQA, DMS).eval()
    dms.load_state_dict(vanilla.state_dict(), strict=False)
    with torch.no_grad():
        torch.testing.assert_close(dms(*_batch()), vanilla(*_batch()), atol=1e-5, rtol=1e-5)
        assert collect_dmc_stats(dms).merge_fraction.item() == 0.0


def test_dms_adapter_hf_export_forward_equals_megatron(megatron_tp1, tmp_path):
    from transformers import AutoModelForCausalLM

    from nemo_dmc.checkpoints.sharding import gather_full_state
    from nemo_dmc.convert.hf_export import save_hf_checkpoint
    from test_convert_hf_export import _ids, _megatron_logits

    seed_all(5)
    model = build_model(TINY_GQA, DMS).eval()
    _randomise_adapters(model)
    save_hf_checkpoint(gather_full_state(model), TINY_GQA, tmp_path / "hf", method=DMS)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = _ids()
    want = _megatron_logits(model, ids)
    assert 0.2 < collect_dmc_stats(model).merge_fraction.item() < 0.8
    with torch.no_grad():
        torch.testing.assert_close(hf(ids, use_cache=False).logits, want, atol=2e-5, rtol=1e-5)
