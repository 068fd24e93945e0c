"""``dmc.zero_after_rope``: NVIDIA's reference zeroes channel D-1 of q and k after RoPE as well
as before it. Every path (training form, token-by-token references, paged prefill/decode,
Triton kernels, megatron model and engine, HF model) against a naive implementation written
here with plain loops, under both conventions; and settings stored before the key existed
load with the old convention (false) while new ones default to the reference's (true)."""

import json
import math
from dataclasses import replace

import pytest
import torch
from omegaconf import OmegaConf

from megatron_utils import TINY_GQA
from nemo_dmc.core import DMCConfig, dmc_self_attention, rotate_half_rope, simulate_inference
from nemo_dmc.methods import DMSConfig, settings_for, settings_from_dict, settings_to_dict
from nemo_dmc.methods.dms_reference import simulate_dms

BASE = 100.0  # a small RoPE base: channel D/2-1 turns fast, so the conventions differ clearly
CONVENTIONS = pytest.mark.parametrize("zero_after", [True, False],
                                      ids=["zero_after_rope", "zero_before_only"])


# -- the naive reference convention ---------------------------------------------------------

def _rotate(x, position, base, zero_after):
    """Rotate-half RoPE of one vector at ``position``, then channel D-1 zeroed if asked."""
    d = x.shape[0]
    half = d // 2
    out = x.clone()
    for i in range(half):
        angle = position * base ** (-2 * i / d)
        c, s = math.cos(angle), math.sin(angle)
        out[i] = x[i] * c - x[i + half] * s
        out[i + half] = x[i + half] * c + x[i] * s
    if zero_after:
        out[d - 1] = 0.0
    return out


def _zeroed(x):
    out = x.clone()
    out[-1] = 0.0
    return out


def _attend(query, keys, values, scale):
    scores = [float(query @ key) * scale for key in keys]
    top = max(scores)
    weights = [math.exp(s - top) for s in scores]
    return sum(w * v for w, v in zip(weights, values)) / sum(weights)


def _kv_heads(q, k):
    """``(sequence, KV head, its query heads)`` of every KV head of ``q [b, hq, s, d]`` and
    ``k [b, hk, s, d]``."""
    group = q.shape[1] // k.shape[1]
    for bi in range(q.shape[0]):
        for h in range(k.shape[1]):
            yield bi, h, range(h * group, (h + 1) * group)


def naive_dmc(q, k, v, offset, window, zero_after, base=BASE):
    """DMC inference one token at a time: merge where ``k[D-1] - c > 0`` (not token 0), slot =
    omega-weighted mean of the (channel-zeroed, pre-RoPE) keys/values of the last ``window``
    tokens of its run, rotated at the newest token's position."""
    out = torch.zeros_like(q)
    s, d = q.shape[2:]
    for bi, h, heads in _kv_heads(q, k):
        slot_keys, slot_values, run = [], [], []
        for t in range(s):
            merge = t > 0 and float(k[bi, h, t, -1]) - offset > 0
            signal = sum(float(q[bi, j, t, -1]) for j in heads) / len(heads)
            omega = 1.0 / (1.0 + math.exp(-(signal + offset)))
            run = (run if merge else []) + [(omega, _zeroed(k[bi, h, t]), v[bi, h, t])]
            if window is not None:
                run = run[-window:]
            total = sum(w for w, _, _ in run)
            key = _rotate(sum(w * x for w, x, _ in run) / total, t, base, zero_after)
            value = sum(w * x for w, _, x in run) / total
            if not merge:
                slot_keys.append(None)
                slot_values.append(None)
            slot_keys[-1], slot_values[-1] = key, value
            for j in heads:
                query = _rotate(_zeroed(q[bi, j, t]), t, base, zero_after)
                out[bi, j, t] = _attend(query, slot_keys, slot_values, d ** -0.5)
    return out


def naive_dms(q, k, v, offset, window, zero_after, base=BASE):
    """DMS inference: query ``t`` sees key ``i <= t`` while ``t - i <= window`` or ``i`` is
    not marked for eviction (``k_i[D-1] - c > 0``); keys rotated at their own position."""
    out = torch.zeros_like(q)
    s, d = q.shape[2:]
    for bi, h, heads in _kv_heads(q, k):
        keys = [_rotate(_zeroed(k[bi, h, i]), i, base, zero_after) for i in range(s)]
        evict = [float(k[bi, h, i, -1]) - offset > 0 for i in range(s)]
        for t in range(s):
            seen = [i for i in range(t + 1) if t - i <= window or not evict[i]]
            for j in heads:
                query = _rotate(_zeroed(q[bi, j, t]), t, base, zero_after)
                out[bi, j, t] = _attend(query, [keys[i] for i in seen],
                                        [v[bi, h, i] for i in seen], d ** -0.5)
    return out


