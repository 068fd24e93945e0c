"""Structured (dataclass) configs of a training run, and their validation.

Hydra merges ``conf/`` into :class:`TrainConfig` (registered as ``train_schema``), so unknown
keys and badly typed values fail while the command line is parsed. :func:`validate_config`
then checks value ranges and cross-field constraints before any compute, raising a
:class:`ConfigError` whose message starts with the offending key.
"""

from __future__ import annotations

import re
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from omegaconf import OmegaConf

from nemo_dmc.core import DistillConfig, DMCConfig, ModelConfig, Stage
from nemo_dmc.core.config import LEGACY_DEFAULTS

STAGE_ORDER = (Stage.PRETRAIN, Stage.ZERO_OUT, Stage.RETROFIT, Stage.FINETUNE)
DATA_SOURCES = ("pydocs", "indexed", "random")
DECAY_STYLES = ("cosine", "linear", "constant")
RECOMPUTE_MODES = ("none", "selective")
PRECISIONS = ("auto", "bf16", "fp32")
TRAINABLE = ("all", "decisions")


class ConfigError(ValueError):
    """A config value is out of range or inconsistent; the message names its key."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message if key in message else f"{key}: {message}")
        self.key, self.message = key, message

    def __reduce__(self):  # picklable, so one rank can hand it to the others
        return ConfigError, (self.key, self.message)


@dataclass
class DMCSettings(DMCConfig):
    """``dmc.*``: the DMC method's settings (every field of :class:`~nemo_dmc.core.DMCConfig`,
    declared there) and the retrofit's token budget.

    budget_pct: token budget of the stages with a ``budget_share``, in percent of
        ``model.pretrain_tokens`` (the paper uses 2-8 %); ``null`` = use stage steps/tokens.
    """

    budget_pct: Optional[float] = None

    def __post_init__(self) -> None:
        """Checked by :func:`validate_config` instead, as a :class:`ConfigError` naming the key."""

    def core(self) -> DMCConfig:
        """The :class:`nemo_dmc.core.DMCConfig` the attention layers use (validated)."""
        return DMCConfig(**{f.name: getattr(self, f.name) for f in fields(DMCConfig)})


@dataclass
class DistillSettings(DistillConfig):
    """``distill.*``: distillation from the frozen original model (every loss field of
    :class:`~nemo_dmc.core.DistillConfig`, declared there), in every stage of the run.

    enabled: train on ``lm_weight * CE + kl_weight * T^2 KL`` instead of CE alone.
    teacher: checkpoint of the teacher, built in plain attention, loaded once and frozen;
        ``null`` = ``checkpoint.pretrained`` (the run's starting weights).
    """

    enabled: bool = False
    teacher: Optional[str] = None

    def core(self) -> DistillConfig:
        """The loss settings alone (validated)."""
        settings = DistillConfig(**{f.name: getattr(self, f.name) for f in fields(DistillConfig)})
        settings.check()
        return settings

    def checkpoint(self, pretrained: Optional[str]) -> Optional[str]:
        """The teacher's checkpoint: ``teacher``, else the run's ``checkpoint.pretrained``."""
        return self.teacher or pretrained


@dataclass
class StageSettings:
    """One stage (``stage.<name>.*``); selected stages have ``enabled: true``.

    Length precedence: ``dmc.budget_pct * budget_share`` (when both are set), else
    ``tokens``, else ``steps``.

    Attributes:
        enabled: run this stage (a ``stage=[...]`` group list sets it).
        steps: optimizer steps of the stage.
        tokens: tokens of the stage (overrides steps; rounded up to whole steps).
        budget_share: this stage's share of the dmc.budget_pct token budget.
        lr: peak lr of this stage; null = optim.lr.
        min_lr: final lr of this stage; null = optim.min_lr.
        warmup_steps: linear warmup steps of this stage; null = optim.warmup_steps.
        decay_style: lr decay of this stage (cosine | linear | constant); null =
            optim.decay_style.
    """

    enabled: bool = False
    steps: Optional[int] = None
    tokens: Optional[int] = None
    budget_share: float = 0.0
    lr: Optional[float] = None
    min_lr: Optional[float] = None
    warmup_steps: Optional[int] = None
    decay_style: Optional[str] = None


@dataclass
class StagesConfig:
    """The stages (plain pretraining, then the three DMC stages), run in this order when enabled."""

    pretrain: StageSettings = field(default_factory=StageSettings)
    zero_out: StageSettings = field(default_factory=StageSettings)
    retrofit: StageSettings = field(default_factory=StageSettings)
    finetune: StageSettings = field(default_factory=StageSettings)

    def selected(self) -> List[Stage]:
        """Enabled stages in recipe order."""
        return [s for s in STAGE_ORDER if getattr(self, s.value).enabled]


@dataclass
class DataConfig:
    """Where batches come from (``data.*``).

    source: ``pydocs`` (the built-in Python-docs corpus, prepared once into ``cache_dir``),
        ``indexed`` (megatron ``.bin/.idx`` prefixes with a tokenizer), or ``random``
        (uniform random tokens; for tests and smoke runs).
    cache_dir: where the pydocs corpus is prepared (a subfolder per given tokenizer).
    tokenizer: HF tokenizer dir, tokenizer.json or .gguf; null = pydocs trains its own BPE
        of model.vocab_size in cache_dir (``indexed`` needs one).
    train_prefixes: ``indexed``: training data, prefixes or megatron's weighted
        ``[w1, prefix1, w2, prefix2, ...]``.
    valid_prefixes: ``indexed``: validation data (same forms); empty = split the training
        blend by ``split``.
    split: megatron's ``train,valid,test`` split string (e.g. ``969,30,1``) dividing the
        ``train_prefixes`` blend by document ranges when ``valid_prefixes`` is empty.
    max_documents: pydocs: use at most this many documents (null = all).
    micro_batch_size: sequences per forward/backward on each data-parallel rank.
    global_batch_size: sequences per optimizer step over all ranks (a multiple of
        micro_batch_size x data-parallel size; the rest is gradient accumulation).
    seed: the data order's seed (sample shuffling of megatron's datasets).
    """

    source: str = "pydocs"
    cache_dir: str = "data_cache/pydocs"
    tokenizer: Optional[str] = None
    train_prefixes: List[str] = field(default_factory=list)
    valid_prefixes: List[str] = field(default_factory=list)
    split: str = "969,30,1"
    max_documents: Optional[int] = None
    micro_batch_size: int = 4
    global_batch_size: int = 8
    seed: int = 1234


@dataclass
class OptimConfig:
    """Adam with weight decay, clipping and a warmup + decay schedule (``optim.*``).

    lr: peak learning rate (a stage's lr overrides it).
    min_lr: learning rate at the end of each stage's decay.
    warmup_steps: linear warmup from 0 at the start of each stage.
    decay_style: decay after warmup: cosine | linear | constant.
    weight_decay: AdamW decoupled weight decay (none on biases and norm weights).
    beta1: Adam beta1.
    beta2: Adam beta2.
    eps: Adam epsilon.
    clip_grad: clip the global gradient norm to this (0 = off).
    use_distributed_optimizer: shard optimizer state over data-parallel ranks (megatron's
        distributed optimizer; GPU only).
    trainable: ``all`` trains every weight; ``decisions`` trains only the decision
        parameters (the decision adapters of ``dmc.decision_source=adapter``) with the base
        model frozen: less optimizer state and a retrofit that cannot drift from the original.
    decision_lr_mult: the decision adapters' lr as a multiple of the lr (e.g. with
        ``trainable=all``: the base continues at a low lr while fresh adapters learn fast).
    """

    lr: float = 3.0e-5
    min_lr: float = 3.0e-6
    warmup_steps: int = 0
    decay_style: str = "cosine"
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1.0e-8
    clip_grad: float = 1.0
    use_distributed_optimizer: bool = False
    trainable: str = "all"
    decision_lr_mult: float = 1.0


@dataclass
class ParallelConfig:
    """Parallel layout (``parallel.*``).

    Attributes:
        tensor_model_parallel_size: tensor-parallel ranks; must divide the query and KV heads.
        pipeline_model_parallel_size: pipeline stages (megatron's 1F1B schedule over the
            micro-batches of a step); must divide the layers.
        virtual_pipeline_model_parallel_size: model chunks per pipeline stage (megatron's
            interleaved 1F1B: a smaller bubble for more point-to-point traffic); null = one.
            The layers must split into PP x this chunks, and a step's micro-batches per rank
            must be a multiple of PP.
        context_parallel_size: must be 1: DMC/DMS training cannot split a sequence over
            ranks (see README, "Choosing a parallel layout").
        data_parallel_size: data-parallel ranks; null = world size / (TP x PP).
        sequence_parallel: megatron's sequence parallelism (with tensor parallelism).
        recompute: activation recomputation: none | selective | full.
    """

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: Optional[int] = None
    context_parallel_size: int = 1
    data_parallel_size: Optional[int] = None
    sequence_parallel: bool = False
    recompute: str = "none"


@dataclass
class LoggingConfig:
    """TensorBoard scalars, ``metrics.jsonl`` and the progress bar (rank 0 only).

    tensorboard: write TensorBoard scalars under ``<run_dir>/tensorboard``.
    log_interval: log a step line and metrics every N steps.
    progress_bar: ``null`` draws the tqdm bar only when stderr is a terminal (so log files of
        batch jobs hold the step lines, not bar redraws); ``true``/``false`` force it.
    """

    tensorboard: bool = True
    log_interval: int = 1
    progress_bar: Optional[bool] = None


@dataclass
class ValidationConfig:
    """Validation with hard decisions (``validation.*``).

    Attributes:
        interval: validate every N steps; 0 = only at the end of each stage.
        batches: validation micro-batches per data-parallel rank.
    """

    interval: int = 0
    batches: int = 4


@dataclass
class CheckpointConfig:
    """dist_checkpointing saves (``checkpoint.*``).

    dir: where checkpoints go; ``null`` = ``<run_dir>/checkpoints``.
    save_interval: save every N steps; ``null`` = only at the end of each stage.
    keep_last: checkpoints kept per stage (older ones are deleted after a save).
    resume: continue each stage from its latest intact checkpoint in the run; false =
        start the stages afresh.
    pretrained: base weights for the first stage when the run holds no earlier stage (a
        checkpoint of this trainer, or a NeMo 2 checkpoint directory with ``weights/``).
    allow_config_change: continue a run whose recorded ``run_config.yaml`` differs in a
        setting that changes the model or the data order (:func:`resume_changes`).
    """

    dir: Optional[str] = None
    save_interval: Optional[int] = None
    keep_last: int = 2
    resume: bool = True
    pretrained: Optional[str] = None
    allow_config_change: bool = False


@dataclass
class TrainConfig:
    """Root of a training run (``python -m nemo_dmc.train``).

    name: the run's name (the default run directory is ``runs/<name>``).
    run_dir: checkpoints, ``metrics.jsonl``, ``run_config.yaml`` and TensorBoard logs;
        re-running the same command resumes from it.
    seed: seed of the initialisation and the decision noise (the data order: data.seed).
    precision: auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32.
    window: ``dms``: eviction delay w in tokens; null = DMSConfig's default (512).
    method: the trained KV method: ``dmc``, or ``dms`` (learned eviction with the decision
        settings of ``dmc.*`` and the eviction delay ``window``; see
        :func:`nemo_dmc.methods.settings_for`).
    """

    name: str = "dmc"
    run_dir: str = "runs/dmc"
    seed: int = 1234
    precision: str = "auto"
    method: str = "dmc"
    window: Optional[int] = None
    model: ModelConfig = field(default_factory=ModelConfig)
    dmc: DMCSettings = field(default_factory=DMCSettings)
    distill: DistillSettings = field(default_factory=DistillSettings)
    stage: StagesConfig = field(default_factory=StagesConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def method_settings(self):
        """The settings the attention layers run (``method`` over ``dmc.*``)."""
        from nemo_dmc.methods import settings_for

        return settings_for(self.method, self.dmc.core(), window=self.window)

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.checkpoint.dir or Path(self.run_dir) / "checkpoints")


def register_schema() -> None:
    """Register :class:`TrainConfig` in Hydra's ConfigStore as ``train_schema``."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="train_schema", node=TrainConfig)


