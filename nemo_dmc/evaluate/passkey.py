"""Passkey (needle-in-a-haystack) retrieval on synthetic prompts built locally.

A prompt of exactly ``length`` tokens is filler text with the needle
``"The pass key is NNNNN. Remember it."`` placed at ``depth`` (fraction of the filler before
it), then the question ``"What is the pass key? The pass key is"`` and the answer
``" NNNNN"``. Pass keys come from ``random.Random(seed)``, so the prompts are a pure function
of the tokenizer and the settings.

Scoring is greedy exact match computed by teacher forcing: one forward over prompt + answer,
and a prompt counts as correct iff the argmax at every answer position is the answer token.
By induction this is exactly "greedy decoding of ``len(answer)`` tokens reproduces the
answer's tokens" (and, with hard decisions, equal to decoding with the compressed cache). It
does not credit the same digits produced through a different tokenization.
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region
from torch import Tensor, nn

from nemo_dmc.megatron.cpu_shims import causal_attention_mask

FILLER = (" The grass is green. The sky is blue. The sun is yellow. Here we go."
          " There and back again.")
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = " What is the pass key? The pass key is"
ANSWER = " {key}"


@dataclass(frozen=True)
class PasskeyPrompt:
    """``tokens`` (prompt + answer, ``length`` of them); the needle's tokens start at
    ``needle_start``, the answer's at ``answer_start`` (through the end)."""

    tokens: Tuple[int, ...]
    needle_start: int
    answer_start: int
    passkey: str
    length: int
    depth: float

    @property
    def answer(self) -> Tuple[int, ...]:
        return self.tokens[self.answer_start:]


def make_passkey_prompt(tokenizer, length: int, depth: float, passkey: str) -> PasskeyPrompt:
    """One prompt of exactly ``length`` tokens with the needle at ``depth`` of the filler.

    Pieces are tokenized separately and concatenated (each starts with a space, where a
    byte-level BPE splits words anyway), so positions are exact.
    """
    needle = tokenizer.encode(NEEDLE.format(key=passkey))
    question = tokenizer.encode(QUESTION)
    answer = tokenizer.encode(ANSWER.format(key=passkey))
    filler_count = length - len(needle) - len(question) - len(answer)
    if filler_count < 0:
        raise ValueError(f"passkey.lengths: {length} tokens cannot hold the needle, question "
                         f"and answer ({length - filler_count} tokens)")
    unit = tokenizer.encode(FILLER)
    filler = unit * (filler_count // len(unit) + 1)
    before = round(depth * filler_count)
    tokens = (filler[:before] + needle + filler[before:filler_count] + question + answer)
    return PasskeyPrompt(tokens=tuple(tokens), needle_start=before,
                         answer_start=length - len(answer), passkey=passkey, length=length,
                         depth=depth)


def passkey_prompts(tokenizer, lengths: Sequence[int], depths: Sequence[float], samples: int,
                    digits: int = 5, seed: int = 0) -> List[PasskeyPrompt]:
    """``samples`` prompts per (length, depth), in that order, with seeded pass keys."""
    rng = random.Random(seed)
    prompts = []
    for length in lengths:
        for depth in depths:
            for _ in range(samples):
                key = str(rng.randrange(10 ** (digits - 1), 10 ** digits))
                prompts.append(make_passkey_prompt(tokenizer, length, depth, key))
    return prompts


def answer_correct(logits: Tensor, prompt: PasskeyPrompt) -> bool:
    """Greedy exact match: ``argmax(logits[t - 1]) == tokens[t]`` at every answer position.

    ``logits``: ``[length, vocab]`` of the prompt's teacher-forced forward.
    """
    start = prompt.answer_start
    predicted = logits[start - 1:prompt.length - 1].argmax(-1)
    return bool((predicted.cpu() == torch.tensor(prompt.answer)).all())


@torch.no_grad()
def full_logits(model: nn.Module, tokens: Tensor, vocab_size: int) -> Tensor:
    """``[batch, seq, vocab_size]`` logits (gathered over TP ranks, vocab padding dropped)."""
    seq = tokens.shape[1]
    positions = torch.arange(seq, device=tokens.device).expand_as(tokens)
    logits = model(tokens, positions, causal_attention_mask(seq, tokens.device))
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        logits = gather_from_tensor_model_parallel_region(logits.contiguous())
    return logits[..., :vocab_size].float()


@dataclass
class PasskeyReport:
    """Accuracy overall and per (length, depth) cell."""

    accuracy: float
    cells: List[Dict[str, float]]
    correct: int
    total: int


@torch.no_grad()
def passkey_accuracy(model: nn.Module, prompts: Sequence[PasskeyPrompt], vocab_size: int,
                     batch_size: int = 4, device: torch.device | str = "cpu") -> PasskeyReport:
    """Score ``prompts`` (batched by length) with :func:`answer_correct`."""
    model.eval()
    outcome: Dict[Tuple[int, float], List[bool]] = defaultdict(list)
    by_length: Dict[int, List[PasskeyPrompt]] = defaultdict(list)
    for prompt in prompts:
        by_length[prompt.length].append(prompt)
    for group in by_length.values():
        for start in range(0, len(group), batch_size):
            chunk = group[start:start + batch_size]
            tokens = torch.tensor([p.tokens for p in chunk], device=device)
            logits = full_logits(model, tokens, vocab_size)
            for prompt, row in zip(chunk, logits):
                outcome[(prompt.length, prompt.depth)].append(answer_correct(row, prompt))
    cells = [{"length": length, "depth": depth, "accuracy": sum(hits) / len(hits),
              "correct": sum(hits), "total": len(hits)}
             for (length, depth), hits in sorted(outcome.items())]
    correct = sum(int(c["correct"]) for c in cells)
    total = sum(int(c["total"]) for c in cells)
    return PasskeyReport(accuracy=correct / max(1, total), cells=cells, correct=correct,
                         total=total)