def _inputs(hq=4, hk=2, seq=14, batch=2, dim=8, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, hq, seq, dim, generator=g, dtype=torch.float64)
    k = torch.randn(batch, hk, seq, dim, generator=g, dtype=torch.float64)
    v = torch.randn(batch, hk, seq, dim, generator=g, dtype=torch.float64)
    k[..., -1] = 3.0 * k[..., -1] + 5.0  # logit k[D-1] - 5: about half merge / are marked
    return tuple(x.to(dtype) for x in (q, k, v))


def test_the_conventions_differ_where_rope_turns_channel_d_over_2_minus_1():
    q, k, v = _inputs()
    after = naive_dmc(q, k, v, 5.0, 3, zero_after=True)
    before = naive_dmc(q, k, v, 5.0, 3, zero_after=False)
    assert (after - before).abs().max() > 1e-2


# -- pure-torch paths -------------------------------------------------------------------------

@CONVENTIONS
@pytest.mark.parametrize("window", [None, 3])
def test_training_form_with_hard_decisions_follows_the_convention(zero_after, window):
    q, k, v = _inputs()
    cfg = DMCConfig(window=window, zero_after_rope=zero_after)
    out, decisions = dmc_self_attention(q, k, v, cfg, training=False,
                                        rope=rotate_half_rope(BASE))
    assert 0.2 < decisions.hard.mean() < 0.8
    torch.testing.assert_close(out, naive_dmc(q, k, v, 5.0, window, zero_after),
                               atol=1e-10, rtol=1e-10)


@CONVENTIONS
def test_token_by_token_references_follow_the_convention(zero_after):
    q, k, v = _inputs()
    rope = rotate_half_rope(BASE)
    dmc = simulate_inference(q, k, v, DMCConfig(window=3, zero_after_rope=zero_after), rope)
    torch.testing.assert_close(dmc.output, naive_dmc(q, k, v, 5.0, 3, zero_after),
                               atol=1e-10, rtol=1e-10)
    dms = simulate_dms(q, k, v, DMSConfig(window=3, zero_after_rope=zero_after), rope)
    torch.testing.assert_close(dms.output, naive_dms(q, k, v, 5.0, 3, zero_after),
                               atol=1e-10, rtol=1e-10)


def _paged(q, k, v, method, prefill, chunk):
    """The engine's cache policy of ``method`` settings: prefill in chunks, then decode."""
    from nemo_dmc.kvcache import CacheLayout, LayerCacheView, PagedKVCache, policy_for
    from nemo_dmc.kvcache.ops import rope_tables
    from nemo_dmc.kvcache.policies import DecodeStep
    from nemo_dmc.methods import build_method

    b, hk, seq, d = k.shape
    policy = policy_for(build_method(method))
    cache = PagedKVCache(CacheLayout(
        num_layers=1, kv_heads=hk, head_dim=d, window=policy.window, block_size=2,
        num_blocks=b * hk * seq, max_sequences=b, max_sequence_length=seq, dtype=q.dtype,
        open_runs=policy.open_runs, slot_scores=policy.slot_scores))
    rows, rope, scale = torch.arange(b), rotate_half_rope(BASE), d ** -0.5
    view = LayerCacheView(cache, 0, rows)
    outs, done = [], 0
    while done < seq:
        c = min(chunk, prefill - done) if done < prefill else 1
        pos, sl = (done + torch.arange(c)).repeat(b, 1), slice(done, done + c)
        if done < prefill:
            outs.append(policy.prefill(view, q[:, :, sl], k[:, :, sl], v[:, :, sl], pos,
                                       torch.full((b,), c), rope, scale))
        else:
            step = DecodeStep(rope_tables(rope, pos[:, 0], d, q.dtype), done + 1)
            outs.append(policy.decode(view, q[:, :, sl], k[:, :, sl], v[:, :, sl], pos, rope,
                                      scale, step))
        cache.positions[rows] += c
        done += c
    return torch.cat(outs, dim=2)


@CONVENTIONS
@pytest.mark.parametrize("prefill,chunk", [(1, 1), (14, 14), (9, 4)],
                         ids=["decode_only", "one_prefill", "chunked_then_decode"])