def data_parallel_size(cfg: TrainConfig, world_size: int) -> int:
    """Data-parallel size of ``world_size`` processes (checked by :func:`validate_config`)."""
    par = cfg.parallel
    return world_size // (par.tensor_model_parallel_size * par.pipeline_model_parallel_size)


def _named_error(err: Exception, default_key: str) -> ConfigError:
    """A :class:`ConfigError` for a library check whose message names a config key."""
    named = re.search(r"\b(model|parallel|dmc)\.\w+", str(err))
    return ConfigError(named.group(0) if named else default_key, str(err))


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(key, message)


def _check_min(value: Optional[float], key: str, minimum: float, allow_none: bool = False) -> None:
    if value is None:
        _require(allow_none, key, "must be set")
        return
    _require(value >= minimum, key, f"must be >= {minimum}, got {value}")


def use_bf16(cfg: TrainConfig, cuda_available: bool) -> bool:
    """Whether the run trains in bf16 (``precision: auto`` = bf16 on GPU, fp32 on CPU)."""
    return cfg.precision == "bf16" or (cfg.precision == "auto" and cuda_available)


def validate_config(cfg: TrainConfig, world_size: int, cuda_available: bool) -> None:
    """Check every range and cross-field constraint; raise :class:`ConfigError` naming the key."""
    _require(cfg.precision in PRECISIONS, "precision", f"must be one of {PRECISIONS}, got {cfg.precision!r}")
    _require(cfg.precision != "bf16" or cuda_available, "precision",
             "bf16 needs a CUDA device; use 'fp32' or 'auto' on CPU")
    _validate_writable("run_dir", Path(cfg.run_dir))
    if cfg.checkpoint.dir is not None:
        _validate_writable("checkpoint.dir", Path(cfg.checkpoint.dir))
    _validate_parallel(cfg, world_size)
    from nemo_dmc.megatron.model import transformer_config  # megatron: not at CLI import

    try:  # megatron's TransformerConfig of the model: shapes, TP, sequence parallel
        transformer_config(cfg.model, cfg.parallel.tensor_model_parallel_size,
                           cfg.parallel.sequence_parallel, use_bf16(cfg, cuda_available),
                           cfg.parallel.recompute == "selective",
                           cfg.parallel.pipeline_model_parallel_size,
                           cfg.parallel.virtual_pipeline_model_parallel_size)
    except (ValueError, AssertionError) as err:
        raise _named_error(err, "model") from err
    _check_min(cfg.model.pretrain_tokens, "model.pretrain_tokens", 1, allow_none=True)
    _validate_dmc(cfg.dmc)
    _require(cfg.method in ("dmc", "dms"), "method", f"must be dmc or dms, got {cfg.method!r}")
    try:
        cfg.method_settings()
    except ValueError as err:
        raise _named_error(err, "window" if cfg.window is not None else "dmc") from err
    _validate_distill(cfg)
    _validate_data(cfg, world_size)
    _validate_optim(cfg.optim)
    _check_min(cfg.logging.log_interval, "logging.log_interval", 1)
    _check_min(cfg.validation.interval, "validation.interval", 0)
    _check_min(cfg.validation.batches, "validation.batches", 1)
    _check_min(cfg.checkpoint.keep_last, "checkpoint.keep_last", 1)
    _check_min(cfg.checkpoint.save_interval, "checkpoint.save_interval", 1, allow_none=True)
    if cfg.checkpoint.pretrained is not None:
        _validate_pretrained(cfg.model, Path(cfg.checkpoint.pretrained))
    _validate_stages(cfg)


