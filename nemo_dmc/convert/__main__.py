"""``python -m nemo_dmc.convert``: checkpoint conversion subcommands.

    python -m nemo_dmc.convert import-hf --input <hf_dir | model.gguf> --output <dir>
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence


def _import_hf(args: argparse.Namespace) -> int:
    from nemo_dmc.convert.checkpoint_dir import save_weights_checkpoint
    from nemo_dmc.convert.hf_import import hf_to_megatron, load_hf_checkpoint
    from nemo_dmc.megatron import parallel
    from nemo_dmc.megatron.model import build_model

    print(f"[convert] reading {args.input}", flush=True)
    checkpoint = load_hf_checkpoint(args.input)
    parallel.initialize(tensor_parallel_size=1, seed=0)
    try:
        model = build_model(checkpoint.model, dmc=None)
        result = model.load_state_dict(hf_to_megatron(checkpoint.state, checkpoint.model),
                                       strict=False)
        missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
        if missing or result.unexpected_keys:
            raise ValueError(f"shape/key mismatch importing {args.input}: missing {missing}, "
                             f"unexpected {result.unexpected_keys}")
        out = save_weights_checkpoint(model, checkpoint.model, Path(args.output))
    finally:
        parallel.shutdown()
    n = sum(t.numel() for t in checkpoint.state.values())
    print(f"[convert] wrote {out} ({n / 1e6:.1f} M parameters, {checkpoint.model.num_layers} "
          f"layers, {checkpoint.model.num_attention_heads} heads / "
          f"{checkpoint.model.kv_heads} KV groups)", flush=True)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nemo_dmc.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import-hf", help="Hugging Face directory or GGUF file -> weights checkpoint")
    imp.add_argument("--input", required=True, type=Path)
    imp.add_argument("--output", required=True, type=Path)
    imp.set_defaults(func=_import_hf)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
