"""Writing a checkpoint directory atomically from every rank: a temporary directory beside
the target, renamed into place by rank 0 once complete."""

from __future__ import annotations

import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch.distributed as dist


def is_rank0() -> bool:
    """Global rank 0, or a process without ``torch.distributed``."""
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


@contextmanager
def atomic_checkpoint_dir(output: Path, subdirs: tuple[str, ...] = ()) -> Iterator[Path]:
    """Yield a temporary directory beside ``output`` (with ``subdirs``) for every rank to
    write into; on success rank 0 renames it to ``output``, replacing an older one only
    once the new one is complete; on an error it is removed. All ranks must enter it."""
    output = Path(output)
    tmp = output.with_name(f".tmp-{output.name}")
    if is_rank0():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for sub in subdirs:
            (tmp / sub).mkdir()
    _barrier()
    try:
        yield tmp
    except BaseException:
        if is_rank0():
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    _barrier()
    if is_rank0():
        shutil.rmtree(output, ignore_errors=True)
        tmp.rename(output)
    _barrier()
