"""``python -m nemo_dmc.convert``: checkpoint conversion subcommands.

    python -m nemo_dmc.convert import-hf       --input <hf_dir | model.gguf> --output <dir>
    python -m nemo_dmc.convert import-megatron --input <Megatron-LM save dir> --output <dir>
    python -m nemo_dmc.convert export-nemo --input <run | stage | step_N | weights dir> --output <dir>
    python -m nemo_dmc.convert export-hf   --input <run | stage | step_N | weights dir> --output <dir>

``import-megatron`` reads Megatron-LM's torch format (``iter_*/mp_rank_NN/model_optim_rng.pt``,
e.g. NVIDIA's released DMC Llama 2 models), any tensor-parallel size, and records the run's
DMC settings beside the weights; ``--trust-pickle`` lifts its allow-list of pickled types.

Exports are compressed models when the checkpoint records DMC settings (a nemo-dmc training
run, which also records the trained ``method``; an ``import-megatron`` checkpoint; a NeMo 2
DMC context): ``export-hf`` writes the run's KV method (DMC, or DMS with the run's
``window``; ``--method`` / ``--window`` pick another), ``export-nemo`` a DMC model (a NeMo 2
context records DMC settings only: a DMS run is refused unless ``--format plain`` or
``--format dmc`` says which model to write); plain Llama otherwise. ``--format dmc|plain``
overrides.

``--output`` must be a new or empty folder (``--overwrite`` replaces an existing one, old
contents kept until the new output is complete), and may not equal or contain the input.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Optional, Sequence

OVERWRITE_HELP = "replace an existing, non-empty --output"


def _import_method(checkpoint, state):
    """The KV method whose parameters the imported weights carry beside the base model's:
    a ``dmc_llama`` export's DMC settings when it holds decision adapters (saved with the
    weights; train or load them with ``dmc.decision_source=adapter``), else ``None``."""
    from nemo_dmc.methods import ADAPTER_MODULE, settings_from_dict

    if not any(f".{ADAPTER_MODULE}." in name for name in state):
        return None
    method = settings_from_dict(checkpoint.hf_config.kv_method, key="config.json kv_method")
    if getattr(method, "decision_source", None) != "adapter":
        raise ValueError("the checkpoint holds decision adapters but its config.json kv_method "
                         f"does not use them ({method})")
    print("[convert] carrying the decision adapters: load the weights with "
          "dmc.decision_source=adapter to use them", flush=True)
    return method


def _save_imported(source: Path, state, shape, output: Path, progress, method=None,
                   special_tokens=None, dmc=None) -> Path:
    """Load a converted full state dict into a TP=1 model of ``shape`` (every tensor must
    fit) and write it as a weights checkpoint."""
    from nemo_dmc.checkpoints.layout import match_layout
    from nemo_dmc.checkpoints.weights import save_weights_checkpoint
    from nemo_dmc.megatron import parallel
    from nemo_dmc.megatron.model import build_model

    parallel.initialize(tensor_parallel_size=1, seed=0)
    try:
        model = build_model(shape, method=method)
        result = model.load_state_dict(match_layout(state, model.state_dict()), strict=False)
        missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
        if missing or result.unexpected_keys:
            raise ValueError(f"shape/key mismatch importing {source}: missing {missing}, "
                             f"unexpected {result.unexpected_keys}")
        progress(f"saving weights to {output}")
        out = save_weights_checkpoint(model, shape, Path(output), special_tokens=special_tokens,
                                      dmc=dmc)
        progress("saved")
    finally:
        parallel.shutdown()
    return out


def _imported(out: Path, parameters: int, shape) -> str:
    return (f"[convert] wrote {out} ({parameters / 1e6:.1f} M parameters, {shape.num_layers} "
            f"layers, {shape.num_attention_heads} heads / {shape.kv_heads} KV groups)")


def _import_hf(args: argparse.Namespace) -> int:
    from nemo_dmc.convert.hf_import import hf_to_megatron, load_hf_checkpoint
    from nemo_dmc.convert.progress import Progress

    print(f"[convert] reading {args.input}", flush=True)
    progress = Progress()
    checkpoint = load_hf_checkpoint(args.input, progress)
    state = hf_to_megatron(checkpoint.state, checkpoint.model, progress=progress)
    method = _import_method(checkpoint, state)
    out = _save_imported(args.input, state, checkpoint.model, args.output, progress,
                         method=method, special_tokens=checkpoint.special_tokens)
    print(_imported(out, checkpoint.num_parameters, checkpoint.model), flush=True)
    return 0


def _import_megatron(args: argparse.Namespace) -> int:
    from nemo_dmc.convert.megatron_import import load_megatron_checkpoint
    from nemo_dmc.convert.progress import Progress

    print(f"[convert] reading {args.input}", flush=True)
    progress = Progress()
    checkpoint = load_megatron_checkpoint(args.input, args.vocab_size, args.trust_pickle,
                                          progress)
    if args.vocab_size is None:
        print(f"[convert] note: keeping all {checkpoint.model.vocab_size} embedding rows "
              "(args.padded_vocab_size, Megatron's padding included); --vocab-size trims them "
              "to the tokenizer's vocabulary (32000 for Llama 2)", flush=True)
    print("[convert] DMC settings: " + (str(checkpoint.dmc) if checkpoint.dmc is not None else
                                        "none in the args (a plain model)"), flush=True)
    out = _save_imported(args.input, checkpoint.state, checkpoint.model, args.output, progress,
                         dmc=checkpoint.dmc)
    print(_imported(out, checkpoint.num_parameters, checkpoint.model), flush=True)
    return 0


def _load_for_export(args: argparse.Namespace):
    """(model, model_config, dmc or None, resolved) for an export subcommand."""
    from nemo_dmc.core import DMCConfig, ModelConfig
    from nemo_dmc.inference.loading import build_inference_model

    print(f"[convert] loading {args.input}", flush=True)
    model, shape, dmc, resolved = build_inference_model(args.input, ModelConfig(), DMCConfig(),
                                                        key="--input")
    trained = resolved.run_config is not None or resolved.dmc_config is not None
    use_dmc = args.format == "dmc" or (args.format == "auto" and trained)
    print(f"[convert] {shape.num_layers} layers, {shape.num_attention_heads} heads / "
          f"{shape.kv_heads} KV groups; exporting "
          f"{'a compressed model' if use_dmc else 'plain Llama'}", flush=True)
    return model, shape, (dmc if use_dmc else None), resolved


def _export_tokenizer(args: argparse.Namespace, resolved):
    """The tokenizer an export ships: ``--tokenizer``, else the run's, with the special
    tokens a weights checkpoint recorded; ``(tokenizer or None, recorded special tokens)``."""
    from nemo_dmc.checkpoints.resolve import find_tokenizer_path
    from nemo_dmc.checkpoints.weights import read_special_tokens
    from nemo_dmc.data.tokenizer import load_tokenizer

    tokenizer_path = find_tokenizer_path(args.tokenizer, resolved)
    special = read_special_tokens(resolved.path) if resolved.kind == "weights" else None
    if tokenizer_path is None:
        return None, special
    print(f"[convert] tokenizer from {tokenizer_path}", flush=True)
    return load_tokenizer(tokenizer_path, special_tokens=special), special


def _export_nemo(args: argparse.Namespace) -> int:
    from nemo_dmc.megatron import parallel

    parallel.initialize(tensor_parallel_size=1, seed=0)
    try:
        model, shape, dmc, resolved = _load_for_export(args)
        trained = resolved.recorded_method()  # (method, window) or None
        if dmc is not None and trained is not None and trained[0] != "dmc":
            if args.format == "auto":
                raise ValueError(
                    f"--input: {resolved.path} was trained with method={trained[0]}, which a "
                    "NeMo 2 checkpoint cannot record (its context holds DMC settings only): "
                    "use export-hf (records the method), --format plain (a plain Llama) or "
                    "--format dmc (the weights run as DMC: not the model that was trained)")
            print(f"[convert] note: the checkpoint was trained with method={trained[0]}; "
                  "exporting it as DMC (--format dmc) is a different model from the one "
                  "trained", flush=True)
        from nemo_dmc.nemo.checkpoint import export_nemo_checkpoint, recorded_stage_settings

        settings = recorded_stage_settings(resolved)
        if dmc is not None:
            print(f"[convert] NeMo DMC settings: {dmc}, " +
                  ", ".join(f"{k}={v}" for k, v in settings.items()), flush=True)
        tokenizer, _ = _export_tokenizer(args, resolved)
        with tempfile.TemporaryDirectory() as tmp:
            tokenizer_dir = None
            if tokenizer is not None:  # saved as export-hf ships it; NeMo copies the folder
                from nemo_dmc.checkpoints.nemo_context import NEMO_TOKENIZER
                from nemo_dmc.convert.hf_export import export_tokenizer

                tokenizer_dir = Path(tmp) / NEMO_TOKENIZER  # NeMo keeps the folder's name
                export_tokenizer(tokenizer).save_pretrained(str(tokenizer_dir))
            out = export_nemo_checkpoint(model, shape, dmc, args.output, **settings,
                                         tokenizer_dir=tokenizer_dir)
    finally:
        parallel.shutdown()
    print(f"[convert] wrote NeMo 2 checkpoint {out}", flush=True)
    return 0


def _export_hf(args: argparse.Namespace) -> int:
    from nemo_dmc.checkpoints.sharding import gather_full_state
    from nemo_dmc.convert.hf_export import save_hf_checkpoint
    from nemo_dmc.convert.progress import Progress
    from nemo_dmc.megatron import parallel

    progress = Progress()
    parallel.initialize(tensor_parallel_size=1, seed=0)
    try:
        model, shape, dmc, resolved = _load_for_export(args)
        from nemo_dmc.core import DMCConfig
        from nemo_dmc.methods import choose_method, settings_for

        method = dmc
        if args.method is not None or args.window is not None or dmc is not None:
            # --method, else the run's own (dmc or dms, with its window) when exporting its method
            choice = choose_method(args.method, args.window, resolved.recorded_method(),
                                   method_key="--method", window_key="--window")
            if choice.note is not None:
                print(f"[convert] {choice.note}", flush=True)
            method = settings_for(choice.method, dmc or DMCConfig(), args.ratio, args.sinks,
                                  choice.window)
            print(f"[convert] exporting with the {choice.method} KV method"
                  + (" (the run's)" if choice.source == "run" else "") + f": {method}",
                  flush=True)
        tokenizer, special = _export_tokenizer(args, resolved)
        progress(f"loaded {args.input}")
        out = save_hf_checkpoint(gather_full_state(model), shape, args.output, method=method,
                                 tokenizer=tokenizer, special_tokens=special, progress=progress)
        progress("saved")
    finally:
        parallel.shutdown()
    print(f"[convert] wrote Hugging Face checkpoint {out}", flush=True)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    from nemo_dmc.quiet import quiet_third_party

    quiet_third_party()
    parser = argparse.ArgumentParser(prog="python -m nemo_dmc.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import-hf", help="Hugging Face directory or GGUF file -> weights checkpoint")
    imp.add_argument("--input", required=True, type=Path)
    imp.add_argument("--output", required=True, type=Path)
    imp.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    imp.set_defaults(func=_import_hf)
    meg = sub.add_parser("import-megatron",
                         help="Megatron-LM torch checkpoint (NVIDIA's DMC models) -> weights "
                              "checkpoint with its DMC settings")
    meg.add_argument("--input", required=True, type=Path,
                     help="save dir with latest_checkpointed_iteration.txt, or an iter_* dir")
    meg.add_argument("--output", required=True, type=Path)
    meg.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    meg.add_argument("--vocab-size", type=int, default=None,
                     help="the tokenizer's vocabulary: trims Megatron's padded embedding rows "
                          "(default: keep args.padded_vocab_size rows)")
    meg.add_argument("--trust-pickle", action="store_true",
                     help="load model_optim_rng.pt unrestricted (runs any code it names); "
                          "only for files from a source you trust")
    meg.set_defaults(func=_import_megatron)
    for name, func, text in (("export-nemo", _export_nemo, "checkpoint -> NeMo 2 directory"),
                             ("export-hf", _export_hf, "checkpoint -> HF safetensors dir")):
        exp = sub.add_parser(name, help=text)
        exp.add_argument("--input", required=True, type=Path)
        exp.add_argument("--output", required=True, type=Path)
        exp.add_argument("--format", choices=("auto", "dmc", "plain"), default="auto",
                         help="auto: the run's compressed model for a training run, plain "
                              "Llama otherwise; dmc: a compressed model (export-hf: the run's "
                              "method, DMC or DMS; export-nemo: DMC); plain: plain Llama")
        exp.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
        exp.add_argument("--tokenizer", type=Path, default=None,
                         help="HF dir, tokenizer.json or .gguf (default: the run's); "
                              "shipped with the export (NeMo: in context/)")
        if name == "export-hf":
            exp.add_argument("--method", default=None,
                             help="KV method of the export (dmc, dms, vanilla, h2o, tova, "
                                  "streaming; default: the checkpoint's own, the method its "
                                  "run trained, see --format)")
            exp.add_argument("--ratio", type=float, default=None,
                             help="compression ratio of an eviction --method")
            exp.add_argument("--sinks", type=int, default=4,
                             help="attention sinks of --method streaming")
            exp.add_argument("--window", type=int, default=None,
                             help="eviction delay of --method dms (default: the run's "
                                  "when it trained dms, else DMSConfig's)")
        exp.set_defaults(func=func)
    args = parser.parse_args(argv)
    from nemo_dmc.checkpoints.atomic import check_output

    try:
        check_output(args.output, (args.input, getattr(args, "tokenizer", None)), args.overwrite)
        return args.func(args)
    except (FileNotFoundError, FileExistsError, ValueError, KeyError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err  # no repr quotes
        print(f"error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
