"""Distillation loss: vocab-parallel KL against a dense reference, zero on itself, TP=2 == TP=1."""

import pytest
import torch
import torch.nn.functional as F

from distributed import run_distributed
from megatron_utils import TINY_GQA
from nemo_dmc.checkpoints.sharding import gather_full_grads, shard_full_state
from nemo_dmc.core import DistillConfig, DMCConfig
from nemo_dmc.megatron import parallel
from nemo_dmc.megatron.cpu_shims import causal_attention_mask
from nemo_dmc.megatron.distill import Teacher, distill_terms, vocab_parallel_kl
from nemo_dmc.megatron.model import build_model
from nemo_dmc.methods import VanillaSettings


def _logits(seed: int, shape=(2, 5, 64)) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return 3 * torch.randn(*shape, generator=generator, dtype=torch.float64)


def _dense_kl(student, teacher, temperature, direction):
    """``T^2 KL`` per token with torch's ``kl_div`` (``kl_div(input, target)`` =
    ``KL(target || input)``)."""
    log_s = F.log_softmax(student / temperature, dim=-1)
    log_t = F.log_softmax(teacher / temperature, dim=-1)
    pair = (log_s, log_t) if direction == "forward" else (log_t, log_s)
    return temperature ** 2 * F.kl_div(*pair, log_target=True, reduction="none").sum(-1)


@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_kl_and_its_gradient_match_torch_kl_div(megatron_tp1, direction, temperature):
    teacher = _logits(1)
    ours = _logits(0).requires_grad_(True)
    dense = _logits(0).requires_grad_(True)
    weights = torch.rand(2, 5, dtype=torch.float64)
    got = vocab_parallel_kl(ours, teacher, temperature, direction)
    expected = _dense_kl(dense, teacher, temperature, direction)
    torch.testing.assert_close(got, expected.float(), rtol=1e-5, atol=1e-6)
    (got * weights).sum().backward()
    (expected * weights).sum().backward()
    torch.testing.assert_close(ours.grad, dense.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_kl_is_zero_on_the_teacher_itself_and_positive_otherwise(megatron_tp1, direction):
    teacher = _logits(1).float()
    same = vocab_parallel_kl(teacher.clone().requires_grad_(True), teacher, 2.0, direction)
    assert same.abs().max() < 1e-5
    other = vocab_parallel_kl(_logits(0).float(), teacher, 2.0, direction)
    assert (other > 0).all()


def test_terms_mix_megatron_cross_entropy_and_kl_with_their_weights(megatron_tp1):
    student, teacher = _logits(0).float(), _logits(1).float()
    labels = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(2))
    settings = DistillConfig(lm_weight=0.25, kl_weight=2.0, temperature=1.5)
    terms = distill_terms(student, teacher, labels, settings)
    ce = F.cross_entropy(student.reshape(-1, 64), labels.reshape(-1), reduction="none")
    torch.testing.assert_close(terms.ce, ce.view(2, 5))
    torch.testing.assert_close(terms.loss, 0.25 * terms.ce + 2.0 * terms.kl)
    assert torch.equal(student, _logits(0).float())  # the logits are left as they were


def test_teacher_is_frozen_and_outside_the_students_parameters(megatron_tp1):
    teacher = Teacher(build_model(TINY_GQA, VanillaSettings()).train(), DistillConfig())
    assert not teacher.module.training
    assert not any(p.requires_grad for p in teacher.module.parameters())
    count = sum(p.numel() for p in teacher.module.parameters())
    assert teacher.param_bytes == 4 * count


# -- TP=2 == TP=1 -------------------------------------------------------------------------

DMC = DMCConfig(init_offset=0.0, window=4)  # the student merges about half: KL > 0


def _distill_run(student, teacher, direction: str) -> dict:
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, TINY_GQA.vocab_size, (2, 16), generator=g)
    labels = torch.roll(tokens, -1, dims=1)
    positions, mask = torch.arange(16).expand(2, 16), causal_attention_mask(16)
    student.train()
    student.zero_grad(set_to_none=True)
    torch.manual_seed(11)
    teach = Teacher(teacher, DistillConfig(lm_weight=0.5, temperature=2.0, direction=direction))
    terms = teach.terms(student, tokens, positions, mask, labels)
    loss = terms.loss.mean()
    loss.backward()
    return {"loss": loss.detach(), "kl": terms.kl.detach(), "ce": terms.ce.detach(),
            "grads": gather_full_grads(student)}


def _tp_worker(rank: int, world: int) -> None:
    parallel.initialize(tensor_parallel_size=1, seed=0)
    student, teacher = build_model(TINY_GQA, DMC), build_model(TINY_GQA, VanillaSettings())
    full = {k: v.clone() if torch.is_tensor(v) else v for k, v in student.state_dict().items()}
    teacher.load_state_dict(full)
    reference = {d: _distill_run(student, teacher, d) for d in ("forward", "reverse")}
    parallel.initialize(tensor_parallel_size=2, seed=0)
    student, teacher = build_model(TINY_GQA, DMC), build_model(TINY_GQA, VanillaSettings())
    student.load_state_dict(shard_full_state(full, student))
    teacher.load_state_dict(shard_full_state(full, teacher))
    for direction, ref in reference.items():
        got = _distill_run(student, teacher, direction)
        assert ref["kl"].mean() > 1e-4, direction  # (0 at the first token: it appends)
        for key in ("loss", "kl", "ce"):
            torch.testing.assert_close(got[key], ref[key], atol=1e-5, rtol=1e-5,
                                       msg=lambda m, k=key: f"rank {rank} {direction} {k}: {m}")
        for name, grad in ref["grads"].items():
            torch.testing.assert_close(got["grads"][name], grad, atol=2e-6, rtol=1e-4,
                                       msg=f"rank {rank} {direction} grad {name}")
    parallel.shutdown()


def test_tp2_matches_tp1_distillation_loss_and_gradients():
    run_distributed(_tp_worker, 2)
