"""Environment check of bench/gpu_check.sh: versions, the GPU, and the imports its steps need.

Prints one line per item and exits non-zero when something the steps need is missing:
torch, triton, numpy (with ``np.product``, which megatron-core 0.15's dist_checkpointing calls;
numpy 2 needs the alias setup writes),
megatron.core, hydra, omegaconf, and ``nemo_dmc.kernels`` resolving to this checkout's
``kernels/``. With ``--require-cuda`` a missing CUDA device is an error too. Transformer Engine
and NeMo are reported only (their gpu tests skip without them).

Usage: python bench/gpu_check_env.py [--require-cuda]
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
REQUIRED = ["torch", "triton", "numpy", "megatron.core", "hydra", "omegaconf", "yaml",
            "tensorboard", "psutil"]
OPTIONAL = ["transformer_engine", "nemo", "transformers", "flash_attn"]


def _version(name: str) -> str:
    module = importlib.import_module(name)
    version = getattr(module, "__version__", None)
    if version is None and name == "megatron.core":
        from megatron.core import package_info

        version = package_info.__version__
    return f"{version or '?'} ({Path(module.__file__).parent})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--require-cuda", action="store_true")
    args = parser.parse_args()
    errors = []
    print(f"python {platform.python_version()} ({sys.executable}), {platform.machine()}")
    for name in REQUIRED:
        try:
            print(f"{name} {_version(name)}")
        except Exception as err:  # noqa: BLE001 - report every missing piece
            errors.append(f"{name}: {type(err).__name__}: {err}")
    for name in OPTIONAL:
        try:
            print(f"{name} {_version(name)} (optional)")
        except Exception as err:  # noqa: BLE001
            print(f"{name}: not usable ({type(err).__name__}); its tests skip (optional)")
    try:
        import numpy
        import torch

        torch.from_numpy(numpy.ones(2))  # torch and numpy must agree on the ABI
        if not hasattr(numpy, "product"):
            errors.append(f"numpy {numpy.__version__} lacks np.product (megatron-core 0.15's "
                          "dist_checkpointing calls it; setup aliases it to np.prod)")
    except Exception as err:  # noqa: BLE001
        errors.append(f"numpy/torch interop: {type(err).__name__}: {err}")
    try:
        import nemo_dmc.kernels

        where = Path(nemo_dmc.kernels.__path__[0]).resolve()
        print(f"nemo_dmc.kernels from {where}")
        if where != (REPO / "kernels").resolve():
            errors.append(f"nemo_dmc.kernels resolves to {where}, not {REPO / 'kernels'}")
    except Exception as err:  # noqa: BLE001
        errors.append(f"nemo_dmc.kernels: {type(err).__name__}: {err}")
    try:
        import torch

        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            print(f"cuda device {props.name}, capability {props.major}.{props.minor}, "
                  f"{props.multi_processor_count} SMs, {props.total_memory / 2**30:.1f} GiB, "
                  f"torch cuda {torch.version.cuda}")
        else:
            print("cuda: not available")
            if args.require_cuda:
                errors.append("no CUDA device")
    except Exception as err:  # noqa: BLE001
        errors.append(f"cuda query: {type(err).__name__}: {err}")
    print(f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')!r}, "
          f"NEMO_DMC_KERNELS={os.environ.get('NEMO_DMC_KERNELS', 'auto')!r}")
    for line in errors:
        print(f"ERROR {line}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
