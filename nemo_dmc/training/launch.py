"""Rendezvous environment for ``torch.distributed`` (env:// init) under every launcher.

* ``torchrun`` (or anything that sets ``RANK``/``WORLD_SIZE``): used as is.
* ``srun`` (one task per process; SLURM's ``SLURM_PROCID``/``SLURM_NTASKS``/
  ``SLURM_JOB_NODELIST``), and hydra-submitit-launcher jobs (``submitit_slurm``,
  ``submitit_local``): rank, world size, local rank from the job environment; the master is
  the first host of the allocation (or ``MASTER_ADDR``); a single-task job takes a free local
  port, a multi-task job derives its port from the job id, below the kernel's ephemeral range
  so no outgoing connection holds it (under srun, an exported ``MASTER_PORT`` is used instead).
* a plain ``python -m nemo_dmc.train``: one process on a free local port.
"""

from __future__ import annotations

import os
import random
import socket
from contextlib import contextmanager
from typing import Dict, Iterator

_PORT_RANGE = (15000, 32000)  # below Linux's default ephemeral ports (32768-60999)


def free_port() -> int:
    """A TCP port that is free on this host right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _job_environment():
    """submitit's view of the current SLURM task or submitit job, or ``None``."""
    environ = os.environ
    if "SUBMITIT_EXECUTOR" in environ:
        from submitit import JobEnvironment

        return JobEnvironment()
    if "SLURM_PROCID" in environ and "SLURM_NTASKS" in environ:
        from submitit.slurm.slurm import SlurmJobEnvironment

        return SlurmJobEnvironment()
    return None


def rendezvous_env() -> Dict[str, str]:
    """The ``MASTER_ADDR``/``MASTER_PORT``/``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` to use."""
    environ = os.environ
    if "RANK" in environ and "WORLD_SIZE" in environ:
        return {key: environ[key] for key in ("MASTER_ADDR", "MASTER_PORT", "RANK",
                                              "WORLD_SIZE", "LOCAL_RANK") if key in environ}
    job = _job_environment()
    if job is None:  # one process: any free local port (an inherited one may be taken)
        return {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
                "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
    # The jobs of one sweep inherit the same environment but may share a node, so an inherited
    # MASTER_PORT is not used for submitit jobs. One task needs no agreement: any free port.
    # The tasks of a multi-task job agree on a port derived from the job id. Under srun, an
    # exported MASTER_PORT wins.
    port = None if "SUBMITIT_EXECUTOR" in environ else environ.get("MASTER_PORT")
    if port is None and job.num_tasks == 1:
        port = str(free_port())
    port = port or str(random.Random(job.job_id).randint(*_PORT_RANGE))
    return {"MASTER_ADDR": environ.get("MASTER_ADDR") or job.hostnames[0],
            "MASTER_PORT": port, "RANK": str(job.global_rank),
            "WORLD_SIZE": str(job.num_tasks), "LOCAL_RANK": str(job.local_rank)}


def export_rendezvous_env() -> int:
    """Write :func:`rendezvous_env` into ``os.environ``; return the world size."""
    env = rendezvous_env()
    os.environ.update(env)
    return int(env["WORLD_SIZE"])


@contextmanager
def local_rendezvous() -> Iterator[None]:
    """:func:`export_rendezvous_env` for an in-process job (conversion, evaluation), then put
    the launcher variables back as they were, so later subprocesses do not inherit a stale
    ``RANK``/``MASTER_PORT``. Changes nothing if ``torch.distributed`` is already initialised."""
    import torch.distributed as dist

    if dist.is_initialized():
        yield
        return
    keys = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")
    saved = {key: os.environ.get(key) for key in keys}
    export_rendezvous_env()
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
