"""Tensor parallelism: a TP=2 DMC (or DMS) model equals the TP=1 model with the same weights."""

import pytest
import torch
from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

from distributed import run_distributed
from megatron_utils import TINY_GQA
from nemo_dmc.checkpoints.sharding import gather_full_grads, shard_full_state
from nemo_dmc.core import DMCConfig
from nemo_dmc.megatron import parallel
from nemo_dmc.megatron.cpu_shims import causal_attention_mask
from nemo_dmc.megatron.model import build_model
from nemo_dmc.megatron.stats import collect_dmc_stats
from nemo_dmc.methods import DMSConfig

DMC = DMCConfig(init_offset=0.0, window=4)  # offset 0: a random init merges about half
DMS = DMSConfig(init_offset=0.0, window=4)  # ... or evicts about half (after a 4-token delay)


def _run(model) -> dict:
    """Eval logits/stats, then one training forward/backward with fixed Gumbel noise."""
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, TINY_GQA.vocab_size, (2, 16), generator=g)
    positions, mask = torch.arange(16).expand(2, 16), causal_attention_mask(16)
    model.eval()
    with torch.no_grad():
        logits = gather_from_tensor_model_parallel_region(model(tokens, positions, mask))
        eval_stats = collect_dmc_stats(model)
    model.train()
    torch.manual_seed(123)
    lm_loss = model(tokens, positions, mask, labels=tokens).mean()
    stats = collect_dmc_stats(model)
    dmc_loss = stats.loss(4.0)
    (lm_loss + dmc_loss).backward()
    return {"logits": logits, "head_cr": eval_stats.head_cr, "lm_loss": lm_loss.detach(),
            "merge_fraction": stats.merge_fraction.detach(), "dmc_loss": dmc_loss.detach(),
            "grads": gather_full_grads(model)}


def _compare(ref: dict, got: dict, label: str) -> None:
    for key in ("logits", "head_cr", "lm_loss", "merge_fraction", "dmc_loss"):
        torch.testing.assert_close(got[key], ref[key], atol=2e-6, rtol=1e-5, msg=f"{label} {key}")
    assert ref["dmc_loss"] > 0 and 0.2 < ref["merge_fraction"] < 0.8
    assert ref["grads"].keys() == got["grads"].keys()
    for name, grad in ref["grads"].items():
        torch.testing.assert_close(got["grads"][name], grad, atol=2e-6, rtol=1e-4,
                                   msg=f"{label} grad {name}")


def _tp_worker(rank: int, world: int, settings=DMC) -> None:
    parallel.initialize(tensor_parallel_size=1, seed=0)
    model = build_model(TINY_GQA, settings)
    full_state = {k: v.clone() if torch.is_tensor(v) else v for k, v in model.state_dict().items()}
    reference = _run(model)
    parallel.initialize(tensor_parallel_size=2, seed=0)
    sharded = build_model(TINY_GQA, settings)
    sharded.load_state_dict(shard_full_state(full_state, sharded))
    _compare(reference, _run(sharded), f"rank {rank} tp=2")
    parallel.shutdown()


@pytest.mark.parametrize("settings", [DMC, DMS], ids=["dmc", "dms"])
def test_tp2_matches_tp1_logits_dmc_loss_and_gradients_for_gqa(settings):
    run_distributed(_tp_worker, 2, settings)


def _heads_not_dividing_worker(rank: int, world: int) -> None:
    """A raw TransformerConfig (no ModelConfig validation) with 3 KV heads at TP=2."""
    import pytest
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer.transformer_config import TransformerConfig

    from nemo_dmc.megatron.spec import method_layer_spec, llama_layer_spec

    parallel.initialize(tensor_parallel_size=2, seed=0)
    config = TransformerConfig(num_layers=1, hidden_size=48, num_attention_heads=6,
                               num_query_groups=3, use_cpu_initialization=True)
    with pytest.raises(ValueError, match=r"num_query_groups \(3\) must be divisible by the "
                                         r"tensor-parallel size \(2\)"):
        GPTModel(config, method_layer_spec(llama_layer_spec(False), DMCConfig()), vocab_size=64,
                 max_sequence_length=16)
    parallel.shutdown()


def test_kv_heads_not_dividing_tensor_parallel_size_is_a_clear_error():
    run_distributed(_heads_not_dividing_worker, 2)