def _validate_writable(key: str, path: Path) -> None:
    """``path`` is a directory this process may write into, or can be created as one."""
    existing = path.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    _require(existing.is_dir(), key, f"{key}: {path} cannot be created: {existing} is a file, "
             f"not a directory; choose another {key}")
    _require(os.access(existing, os.W_OK | os.X_OK), key,
             f"{key}: {path} is not writable ({existing} does not allow this user to write); "
             f"choose another {key} or fix its permissions")


# Settings a run may not change when it continues from its checkpoints: they change the model
# or the order of its samples (the stage lengths, optimizer and logging may change).
RESUME_KEYS = ("seed", "data.source", "data.tokenizer", "data.train_prefixes",
               "data.valid_prefixes", "data.split", "data.max_documents", "data.seed",
               "data.global_batch_size")
RESUME_EXEMPT = ("model.pretrain_tokens",)  # sizes the token budget only


def _resume_key(key: str) -> bool:
    if key in RESUME_EXEMPT:
        return False
    dmc_method = key.startswith("dmc.") and key[4:] in {f.name for f in fields(DMCConfig)}
    return (key in RESUME_KEYS or key.startswith("model.") or dmc_method
            or key in ("method", "window"))


def _flatten(tree: Any, prefix: str = "") -> Dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix.rstrip("."): tree}
    out: Dict[str, Any] = {}
    for key, value in tree.items():
        out.update(_flatten(value, f"{prefix}{key}."))
    return out