def test_paged_prefill_and_decode_follow_the_convention(zero_after, prefill, chunk):
    q, k, v = _inputs()
    dmc = DMCConfig(window=3, zero_after_rope=zero_after)
    torch.testing.assert_close(_paged(q, k, v, dmc, prefill, chunk),
                               naive_dmc(q, k, v, 5.0, 3, zero_after), atol=1e-10, rtol=1e-10)
    dms = DMSConfig(window=3, zero_after_rope=zero_after)
    torch.testing.assert_close(_paged(q, k, v, dms, prefill, chunk),
                               naive_dms(q, k, v, 5.0, 3, zero_after), atol=1e-10, rtol=1e-10)


@CONVENTIONS
def test_triton_decode_kernels_follow_the_convention(zero_after, monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("NEMO_DMC_KERNELS", "triton")  # the interpreter on CPU (conftest)
    q, k, v = _inputs(seq=10, dtype=torch.float32)
    out = _paged(q, k, v, DMCConfig(window=3, zero_after_rope=zero_after), 4, 4)
    expected = naive_dmc(*(x.double() for x in (q, k, v)), 5.0, 3, zero_after)
    torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=2e-5)


# -- megatron model, engine and Triton training kernels ---------------------------------------

SHAPE = replace(TINY_GQA, rotary_base=BASE)


