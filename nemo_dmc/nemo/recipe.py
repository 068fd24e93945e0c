"""NeMo-Run recipes for the DMC stages on top of NeMo's Llama pre-training recipes.

    import nemo_run as run
    from nemo_dmc.nemo.recipe import dmc_recipe
    recipe = dmc_recipe("llama2_7b", stage="retrofit", target_cr=4.0, steps=6000,
                        restore_from="/ckpt/zero_out", num_nodes=4)
    run.run(recipe, executor=run.SlurmExecutor(...))
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any, Optional

import nemo_run as run
from nemo import lightning as nl
from nemo.collections import llm

from nemo_dmc.core import DMCConfig, Stage
from nemo_dmc.nemo.config import DMCLlamaConfig
from nemo_dmc.nemo.model import DMCGPTModel

_SHAPE_FIELDS = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
                 "ffn_hidden_size", "seq_length", "rotary_base", "layernorm_epsilon",
                 "share_embeddings_and_output_weights", "init_method_std", "kv_channels")


def dmc_recipe(base: str = "llama2_7b", stage: str = "retrofit", steps: int = 6000,
               lr: float = 3e-5, tensor_parallel_size: int = 4,
               restore_from: Optional[str] = None, dir: Optional[str] = None, name: str = "dmc",
               num_nodes: int = 1, num_gpus_per_node: int = 8, trainable: str = "all",
               **dmc: Any) -> run.Partial:
    """NeMo's ``llm.recipes.<base>.pretrain_recipe`` with the model made DMC.

    ``dmc`` are :class:`~nemo_dmc.core.DMCConfig` fields (e.g. ``target_cr=4.0``, ``window``).
    Optimiser settings follow the DMC reference (Adam (0.9, 0.95), weight decay 0.1,
    clipping 1.0, cosine to lr/10); ``restore_from`` starts from the previous stage's
    NeMo checkpoint (e.g. the zero-out result for ``retrofit``). ``trainable="decisions"``
    trains only the decision adapters (with ``decision_source="adapter"``), the base frozen.
    """
    Stage(stage)
    DMCConfig(**dmc)  # raises naming a bad setting (e.g. dmc.target_cr < 1)
    recipes = getattr(llm.recipes, base, None)
    if recipes is None or not hasattr(recipes, "pretrain_recipe"):
        raise ValueError(f"unknown NeMo recipe base {base!r} (e.g. llama2_7b, llama3_8b)")
    recipe = recipes.pretrain_recipe(dir=dir, name=name, num_nodes=num_nodes,
                                     num_gpus_per_node=num_gpus_per_node)
    base_config = recipe.model.config  # read, not built: its fusions need TE/CUDA
    present = {f.name for f in fields(base_config.__fn_or_cls__)}
    shape = {k: getattr(base_config, k) for k in _SHAPE_FIELDS if k in present}
    recipe.model = run.Config(DMCGPTModel, config=run.Config(
        DMCLlamaConfig, **shape, dmc=run.Config(DMCConfig, **dmc),
        dmc_stage=stage, dmc_stage_steps=steps, dmc_trainable=trainable))
    recipe.trainer.max_steps = steps
    recipe.trainer.strategy.tensor_model_parallel_size = tensor_parallel_size
    recipe.optim.config.lr = lr
    recipe.optim.config.adam_beta1, recipe.optim.config.adam_beta2 = 0.9, 0.95
    recipe.optim.config.weight_decay = 0.1
    recipe.optim.config.clip_grad = 1.0
    recipe.optim.lr_scheduler.min_lr = lr / 10
    if restore_from is not None:
        recipe.resume = run.Config(nl.AutoResume,
                                   restore_config=run.Config(nl.RestoreConfig, path=restore_from))
    return recipe
