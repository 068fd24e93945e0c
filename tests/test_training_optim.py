"""Optimizer (CPU path of megatron's FP32Optimizer) and the lr schedule."""

from __future__ import annotations

import pytest
import torch
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensor
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

from nemo_dmc.core import DMCConfig, ModelConfig, Stage
from nemo_dmc.megatron.model import build_model
from nemo_dmc.training.config import OptimConfig
from nemo_dmc.training.optim import build_optimizer, build_scheduler
from nemo_dmc.training.plan import StagePlan

MICRO = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                    ffn_hidden_size=128, vocab_size=256, seq_length=32)


def micro_ddp() -> DistributedDataParallel:
    model = build_model(MICRO, DMCConfig())
    return DistributedDataParallel(model.config, DistributedDataParallelConfig(), model)


def plan(steps: int = 10, warmup: int = 0, decay: str = "cosine") -> StagePlan:
    return StagePlan(Stage.RETROFIT, steps=steps, tokens_per_step=64, lr=1e-3, min_lr=1e-4,
                     warmup_steps=warmup, decay_style=decay, budget_source="test")


def test_schedule_warms_up_then_decays_to_min_lr_at_the_last_step(megatron_tp1):
    optim = OptimConfig()
    optimizer = build_optimizer(micro_ddp(), optim, plan(warmup=2), bf16=False)
    scheduler = build_scheduler(optimizer, optim, plan(warmup=2))
    lrs = [optimizer.param_groups[0]["lr"]]
    for _ in range(10):
        scheduler.step(1)
        lrs.append(optimizer.param_groups[0]["lr"])
    assert lrs[0] == 0.0 and lrs[1] == pytest.approx(5e-4) and lrs[2] == pytest.approx(1e-3)
    assert all(a > b for a, b in zip(lrs[2:], lrs[3:]))
    assert lrs[-1] == pytest.approx(1e-4)


def test_norm_weights_get_no_weight_decay(megatron_tp1):
    ddp = micro_ddp()
    optimizer = build_optimizer(ddp, OptimConfig(weight_decay=0.1), plan(), bf16=False)
    build_scheduler(optimizer, OptimConfig(weight_decay=0.1), plan())
    decay_of = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    for name, param in ddp.named_parameters():
        assert decay_of[id(param)] == (0.0 if param.ndim == 1 else 0.1), name


def test_decision_adapters_learn_at_their_own_lr_multiple(megatron_tp1):
    model = build_model(MICRO, DMCConfig(decision_source="adapter"))
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(), model)
    optim = OptimConfig(decision_lr_mult=100.0)
    optimizer = build_optimizer(ddp, optim, plan(), bf16=False)
    scheduler = build_scheduler(optimizer, optim, plan())
    scheduler.step(1)
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    names = [name for name, _ in ddp.named_parameters()]
    assert any("decision_adapter" in n for n in names)
    adapter = {lr_of[id(p)] for n, p in ddp.named_parameters() if "decision_adapter" in n}
    rest = {lr_of[id(p)] for n, p in ddp.named_parameters() if "decision_adapter" not in n}
    assert len(adapter) == len(rest) == 1
    assert adapter.pop() == pytest.approx(100.0 * rest.pop())


def test_gradients_are_clipped_to_the_global_norm(megatron_tp1):
    ddp = micro_ddp()
    optimizer = build_optimizer(ddp, OptimConfig(clip_grad=1.0), plan(), bf16=False)
    numel = 0
    for param in ddp.parameters():
        param.main_grad.fill_(2.0)
        numel += param.numel()
    _, grad_norm, _ = optimizer.step()
    assert grad_norm == pytest.approx(2.0 * numel ** 0.5)
    clipped = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in ddp.parameters()))
    assert float(clipped) == pytest.approx(1.0, rel=1e-5)


def test_optimizer_state_is_sharded_like_its_parameters(megatron_tp1):
    ddp = micro_ddp()
    optimizer = build_optimizer(ddp, OptimConfig(), plan(), bf16=False)
    for param in ddp.parameters():
        param.main_grad.normal_()
    optimizer.step()
    model_state = ddp.sharded_state_dict()
    state = optimizer.sharded_state_dict(model_state)
    param = model_state["module.decoder.layers.0.self_attention.linear_qkv.weight"]
    shards = {(t.key, t.global_offset): t for t in nested_values(state)
              if isinstance(t, ShardedTensor)}
    exp_avg = shards[(f"optimizer.state.exp_avg.{param.key}", param.global_offset)]
    assert exp_avg.global_shape == param.global_shape
    assert exp_avg.axis_fragmentations == param.axis_fragmentations


def test_a_fresh_optimizer_is_primed_with_one_common_step_before_loading(megatron_tp1):
    """megatron's distributed optimizer over torch Adam reads one common ``step`` from the
    inner state while building a loading request; a fresh optimizer has none until primed."""
    from nemo_dmc.training.optim import prime_state_for_loading

    optimizer = build_optimizer(micro_ddp(), OptimConfig(), plan(), bf16=False)
    inner = optimizer.optimizer
    assert not inner.state
    prime_state_for_loading(optimizer)
    params = [p for group in inner.param_groups for p in group["params"]]
    assert len(inner.state) == len(params) > 0
    steps = {s["step"].item() for s in inner.state_dict()["state"].values()}
    assert steps == {0.0}
    for param in params:
        state = inner.state[param]
        assert state["exp_avg"].shape == param.shape and not state["exp_avg"].any()
        assert not state["exp_avg_sq"].any()
    trained = {id(p): inner.state[p]["exp_avg"] for p in params}
    prime_state_for_loading(optimizer)  # a state already there is kept
    assert all(inner.state[p]["exp_avg"] is trained[id(p)] for p in params)
