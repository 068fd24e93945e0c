"""Pipeline parallelism: two stages give the loss and gradients of one, decision rows included.

The compression loss couples every layer (a layer hinge and a cap here), so the first stage's
decision parameters get their share of its gradient only through the fractions its
activations carry to the last stage (:mod:`nemo_dmc.megatron.pipeline`).
"""

from dataclasses import replace

import pytest
import torch

from distributed import run_distributed
from megatron_utils import TINY_GQA
from nemo_dmc.core import DMCConfig
from nemo_dmc.megatron import parallel
from nemo_dmc.megatron.cpu_shims import causal_attention_mask
from nemo_dmc.megatron.model import build_model
from nemo_dmc.megatron.pipeline import (
    ModelChunks,
    PipelineStageModel,
    carry_rows,
    first_layer,
    model_chunks,
)
from nemo_dmc.methods import DMSConfig
from nemo_dmc.training.loop import PassTotals, run_micro_batches, training_loss

SHAPE = replace(TINY_GQA, num_layers=4)
SETTINGS = {
    "dmc_layer_hinge_and_cap": DMCConfig(init_offset=0.0, window=4, balance="layer",
                                          balance_cap=1.5, loss_weight=3.0),
    "dms": DMSConfig(init_offset=0.0, window=4, loss_weight=3.0),
}
SEQ, MICRO, NUM_MICRO = 16, 2, 3


def _batches(num_micro: int = NUM_MICRO):
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(num_micro):
        tokens = torch.randint(0, SHAPE.vocab_size, (MICRO, SEQ + 1), generator=g)
        out.append({"tokens": tokens[:, :-1], "labels": tokens[:, 1:],
                    "position_ids": torch.arange(SEQ).expand(MICRO, SEQ),
                    "loss_mask": torch.ones(MICRO, SEQ),
                    "attention_mask": causal_attention_mask(SEQ)})
    return out


def _global_name(name: str, offset: int) -> str:
    parts = name.split(".")
    for i in range(len(parts) - 2):
        if parts[i:i + 2] == ["decoder", "layers"]:
            parts[i + 2] = str(int(parts[i + 2]) + offset)
    return ".".join(parts)


def _step(model, target_cr, num_micro: int = NUM_MICRO):
    """One training pass (fixed noise scopes): mean losses, fractions and every local
    parameter's gradient under its global name."""
    model.train()
    model.zero_grad()
    batches, mask = _batches(num_micro), causal_attention_mask(SEQ)
    totals = PassTotals(3, SHAPE.num_layers)
    run_micro_batches(model, batches.__getitem__, num_micro, mask,
                      training_loss(target_cr, totals),
                      lambda m, b: m(b["tokens"], b["position_ids"], mask, labels=b["labels"]),
                      lambda micro: f"pp-test/{micro}", totals, forward_only=False)
    losses, fractions, decided = totals.reduce()
    grads = {}
    for chunk in model_chunks(model):
        offset = first_layer(chunk)
        grads.update({_global_name(n, offset): p.grad.clone()
                      for n, p in chunk.named_parameters() if p.grad is not None})
    return losses / num_micro, fractions / num_micro, decided, grads


def _decision_grads(grads):
    return {n: g for n, g in grads.items() if n.startswith("decoder.layers.0.")
            and "linear_qkv" in n}


def _pp_worker(rank: int, world: int, settings) -> None:
    parallel.initialize(seed=0)
    single = build_model(SHAPE, settings)
    state = {k: v.clone() if torch.is_tensor(v) else v for k, v in single.state_dict().items()}
    ref_losses, ref_fractions, _, ref_grads = _step(single, 4.0)
    _, _, _, lm_only = _step(single, None)

    parallel.initialize(seed=0, pipeline_parallel_size=2)
    stage = build_model(SHAPE, settings)
    assert isinstance(stage, PipelineStageModel)
    assert stage.carry_rows == carry_rows(4, SHAPE.kv_heads, SHAPE.hidden_size) == 1
    offset = first_layer(stage)
    assert offset == 2 * rank
    stage.load_state_dict({name: state[_global_name(name, offset)]
                           for name in stage.state_dict()})
    losses, fractions, decided, grads = _step(stage, 4.0)
    assert decided
    torch.testing.assert_close(losses, ref_losses, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(fractions, ref_fractions, atol=1e-6, rtol=1e-5)
    assert ref_losses[1] > 0  # the compression loss is active
    assert grads and all(name in ref_grads for name in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], atol=2e-6, rtol=1e-4, msg=name)
    if rank == 0:  # the first stage's decision rows feel the compression loss
        with_loss, lm = _decision_grads(grads), _decision_grads(lm_only)
        assert with_loss and any(not torch.allclose(with_loss[n], lm[n]) for n in with_loss)
    parallel.shutdown()