def resume_changes(recorded: Any, cfg: TrainConfig) -> List[Tuple[str, Any, Any]]:
    """``(key, recorded value, new value)`` of every setting that changes the model or the
    data order (seed, ``model.*``, data sources/split/seed/global batch, ``dmc.*`` method
    settings) and differs between a run's recorded config and ``cfg``. Keys the recorded
    config predates are not compared, except the ``dmc.*`` of
    :data:`~nemo_dmc.core.config.LEGACY_DEFAULTS` (the run trained with those values);
    ``dmc.zero_after_rope`` is not compared for the adapter decision source (no effect)."""
    old = _flatten(OmegaConf.to_container(OmegaConf.create(recorded), resolve=True))
    if any(key.startswith("dmc.") for key in old):
        old = {**{f"dmc.{k}": v for k, v in LEGACY_DEFAULTS.items()}, **old}
    new = _flatten(OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True))
    inert = set()
    if old.get("dmc.decision_source") == new.get("dmc.decision_source") == "adapter":
        inert.add("dmc.zero_after_rope")  # q and k keep channel D-1: the setting does nothing
    return [(key, old[key], new[key]) for key in sorted(old)
            if key in new and key not in inert and _resume_key(key) and old[key] != new[key]]


def _validate_parallel(cfg: TrainConfig, world_size: int) -> None:
    par = cfg.parallel
    tp, pp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size
    _check_min(tp, "parallel.tensor_model_parallel_size", 1)
    _check_min(pp, "parallel.pipeline_model_parallel_size", 1)
    _check_min(par.context_parallel_size, "parallel.context_parallel_size", 1)
    _require(par.context_parallel_size == 1, "parallel.context_parallel_size",
             f"is {par.context_parallel_size}, but DMC and DMS training cannot split a sequence "
             "over ranks: a token's key/value accumulates up to dmc.window-1 earlier tokens "
             "(DMS: its eviction waits a window of later tokens) and each key's score bias "
             "depends on the next token's decision, so every chunk border needs state from both "
             "neighbours, which megatron's ring attention does not exchange and whose kernels "
             "take no per-key score bias. Use tensor and pipeline parallelism for long "
             "sequences (set it to 1)")
    _require(world_size % tp == 0, "parallel.tensor_model_parallel_size",
             f"{tp} does not divide the world size {world_size}")
    _require(world_size % (tp * pp) == 0, "parallel.pipeline_model_parallel_size",
             f"tensor x pipeline parallel = {tp} x {pp} does not divide the world size "
             f"{world_size}")
    _require(cfg.model.num_layers % pp == 0, "parallel.pipeline_model_parallel_size",
             f"{pp} pipeline stages do not divide model.num_layers={cfg.model.num_layers}")
    vpp = par.virtual_pipeline_model_parallel_size
    if vpp is not None:
        key = "parallel.virtual_pipeline_model_parallel_size"
        _check_min(vpp, key, 1)
        _require(pp > 1, key, f"is {vpp}, but interleaved stages need "
                 "parallel.pipeline_model_parallel_size > 1")
        _require(cfg.model.num_layers % (pp * vpp) == 0, key,
                 f"{pp} stages x {vpp} chunks do not divide model.num_layers="
                 f"{cfg.model.num_layers}")
        dp = world_size // (tp * pp)
        micro = cfg.data.global_batch_size // max(1, cfg.data.micro_batch_size * dp)
        _require(micro % pp == 0, key,
                 f"the interleaved schedule runs groups of {pp} micro-batches, but a step has "
                 f"{micro} per rank (data.global_batch_size / (data.micro_batch_size x DP)); "
                 f"make it a multiple of {pp}")
    _require(pp == 1 or not cfg.distill.enabled, "parallel.pipeline_model_parallel_size",
             f"distillation (distill.enabled=true) runs with pipeline_model_parallel_size=1 "
             f"only (the teacher is not pipelined); got {pp}")
    dp = data_parallel_size(cfg, world_size)
    _require(par.data_parallel_size in (None, dp), "parallel.data_parallel_size",
             f"is {par.data_parallel_size}, but world size {world_size} / (TP {tp} x PP {pp}) "
             f"= {dp}")
    _require(par.recompute != "full", "parallel.recompute",
             "'full' recompute is not supported: DMC needs each layer's decisions for its loss; "
             "use 'selective' (core attention) or 'none'")
    _require(par.recompute in RECOMPUTE_MODES, "parallel.recompute",
             f"must be one of {RECOMPUTE_MODES}, got {par.recompute!r}")


