"""dist_checkpointing checkpoints: round trip, atomic layout, pruning, NeMo 2 weights."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from megatron.core import dist_checkpointing

from nemo_dmc.checkpoints.run_dir import Progress, latest_checkpoint, list_checkpoints, read_progress
from nemo_dmc.checkpoints.weights import load_weights_checkpoint
from nemo_dmc.training import checkpoint as checkpoint_module
from nemo_dmc.training.checkpoint import load_checkpoint, save_checkpoint
from nemo_dmc.training.config import OptimConfig
from nemo_dmc.training.optim import build_optimizer, build_scheduler
from test_training_optim import micro_ddp, plan


def trainer():
    ddp = micro_ddp()
    optimizer = build_optimizer(ddp, OptimConfig(), plan(), bf16=False)
    return ddp, optimizer, build_scheduler(optimizer, OptimConfig(), plan())


def one_step(ddp, optimizer, scheduler) -> None:
    for param in ddp.parameters():
        param.main_grad.normal_()
    optimizer.step()
    scheduler.step(1)


def progress(step: int) -> Progress:
    return Progress("retrofit", step, 10, consumed_samples=8 * step, tensor_parallel_size=1,
                    data_parallel_size=1)


def snapshot(ddp, optimizer, scheduler) -> dict:
    return {"params": [p.detach().clone() for p in ddp.parameters()],
            "exp_avg": [optimizer.optimizer.state[p]["exp_avg"].clone() for p in ddp.parameters()],
            "lr": optimizer.param_groups[0]["lr"], "sched": scheduler.num_steps,
            "rng": (torch.rand(3), random.random())}


def test_checkpoint_round_trip_restores_model_optimizer_schedule_and_rng(megatron_tp1, tmp_path):
    ddp, optimizer, scheduler = trainer()
    one_step(ddp, optimizer, scheduler)
    path = save_checkpoint(tmp_path, ddp, optimizer, scheduler, progress(1), keep_last=2)
    before = snapshot(ddp, optimizer, scheduler)
    one_step(ddp, optimizer, scheduler)  # drift away from the checkpoint

    fresh = trainer()
    torch.manual_seed(999)  # scramble the generators: the load must restore them
    random.seed(999)
    restored = load_checkpoint(path, *fresh)
    after = snapshot(*fresh)
    assert restored == progress(1)
    for key in ("params", "exp_avg"):
        assert all(torch.equal(a, b) for a, b in zip(before[key], after[key]))
    assert (before["lr"], before["sched"]) == (after["lr"], after["sched"])
    assert torch.equal(before["rng"][0], after["rng"][0]) and before["rng"][1] == after["rng"][1]


def test_an_unfinished_temporary_save_is_not_a_checkpoint(megatron_tp1, tmp_path):
    ddp, optimizer, scheduler = trainer()
    save_checkpoint(tmp_path, ddp, optimizer, scheduler, progress(3), keep_last=2)
    (tmp_path / ".tmp-step_0000005").mkdir()
    assert latest_checkpoint(tmp_path) == tmp_path / "step_0000003"
    assert read_progress(latest_checkpoint(tmp_path)).step == 3


def test_a_save_that_fails_midway_leaves_the_previous_checkpoint_the_latest(
        megatron_tp1, tmp_path, monkeypatch):
    ddp, optimizer, scheduler = trainer()
    save_checkpoint(tmp_path, ddp, optimizer, scheduler, progress(3), keep_last=2)

    def crash(state, directory, *args, **kwargs):
        (Path(directory) / "metadata.json").write_text("{}")  # a partial write, then a crash
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint_module.dist_checkpointing, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, ddp, optimizer, scheduler, progress(5), keep_last=2)
    monkeypatch.undo()
    assert not (tmp_path / "step_0000005").exists()
    assert [step for step, _ in list_checkpoints(tmp_path)] == [3]
    assert latest_checkpoint(tmp_path) == tmp_path / "step_0000003"
    assert read_progress(latest_checkpoint(tmp_path)).step == 3
    # the next save of that step replaces the leftover temporary directory
    save_checkpoint(tmp_path, ddp, optimizer, scheduler, progress(5), keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_0000003", "step_0000005"]


def test_only_the_newest_checkpoints_are_kept(megatron_tp1, tmp_path):
    ddp, optimizer, scheduler = trainer()
    for step in (2, 4, 6):
        save_checkpoint(tmp_path, ddp, optimizer, scheduler, progress(step), keep_last=2)
    assert [step for step, _ in list_checkpoints(tmp_path)] == [4, 6]


def test_model_weights_load_from_a_nemo2_checkpoint_directory(megatron_tp1, tmp_path: Path):
    source = micro_ddp()
    # NeMo 2 layout: <ckpt>/weights holds GPTModel.sharded_state_dict(prefix="module.").
    (tmp_path / "weights").mkdir()
    dist_checkpointing.save(source.module.sharded_state_dict(prefix="module."),
                            str(tmp_path / "weights"))
    target = micro_ddp()
    torch.nn.init.zeros_(next(target.parameters()))
    assert load_weights_checkpoint(target, tmp_path) == tmp_path / "weights"
    for a, b in zip(source.parameters(), target.parameters()):
        assert torch.equal(a, b)
