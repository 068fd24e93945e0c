"""``DMCLlamaConfig``: NeMo's ``LlamaConfig`` whose layer spec is the DMC transform."""

from __future__ import annotations

from dataclasses import dataclass, field

from megatron.core.transformer.enums import AttnBackend
from megatron.core.transformer.spec_utils import ModuleSpec
from nemo.collections.llm.gpt.model.base import default_layer_spec
from nemo.collections.llm.gpt.model.llama import LlamaConfig

from nemo_dmc.checkpoints.nemo_context import cpu_overrides
from nemo_dmc.core import DMCConfig, ModelConfig, Stage
from nemo_dmc.megatron.pipeline import as_pipeline_stage, stage_carry_rows
from nemo_dmc.megatron.spec import method_layer_spec

TRAINABLE = ("all", "decisions")


def dmc_transformer_layer_spec(config: "DMCLlamaConfig") -> ModuleSpec:
    """NeMo's default Llama layer spec (TE when installed, else local), made DMC."""
    return method_layer_spec(default_layer_spec(config), config.dmc)


@dataclass
class DMCLlamaConfig(LlamaConfig):
    """A Llama config with DMC attention and the stage it trains in.

    ``dmc`` is the method's :class:`~nemo_dmc.core.DMCConfig` (stored in NeMo's checkpoint
    context, ``io.json``, like the rest of the config); ``dmc_stage``/``dmc_stage_steps``
    are the stage this model trains in. ``dmc_trainable``: ``"all"`` trains every weight,
    ``"decisions"`` only the decision adapters (``dmc.decision_source="adapter"``) with the
    base model frozen, as the own trainer's ``optim.trainable``.
    """

    dmc: DMCConfig = field(default_factory=DMCConfig)
    dmc_stage: str = "retrofit"
    dmc_stage_steps: int = 6000
    dmc_trainable: str = "all"
    transformer_layer_spec: object = dmc_transformer_layer_spec

    def __post_init__(self) -> None:
        if self.attention_backend == AttnBackend.local:
            # NeMo would swap the DMC core attention for DotProductAttention.
            raise ValueError("attention_backend=local replaces DMC's core attention; use auto")
        if self.dmc_stage_steps < 1:
            raise ValueError(f"dmc_stage_steps must be >= 1, got {self.dmc_stage_steps}")
        stage = Stage(self.dmc_stage)  # raises ValueError naming an unknown stage
        adapter = self.dmc.decision_source == "adapter"
        if adapter and stage is Stage.ZERO_OUT:
            raise ValueError("dmc.decision_source=adapter leaves q and k intact: there is no "
                             "zero_out stage (dmc_stage)")
        if self.dmc_trainable not in TRAINABLE:
            raise ValueError(f"dmc_trainable must be one of {TRAINABLE}, "
                             f"got {self.dmc_trainable!r}")
        if self.dmc_trainable == "decisions" and not adapter:
            raise ValueError("dmc_trainable='decisions' trains only decision adapters: set "
                             "dmc.decision_source=adapter")
        super().__post_init__()

    def configure_model(self, tokenizer, pre_process=None, post_process=None, vp_stage=None):
        """NeMo's model, made a decision-carrying pipeline stage under pipeline parallelism
        (:func:`~nemo_dmc.megatron.pipeline.as_pipeline_stage`)."""
        model = super().configure_model(tokenizer, pre_process, post_process, vp_stage)
        if self.pipeline_model_parallel_size > 1:
            as_pipeline_stage(model, stage_carry_rows(self, self.dmc))
        return model


def _llama_shape(model: ModelConfig) -> dict:
    """``LlamaConfig`` keyword arguments of our model shape."""
    model.validate()
    if model.rope_scaling_factor is not None:
        raise ValueError("NeMo export of Llama-3.1 RoPE scaling is not supported yet "
                         "(model.rope_scaling_factor)")
    return dict(
        num_layers=model.num_layers, hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads, num_query_groups=model.kv_heads,
        ffn_hidden_size=model.ffn_hidden_size, kv_channels=model.head_dim,
        seq_length=model.seq_length, rotary_base=model.rotary_base,
        layernorm_epsilon=model.norm_epsilon, init_method_std=model.init_method_std,
        share_embeddings_and_output_weights=model.share_embeddings_and_output_weights,
        make_vocab_size_divisible_by=model.make_vocab_size_divisible_by,
        vocab_size=model.padded_vocab_size(),
    )


def llama_config(model: ModelConfig) -> LlamaConfig:
    """A plain NeMo :class:`LlamaConfig` of our model shape (with :func:`cpu_overrides`)."""
    return LlamaConfig(**_llama_shape(model), **cpu_overrides())


def dmc_llama_config(model: ModelConfig, dmc: DMCConfig, stage: str = "retrofit",
                     stage_steps: int = 6000, **overrides) -> DMCLlamaConfig:
    """A :class:`DMCLlamaConfig` for our model shape (with :func:`cpu_overrides`)."""
    kwargs = dict(_llama_shape(model), dmc=dmc, dmc_stage=stage, dmc_stage_steps=stage_steps,
                  **cpu_overrides())
    kwargs.update(overrides)
    return DMCLlamaConfig(**kwargs)