def _validate_pretrained(model: ModelConfig, path: Path, key: str = "checkpoint.pretrained"
                         ) -> None:
    """The base checkpoint (config key ``key``) exists and, if it records its shape
    (``model_config.yaml`` of ``python -m nemo_dmc.convert``, or a NeMo 2 checkpoint's
    ``context/``), matches ``model.*``."""
    from nemo_dmc.checkpoints.nemo_context import NEMO_CONTEXT
    from nemo_dmc.checkpoints.weights import MODEL_CONFIG_FILE, read_model_config

    _require(path.is_dir(), key, f"no checkpoint directory at {path}")
    padded = False  # a NeMo 2 context records the padded vocabulary only
    if (path / MODEL_CONFIG_FILE).is_file():
        saved, source = read_model_config(path), path / MODEL_CONFIG_FILE
    elif (path / NEMO_CONTEXT).is_dir():
        saved, source, padded = _nemo_model_config(path), path / NEMO_CONTEXT, True
        if saved is None:
            return
    else:
        return
    for key in ("num_layers", "hidden_size", "num_attention_heads", "kv_heads",
                "ffn_hidden_size", "vocab_size", "rotary_base", "rope_scaling_factor",
                "share_embeddings_and_output_weights"):
        ours, theirs = getattr(model, key), getattr(saved, key)
        if key == "vocab_size" and padded:
            ours = model.padded_vocab_size()
        name = "num_query_groups" if key == "kv_heads" else key
        _require(ours == theirs, f"model.{name}",
                 f"is {ours}, but {key}={path} has {theirs} "
                 f"({source}); pick the matching model=... preset")


