"""Writing a checkpoint directory atomically from every rank: a temporary directory beside
the target, renamed into place by rank 0 once complete; and the checks a command makes
before it writes to a path the user named (:func:`check_output`)."""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, Optional

import torch.distributed as dist


def is_rank0() -> bool:
    """Global rank 0, or a process without ``torch.distributed``."""
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _absolute(path: Path) -> Path:
    """``path`` absolute, with ``..`` and symlinks resolved (``some/dir/..`` is ``some``)."""
    return Path(path).expanduser().resolve()


def _aside(output: Path) -> Path:
    """Where an older ``output`` waits while the new one is renamed in."""
    return output.with_name(f".old-{output.name}")


def _remove(path: Path) -> None:
    """Delete a directory tree, or a file or symlink (never what a symlink points to)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def recover_replaced(output: Path) -> None:
    """Finish a replace of ``output`` that was killed midway: put the older output back if
    the new one never arrived, else delete the older one that was left aside."""
    output = _absolute(output)
    old = _aside(output)
    if not (old.exists() or old.is_symlink()):
        return
    if output.exists() or output.is_symlink():
        _remove(old)
    else:
        old.rename(output)


def _refuse_enclosing_cwd(output: Path, flag: Optional[str] = None) -> None:
    """Refuse to replace the current directory or a folder containing it."""
    cwd = Path.cwd().resolve()
    if output == cwd or output in cwd.parents:
        fix = f"e.g. {flag} ./converted" if flag else "inside it"
        raise ValueError(f"{flag or 'output'} {output} is the current directory or contains "
                         f"it, which the output would replace: name a new folder, {fix}")


def check_output(output: Path, inputs: Iterable[Optional[Path]] = (), overwrite: bool = False,
                 flag: str = "--output") -> Path:
    """Refuse an ``output`` a command must not replace; return it resolved.

    Refused: the current directory or one containing it; an output equal to or containing
    one of ``inputs`` (compared resolved, so ``runs/x/..`` and symlinks count); and unless
    ``overwrite``, an existing file or non-empty directory. ``flag`` names the option in
    the messages (``--output``, ``--dst``).

    Raises:
        ValueError: the output is the current directory or contains an input.
        FileExistsError: the output exists, is not empty, and ``overwrite`` is false.
    """
    resolved = _absolute(output)
    recover_replaced(resolved)
    _refuse_enclosing_cwd(resolved, flag)
    for source in inputs:
        if source is None:
            continue
        source = _absolute(source)
        if resolved == source or resolved in source.parents:
            raise ValueError(f"{flag} {output} would replace the input {source} (the output "
                             "equals or contains it): write to another folder")
    if not overwrite and (resolved.is_file() or (resolved.is_dir() and any(resolved.iterdir()))):
        raise FileExistsError(f"{flag} {output} already exists and is not empty: choose a new "
                              "folder, or pass --overwrite to replace it")
    return resolved


@contextmanager
def atomic_checkpoint_dir(output: Path, subdirs: tuple[str, ...] = ()) -> Iterator[Path]:
    """Yield a temporary directory beside ``output`` (with ``subdirs``) for every rank to
    write into; on success rank 0 renames it to ``output``; on an error it is removed. All
    ranks must enter it.

    An existing ``output`` is replaced (commands check a user's path with
    :func:`check_output` first) without a moment where neither exists: it is renamed aside
    to ``.old-<name>``, the new one renamed in, then the old one deleted; a replace killed
    midway is finished by the next call (:func:`recover_replaced`).
    """
    output = _absolute(output)
    _refuse_enclosing_cwd(output)
    tmp = output.with_name(f".tmp-{output.name}")
    if is_rank0():
        recover_replaced(output)
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
        old = _aside(output)
        if output.exists() or output.is_symlink():
            os.replace(output, old)
        os.replace(tmp, output)
        _remove(old)
    _barrier()
