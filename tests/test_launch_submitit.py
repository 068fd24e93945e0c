"""hydra-submitit-launcher: a --multirun sweep with submitit_local runs one job per value."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from nemo_dmc.train import CONFIG_DIR

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_submitit_local_sweep_runs_one_training_job_per_value(tmp_path):
    command = [sys.executable, "-m", "nemo_dmc.train", "--multirun", "hydra/launcher=submitit_local",
               f"hydra.sweep.dir={tmp_path}", "model=micro", "data=random", "logging=quiet",
               "stage=retrofit", "stage.retrofit.steps=2", "dmc.target_cr=2,3"]
    # An inherited MASTER_PORT must not make the two concurrent jobs collide.
    env = {**os.environ, "MASTER_PORT": "29533"}
    env = {k: v for k, v in env.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900,
                            env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    final_targets = set()
    for job in ("0", "1"):
        records = [json.loads(line) for line in (tmp_path / job / "metrics.jsonl").open()]
        final_targets.add(records[-2]["target_cr"])  # the last training step (then validation)
        assert (tmp_path / job / "checkpoints" / "retrofit" / "step_0000002").is_dir()
    assert final_targets == {2.0, 3.0}


@pytest.mark.parametrize("launcher, target, expected", [
    ("dmc_slurm", "SlurmLauncher", {"nodes": 4, "tasks_per_node": 8, "gpus_per_node": 8,
                                    "max_num_timeout": 10, "timeout_min": 2880}),
    ("dmc_local", "LocalLauncher", {"tasks_per_node": 1, "timeout_min": 120}),
])
def test_dmc_launcher_configs_compose_with_the_training_config(launcher, target, expected):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[f"hydra/launcher={launcher}", "run_dir=/tmp/unused"],
                      return_hydra_config=True)
    settings = cfg.hydra.launcher
    assert settings._target_ == f"hydra_plugins.hydra_submitit_launcher.submitit_launcher.{target}"
    assert {key: settings[key] for key in expected} == expected
