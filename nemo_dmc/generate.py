"""``python -m nemo_dmc.generate``: text generation with DMC's compressed KV cache, or with
the same model under another KV method (``method=vanilla|h2o|tova|streaming ratio=<r>``)
(Hydra, ``conf/generate.yaml``). Prints each completion with its achieved compression ratio
and KV memory.

Examples::

    python -m nemo_dmc.generate load=runs/dmc_tiny prompts='["The list type"]'
    python -m nemo_dmc.generate load=ckpt/smollm2 tokenizer=path/model.gguf \\
        sampling.temperature=0.7 sampling.top_p=0.9 sampling.max_new_tokens=128
    python -m nemo_dmc.generate load=ckpt/smollm2 method=vanilla  # the model as imported
    python -m nemo_dmc.generate load=runs/dmc_tiny engine.force_decision=append  # DMC layers
        # appending every token (channel D-1 still zeroed: not the model as imported)
    python -m nemo_dmc.generate load=runs/dmc_tiny method=h2o ratio=4  # evicting cache
    torchrun --nproc-per-node 2 -m nemo_dmc.generate parallel.tensor_model_parallel_size=2 ...
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, List, Optional

from nemo_dmc.quiet import quiet_third_party  # noqa: E402

quiet_third_party()  # before megatron / torch print their notices

import hydra  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from nemo_dmc.config_help import register_help  # noqa: E402
from nemo_dmc.core import DMCConfig, ModelConfig  # noqa: E402
from nemo_dmc.inference.config import (  # noqa: E402
    EngineConfig,
    ParallelSettings,
    SamplingSettings,
)
from nemo_dmc.inference.sampling import SamplingParams  # noqa: E402
from nemo_dmc.methods import choose_method, settings_for  # noqa: E402

if TYPE_CHECKING:  # the engine imports megatron: not for --help
    from nemo_dmc.inference.engine import GenerationResult


@dataclass
class GenerateConfig:
    """Root of ``conf/generate.yaml``.

    load: the checkpoint: a training run / stage / step directory, a NeMo 2 directory, a
        weights checkpoint of ``nemo_dmc.convert``, or a ``.pt`` state_dict (``null``: random
        weights). (Not ``checkpoint``: that name is a config group of the trainer in ``conf/``.)
    tokenizer: HF directory, ``tokenizer.json`` or ``.gguf`` (``null``: the run's tokenizer).
    prompts: text prompts.
    prompt_token_ids: token-id prompts instead of text, e.g. ``[[1,2,3],[4,5]]`` (no
        tokenizer needed).
    seed: seed of torch's and megatron's generators (random weights without ``load``).
    ratio: eviction methods: the compression ratio (required for them).
    sinks: ``streaming``: first tokens always kept.
    method: the KV method the model runs: ``dmc`` (the checkpoint's DMC settings),
        ``vanilla`` (plain attention, channel D-1 used as is) or an eviction method (``h2o``,
        ``tova``, ``streaming``) at compression ``ratio``, keeping ``sinks`` first tokens
        (streaming), or ``dms`` (learned eviction from channel D-1, delayed by ``window``);
        ``null`` = the method the checkpoint's training run recorded (``dmc`` or ``dms``, see
        :func:`nemo_dmc.methods.choose_method`), else ``dmc``.
    window: ``dms``'s eviction delay (``null`` = the run's when it trained ``dms``, else
        DMSConfig's).
    """

    load: Optional[str] = None
    tokenizer: Optional[str] = None
    prompts: List[str] = field(default_factory=list)
    prompt_token_ids: Optional[List[List[int]]] = None
    seed: int = 1234
    method: Optional[str] = None
    ratio: Optional[float] = None
    sinks: int = 4
    window: Optional[int] = None
    model: ModelConfig = field(default_factory=ModelConfig)
    dmc: DMCConfig = field(default_factory=DMCConfig)
    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    engine: EngineConfig = field(default_factory=EngineConfig)
    parallel: ParallelSettings = field(default_factory=ParallelSettings)


def register_schema() -> None:
    """Register :class:`GenerateConfig` in Hydra's ConfigStore as ``generate_schema``."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="generate_schema", node=GenerateConfig)


def _mib(n: int) -> str:
    return f"{n / 2 ** 20:.3f} MiB"


def format_result(result: GenerationResult, prompt: str) -> str:
    """The lines printed for one request."""
    mem, cache = result.cache.memory, result.cache
    text = result.text if result.text is not None else str(result.tokens)
    return "\n".join([
        f"[request {result.request_id}] prompt: {prompt!r}",
        f"[request {result.request_id}] completion ({len(result.tokens)} tokens, "
        f"{result.finish_reason}): {text!r}",
        f"[request {result.request_id}] achieved CR {cache.compression_ratio:.2f} over "
        f"{cache.tokens} tokens; KV cache {_mib(mem.logical)} logical, {_mib(mem.allocated)} "
        f"allocated ({_mib(mem.waste)} block waste) + {_mib(mem.open_state)} open state; "
        f"vanilla {_mib(mem.vanilla)}" + (f"; preempted {result.preemptions}x"
                                          if result.preemptions else ""),
    ])


def length_warnings(prompt_lengths: List[int], max_new_tokens: int, trained_length: int,
                    engine_limit: int) -> List[str]:
    """Warnings for prompts whose generation goes past the model's trained sequence length
    (RoPE positions it never saw) or is cut at ``engine.max_sequence_length``."""
    warnings_ = []
    for i, n in enumerate(prompt_lengths):
        end = n + max_new_tokens - 1  # positions fed to the model (the last token is not)
        if end > trained_length:
            warnings_.append(
                f"warning: prompt {i} ({n} tokens) + sampling.max_new_tokens={max_new_tokens} "
                f"goes past the model's trained sequence length (model.seq_length="
                f"{trained_length}): positions beyond it were never trained, quality may drop")
        if end > engine_limit:
            warnings_.append(
                f"warning: prompt {i} ({n} tokens) stops after {max(0, engine_limit - n + 1)} new "
                f"tokens at engine.max_sequence_length={engine_limit}, not "
                f"sampling.max_new_tokens={max_new_tokens}: raise engine.max_sequence_length")
    return warnings_


def run(cfg: GenerateConfig) -> List[GenerationResult]:
    """Build the model (and tokenizer), generate, print on rank 0, return the results."""
    import torch.distributed as dist

    from nemo_dmc.checkpoints.resolve import find_tokenizer_path, resolve_checkpoint
    from nemo_dmc.checkpoints.weights import read_special_tokens
    from nemo_dmc.data.tokenizer import load_tokenizer
    from nemo_dmc.inference.engine import generate
    from nemo_dmc.inference.loading import build_inference_model
    from nemo_dmc.megatron import parallel

    if cfg.prompt_token_ids is None and not cfg.prompts:
        raise ValueError("prompts: give at least one prompt (or prompt_token_ids)")
    resolved = resolve_checkpoint(cfg.load, "load") if cfg.load is not None else None
    choice = choose_method(cfg.method, cfg.window,
                           resolved.recorded_method() if resolved is not None else None)
    method_name, window = choice.method, choice.window
    settings_for(method_name, cfg.dmc, cfg.ratio, cfg.sinks, window)  # bad keys: fail early
    params = SamplingParams(temperature=cfg.sampling.temperature, top_k=cfg.sampling.top_k,
                            top_p=cfg.sampling.top_p, max_new_tokens=cfg.sampling.max_new_tokens,
                            stop_token_ids=tuple(cfg.sampling.stop_token_ids),
                            seed=cfg.sampling.seed)
    parallel.initialize(tensor_parallel_size=cfg.parallel.tensor_model_parallel_size, seed=cfg.seed)
    try:
        model, model_cfg, dmc, resolved = build_inference_model(
            resolved, cfg.model, cfg.dmc, key="load",
            method=lambda dmc: settings_for(method_name, dmc, cfg.ratio, cfg.sinks, window))
        path = find_tokenizer_path(cfg.tokenizer, resolved)
        special = read_special_tokens(resolved.path) if resolved is not None else None
        tokenizer = load_tokenizer(path, special_tokens=special) if path is not None else None
        if tokenizer is not None and tokenizer.vocab_size > model_cfg.vocab_size:
            raise ValueError(f"tokenizer: {path} has {tokenizer.vocab_size} tokens, more than "
                             f"the model's vocab_size {model_cfg.vocab_size}")
        if cfg.prompt_token_ids is not None:
            prompts = [list(p) for p in cfg.prompt_token_ids]
            vocab = tokenizer.vocab_size if tokenizer is not None else model_cfg.vocab_size
            bad = sorted({t for p in prompts for t in p if not 0 <= t < vocab})
            if bad:
                raise ValueError(f"prompt_token_ids: token id(s) {bad[:8]} outside the "
                                 f"vocabulary (0..{vocab - 1})")
        elif tokenizer is None:
            raise ValueError("tokenizer: text prompts need a tokenizer (none given and none "
                             "recorded by the run of `load`); or use prompt_token_ids")
        else:
            prompts = list(cfg.prompts)
        if tokenizer is not None and cfg.sampling.stop_at_eod:
            params.stop_token_ids = tuple(params.stop_token_ids) + (tokenizer.eod_id,)
        rank0 = dist.get_rank() == 0
        if rank0:
            lengths = [len(p) if not isinstance(p, str) else len(tokenizer.encode(p))
                       for p in prompts]
            for line in length_warnings(lengths, params.max_new_tokens, model_cfg.seq_length,
                                        cfg.engine.max_sequence_length):
                print(line, file=sys.stderr, flush=True)
            source = resolved.path if resolved is not None else "random initialisation"
            if choice.note is not None:
                print(choice.note, flush=True)
            if method_name == "dmc":
                method = (f"DMC window {dmc.window}, decisions "
                          f"{cfg.engine.force_decision or 'learned'}")
            elif method_name == "dms":
                method = (f"method dms, window "
                          f"{settings_for('dms', dmc, window=window).window}")
            else:
                method = f"method {method_name}" + (f" at ratio {cfg.ratio:g}"
                                                    if cfg.ratio is not None else "")
            if choice.source == "run":
                method += " (the checkpoint's trained method)"
            print(f"model: {model_cfg.num_layers} layers, {model_cfg.num_attention_heads} heads / "
                  f"{model_cfg.kv_heads} KV, weights {source}; {method}; tokenizer {path}",
                  flush=True)
        results = generate(model, prompts, params, cfg.engine, tokenizer=tokenizer,
                           vocab_size=tokenizer.vocab_size if tokenizer else model_cfg.vocab_size)
        if rank0:
            for prompt, result in zip(prompts, results):
                print(format_result(result, prompt if isinstance(prompt, str) else str(prompt)),
                      flush=True)
        return results
    finally:
        parallel.shutdown()


register_schema()
register_help("generate", GenerateConfig)


@hydra.main(config_path="../conf", config_name="generate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from nemo_dmc.kvcache.paged import CacheFullError

    try:
        run(OmegaConf.to_object(cfg))  # type: ignore[arg-type]
    except (ValueError, FileNotFoundError, CacheFullError) as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