def _nemo_model_config(path: Path) -> Optional[ModelConfig]:
    """The shape a NeMo 2 checkpoint's ``context/`` records; ``None`` without NeMo installed
    (its ``weights/`` still load, unchecked)."""
    from nemo_dmc.checkpoints.nemo_context import nemo_checkpoint_settings

    try:
        settings = nemo_checkpoint_settings(path)
    except ValueError as err:
        raise ConfigError("checkpoint.pretrained", str(err)) from err
    return settings[0] if settings else None


def _validate_dmc(dmc: DMCSettings) -> None:
    try:
        dmc.core()
    except ValueError as err:
        raise _named_error(err, "dmc") from err
    if dmc.budget_pct is not None:
        _require(0 < dmc.budget_pct <= 100, "dmc.budget_pct",
                 f"must be in (0, 100] percent, got {dmc.budget_pct}")


def _validate_distill(cfg: TrainConfig) -> None:
    """Loss settings in range; with ``distill.enabled`` a teacher checkpoint that exists."""
    try:
        cfg.distill.core()
    except ValueError as err:
        named = re.search(r"\bdistill\.\w+", str(err))
        raise ConfigError(named.group(0) if named else "distill", str(err)) from err
    if not cfg.distill.enabled:
        return
    teacher = cfg.distill.checkpoint(cfg.checkpoint.pretrained)
    _require(teacher is not None, "checkpoint.pretrained",
             "distill.enabled=true needs the original model as teacher: set "
             "checkpoint.pretrained (the run's starting weights) or distill.teacher")
    key = "distill.teacher" if cfg.distill.teacher else "checkpoint.pretrained"
    _require(Path(teacher).is_dir(), key, f"no teacher checkpoint directory at {teacher}")
    _validate_pretrained(cfg.model, Path(teacher), key)


