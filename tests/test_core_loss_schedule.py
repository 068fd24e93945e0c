"""Compression loss, realised CR and the stage schedules."""

import pytest
import torch

from nemo_dmc.core import (
    Stage,
    compression_loss,
    dmc_score_bias,
    merge_target,
    realised_cr,
    target_cr,
    zero_out_scale,
)


def test_compression_loss_is_one_sided():
    r = torch.tensor(0.5, requires_grad=True)
    assert compression_loss(torch.tensor(0.9), 4.0).item() == 0.0  # merging more is free
    loss = compression_loss(r, 4.0)                                  # p* = 0.75
    assert loss.item() == pytest.approx(0.25)
    loss.backward()
    assert r.grad.item() == pytest.approx(-1.0)  # pushes towards more merges


def test_merge_target_and_realised_cr_are_inverse():
    for cr in (1.0, 2.0, 4.0, 8.0):
        assert realised_cr(torch.tensor(merge_target(cr))).item() == pytest.approx(cr)


def test_cr_below_one_is_rejected():
    with pytest.raises(ValueError, match="compression ratio must be >= 1"):
        merge_target(0.5)
    with pytest.raises(ValueError, match="dmc.target_cr"):
        target_cr("retrofit", 0, 10, 0.9)


def test_retrofit_ramps_linearly_from_one_to_target_then_finetune_holds():
    assert target_cr(Stage.RETROFIT, 0, 100, 4.0) == 1.0
    assert target_cr(Stage.RETROFIT, 50, 100, 4.0) == pytest.approx(2.5)
    assert target_cr(Stage.RETROFIT, 100, 100, 4.0) == 4.0
    assert target_cr(Stage.RETROFIT, 150, 100, 4.0) == 4.0
    assert target_cr("finetune", 0, 10, 4.0) == 4.0
    assert target_cr("zero_out", 5, 10, 4.0) == 1.0


def test_zero_out_scale_decays_to_zero_at_eighty_percent():
    assert zero_out_scale(0, 100) == 1.0
    assert zero_out_scale(40, 100) == pytest.approx(0.5)
    assert zero_out_scale(80, 100) == 0.0
    assert zero_out_scale(99, 100) == 0.0


def test_score_bias_is_causal_with_exempt_diagonal():
    state_bias = torch.tensor([[[-1.0, -2.0, -3.0]]])
    bias = dmc_score_bias(state_bias)[0, 0]
    inf = float("-inf")
    assert bias.tolist() == [[0.0, inf, inf], [-1.0, 0.0, inf], [-1.0, -2.0, 0.0]]
