"""Every compression-loss form is the same at TP=2 as at TP=1, value and gradients."""

import torch

from distributed import run_distributed
from megatron_utils import TINY_GQA
from nemo_dmc.checkpoints.sharding import gather_full_grads, shard_full_state
from nemo_dmc.core import DMCConfig
from nemo_dmc.megatron import parallel
from nemo_dmc.megatron.cpu_shims import causal_attention_mask
from nemo_dmc.megatron.model import build_model
from nemo_dmc.megatron.stats import collect_dmc_stats

DMC = DMCConfig(init_offset=0.0, window=4)  # a random init merges about half
# (target CR, settings): floors short of a 4x target, a cap above 1.5 x 1.2
FORMS = [(4.0, DMCConfig(loss_reduction="global")),
         (4.0, DMCConfig(loss_reduction="sequence")),
         (4.0, DMCConfig(balance="layer")),
         (4.0, DMCConfig(loss_reduction="sequence", balance="head")),
         (1.2, DMCConfig(balance="head", balance_cap=1.5)),
         (1.2, DMCConfig(loss_reduction="sequence", balance_cap=1.5))]


def _losses_and_grads(model) -> list:
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, TINY_GQA.vocab_size, (3, 16), generator=g)
    positions, mask = torch.arange(16).expand(3, 16), causal_attention_mask(16)
    model.train()
    torch.manual_seed(7)
    model(tokens, positions, mask, labels=tokens)
    stats = collect_dmc_stats(model)
    out = []
    for target, form in FORMS:
        for param in model.parameters():  # only the decision rows get a gradient
            param.grad = torch.zeros_like(param)
        loss = stats.loss(target, form)
        loss.backward(retain_graph=True)
        out.append((loss.detach(), gather_full_grads(model)))
    return out


def _worker(rank: int, world: int) -> None:
    parallel.initialize(tensor_parallel_size=1, seed=0)
    model = build_model(TINY_GQA, DMC)
    full_state = {k: v.clone() if torch.is_tensor(v) else v for k, v in model.state_dict().items()}
    reference = _losses_and_grads(model)
    parallel.initialize(tensor_parallel_size=2, seed=0)
    sharded = build_model(TINY_GQA, DMC)
    sharded.load_state_dict(shard_full_state(full_state, sharded))
    for (target, form), (ref_loss, ref_grads), (loss, grads) in zip(
            FORMS, reference, _losses_and_grads(sharded)):
        label = f"rank {rank} {form.loss_reduction}/{form.balance}/cap {form.balance_cap}"
        assert ref_loss > 0, label
        torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-5, msg=label)
        assert any(g.abs().sum() > 0 for g in ref_grads.values() if g is not None), label
        for name, grad in ref_grads.items():
            torch.testing.assert_close(grads[name], grad, atol=2e-6, rtol=1e-4,
                                       msg=f"{label} grad {name}")
    parallel.shutdown()


def test_tp2_matches_tp1_for_every_compression_loss_form_with_gradients():
    run_distributed(_worker, 2)
