"""Run the selected stages (zero-out -> retrofit -> fine-tune) of one run directory.

Each stage resumes from its own latest checkpoint in the run (``checkpoint.resume``);
otherwise it starts from the weights the previous stage ended with (in memory, or that
stage's final checkpoint in the run; an unfinished one is an error), else from
``checkpoint.pretrained``, else from a random init (said in the log). The data position
carries over between stages, so no stage re-reads samples.

One training at a time holds the run directory (:mod:`~nemo_dmc.training.run_lock`); a run
with checkpoints continues only with the settings it recorded in ``run_config.yaml`` that
shape the model and the data order (``checkpoint.allow_config_change`` overrides). A damaged
checkpoint (missing or truncated file) is skipped for the previous intact one, saying so.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.optimizer import MegatronOptimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from omegaconf import OmegaConf

from nemo_dmc.checkpoints.atomic import is_rank0
from nemo_dmc.checkpoints.run_config import RUN_CONFIG_FILE
from nemo_dmc.checkpoints.run_dir import (
    STAGES,
    Progress,
    latest_intact_checkpoint,
    list_checkpoints,
    read_progress,
)
from nemo_dmc.checkpoints.weights import load_weights_checkpoint
from nemo_dmc.core import Stage, target_cr
from nemo_dmc.megatron import parallel
from nemo_dmc.megatron.adapter import train_only_adapters
from nemo_dmc.megatron.cpu_shims import causal_attention_mask
from nemo_dmc.megatron.distill import Teacher
from nemo_dmc.megatron.model import build_model
from nemo_dmc.megatron.pipeline import ModelChunks
from nemo_dmc.megatron.stages import apply_stage, finish_stage, validation_phase
from nemo_dmc.training.batches import MicroBatches, build_splits, on_rank0
from nemo_dmc.training.checkpoint import load_checkpoint, save_checkpoint
from nemo_dmc.training.config import (
    STAGE_ORDER,
    ConfigError,
    TrainConfig,
    resume_changes,
    use_bf16,
    validate_config,
)
from nemo_dmc.training.launch import export_rendezvous_env
from nemo_dmc.training.loop import StepResult, train_step, validate
from nemo_dmc.training.metrics import RunLogger, StageSummary, Validation
from nemo_dmc.training.optim import build_optimizer, build_scheduler
from nemo_dmc.training.plan import StagePlan, plan_stages
from nemo_dmc.training.run_lock import RunLock, acquire_run_lock
from nemo_dmc.training.teacher import load_teacher

ResumePoints = Dict[Stage, Optional[Path]]


@dataclass
class Session:
    """What every stage of a run shares."""

    cfg: TrainConfig
    model: DistributedDataParallel
    batches: MicroBatches
    mask: torch.Tensor
    logger: RunLogger
    bf16: bool
    resumes: ResumePoints
    teacher: Optional[Teacher] = None


def _note(message: str) -> None:
    if is_rank0():
        print(message, flush=True)


def intact_latest(stage_dir: Path) -> Optional[Path]:
    """The newest intact checkpoint of a stage (``None`` if it has none); newer damaged ones
    are skipped, saying so. Raises :class:`ConfigError` if none of its checkpoints is intact."""
    path, damaged = latest_intact_checkpoint(stage_dir)
    if damaged and path is None:
        problems = "; ".join(problem for _, problem in damaged)
        raise ConfigError("checkpoint.resume", f"no intact checkpoint in {stage_dir} ({problems});"
                          f" copy the damaged files again, or move {stage_dir} away to train "
                          "the stage from its start")
    for bad, problem in damaged:
        _note(f"[{stage_dir.name}] skipping the damaged checkpoint {bad.name} ({problem}); "
              f"using the previous intact one, {path.name}")
    return path


def initial_weights(cfg: TrainConfig, first: Stage) -> Optional[Path]:
    """Where the first selected stage takes its weights from when it does not resume: the
    previous stage's final checkpoint in the run, else ``checkpoint.pretrained``; raises a
    :class:`ConfigError` if the previous stage is in the run but unfinished."""
    index = STAGE_ORDER.index(first)
    if index > 0:
        previous = STAGE_ORDER[index - 1]
        latest = intact_latest(cfg.checkpoint_dir / previous.value)
        if latest is not None:
            done = read_progress(latest)
            if not done.complete:
                raise ConfigError("stage", f"stage {previous.value} in {cfg.run_dir} is "
                                  f"unfinished (step {done.step}/{done.steps}); run "
                                  f"stage={previous.value} first")
            return latest
    return Path(cfg.checkpoint.pretrained) if cfg.checkpoint.pretrained else None


def _consumed_after(path: Optional[Path]) -> int:
    """Samples consumed by the run that wrote ``path`` (0 for a NeMo 2 or other checkpoint)."""
    if path is None or not (path / "metadata.json").is_file():
        return 0
    try:
        return read_progress(path).consumed_samples
    except ValueError:  # a dist checkpoint without this trainer's progress
        return 0


def resume_point(cfg: TrainConfig, stage: Stage) -> Optional[Path]:
    """The checkpoint a stage resumes from (its latest intact one in the run), if
    ``checkpoint.resume``."""
    return intact_latest(cfg.checkpoint_dir / stage.value) if cfg.checkpoint.resume else None


def samples_to_read(cfg: TrainConfig, plans: List[StagePlan], start_samples: int,
                    resumes: ResumePoints) -> int:
    """Train samples the selected stages read, counting from sample 0: each stage resumes
    from its own checkpoint (``resumes``) if it has one, else continues where the previous
    one ended."""
    end = consumed = start_samples
    for plan in plans:
        latest = resumes[plan.stage]
        done = read_progress(latest) if latest is not None else None
        if done is not None:
            consumed = done.consumed_samples
        consumed += (plan.steps - (done.step if done else 0)) * cfg.data.global_batch_size
        end = max(end, consumed)
    return end


def run(cfg: TrainConfig) -> List[StageSummary]:
    """Validate ``cfg``, set up torch.distributed and megatron, run the stages, tear down."""
    world_size = export_rendezvous_env()
    validate_config(cfg, world_size, torch.cuda.is_available())
    parallel.initialize(cfg.parallel.tensor_model_parallel_size, cfg.seed,
                        cfg.parallel.pipeline_model_parallel_size,
                        cfg.parallel.virtual_pipeline_model_parallel_size)
    held: List[RunLock] = []

    def claim(config: TrainConfig) -> None:  # rank 0; its errors are raised on every rank
        held.append(acquire_run_lock(Path(config.run_dir)))
        check_recorded_config(config)
        write_run_config(config)

    try:
        on_rank0(claim, cfg)
        return _run_stages(cfg)
    finally:
        for lock in held:
            lock.release()
        parallel.shutdown()


def check_recorded_config(cfg: TrainConfig) -> None:
    """A run directory holding checkpoints continues only with the settings its
    ``run_config.yaml`` records for the model and the data order
    (:func:`~nemo_dmc.training.config.resume_changes`), unless
    ``checkpoint.allow_config_change``; raises :class:`ConfigError` naming every change."""
    path = Path(cfg.run_dir) / RUN_CONFIG_FILE
    has_checkpoints = any(list_checkpoints(cfg.checkpoint_dir / stage) for stage in STAGES)
    if not path.is_file() or not has_checkpoints:
        return
    allowed = cfg.checkpoint.allow_config_change
    try:
        recorded = OmegaConf.load(path)
    except Exception as err:  # any YAML or OmegaConf error: the file is not a config
        if allowed:
            return
        raise ConfigError("checkpoint.allow_config_change",
                          f"cannot read {path} ({err}), the config of the checkpoints in "
                          f"{cfg.checkpoint_dir}; restore it, or pass "
                          "checkpoint.allow_config_change=true to continue with this "
                          "command's settings") from err
    changes = resume_changes(recorded, cfg)
    if not changes:
        return
    listed = ", ".join(f"{key} {old!r} -> {new!r}" for key, old, new in changes)
    if allowed:
        _note(f"[run] continuing {cfg.run_dir} with changed settings "
              f"(checkpoint.allow_config_change=true): {listed}")
        return
    raise ConfigError(changes[0][0], f"{cfg.run_dir} holds checkpoints of a run recorded in "
                      f"{path} with other settings: {listed}. Resuming would mix them: use the "
                      "recorded values, another run_dir, or checkpoint.allow_config_change=true "
                      "to continue anyway")


def write_run_config(cfg: TrainConfig) -> None:
    """Rank 0 writes the resolved config to ``<run_dir>/run_config.yaml`` (atomically), so
    the run's checkpoints describe themselves wherever Hydra put its own output."""
    if not is_rank0():
        return
    path = Path(cfg.run_dir) / RUN_CONFIG_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    os.replace(tmp, path)


