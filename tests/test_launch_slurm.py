"""Launching under SLURM: rendezvous from srun's task environment, and the sbatch recipe."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from megatron.core import dist_checkpointing

from nemo_dmc.training.launch import free_port, rendezvous_env

REPO = Path(__file__).resolve().parents[1]
SBATCH = REPO / "examples" / "slurm" / "dmc_llama2_7b.sbatch"
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SUBMITIT_EXECUTOR")


def clean_environ() -> dict:
    """This process's environment without launcher variables (other tests may set them)."""
    return {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}


def slurm_task_env(rank: int, tasks: int, nodelist: str, job_id: int) -> dict:
    return {"SLURM_PROCID": str(rank), "SLURM_NTASKS": str(tasks), "SLURM_LOCALID": str(rank),
            "SLURM_JOB_NODELIST": nodelist, "SLURM_JOB_ID": str(job_id),
            "SLURM_JOB_NUM_NODES": "1", "SLURM_NODEID": "0"}


def test_rendezvous_comes_from_the_slurm_task_environment(monkeypatch):
    for key in LAUNCH_VARS:
        monkeypatch.delenv(key, raising=False)
    env = {**slurm_task_env(5, 16, "gpu[07-08]", 4242), "SLURM_LOCALID": "1",
           "SLURM_JOB_NUM_NODES": "2", "SLURM_NODEID": "1"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    first = rendezvous_env()
    assert first == {**first, "MASTER_ADDR": "gpu07", "RANK": "5", "WORLD_SIZE": "16",
                     "LOCAL_RANK": "1"}
    # derived from the job id, below Linux's default ephemeral ports (32768-60999)
    assert 15000 <= int(first["MASTER_PORT"]) <= 32000
    assert rendezvous_env() == first  # every task of the job derives the same port


def test_torchrun_variables_take_precedence_over_slurm(monkeypatch):
    for key, value in {**slurm_task_env(5, 16, "gpu[07-08]", 4242), "RANK": "1",
                       "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.1",
                       "MASTER_PORT": "29400"}.items():
        monkeypatch.setenv(key, value)
    assert rendezvous_env() == {"MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29400", "RANK": "1",
                                "WORLD_SIZE": "2", "LOCAL_RANK": "1"}


@pytest.mark.slow
def test_two_srun_tasks_train_as_two_data_parallel_ranks(tmp_path):
    base = clean_environ()
    port, job_id = free_port(), 1000 + os.getpid()
    command = [sys.executable, "-m", "nemo_dmc.train", f"hydra.run.dir={tmp_path}", "model=micro",
               "data=random", "logging=quiet", "stage=retrofit", "stage.retrofit.steps=2"]
    tasks = [subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True, env={**base, **slurm_task_env(rank, 2, "localhost", job_id),
                                              "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"})
             for rank in range(2)]
    errors = [task.communicate(timeout=600)[1] for task in tasks]
    assert [task.returncode for task in tasks] == [0, 0], errors[0][-3000:] + errors[1][-3000:]
    final = tmp_path / "checkpoints" / "retrofit" / "step_0000002"
    progress = dist_checkpointing.load_common_state_dict(str(final))["progress"]
    assert progress["data_parallel_size"] == 2


@pytest.mark.parametrize("script, expected", [
    ("dmc_llama2_7b.sbatch", ("name: dmc_llama2_7b_cr4", "tensor_model_parallel_size: 4",
                              "hidden_size: 4096", "pipeline_model_parallel_size: 1")),
    ("dmc_llama2_70b.sbatch", ("name: dmc_llama2_70b_cr4", "tensor_model_parallel_size: 8",
                               "pipeline_model_parallel_size: 2", "hidden_size: 8192",
                               "num_query_groups: 8", "use_distributed_optimizer: true"))])
def test_sbatch_scripts_run_their_recipe_under_srun(tmp_path, script, expected):
    stubs = tmp_path / "bin"
    stubs.mkdir()
    (stubs / "scontrol").write_text("#!/bin/sh\nprintf 'node01\\nnode02\\n'\n")
    (stubs / "srun").write_text('#!/bin/sh\necho "srun: master $MASTER_ADDR:$MASTER_PORT"\n'
                                'while [ "${1#-}" != "$1" ]; do shift; done\nexec "$@"\n')
    for stub in stubs.iterdir():
        stub.chmod(0o755)
    env = {**clean_environ(), "PATH": f"{stubs}:{os.environ['PATH']}", "PYTHON": sys.executable,
           "SLURM_JOB_NODELIST": "node[01-02]", "SLURM_JOB_ID": "777", "REPO": str(REPO),
           "RUN_DIR": str(tmp_path / "run"), "BASE_CKPT": "/ckpt/llama2-7b",
           "TOKENIZER": "/ckpt/tok", "TRAIN_PREFIX": "/data/train", "VALID_PREFIX": "/data/valid"}
    # Hydra's --cfg job prints the composed config instead of training.
    result = subprocess.run(["bash", str(SBATCH.parent / script), "--cfg", "job"], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "srun: master node01:20777" in out
    for line in (*expected, "pretrained: /ckpt/llama2-7b", "- /data/train",
                 "global_batch_size: 1024"):
        assert line in out


def test_a_single_process_ignores_an_inherited_master_port(monkeypatch):
    for key in LAUNCH_VARS + ("SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(key, raising=False)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        monkeypatch.setenv("MASTER_PORT", port)
        env = rendezvous_env()
    assert (env["RANK"], env["WORLD_SIZE"]) == ("0", "1")
    assert env["MASTER_PORT"] != port


class _FakeSubmititJob:
    """What :mod:`submitit`'s JobEnvironment exposes to :func:`rendezvous_env`."""

    def __init__(self, job_id: str, tasks: int, rank: int) -> None:
        self.job_id, self.num_tasks, self.global_rank, self.local_rank = job_id, tasks, rank, rank
        self.hostnames = ["localhost"]


@pytest.mark.parametrize("tasks", [1, 2])
def test_submitit_job_ports_are_agreed_by_tasks_and_outside_the_ephemeral_range(monkeypatch,
                                                                                 tasks):
    from nemo_dmc.training import launch

    for key in LAUNCH_VARS:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "local")
    monkeypatch.setenv("MASTER_PORT", "29533")  # inherited by every job of a sweep: ignored
    envs = []
    for rank in range(tasks):
        monkeypatch.setattr(launch, "_job_environment",
                            lambda rank=rank: _FakeSubmititJob("4242", tasks, rank))
        envs.append(rendezvous_env())
    ports = {int(env["MASTER_PORT"]) for env in envs}
    assert [env["RANK"] for env in envs] == [str(r) for r in range(tasks)]
    assert 29533 not in ports
    if tasks > 1:  # all tasks meet on one port, below the kernel's ephemeral ports
        assert len(ports) == 1 and 15000 <= ports.pop() < 32768


def test_local_rendezvous_restores_the_launcher_variables(monkeypatch):
    from nemo_dmc.training.launch import local_rendezvous

    for key in LAUNCH_VARS + ("SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("MASTER_PORT", "29533")
    with local_rendezvous():
        assert os.environ["RANK"] == "0" and os.environ["MASTER_PORT"] != "29533"
    assert "RANK" not in os.environ and os.environ["MASTER_PORT"] == "29533"
