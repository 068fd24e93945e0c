"""Building Llama-family megatron-core GPT models, with megatron's attention or a KV method."""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig

from nemo_dmc.core import ModelConfig
from nemo_dmc.megatron.spec import llama_layer_spec, method_layer_spec


def _have_fused_norms() -> bool:
    for name in ("transformer_engine", "apex"):
        try:
            __import__(name)
            return True
        except ImportError:
            continue
    return False


def transformer_config(model: ModelConfig, tensor_parallel_size: int = 1,
                       sequence_parallel: bool = False, bf16: bool = False,
                       recompute_core_attention: bool = False,
                       pipeline_parallel_size: int = 1,
                       virtual_pipeline_parallel_size: Optional[int] = None) -> TransformerConfig:
    """megatron ``TransformerConfig`` of a Llama-family model (CPU-safe: no fused kernels)."""
    model.validate(tensor_parallel_size)
    chunks = pipeline_parallel_size * (virtual_pipeline_parallel_size or 1)
    if model.num_layers % chunks:
        raise ValueError(f"model.num_layers ({model.num_layers}) must be divisible by the "
                         f"pipeline-parallel size x model chunks ({chunks})")
    if sequence_parallel and tensor_parallel_size > 1 and not _have_fused_norms():
        raise ValueError("parallel.sequence_parallel=true needs Transformer Engine or Apex "
                         "(megatron's torch RMSNorm does not support it); install one or "
                         "set parallel.sequence_parallel=false")
    return TransformerConfig(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.kv_heads,
        ffn_hidden_size=model.ffn_hidden_size,
        kv_channels=model.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=model.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=model.init_method_std,
        tensor_model_parallel_size=tensor_parallel_size,
        pipeline_model_parallel_size=pipeline_parallel_size,
        virtual_pipeline_model_parallel_size=virtual_pipeline_parallel_size,
        # Interleaved stages exchange activations and gradients with both neighbours at once;
        # with 2 stages both are the same rank, and batched point-to-point calls would pair
        # one's messages with the other's (the even/odd ordered calls do not).
        batch_p2p_comm=virtual_pipeline_parallel_size is None,
        pipeline_dtype=torch.bfloat16 if bf16 else torch.float32,
        sequence_parallel=sequence_parallel and tensor_parallel_size > 1,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_cpu_initialization=True,
        gradient_accumulation_fusion=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        recompute_granularity="selective" if recompute_core_attention else None,
        recompute_modules=["core_attn"] if recompute_core_attention else None,
    )


def build_model(model: ModelConfig, method: Any = None,
                sequence_parallel: bool = False, bf16: bool = False,
                recompute_core_attention: bool = False,
                use_transformer_engine: Optional[bool] = None,
                vp_stage: Optional[int] = None) -> GPTModel:
    """A megatron ``GPTModel`` for the current tensor- and pipeline-parallel groups.

    ``method`` is a KV method's settings (:mod:`nemo_dmc.methods`; e.g. a
    :class:`~nemo_dmc.core.DMCConfig`): every layer then runs that method. ``None`` builds
    megatron's own attention (the same weights and names). Under pipeline parallelism this
    rank's stage, a :class:`~nemo_dmc.megatron.pipeline.PipelineStageModel` (its activations
    carry the decision fractions when the method trains decisions); ``vp_stage``: which of
    its model chunks under interleaved (virtual) pipeline stages.
    Requires ``parallel_state`` to be initialised (``nemo_dmc.megatron.parallel``).
    """
    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    vpp = parallel_state.get_virtual_pipeline_model_parallel_world_size()
    config = transformer_config(model, tp, sequence_parallel, bf16, recompute_core_attention, pp,
                                vpp)
    spec = llama_layer_spec(use_transformer_engine)
    if method is not None:
        spec = method_layer_spec(spec, method)
    cls, stage = GPTModel, {}
    if pp > 1:
        from nemo_dmc.megatron.pipeline import PipelineStageModel, stage_carry_rows

        cls = PipelineStageModel
        ends = dict(ignore_virtual=vpp is None, vp_stage=vp_stage)
        stage = dict(pre_process=parallel_state.is_pipeline_first_stage(**ends),
                     post_process=parallel_state.is_pipeline_last_stage(**ends),
                     carry_rows=stage_carry_rows(config, method), vp_stage=vp_stage)
    return cls(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=model.padded_vocab_size(tp),
        max_sequence_length=model.seq_length,
        share_embeddings_and_output_weights=model.share_embeddings_and_output_weights,
        position_embedding_type="rope",
        rotary_base=int(model.rotary_base),
        rope_scaling=model.rope_scaling_factor is not None,
        rope_scaling_factor=model.rope_scaling_factor or 8.0,
        parallel_output=True,
        **stage,
    )