def _build_session(cfg: TrainConfig, plans: List[StagePlan], start_samples: int,
                   resumes: ResumePoints) -> Session:
    cuda = torch.cuda.is_available()
    bf16 = use_bf16(cfg, cuda)
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    vpp = cfg.parallel.virtual_pipeline_model_parallel_size
    chunks = [build_model(cfg.model, cfg.method_settings(),
                          sequence_parallel=cfg.parallel.sequence_parallel, bf16=bf16,
                          recompute_core_attention=cfg.parallel.recompute == "selective",
                          vp_stage=stage)
              for stage in (range(vpp) if vpp else [None])]
    model = chunks[0] if len(chunks) == 1 else ModelChunks(chunks)
    frozen_note = None
    if cfg.optim.trainable == "decisions":
        total = sum(p.numel() for p in model.parameters())
        trained = train_only_adapters(model)
        frozen_note = (f"[run] optim.trainable=decisions: training {trained:,} decision-adapter "
                       f"parameters of {total:,} per rank; the rest is frozen")
    if cuda:
        model.cuda()
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False,
        use_distributed_optimizer=cfg.optim.use_distributed_optimizer and cuda)
    wrapped = [DistributedDataParallel(chunk.config, ddp_config, chunk) for chunk in chunks]
    ddp = wrapped[0] if len(wrapped) == 1 else ModelChunks(wrapped)
    dp_size = parallel_state.get_data_parallel_world_size()
    train_samples = samples_to_read(cfg, plans, start_samples, resumes)
    valid_samples = cfg.validation.batches * cfg.data.micro_batch_size * dp_size
    splits = build_splits(cfg, train_samples, valid_samples)
    batches = MicroBatches(splits, cfg.data.micro_batch_size, cfg.data.global_batch_size,
                           parallel_state.get_data_parallel_rank(), dp_size, device)
    logger = RunLogger(Path(cfg.run_dir), cfg.logging, enabled=dist.get_rank() == 0)
    if frozen_note:
        logger.note(frozen_note)
    teacher = load_teacher(cfg, bf16, device)
    if teacher is not None:
        source = cfg.distill.checkpoint(cfg.checkpoint.pretrained)
        logger.note(f"[distill] frozen teacher in plain attention from {source}: "
                    f"{teacher.param_bytes / 2**20:.1f} MiB of parameters per rank; "
                    f"{cfg.distill.direction} KL at T={cfg.distill.temperature:g}, "
                    f"loss = {cfg.distill.lm_weight:g} CE + {cfg.distill.kl_weight:g} KL")
    return Session(cfg, ddp, batches, causal_attention_mask(cfg.model.seq_length, device),
                   logger, bf16, resumes, teacher)


