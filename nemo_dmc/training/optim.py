"""Adam with weight decay, gradient clipping and a warmup + decay schedule.

On GPU this is megatron-core's own optimizer (``get_megatron_optimizer``: fp32 main params
for bf16, optional distributed optimizer). On CPU, :class:`CPUAdamW` runs the same
``FP32Optimizer`` logic (``main_grad`` -> ``grad``, clip, step, dist_checkpointing state sharded
like the params) around ``torch.optim.AdamW``, replacing only the parts megatron hard-codes
to CUDA tensors. Both are driven by megatron's ``OptimizerParamScheduler``.
"""

from __future__ import annotations

from typing import Dict, List

import torch
import torch.distributed as dist
from megatron.core.optimizer import MegatronOptimizer, OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer.optimizer import FP32Optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from torch import nn

from nemo_dmc.methods import ADAPTER_MODULE
from nemo_dmc.training.config import OptimConfig
from nemo_dmc.training.plan import StagePlan


def megatron_optimizer_config(optim: OptimConfig, plan: StagePlan, bf16: bool) -> OptimizerConfig:
    """megatron ``OptimizerConfig`` of a stage."""
    return OptimizerConfig(
        optimizer="adam", lr=plan.lr, min_lr=plan.min_lr, weight_decay=optim.weight_decay,
        adam_beta1=optim.beta1, adam_beta2=optim.beta2, adam_eps=optim.eps,
        clip_grad=optim.clip_grad, bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_distributed_optimizer=optim.use_distributed_optimizer,
    )


def is_decision_param(name: str, param: nn.Parameter | None = None) -> bool:
    """Whether a parameter belongs to a decision adapter (``optim.decision_lr_mult``)."""
    return ADAPTER_MODULE in name


def param_groups(model: nn.Module, decision_lr_mult: float = 1.0) -> List[Dict]:
    """megatron's grouping: no weight decay for biases and 1-D (norm) params; decision-adapter
    parameters at ``decision_lr_mult`` x the lr (groups only where they have parameters).

    Groups carry megatron's identifier keys (``wd_mult``, ``lr_mult``, ...) so checkpoints
    match groups by key, and the scheduler scales lr/wd per group.
    """
    groups: Dict[tuple, List[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            wd = 0.0 if name.endswith(".bias") or param.ndim == 1 else 1.0
            lr = decision_lr_mult if is_decision_param(name) else 1.0
            groups.setdefault((wd, lr), []).append(param)
    common = {"is_expert_parallel": False, "is_decoupled_lr": False}
    return [{"params": params, "wd_mult": wd, "lr_mult": lr, **common}
            for (wd, lr), params in sorted(groups.items(), key=lambda kv: (-kv[0][0], kv[0][1]))]


def _init_adam_state(optimizer: torch.optim.Optimizer, config: OptimizerConfig | None = None) -> None:
    """Create zero Adam moments so a checkpoint can be loaded into a fresh optimizer."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            if not optimizer.state[param]:
                optimizer.state[param]["exp_avg"] = torch.zeros_like(param.data)
                optimizer.state[param]["exp_avg_sq"] = torch.zeros_like(param.data)


def prime_state_for_loading(optimizer: MegatronOptimizer) -> None:
    """Give a fresh optimizer's torch Adam(W) state zero moments and step 0 before a checkpoint
    is loaded into it (the loaded values replace them).

    megatron-core 0.15's distributed optimizer over torch Adam (no Apex or Transformer Engine)
    reads one common ``step`` from its inner optimizer's state while it builds the loading
    request, and asserts on a fresh optimizer, which has none (found on the first GPU run).
    Fused Apex/TE optimizers keep ``step`` elsewhere and are left alone.
    """
    for sub in getattr(optimizer, "chained_optimizers", None) or [optimizer]:
        inner = getattr(sub, "optimizer", None)
        if isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)) and not inner.state:
            _init_adam_state(inner)
            for state in inner.state.values():
                state["step"] = torch.zeros((), dtype=torch.float32)


class CPUAdamW(FP32Optimizer):
    """megatron's ``FP32Optimizer`` over ``torch.optim.AdamW`` without CUDA-only helpers.

    Grad norm: the global L2 norm over non-duplicated params (``get_main_grads_for_grad_norm``),
    summed over the model-parallel group, as megatron computes it on GPU.
    """

    def __init__(self, model: nn.Module, config: OptimizerConfig,
                 decision_lr_mult: float = 1.0) -> None:
        adamw = torch.optim.AdamW(param_groups(model, decision_lr_mult), lr=config.lr,
                                  betas=(config.adam_beta1, config.adam_beta2),
                                  eps=config.adam_eps, weight_decay=config.weight_decay)
        MegatronOptimizer.__init__(self, adamw, config, _init_adam_state)  # skips CUDA tensors
        self._scale = torch.ones(1)
        self.is_stub_optimizer = False

    @torch.no_grad()
    def get_grad_norm(self) -> float:
        grads = self.get_main_grads_for_grad_norm()
        total = torch.zeros((), dtype=torch.float64)
        for grad in grads:
            total += grad.detach().double().pow(2).sum()
        dist.all_reduce(total, group=self.get_grad_stats_parallel_group())
        return float(total.sqrt())

    @torch.no_grad()
    def clip_grad_norm(self, clip_grad: float) -> float:
        norm = self.get_grad_norm()
        coeff = clip_grad / (norm + 1.0e-6)
        if coeff < 1.0:
            grads = [p.grad for p in self.get_parameters() if p.grad is not None]
            torch._foreach_mul_(grads, coeff)
        return norm


def build_optimizer(ddp_model: nn.Module, optim: OptimConfig, plan: StagePlan,
                    bf16: bool) -> MegatronOptimizer:
    """The stage's optimizer: megatron's on GPU, :class:`CPUAdamW` on CPU."""
    config = megatron_optimizer_config(optim, plan, bf16)
    if torch.cuda.is_available():
        return get_megatron_optimizer(config, [ddp_model], scale_lr_cond=is_decision_param,
                                      lr_mult=optim.decision_lr_mult)
    return CPUAdamW(ddp_model, config, optim.decision_lr_mult)


def build_scheduler(optimizer: MegatronOptimizer, optim: OptimConfig,
                    plan: StagePlan) -> OptimizerParamScheduler:
    """Linear warmup to ``plan.lr``, then ``plan.decay_style`` to ``plan.min_lr`` at the
    stage's last step; constant weight decay."""
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if plan.warmup_steps else plan.lr,
        max_lr=plan.lr,
        min_lr=plan.min_lr,
        lr_warmup_steps=plan.warmup_steps,
        lr_decay_steps=plan.steps,
        lr_decay_style=plan.decay_style,
        start_wd=optim.weight_decay,
        end_wd=optim.weight_decay,
        wd_incr_steps=plan.steps,
        wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=False,
        override_opt_param_scheduler=True,
    )
