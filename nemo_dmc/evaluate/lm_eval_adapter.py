"""An lm-evaluation-harness model type over our checkpoints: ``--model nemo_dmc``.

``loglikelihood`` / ``loglikelihood_rolling`` score whole sequences with one parallel forward
under the chosen cache policy (hard DMC decisions score exactly as the compressed cache
would); ``generate_until`` decodes with DMC's compressed paged cache
(:func:`nemo_dmc.inference.generate`), or, for ``dms``, ``vanilla`` and the eviction policies,
greedily by full forwards. Model arguments: ``load`` (required), ``tokenizer``, ``method``
(``dmc`` | ``dms`` | ``vanilla`` | ``h2o`` | ``tova`` | ``streaming``; default: the method the
checkpoint's training run recorded, else ``dmc``), ``ratio``, ``sinks``, ``window`` (``dms``),
``max_length`` (default: the model's ``seq_length``), ``max_gen_toks``,
``tensor_model_parallel_size``.

Needs the ``eval`` extra (``pip install -c constraints.txt -e ".[eval]"``). Command line::

    python -m nemo_dmc.evaluate.lm_eval_adapter --model nemo_dmc \\
        --model_args load=runs/dmc_tiny --tasks dmc_demo \\
        --include_path nemo_dmc/evaluate/tasks
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

try:
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError("the lm-eval adapter needs lm-evaluation-harness: install the `eval` "
                      "extra, pip install -c constraints.txt -e \".[eval]\"") from err

from nemo_dmc.core import DMCConfig, ModelConfig
from nemo_dmc.methods import eviction_methods, method_names
from nemo_dmc.evaluate.passkey import full_logits
from nemo_dmc.methods import choose_method, settings_for

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
"""The local demo tasks (``--include_path``): ``dmc_demo`` = choice + continue + rolling."""


@register_model("nemo_dmc")
class NemoDMCLM(TemplateLM):
    """A nemo-dmc checkpoint as an lm-eval ``LM`` (see module docstring)."""

    def __init__(self, load: str, tokenizer: Optional[str] = None, method: Optional[str] = None,
                 ratio: Optional[float] = None, sinks: int = 4, window: Optional[int] = None,
                 max_length: Optional[int] = None,
                 max_gen_toks: int = 256, batch_size: int | str = 1,
                 tensor_model_parallel_size: int = 1, seed: int = 1234,
                 device: Optional[str] = None, **unused: Any) -> None:
        super().__init__()
        from nemo_dmc.checkpoints.resolve import find_tokenizer_path, resolve_checkpoint
        from nemo_dmc.data.tokenizer import load_tokenizer
        from nemo_dmc.inference.loading import build_inference_model
        from nemo_dmc.megatron import parallel
        from nemo_dmc.training.launch import local_rendezvous

        if method is not None and method not in method_names():
            raise ValueError(f"method: must be one of {', '.join(method_names())}, "
                             f"got {method!r}")
        if (method in eviction_methods()) != (ratio is not None):
            raise ValueError("ratio: give ratio=<float> with (and only with) the eviction "
                             f"methods {', '.join(eviction_methods())}")
        resolved = resolve_checkpoint(load, "load")
        # method=None: the method the checkpoint's run trained (dmc or dms), else dmc
        choice = choose_method(method, None if window is None else int(window),
                               resolved.recorded_method())
        if choice.note is not None:
            print(choice.note, flush=True)
        self.method, self.sinks = choice.method, int(sinks)
        self.ratio = None if ratio is None else float(ratio)
        self.window = choice.window  # dms: eviction delay
        # A free port unless a launcher set one; the launcher variables are restored once the
        # process group exists, so later subprocesses do not inherit this one's rank and port.
        with local_rendezvous():
            parallel.initialize(tensor_parallel_size=int(tensor_model_parallel_size),
                                seed=int(seed))
        self.model, self.model_config, _, resolved = build_inference_model(
            resolved, ModelConfig(), DMCConfig(), key="load",
            method=lambda dmc: settings_for(self.method, dmc, self.ratio, self.sinks,
                                            self.window))
        self.device = torch.device("cuda", torch.cuda.current_device()) \
            if torch.cuda.is_available() else torch.device("cpu")
        self.model.to(self.device)
        path = find_tokenizer_path(tokenizer, resolved)
        if path is None:
            raise ValueError("tokenizer: none given and none recorded by the run of `load`")
        self.tokenizer = load_tokenizer(path)
        self.max_length = int(max_length or self.model_config.seq_length)
        if not 2 <= self.max_length <= self.model_config.seq_length:
            raise ValueError(f"max_length: must be in 2..{self.model_config.seq_length} "
                             f"(the model's seq_length), got {self.max_length}")
        self.max_gen_toks = int(max_gen_toks)
        self.batch_size = 8 if str(batch_size).startswith("auto") else int(batch_size)
        self.seed = int(seed)
        self.generation_cr: List[float] = []
        """Achieved compression ratio of each ``generate_until`` request (``dmc`` only)."""

    # -- tokens ----------------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eod_id

    def tok_encode(self, string: str, **kwargs: Any) -> List[int]:
        return self.tokenizer.encode(string)

    def tok_decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(tokens)

    # -- scoring ---------------------------------------------------------------------------

    def _logits(self, rows: List[List[int]]) -> torch.Tensor:
        """``[n, longest, vocab]`` log-probabilities of right-padded ``rows`` (causal, so
        padding never changes earlier positions)."""
        longest = max(len(r) for r in rows)
        tokens = torch.tensor([r + [self.eot_token_id] * (longest - len(r)) for r in rows],
                              device=self.device)
        return F.log_softmax(full_logits(self.model, tokens, self.tokenizer.vocab_size), -1)

    @torch.no_grad()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False,
                              **kwargs: Any) -> List[Tuple[float, bool]]:
        """``(sum of log p(continuation), greedy?)`` per ``(key, context, continuation)``."""
        inputs = []
        for _, context, continuation in requests:
            if not continuation:
                raise ValueError("lm-eval asked for the log-likelihood of an empty continuation")
            whole = (context + continuation)[-(self.max_length + 1):]
            inputs.append((whole, min(len(continuation), len(whole) - 1)))
        results: List[Optional[Tuple[float, bool]]] = [None] * len(inputs)
        order = sorted(range(len(inputs)), key=lambda i: -len(inputs[i][0]))
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            logprobs = self._logits([inputs[i][0][:-1] for i in chunk])
            for row, i in enumerate(chunk):
                whole, count = inputs[i]
                n = len(whole) - 1  # inputs; position t predicts whole[t + 1]
                target = torch.tensor(whole[-count:], device=self.device)
                scores = logprobs[row, n - count:n]
                total = float(scores.gather(-1, target[:, None]).sum())
                greedy = bool((scores.argmax(-1) == target).all())
                results[i] = (total, greedy)
                self.cache_hook.add_partial("loglikelihood", requests[i][0], results[i])
        return results  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> List[float]:
        """Log-likelihood of whole documents in disjoint windows of ``max_length`` tokens."""
        out = []
        for request in requests:
            (text,) = request.args
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                self.tok_encode(text), self.prefix_token_id, self.max_length, 1)]
            scored = self._loglikelihood_tokens([(None, ctx, cont) for ctx, cont in windows])
            total = sum(score for score, _ in scored)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
            out.append(total)
        return out

    # -- generation ------------------------------------------------------------------------

    def generate_until(self, requests, disable_tqdm: bool = False) -> List[str]:
        """Greedy (or sampled, ``do_sample``) continuations cut at the first ``until`` string."""
        out = []
        for request in requests:
            context, gen_kwargs = request.args
            gen_kwargs = dict(gen_kwargs or {})
            until = gen_kwargs.get("until") or [self.tok_decode([self.eot_token_id])]
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(gen_kwargs.get("max_gen_toks", self.max_gen_toks))
            max_new = max(1, min(max_new, self.max_length - 1))
            temperature = float(gen_kwargs.get("temperature", 0.0)) \
                if gen_kwargs.get("do_sample", False) else 0.0
            prompt = self.tok_encode(context)[-(self.max_length - max_new):] or [self.eot_token_id]
            text = self._generate(prompt, max_new, temperature)
            for stop in until:
                if stop and stop in text:
                    text = text[:text.index(stop)]
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            out.append(text)
        return out

    @torch.no_grad()
    def _generate(self, prompt: List[int], max_new: int, temperature: float) -> str:
        if self.method == "dmc":
            from nemo_dmc.inference import EngineConfig, SamplingParams, generate

            [result] = generate(
                self.model, [prompt],
                SamplingParams(temperature=temperature, max_new_tokens=max_new,
                               stop_token_ids=(self.eot_token_id,), seed=self.seed),
                EngineConfig(max_batch_size=1, max_sequence_length=len(prompt) + max_new,
                             prefill_chunk_size=None, seed=self.seed),
                tokenizer=self.tokenizer)
            self.generation_cr.append(result.cache.compression_ratio)
            return result.text or ""
        tokens = list(prompt)  # plain attention / eviction: one full forward per token
        generator = torch.Generator().manual_seed(self.seed)
        for _ in range(max_new):
            last = self._logits([tokens])[0, -1].cpu()
            if temperature > 0:
                probs = (last / temperature).softmax(-1)
                token = int(torch.multinomial(probs, 1, generator=generator))
            else:
                token = int(last.argmax())
            if token == self.eot_token_id:
                break
            tokens.append(token)
        return self.tok_decode(tokens[len(prompt):])


def main() -> None:
    """lm-eval's command line with the ``nemo_dmc`` model type registered, and our
    transformers architecture (``dmc_llama``) too: ``--model hf`` takes an export as is."""
    from lm_eval.__main__ import cli_evaluate

    import nemo_dmc.hf  # noqa: F401  (registers dmc_llama with transformers' Auto classes)
    from nemo_dmc.quiet import quiet_third_party

    quiet_third_party()

    cli_evaluate()


if __name__ == "__main__":
    main()