def _run_stages(cfg: TrainConfig) -> List[StageSummary]:
    plans = plan_stages(cfg)
    first = plans[0].stage
    resumes = {plan.stage: resume_point(cfg, plan.stage) for plan in plans}
    weights = None if resumes[first] else initial_weights(cfg, first)
    consumed = _consumed_after(weights)
    session = _build_session(cfg, plans, consumed, resumes)
    if not resumes[first] and weights is None:
        session.logger.note(f"[{first.value}] starting from a random init (no checkpoint."
                            f"pretrained and no earlier stage in {cfg.checkpoint_dir})")
    summaries = []
    try:
        for plan in plans:
            summary, consumed = _run_stage(session, plan, weights, consumed)
            summaries.append(summary)
            weights = None  # the next stage continues from the weights in memory
    finally:
        session.logger.close()
    return summaries


def _start_stage(session: Session, plan: StagePlan, weights: Optional[Path], consumed: int
                 ) -> Tuple[MegatronOptimizer, OptimizerParamScheduler, int, int]:
    """Optimizer and schedule of the stage, resumed from its checkpoint if it has one
    (else after loading ``weights``); returns them with the start step and sample."""
    model, logger, name = session.model, session.logger, plan.stage.value
    resume = session.resumes[plan.stage]
    if resume is None and weights is not None:
        logger.note(f"[{name}] initial weights from {load_weights_checkpoint(model, weights)}")
    optimizer = build_optimizer(model, session.cfg.optim, plan, session.bf16)
    scheduler = build_scheduler(optimizer, session.cfg.optim, plan)
    if resume is None:
        return optimizer, scheduler, 0, consumed
    progress = load_checkpoint(resume, model, optimizer, scheduler)
    logger.note(f"[{name}] resumed from {resume} (step {progress.step})")
    return optimizer, scheduler, progress.step, progress.consumed_samples


