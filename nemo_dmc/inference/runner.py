"""Running a megatron-core ``GPTModel`` with KV-method attention over a :class:`PagedKVCache`.

Each layer's attention goes through the cache policy of the layer's method object
(:func:`nemo_dmc.kvcache.policies.policy_for`: DMC, plain attention, or any eviction method),
acting on that layer's :class:`~nemo_dmc.kvcache.view.LayerCacheView`.

The runner walks the model's own modules (embedding, then per layer: input norm,
self-attention against the cache, bias-dropout-add, pre-MLP norm, MLP, add; final norm,
output layer with logits gathered over tensor-parallel ranks), so the weights and the
per-rank head split are exactly those of the model. Each rank caches its own KV heads.

Prefill runs a chunk of tokens in parallel (DMC: one forward computes hard decisions and the
partial accumulations of the whole chunk, continuing each head's open run, attends to the
cached slots of earlier chunks plus the chunk's own states, and commits only the surviving
states). Decode runs one token per sequence (DMC: an incremental open-slot update, then
attention over each head's own slots).

Why not megatron's own ``TransformerLayer.forward`` with an inference context: megatron's
contexts (``StaticInferenceContext``, ``DynamicInferenceContext``) give each request one block
table shared by all heads and cache keys uncompressed, while DMC needs per-(layer, KV head)
lengths, block tables and open-run state; and ``SelfAttention`` would hand the cache update to
``_adjust_key_value_for_inference``. Walking the layer's own submodules keeps the weights and
the TP split exactly the model's; moving onto a layer-level hook is open work (issue 11).
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.identity_op import IdentityOp
from torch import Tensor

from nemo_dmc.kvcache.ops import rope_tables
from nemo_dmc.kvcache.paged import CacheFullError, CacheLayout, PagedKVCache
from nemo_dmc.kvcache.policies import CachePolicy, DecodeStep, DMCPolicy, policy_for
from nemo_dmc.kvcache.view import LayerCacheView
from nemo_dmc.megatron.attention import MethodSelfAttention, megatron_rope


def _method_attentions(model: GPTModel) -> List[MethodSelfAttention]:
    if not (model.pre_process and model.post_process):
        raise ValueError("inference needs the whole model on each rank "
                         "(pipeline_model_parallel_size must be 1)")
    if model.config.sequence_parallel:
        raise ValueError("inference runs without sequence parallelism: build the model with "
                         "parallel.sequence_parallel=false")
    attentions = []
    for i, layer in enumerate(model.decoder.layers):
        attn = layer.self_attention
        if not isinstance(attn, MethodSelfAttention):
            raise ValueError(f"layer {i} has no KV-method attention: build the model with "
                             "method settings (nemo_dmc.megatron.model.build_model)")
        if not isinstance(layer.cross_attention, IdentityOp):
            raise ValueError(f"layer {i} has cross-attention, which inference does not support")
        attentions.append(attn)
    return attentions


def tp_size() -> int:
    """Tensor-parallel world size (1 without an initialised process group)."""
    if not (dist.is_initialized() and parallel_state.model_parallel_is_initialized()):
        return 1
    return parallel_state.get_tensor_model_parallel_world_size()


def tp_any(flag: bool, device: torch.device) -> bool:
    """``flag`` on any tensor-parallel rank (an all-reduce only when TP > 1)."""
    if tp_size() == 1:
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=parallel_state.get_tensor_model_parallel_group())
    return bool(t.item())


class DMCModelRunner:
    """Prefill and decode of rows of a :class:`PagedKVCache` with a ``GPTModel`` whose layers
    run a KV method with a cache policy (``dmc``, ``vanilla``, or an eviction method).

    Args:
        model: a megatron GPTModel whose layers use
            :class:`~nemo_dmc.megatron.attention.MethodSelfAttention` (put in eval mode here).
        block_size, num_blocks, max_sequences, max_sequence_length: the cache layout.
        force_decision: dmc only: ``"append"`` runs the same engine with DMC off (a vanilla
            cache), ``"merge"`` merges every token; ``None`` uses the model's decisions.
    """

    def __init__(self, model: GPTModel, *, block_size: int, num_blocks: int,
                 max_sequences: int, max_sequence_length: int,
                 force_decision: Optional[str] = None) -> None:
        self.model = model.eval()
        attentions = _method_attentions(model)
        self.policies: List[CachePolicy] = []
        for i, attn in enumerate(attentions):
            try:
                self.policies.append(policy_for(attn.method, force_decision))
            except ValueError as err:
                raise ValueError(f"layer {i}: {err}") from None
        windows = {p.window for p in self.policies if isinstance(p, DMCPolicy)}
        if len(windows) > 1:
            raise ValueError("all layers must share one dmc.window, got "
                             f"{sorted(windows, key=str)}")
        first = attentions[0]
        self.heads = first.num_attention_heads_per_partition
        self.kv_heads = first.num_query_groups_per_partition
        self.head_dim = first.hidden_size_per_attention_head
        self.scale = first.core_attention.softmax_scale
        self.window = windows.pop() if windows else None
        self.cache = PagedKVCache(CacheLayout(
            num_layers=len(attentions), kv_heads=self.kv_heads, head_dim=self.head_dim,
            window=self.window, block_size=block_size, num_blocks=num_blocks,
            max_sequences=max_sequences, max_sequence_length=max_sequence_length,
            dtype=model.config.params_dtype,
            open_runs=any(p.open_runs for p in self.policies),
            slot_scores=any(p.slot_scores for p in self.policies)), device=self.device)
        freqs = model.rotary_pos_emb(max_sequence_length)
        self._rope = megatron_rope(freqs, model.config)
        probe = torch.tensor([0, 1, max_sequence_length - 1], device=self.device)
        rope_tables(self._rope, probe, self.head_dim, model.config.params_dtype, check=True)

    @property
    def device(self) -> torch.device:
        """Where the model (and its cache) live."""
        return self.model.embedding.word_embeddings.weight.device

    # -- public steps --------------------------------------------------------------------------

    @torch.no_grad()
    def prefill(self, rows: Sequence[int], tokens: Sequence[Sequence[int]],
                chunk_size: Optional[int] = None, all_logits: bool = False,
                raise_on_overflow: bool = True):
        """Feed each row's next tokens (a prompt, or the rest of one) in parallel chunks.

        Args:
            rows: cache rows; tokens: the tokens per row (>= 1 each), appended after what the
                row already caches.
            chunk_size: at most this many tokens per row per forward (``None``: all at once).
            all_logits: return the logits of every fed token instead of only the last.
            raise_on_overflow: if the pool runs out of blocks, raise :class:`CacheFullError`
                on every tensor-parallel rank (the ranks agree after the last chunk, so all
                run the same forwards);
                ``False``: leave ``cache.overflow`` set and return meaningless logits (the
                engine agrees on a shortage over the TP group before acting on it).

        Returns:
            ``[b, vocab]`` logits of each row's last token, or (``all_logits``) a list of
            ``[len(tokens[i]), vocab]``. After an overflow the rows' state is undefined
            (release them).
        """
        if len(rows) != len(tokens) or any(len(t) == 0 for t in tokens):
            raise ValueError("prefill needs one non-empty token list per row")
        chunk = chunk_size or max(len(t) for t in tokens)
        device = self.device
        pending = [torch.as_tensor(list(t), dtype=torch.int64, device=device) for t in tokens]
        outputs: List[List[Tensor]] = [[] for _ in rows]
        done = 0
        while any(len(t) > done for t in pending):
            active = [i for i, t in enumerate(pending) if len(t) > done]
            pieces = [pending[i][done:done + chunk] for i in active]
            counts = torch.tensor([len(p) for p in pieces], device=device)
            batch = torch.nn.utils.rnn.pad_sequence(pieces, batch_first=True)
            row_ids = torch.as_tensor([rows[i] for i in active], device=device)
            hidden = self._forward(row_ids, batch, counts)
            if all_logits:
                logits = self._logits(hidden)  # [b, c, vocab]
                for j, i in enumerate(active):
                    outputs[i].append(logits[j, :int(counts[j])])
            else:
                last = hidden[counts - 1, torch.arange(len(active), device=device)]
                logits = self._logits(last.unsqueeze(0))[:, 0]
                for j, i in enumerate(active):
                    outputs[i] = [logits[j]]
            done += chunk
        if raise_on_overflow:
            self._raise_if_overflow("prefill")
        if all_logits:
            return [torch.cat(o) for o in outputs]
        return torch.stack([o[0] for o in outputs])

    @torch.no_grad()
    def decode(self, rows: Sequence[int] | Tensor, tokens: Tensor) -> Tensor:
        """Feed one token per row; returns ``[b, vocab]`` logits.

        Raises :class:`CacheFullError` if the pool ran out of blocks (the rows' state is
        then undefined: release them); check :meth:`blocks_needed_for_next_token` first.
        """
        row_ids = torch.as_tensor(rows, dtype=torch.int64, device=self.device)
        with torch.inference_mode():  # cheaper per-op dispatch than no_grad alone
            hidden = self._forward(row_ids, tokens.view(-1, 1).to(self.device), None)
            self._raise_if_overflow("decode")
            logits = self._logits(hidden)[:, 0]
        return logits.clone()  # a normal tensor, which callers may modify in place

    def blocks_needed_for_next_token(self, rows: Tensor) -> int:
        """Blocks one more decode token per row may take from the pool (each layer's policy
        says: DMC and plain attention heads whose last block is full; eviction heads only
        while under their budget)."""
        return sum(policy.blocks_for_next_token(LayerCacheView(self.cache, layer, rows))
                   for layer, policy in enumerate(self.policies))

    def _raise_if_overflow(self, step: str) -> None:
        """Raise :class:`CacheFullError` (clearing ``cache.overflow``) if ``step`` ran out of
        blocks."""
        overflow = tp_any(self.cache.overflow, self.device)  # every rank raises, or none
        self.cache.overflow = False
        if not overflow:
            return
        layout = self.cache.layout
        raise CacheFullError(
            f"the KV pool (engine.num_blocks={layout.num_blocks} blocks of {layout.block_size} "
            f"slots) ran out of blocks during {step}: release the rows (their state is "
            "undefined) and raise engine.num_blocks or engine.kv_memory_mb")

    # -- the model walk ------------------------------------------------------------------------

    def _forward(self, rows: Tensor, tokens: Tensor, counts: Optional[Tensor]) -> Tensor:
        """``tokens [b, c]`` (``counts=None``: decode, c = 1) -> final hidden ``[c, b, h]``."""
        limit = self.cache.layout.max_sequence_length
        starts = self.cache.positions[rows]
        last = int((starts + (1 if counts is None else counts) - 1).max())
        if last >= limit:
            raise ValueError(f"position {last} exceeds engine.max_sequence_length={limit}")
        positions = starts.unsqueeze(1) + torch.arange(tokens.shape[1], device=tokens.device)
        positions = positions.clamp_max(limit - 1)  # padding of short rows in a chunk
        hidden = self.model.embedding(input_ids=tokens, position_ids=positions)
        step = None  # decode: RoPE of this step's positions (all layers) and a length bound
        if counts is None:
            tables = rope_tables(self._rope, positions[:, 0], self.head_dim, hidden.dtype)
            step = DecodeStep(tables, last + 1)  # a head holds at most one slot per token
        for layer_number, layer in enumerate(self.model.decoder.layers):
            residual = hidden
            x = layer.input_layernorm(hidden)
            attn_out = self._attention(layer_number, layer.self_attention, x, rows, positions,
                                       counts, step)
            hidden = layer.self_attn_bda(False, layer.config.bias_dropout_fusion)(
                attn_out, residual, layer.hidden_dropout)
            residual = hidden
            mlp_out = layer.mlp(layer.pre_mlp_layernorm(hidden))
            hidden = layer.mlp_bda(False, layer.config.bias_dropout_fusion)(
                mlp_out, residual, layer.hidden_dropout)
        self.cache.positions[rows] += 1 if counts is None else counts
        return self.model.decoder.final_layernorm(hidden)

    def _logits(self, hidden: Tensor) -> Tensor:
        """``[s, b, h]`` -> ``[b, s, vocab]`` (full padded vocab, gathered over TP)."""
        weight = (self.model.shared_embedding_or_output_weight()
                  if self.model.share_embeddings_and_output_weights else None)
        logits, _ = self.model.output_layer(hidden, weight=weight, runtime_gather_output=True)
        return logits.transpose(0, 1).float()

    def _attention(self, layer: int, attn: MethodSelfAttention, x: Tensor, rows: Tensor,
                   positions: Tensor, counts: Optional[Tensor],
                   step: Optional[DecodeStep] = None) -> Tensor:
        query, key, value = attn.get_query_key_value_tensors(x)  # [c, b, heads, d]
        query, key, value = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        signals = attn.decision_signals(x)  # [b, hk, c, n] from a decision adapter, or None
        view = LayerCacheView(self.cache, layer, rows)
        policy = self.policies[layer]
        if counts is None:
            out = policy.decode(view, query, key, value, positions, self._rope, self.scale, step,
                                signals)
        else:
            out = policy.prefill(view, query, key, value, positions, counts, self._rope,
                                 self.scale, signals)
        c, b = out.shape[2], out.shape[0]
        return attn.linear_proj(out.permute(2, 0, 1, 3).reshape(c, b, -1))
