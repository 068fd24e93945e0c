"""One training at a time per run directory: ``<run_dir>/train.lock``.

The lock file records its holder (pid, host, start time) and is held with ``fcntl.flock``
for the whole run, so two starts cannot both win. A lock left by a run that died (same
host, its pid gone) is taken over, saying so; any other holder is refused by name. The
file is removed when the run ends.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

from nemo_dmc.training.config import ConfigError

LOCK_FILE = "train.lock"


@dataclass(frozen=True)
class LockHolder:
    """Who holds a run directory."""

    pid: int
    host: str
    since: str

    def describe(self) -> str:
        return f"pid {self.pid} on host {self.host} (since {self.since})"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _read_holder(fd: int) -> tuple[Optional[LockHolder], bool]:
    """The holder recorded in the open lock file (``None`` if unreadable), and whether the
    file is empty (new, or its holder is still writing it)."""
    data = os.pread(fd, 1 << 16, 0)
    try:
        return LockHolder(**json.loads(data)), False
    except (ValueError, TypeError):
        return None, not data.strip()


class RunLock:
    """The lock of one run directory, held by this process until :meth:`release`."""

    def __init__(self, path: Path, fd: int, holder: LockHolder) -> None:
        self.path, self._fd, self.holder = path, fd, holder

    def release(self) -> None:
        """Remove the lock file (if it is still this one) and drop the lock."""
        if self._fd < 0:
            return
        try:
            if os.stat(self.path).st_ino == os.fstat(self._fd).st_ino:
                os.unlink(self.path)
        except FileNotFoundError:
            pass
        os.close(self._fd)
        self._fd = -1


def _open_locked(path: Path) -> tuple[int, bool]:
    """Open (creating) ``path`` and try to lock it; returns ``(fd, locked)``. The fd is the
    file now at ``path`` (a lock file removed by its holder meanwhile is opened again)."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return fd, False
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd, True
        os.close(fd)  # its holder removed it while we opened it: try the new one


def _refuse(run_dir: Path, path: Path, holder: Optional[LockHolder], why: str) -> ConfigError:
    who = holder.describe() if holder else "another process"
    return ConfigError("run_dir", f"run_dir {run_dir} is in use by {who}{why}; wait for it to "
                       f"finish or choose another run_dir (if that training is gone, delete {path})")


def acquire_run_lock(run_dir: Path, note: Callable[[str], None] = print) -> RunLock:
    """Lock ``run_dir`` for this process; a stale lock (same host, dead pid) is taken over
    with a ``note``. Raises :class:`ConfigError` naming the holder otherwise."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    fd, locked = _open_locked(path)
    try:
        previous, empty = _read_holder(fd)
        if not locked:
            raise _refuse(run_dir, path, previous, "")
        if previous is None and not empty:
            raise _refuse(run_dir, path, None, f" (its lock file {path} is unreadable)")
        here = socket.gethostname()
        if previous is not None:
            if previous.host != here:
                raise _refuse(run_dir, path, previous, ", which this host cannot check")
            if _pid_alive(previous.pid):
                raise _refuse(run_dir, path, previous, ", which is still running")
            note(f"[run] taking over the stale lock {path} of {previous.describe()}: "
                 "that process is no longer running")
        me = LockHolder(os.getpid(), here, time.strftime("%Y-%m-%d %H:%M:%S %Z"))
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(asdict(me)).encode(), 0)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        raise
    return RunLock(path, fd, me)
