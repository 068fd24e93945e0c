"""Parse a bench script's command line without running it (bench/gpu_check.sh --dry-run).

Runs ``SCRIPT`` as ``__main__`` with ``ARGS`` until its ``argparse`` parser returns, prints the
parsed namespace and exits 0; a flag the script lacks or a bad value exits 2 as argparse
does. So the GPU command lines of bench/gpu_check.sh are checked on a CPU machine, at the
cost of the script's imports only.

Usage: python bench/gpu_check_args.py bench/decode.py --device cuda --shape gpu ...
"""

from __future__ import annotations

import argparse
import os
import runpy
import sys


class _Parsed(Exception):
    pass


def main() -> int:
    if len(sys.argv) < 2:
        print(__doc__)
        return 2
    script, args = sys.argv[1], sys.argv[2:]
    original = argparse.ArgumentParser.parse_args

    def parse_only(self, *a, **k):
        namespace = original(self, *a, **k)
        print(f"{script}: parsed {vars(namespace)}")
        raise _Parsed

    argparse.ArgumentParser.parse_args = parse_only
    sys.argv = [script, *args]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))  # as `python SCRIPT` would
    try:
        runpy.run_path(script, run_name="__main__")
    except _Parsed:
        return 0
    print(f"{script}: returned without parsing its arguments")
    return 1


if __name__ == "__main__":
    sys.exit(main())