def _validate_data(cfg: TrainConfig, world_size: int) -> None:
    data = cfg.data
    _require(data.source in DATA_SOURCES, "data.source",
             f"must be one of {DATA_SOURCES}, got {data.source!r}")
    _check_min(data.micro_batch_size, "data.micro_batch_size", 1)
    _check_min(data.global_batch_size, "data.global_batch_size", 1)
    per_step = data.micro_batch_size * data_parallel_size(cfg, world_size)
    _require(data.global_batch_size % per_step == 0, "data.global_batch_size",
             f"{data.global_batch_size} is not a multiple of data.micro_batch_size x data-parallel "
             f"size = {per_step}")
    _check_min(data.max_documents, "data.max_documents", 20, allow_none=True)
    if data.source == "indexed":
        _require(bool(data.train_prefixes), "data.train_prefixes", "required with data.source=indexed")
        _require(data.tokenizer is not None, "data.tokenizer", "required with data.source=indexed")
        for key in ("train_prefixes", "valid_prefixes"):
            if getattr(data, key):
                _validate_blend(f"data.{key}", getattr(data, key))
        if not data.valid_prefixes:
            _validate_split(data.split)
    if data.tokenizer is not None:
        _require(Path(data.tokenizer).expanduser().exists(), "data.tokenizer",
                 f"no tokenizer at {data.tokenizer}")


def _validate_blend(key: str, blend: List[str]) -> None:
    """Every prefix of a blend (weights skipped) has its ``.bin`` and ``.idx``."""
    from nemo_dmc.data.datasets import indexed_dataset_files, parse_blend

    prefixes, _ = parse_blend(blend)
    for prefix in prefixes:
        try:
            indexed_dataset_files(prefix)
        except FileNotFoundError as err:
            raise ConfigError(key, f"{err} (prefix {prefix!r})") from err


