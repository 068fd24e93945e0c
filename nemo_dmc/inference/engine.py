"""Batched generation with continuous batching over the paged per-head KV cache (DMC, plain
attention, or an eviction method: each layer's cache policy comes from its KV method).

Each :meth:`InferenceEngine.step` first admits waiting requests into free cache rows (their
prompts prefilled together, in parallel chunks) and then decodes one token for every running
sequence. Sequences join and leave between steps; a finished sequence's blocks return to
the pool at once (an eviction head never takes more blocks than its budget of slots needs).
When the pool cannot give the next decode step the blocks it may need,
the most recently admitted sequence is preempted (its blocks freed; later it is re-admitted
and its prompt plus generated tokens are prefilled again); after a preemption or a prompt
that did not fit, admission pauses until a sequence finishes. A prompt that cannot fit
even alone raises :class:`CacheFullError`.

Under tensor parallelism every rank runs the same schedule over its own KV heads: pool
shortages are agreed over the TP group and sampled tokens come from TP rank 0.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Deque, Dict, List, Optional, Sequence, Union

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from torch import Tensor

from nemo_dmc.inference.config import EngineConfig
from nemo_dmc.inference.runner import DMCModelRunner, tp_any, tp_size
from nemo_dmc.inference.sampling import SamplingParams, sample_tokens
from nemo_dmc.kvcache.paged import CacheFullError, MemoryReport



@dataclass
class CacheStats:
    """A sequence's cache when it finished (over all tensor-parallel ranks).

    tokens: tokens the cache covered; head_lengths: ``[layers, kv_heads]`` slots per head;
    memory: its KV bytes (logical, allocated, open state, vanilla equivalent).
    """

    tokens: int
    head_lengths: Tensor
    memory: MemoryReport

    @property
    def compression_ratio(self) -> float:
        """Achieved CR: tokens per slot, averaged over layers and heads."""
        return self.memory.compression_ratio


@dataclass
class GenerationResult:
    """One finished request. ``finish_reason`` is ``"stop"`` (a stop token, kept as the
    last token), ``"length"`` (max_new_tokens or engine.max_sequence_length),
    ``"cache_full"`` (the sequence alone outgrew the KV pool: its tokens so far) or
    ``"cancelled"`` (:meth:`InferenceEngine.cancel`)."""

    request_id: int
    prompt_tokens: List[int]
    tokens: List[int]
    finish_reason: str
    cache: CacheStats
    preemptions: int = 0
    text: Optional[str] = None


@dataclass
class _Sequence:
    request_id: int
    prompt: List[int]
    params: SamplingParams
    generator: Optional[torch.Generator]
    generated: List[int] = field(default_factory=list)
    row: Optional[int] = None
    preemptions: int = 0


class InferenceEngine:
    """Generation with a KV-method ``GPTModel`` over a paged, per-head KV cache.

    Args:
        model: megatron GPTModel with KV-method attention (see :class:`DMCModelRunner`).
        config: cache and scheduling settings.
        vocab_size: real vocabulary (the model's embedding may be padded); tokens are
            sampled below it. ``None``: the whole padded vocabulary.

    Counters of the pool's shortages: ``preemptions``; ``admission_waits`` (prompts put back
    to wait for a running sequence to finish); ``admission_retries`` (batches of prompts that
    did not fit with nothing running, retried one prompt at a time).
    """

    def __init__(self, model: GPTModel, config: Optional[EngineConfig] = None,
                 vocab_size: Optional[int] = None) -> None:
        self.config = config or EngineConfig()
        mc = model.config
        kv_heads = (mc.num_query_groups or mc.num_attention_heads) // tp_size()
        slot_bytes = 2 * mc.kv_channels * torch.empty((), dtype=mc.params_dtype).element_size()
        self.runner = DMCModelRunner(
            model, block_size=self.config.block_size,
            num_blocks=self.config.pool_blocks(mc.num_layers, kv_heads, slot_bytes),
            max_sequences=self.config.max_batch_size,
            max_sequence_length=self.config.max_sequence_length,
            force_decision=self.config.force_decision)
        self.cache = self.runner.cache
        self._device = self.runner.device
        self.vocab_size = vocab_size
        self._next_id = 0
        self._waiting: Deque[_Sequence] = deque()
        self._running: List[_Sequence] = []
        self._admission_paused = False
        self.preemptions = 0
        self.admission_waits = 0
        self.admission_retries = 0
        self.steps = 0

    # -- requests ------------------------------------------------------------------------------

    def add_request(self, prompt: Sequence[int], sampling: Optional[SamplingParams] = None) -> int:
        """Queue a prompt (token ids); returns its request id."""
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise ValueError("a prompt needs at least one token")
        limit = self.config.max_sequence_length
        if len(prompt) > limit:
            raise ValueError(f"prompt of {len(prompt)} tokens exceeds "
                             f"engine.max_sequence_length={limit}")
        params = sampling or SamplingParams()
        request_id = self._next_id
        self._next_id += 1
        generator = None
        if not params.greedy:
            seed = params.seed if params.seed is not None else self.config.seed + request_id
            generator = torch.Generator(self._device).manual_seed(seed)
        self._waiting.append(_Sequence(request_id, prompt, params, generator))
        return request_id

    @property
    def has_unfinished(self) -> bool:
        return bool(self._waiting or self._running)

    @property
    def num_running(self) -> int:
        return len(self._running)

    def cancel(self, request_id: int) -> Optional[GenerationResult]:
        """Stop a waiting or running request now, freeing its blocks; returns its result
        (finish_reason ``"cancelled"``, the tokens generated so far), or ``None`` if the
        request is unknown or already finished."""
        for seq in self._waiting:
            if seq.request_id == request_id:
                self._waiting.remove(seq)
                return self._finish(seq, "cancelled")
        for seq in self._running:
            if seq.request_id == request_id:
                return self._finish(seq, "cancelled")
        return None

    def step(self) -> List[GenerationResult]:
        """Admit waiting requests, then decode one token for each running sequence."""
        self.steps += 1
        finished: List[GenerationResult] = []
        self._admit(finished)
        self._decode(finished)
        return finished

    def generate(self, prompts: Sequence[Sequence[int]],
                 sampling: Union[SamplingParams, Sequence[SamplingParams], None] = None
                 ) -> List[GenerationResult]:
        """Run ``prompts`` (token ids) to completion; results in prompt order."""
        if sampling is None or isinstance(sampling, SamplingParams):
            sampling = [sampling or SamplingParams()] * len(prompts)
        if len(sampling) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(sampling)} sampling parameters")
        ids = [self.add_request(p, s) for p, s in zip(prompts, sampling)]
        done: Dict[int, GenerationResult] = {}
        while self.has_unfinished:
            for result in self.step():
                done[result.request_id] = result
        return [done[i] for i in ids]

    def memory(self) -> MemoryReport:
        """KV memory of all running sequences (summed over tensor-parallel ranks)."""
        return self._tp_sum_report(self.cache.memory())

    # -- scheduling ----------------------------------------------------------------------------

    def _admit(self, finished: List[GenerationResult]) -> None:
        if self._admission_paused or not self._waiting:
            return
        batch = [self._waiting.popleft()
                 for _ in range(min(len(self._waiting), self.cache.num_free_rows))]
        while batch:
            logits = self._prefill(batch)
            if logits is not None:
                self._running.extend(batch)
                self._accept(batch, logits, finished)
                return
            if self._running:  # wait until a running sequence finishes and frees blocks
                self._waiting.extendleft(reversed(batch))
                self._admission_paused = True
                self.admission_waits += 1
                return
            if len(batch) == 1:
                seq = batch[0]
                raise CacheFullError(
                    f"a prompt of {len(seq.prompt) + len(seq.generated)} tokens does not fit "
                    f"the KV cache (engine.num_blocks={self.cache.layout.num_blocks} blocks of "
                    f"{self.cache.layout.block_size} slots): raise engine.num_blocks or "
                    "engine.kv_memory_mb")
            self._waiting.extendleft(reversed(batch[1:]))
            batch = batch[:1]
            self.admission_retries += 1

    def _prefill(self, batch: List[_Sequence]) -> Optional[Tensor]:
        """Prefill ``batch`` into fresh rows; ``None`` (rows released) if the pool ran out."""
        rows = [self.cache.acquire_row() for _ in batch]
        logits = self.runner.prefill(rows, [s.prompt + s.generated for s in batch],
                                     chunk_size=self.config.prefill_chunk_size,
                                     raise_on_overflow=False)  # shortage is agreed over TP
        overflow = tp_any(self.cache.overflow, self._device)
        self.cache.overflow = False
        if overflow:
            for row in rows:
                self.cache.release_row(row)
            return None
        for seq, row in zip(batch, rows):
            seq.row = row
        return logits

    def _decode(self, finished: List[GenerationResult]) -> None:
        while self._running:
            rows = torch.tensor([s.row for s in self._running], device=self._device)
            needed = self.runner.blocks_needed_for_next_token(rows)
            if not tp_any(needed > self.cache.num_free_blocks, self._device):
                break
            if len(self._running) == 1:  # alone and out of blocks: finish it as it stands
                finished.append(self._finish(self._running[0], "cache_full"))
                break
            self._preempt(self._running.pop())
        if not self._running:
            return
        rows = torch.tensor([s.row for s in self._running], device=self._device)
        tokens = torch.tensor([s.generated[-1] for s in self._running], device=self._device)
        logits = self.runner.decode(rows, tokens)  # the reservation above guarantees blocks
        self._accept(list(self._running), logits, finished)

    def _preempt(self, seq: _Sequence) -> None:
        self.cache.release_row(seq.row)
        seq.row = None
        seq.preemptions += 1
        self.preemptions += 1
        self._waiting.appendleft(seq)
        self._admission_paused = True

    def _accept(self, batch: List[_Sequence], logits: Tensor,
                finished: List[GenerationResult]) -> None:
        if self.vocab_size is not None:
            logits = logits[:, :self.vocab_size]
        tokens = sample_tokens(logits, [s.params for s in batch], [s.generator for s in batch])
        if tp_size() > 1:
            dist.broadcast(tokens, parallel_state.get_tensor_model_parallel_src_rank(),
                           group=parallel_state.get_tensor_model_parallel_group())
        for seq, token in zip(batch, tokens.tolist()):
            seq.generated.append(token)
            reason = None
            if token in seq.params.stop_token_ids:
                reason = "stop"
            elif (len(seq.generated) >= seq.params.max_new_tokens
                  or int(self.cache.positions[seq.row]) >= self.config.max_sequence_length):
                reason = "length"
            if reason is not None:
                finished.append(self._finish(seq, reason))

    def _finish(self, seq: _Sequence, reason: str) -> GenerationResult:
        if seq.row is None:  # never admitted, or preempted (cancelled while waiting)
            stats = CacheStats(tokens=0, head_lengths=torch.zeros(0, 0, dtype=torch.int64),
                               memory=MemoryReport(0, 0, 0, 0, 0, 0))
        else:
            lengths = self.cache.head_lengths(seq.row)
            if tp_size() > 1:
                parts = [torch.empty_like(lengths) for _ in range(tp_size())]
                dist.all_gather(parts, lengths,
                                group=parallel_state.get_tensor_model_parallel_group())
                lengths = torch.cat(parts, dim=1)
            stats = CacheStats(tokens=int(self.cache.positions[seq.row]), head_lengths=lengths,
                               memory=self._tp_sum_report(self.cache.memory([seq.row])))
            self.cache.release_row(seq.row)
            self._running.remove(seq)
        self._admission_paused = False
        return GenerationResult(seq.request_id, seq.prompt, seq.generated, reason, stats,
                                seq.preemptions)

    def _tp_sum_report(self, report: MemoryReport) -> MemoryReport:
        if tp_size() == 1:
            return report
        fields_ = ("slots", "logical", "allocated", "open_state", "vanilla")
        t = torch.tensor([getattr(report, f) for f in fields_], dtype=torch.int64,
                         device=self._device)
        dist.all_reduce(t, group=parallel_state.get_tensor_model_parallel_group())
        return MemoryReport(report.tokens, *t.tolist())


def generate(model: GPTModel, prompts: Sequence[Union[str, Sequence[int]]],
             sampling: Union[SamplingParams, Sequence[SamplingParams], None] = None,
             config: Optional[EngineConfig] = None, tokenizer=None,
             vocab_size: Optional[int] = None) -> List[GenerationResult]:
    """Generate for text or token-id prompts with a fresh :class:`InferenceEngine`.

    Text prompts need ``tokenizer`` (a :class:`nemo_dmc.data.tokenizer.Tokenizer` or
    anything with ``encode``/``decode``/``vocab_size``); results then carry ``text`` (the
    generated tokens decoded, without a final stop token). Sampling is limited to
    ``vocab_size`` (default: the tokenizer's).
    """
    if any(isinstance(p, str) for p in prompts) and tokenizer is None:
        raise ValueError("text prompts need a tokenizer")
    ids = [tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompts]
    if vocab_size is None and tokenizer is not None:
        vocab_size = tokenizer.vocab_size
    engine = InferenceEngine(model, config, vocab_size=vocab_size)
    results = engine.generate(ids, sampling)
    if tokenizer is not None:
        for r in results:
            body = r.tokens[:-1] if r.finish_reason == "stop" else r.tokens
            r.text = tokenizer.decode(body)
    return results