@pytest.mark.parametrize("settings", list(SETTINGS.values()), ids=list(SETTINGS))
def test_two_pipeline_stages_match_one_in_loss_fractions_and_every_gradient(settings):
    run_distributed(_pp_worker, 2, settings)


def _vpp_worker(rank: int, world: int) -> None:
    settings = SETTINGS["dmc_layer_hinge_and_cap"]
    parallel.initialize(seed=0)
    single = build_model(SHAPE, settings)
    state = {k: v.clone() if torch.is_tensor(v) else v for k, v in single.state_dict().items()}
    ref_losses, ref_fractions, _, ref_grads = _step(single, 4.0, num_micro=4)

    parallel.initialize(seed=0, pipeline_parallel_size=2, virtual_pipeline_parallel_size=2)
    chunks = [build_model(SHAPE, settings, vp_stage=v) for v in range(2)]
    # layers interleave over the ranks: rank 0 holds layers 0 and 2, rank 1 layers 1 and 3
    assert [first_layer(chunk) for chunk in chunks] == [rank, 2 + rank]
    for chunk in chunks:
        offset = first_layer(chunk)
        chunk.load_state_dict({name: state[_global_name(name, offset)]
                               for name in chunk.state_dict()})
    losses, fractions, _, grads = _step(ModelChunks(chunks), 4.0, num_micro=4)
    torch.testing.assert_close(losses, ref_losses, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(fractions, ref_fractions, atol=1e-6, rtol=1e-5)
    assert len(grads) > 0 and all(name in ref_grads for name in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], atol=2e-6, rtol=1e-4, msg=name)
    parallel.shutdown()


def test_interleaved_virtual_stages_match_one_stage():
    run_distributed(_vpp_worker, 2)


def test_carry_rows_hold_every_layer_and_kv_head():
    assert carry_rows(80, 8, 8192) == 1
    assert carry_rows(4, 2, 4) == 2 and carry_rows(4, 2, 3) == 3


def _nemo_step(model):
    """NeMo's path through megatron's schedule: ``forward_step`` and the training loss
    reduction (``(loss_sum, num_tokens, logged)``), the schedule sized for the sequence alone
    (NeMo does not know the carry rows: they travel by shape exchange)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from nemo_dmc.megatron.noise import noise_scope

    model.train()
    model.zero_grad()
    model.stage_target_cr = 4.0
    batches = _batches()

    def forward_step(data_iterator, module):
        micro = next(data_iterator)
        batch = batches[micro]
        with noise_scope(f"nemo/{micro}"):
            out = module.forward_step(batch)
        return out, lambda output: model.training_loss_reduction.forward(batch, output)

    get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(range(NUM_MICRO)), model=[model],
        num_microbatches=NUM_MICRO, seq_length=SEQ, micro_batch_size=MICRO, forward_only=False)
    offset = first_layer(model)
    return {_global_name(n, offset): p.grad.clone() for n, p in model.named_parameters()
            if p.grad is not None}


def _nemo_worker(rank: int, world: int) -> None:
    from nemo_dmc.nemo import DMCGPTModel
    from nemo_dmc.nemo.config import dmc_llama_config

    settings = SETTINGS["dmc_layer_hinge_and_cap"]

    def nemo_model(pp):
        config = dmc_llama_config(SHAPE, settings, stage="retrofit",
                                  pipeline_model_parallel_size=pp, pipeline_dtype=torch.float32)
        model = DMCGPTModel(config, tokenizer=None)
        model.configure_model()
        return model

    parallel.initialize(seed=0)
    single = nemo_model(1)
    state = {k: v.clone() for k, v in single.state_dict().items() if torch.is_tensor(v)}
    reference = _nemo_step(single)
    parallel.initialize(seed=0, pipeline_parallel_size=2)
    stage = nemo_model(2)
    assert isinstance(stage.module, PipelineStageModel) and stage.module.carry_rows == 1
    offset = first_layer(stage)
    stage.load_state_dict({name: state[_global_name(name, offset)]
                           for name, value in stage.state_dict().items() if torch.is_tensor(value)},
                          strict=False)
    grads = _nemo_step(stage)
    assert grads and all(name in reference for name in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, reference[name], atol=2e-6, rtol=1e-4, msg=name)
    parallel.shutdown()


def test_nemo_model_under_two_pipeline_stages_matches_one_in_every_gradient():
    run_distributed(_nemo_worker, 2)
