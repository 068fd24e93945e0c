"""One evaluation of a checkpoint under one cache policy: held-out perplexity, realised CR
(overall, per layer, per KV head, heatmap), KV bytes and passkey retrieval, written to
``results.json`` and summarised on one screen."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from nemo_dmc.evaluate.compression import (
    KV_DTYPES,
    CompressionTally,
    compression_report,
    write_heatmap,
)
from nemo_dmc.evaluate.config import DEFAULT_MAX_SEQ_LENGTH, EvaluateConfig
from nemo_dmc.evaluate.data import (
    data_tokenizer_path,
    heldout_batches,
    heldout_dataset,
    resolve_data,
)
from nemo_dmc.evaluate.passkey import PasskeyPrompt, passkey_accuracy, passkey_prompts
from nemo_dmc.evaluate.perplexity import heldout_perplexity
from nemo_dmc.methods import MethodChoice, choose_method, settings_for, settings_to_dict
from nemo_dmc.kvcache.paged import CacheLayout
from nemo_dmc.megatron.stats import layer_slots

RESULTS_FILE = "results.json"
HEATMAP_FILE = "head_cr_heatmap.png"


def method_tag(cfg: EvaluateConfig) -> str:
    """``dmc``, ``vanilla``, ``dms[_w<window>]`` or ``<eviction>_<ratio>`` (e.g. ``h2o_4``) of
    a config whose method is resolved (:func:`resolve_method`)."""
    if cfg.window is not None:
        return f"{cfg.method}_w{cfg.window}"
    return cfg.method if cfg.ratio is None else f"{cfg.method}_{cfg.ratio:g}"


def resolve_method(cfg: EvaluateConfig, resolved) -> Tuple[EvaluateConfig, MethodChoice]:
    """``cfg`` with ``method`` / ``window`` resolved against the checkpoint ``resolved``
    (``method: null`` = the method its training run recorded, else ``dmc``; see
    :func:`~nemo_dmc.methods.choose_method`), and the choice."""
    recorded = resolved.recorded_method() if resolved is not None else None
    choice = choose_method(cfg.method, cfg.window, recorded)
    cfg = replace(cfg, method=choice.method, window=choice.window)
    cfg.validate()
    return cfg, choice


def output_dir(cfg: EvaluateConfig) -> Path:
    """``output_dir``, else ``<load dir>/evaluation/<method tag>``."""
    if cfg.output_dir is not None:
        return Path(cfg.output_dir)
    load = Path(cfg.load)
    return (load if load.is_dir() else load.parent) / "evaluation" / method_tag(cfg)


def passkey_lengths(cfg: EvaluateConfig, seq_length: int) -> List[int]:
    """``passkey.lengths``, or 1/4, 1/2 and all of the model's sequence length."""
    lengths = list(cfg.passkey.lengths) or sorted({max(1, seq_length // 4),
                                                   max(1, seq_length // 2), seq_length})
    bad = [n for n in lengths if not 1 <= n <= seq_length]
    if bad:
        raise ValueError(f"passkey.lengths: {bad} outside 1..model.seq_length ({seq_length})")
    return lengths


def build_passkey_prompts(cfg: EvaluateConfig, tokenizer, seq_length: int
                          ) -> Tuple[List[int], List[int], List[PasskeyPrompt]]:
    """``(lengths, dropped, prompts)`` of the passkey test, built before any forward so a bad
    ``passkey.lengths`` fails fast. Explicit lengths too short for the needle, question and
    answer are an error naming ``passkey.lengths``; default lengths (``seq_length / 4`` ...)
    that are too short for this tokenizer are dropped (shortest first) and listed in
    ``dropped`` (``lengths`` may end up empty)."""
    lengths = passkey_lengths(cfg, seq_length)
    settings = (cfg.passkey.depths, cfg.passkey.samples, cfg.passkey.digits, cfg.passkey.seed)
    if cfg.passkey.lengths:
        return lengths, [], passkey_prompts(tokenizer, lengths, *settings)
    dropped: List[int] = []
    while lengths:
        try:
            return lengths, dropped, passkey_prompts(tokenizer, lengths, *settings)
        except ValueError:
            dropped.append(lengths.pop(0))
    return [], dropped, []


def run(cfg: EvaluateConfig) -> Dict[str, Any]:
    """Evaluate ``cfg.load``; return the results (also written to ``results.json``)."""
    from nemo_dmc.megatron import parallel
    from nemo_dmc.training.launch import local_rendezvous

    cfg.validate()
    # a free local port unless a launcher set one, so concurrent evaluations do not collide
    with local_rendezvous():
        parallel.initialize(tensor_parallel_size=cfg.parallel.tensor_model_parallel_size,
                            seed=cfg.seed)
        try:
            return _evaluate(cfg)
        finally:
            parallel.shutdown()


def _evaluate(cfg: EvaluateConfig) -> Dict[str, Any]:
    from nemo_dmc.checkpoints.resolve import find_tokenizer_path, resolve_checkpoint
    from nemo_dmc.data.tokenizer import load_tokenizer
    from nemo_dmc.inference.loading import build_inference_model

    started = time.time()
    resolved = resolve_checkpoint(cfg.load, "load")
    cfg, choice = resolve_method(cfg, resolved)
    if choice.note is not None and dist.get_rank() == 0:
        print(choice.note, flush=True)
    built: Dict[str, Any] = {}

    def method_settings(dmc):
        built["settings"] = settings_for(cfg.method, dmc, cfg.ratio, cfg.sinks, cfg.window)
        return built["settings"]

    model, model_cfg, dmc, resolved = build_inference_model(
        resolved, cfg.model, cfg.dmc, key="load", method=method_settings)
    model_seq_length = model_cfg.seq_length
    model_cfg = replace(model_cfg, seq_length=cfg.sequence_length(model_seq_length))
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
        else torch.device("cpu")
    model.to(device)
    run_config = resolved.run_config if resolved is not None else None
    checkpoint_tokenizer = find_tokenizer_path(cfg.tokenizer, resolved)
    data = resolve_data(cfg.data, run_config, cfg.tokenizer, checkpoint_tokenizer)
    tokenizer_path = checkpoint_tokenizer or data_tokenizer_path(data)
    tokenizer = load_tokenizer(tokenizer_path) if tokenizer_path is not None else None
    if tokenizer is not None and tokenizer.vocab_size > model_cfg.vocab_size:
        raise ValueError(f"tokenizer: {tokenizer_path} has {tokenizer.vocab_size} tokens, more "
                         f"than the model's vocab_size {model_cfg.vocab_size}")
    dtype = next(model.parameters()).dtype if cfg.kv.dtype == "model" else KV_DTYPES[cfg.kv.dtype]
    layout = CacheLayout(num_layers=model_cfg.num_layers, kv_heads=model_cfg.kv_heads,
                         head_dim=model_cfg.head_dim, window=dmc.window,
                         block_size=cfg.kv.block_size, num_blocks=1, max_sequences=1,
                         max_sequence_length=model_cfg.seq_length, dtype=dtype)
    tally = CompressionTally(layout)

    def count(batch: Dict[str, torch.Tensor]) -> None:
        tally.add(layer_slots(model), batch["tokens"].shape[1], open_state=cfg.method == "dmc")

    # Passkey prompts first: a bad passkey.lengths fails before the perplexity pass.
    passkey: Dict[str, Any]
    prompts: List[PasskeyPrompt] = []
    lengths: List[int] = []
    dropped: List[int] = []
    if not cfg.passkey.enabled:
        passkey = {"skipped": "passkey.enabled=false"}
    elif tokenizer is None:
        passkey = {"skipped": "no tokenizer (give tokenizer=...)"}
    else:
        lengths, dropped, prompts = build_passkey_prompts(cfg, tokenizer, model_cfg.seq_length)
        if not prompts:
            passkey = {"skipped": f"default passkey.lengths {dropped} are too short for the "
                                  "needle, question and answer (give passkey.lengths=...)"}
    dataset = heldout_dataset(data, model_cfg, cfg.data.num_sequences)
    batches = heldout_batches(dataset, cfg.data.num_sequences, cfg.data.micro_batch_size, device)
    ppl = heldout_perplexity(model, batches, after_forward=count)
    if prompts:
        report = passkey_accuracy(model, prompts, tokenizer.vocab_size,
                                  cfg.data.micro_batch_size, device)
        passkey = {**asdict(report), "lengths": lengths, "depths": list(cfg.passkey.depths),
                   "samples": cfg.passkey.samples}
        if dropped:
            passkey["dropped_lengths"] = dropped

    compression = compression_report(tally)
    out = output_dir(cfg)
    results: Dict[str, Any] = {
        "checkpoint": str(resolved.path) if resolved is not None else None,
        "load": cfg.load, "method": cfg.method, "window": cfg.window, "ratio": cfg.ratio,
        "method_source": choice.source, "method_note": choice.note,
        "method_settings": settings_to_dict(built["settings"]),
        "model": asdict(model_cfg), "dmc": asdict(dmc),
        "seq_length": {"evaluated": model_cfg.seq_length, "model": model_seq_length,
                       "capped_by_default": cfg.seq_length is None
                       and model_cfg.seq_length < model_seq_length},
        "perplexity": {"loss": ppl.loss, "perplexity": ppl.perplexity, "tokens": ppl.tokens,
                       "sequences": ppl.sequences, "split": "valid", "source": data.source},
        "compression": asdict(compression), "passkey": passkey, "heatmap": None,
        "tokenizer": str(tokenizer_path) if tokenizer_path is not None else None,
        "config": _plain(cfg), "seconds": None,
    }
    if dist.get_rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
        if cfg.heatmap and cfg.method != "vanilla":
            title = f"realised CR per KV head (overall {compression.cr:.2f})"
            results["heatmap"] = str(write_heatmap(compression.head_cr, out / HEATMAP_FILE, title))
        results["seconds"] = round(time.time() - started, 2)
        (out / RESULTS_FILE).write_text(json.dumps(results, indent=2, default=str) + "\n")
        print(summary(results, out), flush=True)
    return results


def _plain(cfg: EvaluateConfig) -> Dict[str, Any]:
    return json.loads(json.dumps(asdict(cfg), default=str))


def _mib(n: float) -> str:
    return f"{n / 2 ** 20:.3f} MiB"


def _seq_length_line(seq: Dict[str, Any]) -> str:
    line = f"sequence length: {seq['evaluated']} tokens"
    if seq["capped_by_default"]:
        line += (f" (default: the model's {seq['model']} capped at {DEFAULT_MAX_SEQ_LENGTH}; "
                 f"set seq_length=... to change)")
    return line


def summary(results: Dict[str, Any], out: Optional[Path] = None) -> str:
    """The one-screen summary printed after an evaluation."""
    ppl, comp = results["perplexity"], results["compression"]
    kv = comp["kv_bytes"]
    method = results["method"] + (f" (ratio {results['ratio']:g})" if results["ratio"] else "")
    window = (results.get("method_settings") or {}).get("window", results.get("window"))
    if results["method"] == "dms" and window is not None:
        method += f" (window {window})"
    source = results.get("method_source")
    if source in ("run", "default"):
        method += (" (the checkpoint's trained method)" if source == "run"
                   else " (default: the checkpoint records no method)")
    lines = [
        f"checkpoint: {results['checkpoint']}",
        f"method: {method}",
        _seq_length_line(results["seq_length"]),
        f"held-out perplexity: {ppl['perplexity']:.3f} (loss {ppl['loss']:.4f}) over "
        f"{ppl['sequences']} x {ppl['tokens'] // max(1, ppl['sequences'])} tokens of the "
        f"{ppl['source']} valid split",
        f"realised CR: {comp['cr']:.2f}; per layer: "
        + " ".join(f"{cr:.2f}" for cr in comp["layer_cr"]),
        f"KV cache per sequence: {_mib(kv['logical_per_sequence'])} vs "
        f"{_mib(kv['vanilla_per_sequence'])} uncompressed "
        f"({100 * kv['fraction_of_vanilla']:.1f}%); all: {kv['slots']:,} slots, "
        f"{_mib(kv['logical'])} logical, {_mib(kv['allocated'])} allocated, "
        f"{_mib(kv['open_state'])} open state",
    ]
    pk = results["passkey"]
    if "skipped" in pk:
        lines.append(f"passkey: skipped ({pk['skipped']})")
    else:
        lines.append(f"passkey accuracy: {pk['accuracy']:.3f} ({pk['correct']}/{pk['total']})")
        depths = pk["depths"]
        lines.append("  length \\ depth " + " ".join(f"{d:>5.2f}" for d in depths))
        for length in pk["lengths"]:
            row = {c["depth"]: c["accuracy"] for c in pk["cells"] if c["length"] == length}
            lines.append(f"  {length:>14} " + " ".join(f"{row.get(d, float('nan')):>5.2f}"
                                                        for d in depths))
    if out is not None:
        lines.append(f"results: {out / RESULTS_FILE}"
                     + (f"; heatmap: {results['heatmap']}" if results["heatmap"] else ""))
    return "\n".join(lines)