def _validate_split(split: str) -> None:
    """``data.split`` is megatron's ``train,valid[,test]`` with a train and a valid share."""
    try:
        parts = [float(part) for part in split.split(",")]
    except ValueError:
        parts = []
    _require(1 <= len(parts) <= 3 and all(p >= 0 for p in parts), "data.split",
             f"must be 'train,valid,test' weights like '969,30,1', got {split!r}")
    _require(len(parts) >= 2 and parts[0] > 0 and parts[1] > 0, "data.split",
             f"{split!r} leaves no train or no valid documents (with empty data.valid_prefixes "
             "the valid split comes from data.split)")


def _validate_optim(optim: OptimConfig) -> None:
    _require(optim.lr > 0, "optim.lr", f"must be > 0, got {optim.lr}")
    _require(0 <= optim.min_lr <= optim.lr, "optim.min_lr",
             f"must be in [0, optim.lr={optim.lr}], got {optim.min_lr}")
    _check_min(optim.warmup_steps, "optim.warmup_steps", 0)
    _require(optim.decay_style in DECAY_STYLES, "optim.decay_style",
             f"must be one of {DECAY_STYLES}, got {optim.decay_style!r}")
    _check_min(optim.weight_decay, "optim.weight_decay", 0.0)
    for key in ("beta1", "beta2"):
        value = getattr(optim, key)
        _require(0 <= value < 1, f"optim.{key}", f"must be in [0, 1), got {value}")
    _require(optim.eps > 0, "optim.eps", f"must be > 0, got {optim.eps}")
    _check_min(optim.clip_grad, "optim.clip_grad", 0.0)
    _require(optim.decision_lr_mult > 0, "optim.decision_lr_mult",
             f"must be > 0, got {optim.decision_lr_mult}")
    _require(optim.trainable in TRAINABLE, "optim.trainable",
             f"must be one of {TRAINABLE}, got {optim.trainable!r}")


def _validate_stages(cfg: TrainConfig) -> None:
    from nemo_dmc.training.plan import plan_stages

    _require(bool(cfg.stage.selected()), "stage", "no stage selected (e.g. stage=retrofit)")
    adapter = cfg.dmc.decision_source == "adapter"
    _require(not (adapter and cfg.stage.zero_out.enabled), "stage.zero_out",
             "dmc.decision_source=adapter leaves q and k intact: there is no channel to zero "
             "out; drop zero_out from the stages (e.g. stage=[retrofit,finetune])")
    _require(cfg.optim.trainable == "all" or adapter, "optim.trainable",
             "'decisions' trains only decision adapters: set dmc.decision_source=adapter")
    _require(cfg.optim.trainable == "all" or not cfg.stage.pretrain.enabled, "optim.trainable",
             "'decisions' freezes the model: a pretraining stage would train nothing")
    for stage in cfg.stage.selected():
        key = f"stage.{stage.value}"
        settings: StageSettings = getattr(cfg.stage, stage.value)
        _check_min(settings.steps, f"{key}.steps", 1, allow_none=True)
        _check_min(settings.tokens, f"{key}.tokens", 1, allow_none=True)
        _require(0 <= settings.budget_share <= 1, f"{key}.budget_share",
                 f"must be in [0, 1], got {settings.budget_share}")
        _require(settings.lr is None or settings.lr > 0, f"{key}.lr", f"must be > 0, got {settings.lr}")
        _check_min(settings.min_lr, f"{key}.min_lr", 0.0, allow_none=True)
        _check_min(settings.warmup_steps, f"{key}.warmup_steps", 0, allow_none=True)
        _require(settings.decay_style in (None, *DECAY_STYLES), f"{key}.decay_style",
                 f"must be null or one of {DECAY_STYLES}, got {settings.decay_style!r}")
    for plan in plan_stages(cfg):
        key = f"stage.{plan.stage.value}"
        _require(plan.min_lr <= plan.lr, f"{key}.min_lr",
                 f"min_lr {plan.min_lr} exceeds lr {plan.lr}")
        _require(plan.warmup_steps < plan.steps, f"{key}.warmup_steps",
                 f"warmup ({plan.warmup_steps} steps) must be shorter than the stage "
                 f"({plan.steps} steps)")