def _naive_model(shape, settings):
    """The megatron model whose attention is :func:`naive_dmc` / :func:`naive_dms`."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from nemo_dmc.megatron.attention import MethodSelfAttention, _to_bhsd
    from nemo_dmc.megatron.model import transformer_config
    from nemo_dmc.megatron.spec import method_layer_spec

    class NaiveAttention(MethodSelfAttention):
        def forward(self, hidden_states, attention_mask, rotary_pos_emb=None, **_):
            q, k, v = (_to_bhsd(x).double() for x in self.get_query_key_value_tensors(
                hidden_states))
            s = self.method.settings
            naive = naive_dms if isinstance(s, DMSConfig) else naive_dmc
            out = naive(q, k, v, s.init_offset, s.window, s.zero_after_rope, shape.rotary_base)
            out = out.to(hidden_states.dtype).permute(2, 0, 1, 3)
            return self.linear_proj(out.reshape(out.shape[0], out.shape[1], -1))

    spec = method_layer_spec(get_gpt_layer_local_spec(normalization="RMSNorm"), settings)
    spec.submodules.self_attention.module = NaiveAttention
    return GPTModel(config=transformer_config(shape), transformer_layer_spec=spec,
                    vocab_size=shape.padded_vocab_size(), max_sequence_length=shape.seq_length,
                    position_embedding_type="rope", rotary_base=int(shape.rotary_base))


def _models(settings, seed=7):
    from nemo_dmc.megatron.model import build_model
    from nemo_dmc.megatron.parallel import seed_all

    seed_all(seed)
    model = build_model(SHAPE, settings).eval()
    naive = _naive_model(SHAPE, settings).eval()
    naive.load_state_dict(model.state_dict())
    return model, naive


def _tokens(batch=2, seq=12, seed=0):
    return torch.randint(0, SHAPE.vocab_size, (batch, seq),
                         generator=torch.Generator().manual_seed(seed))


def _logits(model, tokens):
    from nemo_dmc.megatron.cpu_shims import causal_attention_mask

    b, s = tokens.shape
    with torch.no_grad():
        return model(tokens, torch.arange(s).expand(b, s), causal_attention_mask(s))


def _settings(method, zero_after):
    """DMC or DMS settings (window 3, random decisions) in one convention."""
    return settings_for(method, DMCConfig(init_offset=0.0, window=3, zero_after_rope=zero_after),
                        window=3 if method == "dms" else None)


@CONVENTIONS
@pytest.mark.parametrize("method", ["dmc", "dms"])
def test_megatron_model_follows_the_convention(megatron_tp1, zero_after, method):
    model, naive = _models(_settings(method, zero_after))
    tokens = _tokens()
    torch.testing.assert_close(_logits(model, tokens), _logits(naive, tokens),
                               atol=2e-5, rtol=1e-5)


@CONVENTIONS
def test_megatron_model_with_triton_training_kernels_follows_the_convention(
        megatron_tp1, zero_after, monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("NEMO_DMC_KERNELS", "triton")  # partial accumulation and attention
    model, naive = _models(DMCConfig(init_offset=0.0, window=3, zero_after_rope=zero_after))
    tokens = _tokens(batch=1, seq=8)
    torch.testing.assert_close(_logits(model, tokens), _logits(naive, tokens),
                               atol=1e-4, rtol=1e-4)


@CONVENTIONS
@pytest.mark.parametrize("method", ["dmc", "dms"])
def test_engine_prefill_and_decode_follow_the_convention(megatron_tp1, zero_after, method):
    from nemo_dmc.inference.runner import DMCModelRunner

    model, naive = _models(_settings(method, zero_after))
    tokens = _tokens()
    expected = _logits(naive, tokens)
    runner = DMCModelRunner(model, block_size=2, num_blocks=400, max_sequences=2,
                            max_sequence_length=tokens.shape[1])
    rows = [runner.cache.acquire_row() for _ in range(2)]
    logits = runner.prefill(rows, tokens[:, :7].tolist(), chunk_size=4, all_logits=True)
    logits = [torch.stack(logits)] + [runner.decode(rows, tokens[:, t]).unsqueeze(1)
                                      for t in range(7, tokens.shape[1])]
    vocab = logits[0].shape[-1]
    torch.testing.assert_close(torch.cat(logits, 1), expected[..., :vocab], atol=2e-5,
                               rtol=1e-5)


# -- the Hugging Face model --------------------------------------------------------------------

def _hf_model(kv_method):
    from nemo_dmc.hf import DMCLlamaForCausalLM
    from nemo_dmc.hf.modeling_dmc_llama import DMCLlamaHFConfig

    config = DMCLlamaHFConfig(kv_method=kv_method, vocab_size=64, hidden_size=32,
                              intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                              num_key_value_heads=2, rope_theta=BASE, attention_bias=True,
                              max_position_embeddings=32)
    torch.manual_seed(0)
    model = DMCLlamaForCausalLM(config).double().eval()
    attn = model.model.layers[0].self_attn
    with torch.no_grad():  # channel D-1 of each key: about half the tokens merge / are marked
        rows = torch.arange(attn.head_dim - 1, attn.k_proj.out_features, attn.head_dim)
        attn.k_proj.weight[rows] *= 30.0
        attn.k_proj.bias[rows] = 5.0
    return model, attn


def _hf_naive(attn, hidden):
    b, s, _ = hidden.shape
    shape = (b, s, -1, attn.head_dim)
    q, k, v = (proj(hidden).view(shape).transpose(1, 2)
               for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
    st = attn.method.settings
    naive = naive_dms if isinstance(st, DMSConfig) else naive_dmc
    out = naive(q, k, v, st.init_offset, st.window, st.zero_after_rope)
    return attn.o_proj(out.transpose(1, 2).reshape(b, s, -1))


@CONVENTIONS
@pytest.mark.parametrize("method", ["dmc", "dms"])
def test_hf_model_forward_and_cache_follow_the_convention(zero_after, method):
    from nemo_dmc.hf.cache import DMCCache

    settings = settings_for(method, DMCConfig(window=3, zero_after_rope=zero_after),
                            window=3 if method == "dms" else None)
    model, attn = _hf_model(settings_to_dict(settings))
    hidden = torch.randn(2, 12, 32, dtype=torch.float64,
                         generator=torch.Generator().manual_seed(1))
    positions = torch.arange(12).view(1, -1)
    rotary = model.model.rotary_emb(hidden, positions)
    with torch.no_grad():
        expected = _hf_naive(attn, hidden)
        forward, _ = attn(hidden, rotary, None)
        cache = DMCCache(model.config, 2, 12, dtype=torch.float64)
        outs = [attn(hidden[:, :7], tuple(x[:, :7] for x in rotary), None,
                     past_key_values=cache)[0]]
        for t in range(7, 12):
            outs.append(attn(hidden[:, t:t + 1], tuple(x[:, t:t + 1] for x in rotary), None,
                             past_key_values=cache)[0])
    torch.testing.assert_close(forward, expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(torch.cat(outs, 1), expected, atol=1e-6, rtol=1e-6)


# -- settings: new runs take the reference convention, stored ones keep theirs -----------------

def _without_key(values):
    return {k: v for k, v in values.items() if k != "zero_after_rope"}


def test_new_settings_and_runs_default_to_zeroing_after_rope():
    from test_training_config import composed

    from nemo_dmc.evaluate.config import EvaluateConfig
    from nemo_dmc.generate import GenerateConfig
    from nemo_dmc.hf.modeling_dmc_llama import DMCLlamaHFConfig

    assert DMCConfig().zero_after_rope and DMSConfig().zero_after_rope
    assert composed().method_settings().zero_after_rope  # a fresh Hydra run
    assert composed("method=dms").method_settings().zero_after_rope
    assert composed("dmc.zero_after_rope=false").method_settings().zero_after_rope is False
    assert EvaluateConfig().dmc.zero_after_rope and GenerateConfig().dmc.zero_after_rope
    assert DMCLlamaHFConfig().method_settings.zero_after_rope
    assert settings_for("dms", DMCConfig(zero_after_rope=False)).zero_after_rope is False


@pytest.mark.parametrize("settings", [DMCConfig(window=3), DMSConfig(window=7)],
                         ids=["dmc", "dms"])
def test_stored_settings_without_the_key_keep_the_old_convention(settings):
    stored = settings_to_dict(settings)
    assert stored["zero_after_rope"] is True
    assert settings_from_dict(stored) == settings
    old = settings_from_dict(_without_key(stored))
    assert old == replace(settings, zero_after_rope=False)


def test_run_config_without_the_key_reads_false_and_resuming_it_names_the_change():
    from nemo_dmc.checkpoints.run_config import dmc_config_from_run
    from nemo_dmc.training.config import TrainConfig, resume_changes

    new = OmegaConf.structured(TrainConfig())
    assert dmc_config_from_run(new).zero_after_rope is True
    old = OmegaConf.create(OmegaConf.to_container(new))
    del old.dmc["zero_after_rope"]
    assert dmc_config_from_run(old) == DMCConfig(zero_after_rope=False)
    assert ("dmc.zero_after_rope", False, True) in resume_changes(old, TrainConfig())
    assert resume_changes(new, TrainConfig()) == []
    adapter = TrainConfig()
    adapter.dmc.decision_source = old.dmc.decision_source = "adapter"
    assert resume_changes(old, adapter) == []  # q/k keep channel D-1: nothing changes


@pytest.mark.parametrize("method", ["dmc", "dms"])
def test_hf_config_json_without_the_key_loads_the_old_convention_and_outputs(method):
    settings = settings_for(method, DMCConfig(window=3), window=3 if method == "dms" else None)
    new, _ = _hf_model(settings_to_dict(settings))
    assert new.config.to_dict()["kv_method"]["zero_after_rope"] is True
    old, attn = _hf_model(_without_key(settings_to_dict(settings)))
    assert attn.method.settings.zero_after_rope is False
    hidden = torch.randn(1, 12, 32, dtype=torch.float64,
                         generator=torch.Generator().manual_seed(2))
    q, k, v = (proj(hidden).view(1, 12, -1, attn.head_dim).transpose(1, 2)
               for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
    naive = naive_dms if method == "dms" else naive_dmc
    expected = attn.o_proj(naive(q, k, v, 5.0, 3, False).transpose(1, 2).reshape(1, 12, -1))
    rotary = old.model.rotary_emb(hidden, torch.arange(12).view(1, -1))
    with torch.no_grad():
        torch.testing.assert_close(attn(hidden, rotary, None)[0], expected, atol=1e-6,
                                   rtol=1e-6)


def test_hf_export_records_the_key_in_config_json(megatron_tp1, tmp_path):
    from nemo_dmc.checkpoints.sharding import gather_full_state
    from nemo_dmc.convert.hf_export import save_hf_checkpoint
    from nemo_dmc.megatron.model import build_model

    dmc = DMCConfig(window=3, zero_after_rope=False)
    save_hf_checkpoint(gather_full_state(build_model(TINY_GQA, dmc)), TINY_GQA, tmp_path,
                       method=dmc)
    kv_method = json.loads((tmp_path / "config.json").read_text())["kv_method"]
    assert settings_from_dict(kv_method) == dmc and kv_method["zero_after_rope"] is False


def test_nemo_context_without_the_key_reads_false(megatron_tp1, tmp_path):
    pytest.importorskip("nemo.collections.llm", reason="needs the `nemo` extra")
    from nemo_dmc.checkpoints.nemo_context import read_nemo_settings
    from nemo_dmc.megatron.model import build_model
    from nemo_dmc.nemo.checkpoint import export_nemo_checkpoint

    dmc = DMCConfig(window=3)
    export_nemo_checkpoint(build_model(TINY_GQA, dmc), TINY_GQA, dmc, tmp_path / "nemo")
    assert read_nemo_settings(tmp_path / "nemo")[1] == dmc
    io_json = tmp_path / "nemo" / "context" / "io.json"
    data = json.loads(io_json.read_text())
    for obj in data["objects"].values():  # the context as written before the key existed
        items = obj.get("items")
        if not isinstance(items, list) or not any("zero_after_rope" in str(i) for i in items):
            continue
        kept = [i for i in items if "zero_after_rope" not in str(i)]  # DMCConfig's argument
        if obj["type"].get("name") == "tuple":  # the argument names of its metadata
            kept = [[f"Index(index={n})", value] for n, (_, value) in enumerate(kept)]
        obj["items"] = kept
    io_json.write_text(json.dumps(data))
    assert read_nemo_settings(tmp_path / "nemo")[1] == replace(dmc, zero_after_rope=False)