def _run_stage(session: Session, plan: StagePlan, weights: Optional[Path],
               consumed: int) -> Tuple[StageSummary, int]:
    """Train the stage to its last step, save, validate; return its summary and the data
    position it ended at."""
    cfg, model, logger, name = session.cfg, session.model, session.logger, plan.stage.value
    optimizer, scheduler, step, consumed = _start_stage(session, plan, weights, consumed)
    first_step, started = step, time.perf_counter()
    logger.start_stage(name, plan.steps, step,
                       f"[{name}] {plan.steps} steps x {plan.tokens_per_step:,} tokens "
                       f"({plan.budget_source}), lr {plan.lr:g} -> {plan.min_lr:g}")
    while step < plan.steps:
        tic = time.perf_counter()
        target = apply_stage(model, plan.stage, step, plan.steps, cfg.dmc.target_cr)
        result = train_step(model, optimizer, scheduler, session.batches, session.mask, consumed,
                            target, cfg.model.num_layers, noise_key=f"{cfg.seed}/{name}/{step}",
                            teacher=session.teacher)
        step += 1
        consumed += cfg.data.global_batch_size
        last = step == plan.steps
        if step % cfg.logging.log_interval == 0 or last:
            _log_step(session, plan, step, result, target, time.perf_counter() - tic)
        else:
            logger.log_layer_cr(name, "train", step, result.layer_cr)
        logger.advance(_progress(result))
        if cfg.validation.interval and step % cfg.validation.interval == 0 and not last:
            _log_validation(session, plan, step)
        if last:
            finish_stage(model, plan.stage)
        if last or (cfg.checkpoint.save_interval and step % cfg.checkpoint.save_interval == 0):
            progress = Progress(name, step, plan.steps, consumed,
                                parallel_state.get_tensor_model_parallel_world_size(),
                                parallel_state.get_data_parallel_world_size(),
                                parallel_state.get_pipeline_model_parallel_world_size())
            save_checkpoint(cfg.checkpoint_dir / name, model, optimizer, scheduler, progress,
                            cfg.checkpoint.keep_last)
    validation_phase(model, plan.stage)
    summary = StageSummary(name, step - first_step, plan.steps, step * plan.tokens_per_step,
                           plan.tokens, time.perf_counter() - started,
                           target_cr(plan.stage, plan.steps, plan.steps, cfg.dmc.target_cr),
                           _log_validation(session, plan, step))
    logger.end_stage(summary)
    return summary, consumed


def _log_step(session: Session, plan: StagePlan, step: int, result: StepResult,
              target: Optional[float], seconds: float) -> None:
    scalars = {"lm_loss": result.lm_loss, "dmc_loss": result.dmc_loss,
               "target_cr": target or 1.0, "cr": result.cr, "lr": result.lr,
               "tokens_per_s": plan.tokens_per_step / seconds,
               "tokens": step * plan.tokens_per_step, "budget_tokens": plan.tokens}
    if result.grad_norm is not None:
        scalars["grad_norm"] = result.grad_norm
    if result.kl is not None:
        scalars["kl"] = result.kl
    session.logger.log(plan.stage.value, "train", step, scalars, result.layer_cr)


def _progress(result: StepResult) -> Dict[str, Union[float, str]]:
    """The progress bar's postfix: losses, CR and the CR of every layer."""
    postfix: Dict[str, Union[float, str]] = {"loss": result.lm_loss, "cr": result.cr}
    if result.kl is not None:
        postfix["kl"] = result.kl
    postfix["layer_cr"] = "/".join(f"{cr:.1f}" for cr in result.layer_cr)
    return postfix


def _log_validation(session: Session, plan: StagePlan, step: int) -> Validation:
    cfg = session.cfg
    result = validate(session.model, session.batches, session.mask, cfg.validation.batches,
                      cfg.model.num_layers, teacher=session.teacher)
    session.logger.log(plan.stage.value, "valid", step, result.scalars(), result.layer_cr)
    return result
