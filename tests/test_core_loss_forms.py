"""The forms of the compression loss: global or per-sequence hinge, layer/head floors, cap."""

import pytest
import torch

from nemo_dmc.core import DMCConfig, cap_fraction, compression_loss, dmc_compression_loss

# [batch=2, layers=2, kv_heads=2] merge fractions; target CR 4 -> p* = 0.75.
FRACTIONS = torch.tensor([[[0.9, 0.9], [0.9, 0.9]],
                          [[0.6, 0.6], [0.2, 1.0]]])


def test_global_form_is_the_hinge_of_the_mean_decision():
    loss = dmc_compression_loss(FRACTIONS, 4.0)
    assert loss.item() == pytest.approx(0.0)  # mean 0.75: on target
    torch.testing.assert_close(loss, compression_loss(FRACTIONS.mean(), 4.0))


def test_sequence_form_clamps_each_sequence_before_averaging():
    # sequence means 0.9 (free) and 0.6 (short by 0.15): (0 + 0.15) / 2
    loss = dmc_compression_loss(FRACTIONS, 4.0, reduction="sequence")
    assert loss.item() == pytest.approx(0.075)


def test_layer_floor_hinges_each_layer_at_the_target():
    # pooled layers: 0.75 (on target), 0.75 -> 0; per sequence: layer 0 of seq 1 at 0.6
    assert dmc_compression_loss(FRACTIONS, 4.0, balance="layer").item() == pytest.approx(0.0)
    per_sequence = dmc_compression_loss(FRACTIONS, 4.0, "sequence", "layer")
    assert per_sequence.item() == pytest.approx((0.15 + 0.15) / 4)


def test_head_floor_sees_a_head_that_the_others_make_up_for():
    # pooled heads: [0.75, 0.75], [0.55, 0.95] -> only head (1, 0) is short, by 0.2
    loss = dmc_compression_loss(FRACTIONS, 4.0, balance="head")
    assert loss.item() == pytest.approx(0.2 / 4)


def test_cap_penalises_a_unit_above_k_times_the_target():
    threshold = cap_fraction(4.0, 2.0)  # a unit at 8x merges 0.875
    assert threshold == pytest.approx(0.875)
    # pooled heads 0.95 is the one above: 0.075 / 4 heads, on top of the floor's 0.05
    loss = dmc_compression_loss(FRACTIONS, 4.0, balance="head", cap=2.0)
    assert loss.item() == pytest.approx(0.05 + 0.075 / 4)
    # without balance the cap acts on layers: pooled layers 0.75, 0.75 are under 0.875
    assert dmc_compression_loss(FRACTIONS, 4.0, cap=2.0).item() == pytest.approx(0.0)


def test_floor_gradient_reaches_only_the_units_below_the_target():
    fractions = FRACTIONS.clone().requires_grad_(True)
    dmc_compression_loss(fractions, 4.0, balance="head").backward()
    grad = fractions.grad
    assert grad[:, 1, 0].lt(0).all()  # the short head is pushed to merge more
    grad[:, 1, 0] = 0
    assert grad.eq(0).all()


@pytest.mark.parametrize("change, key", [({"loss_reduction": "token"}, "dmc.loss_reduction"),
                                         ({"balance": "model"}, "dmc.balance"),
                                         ({"balance_cap": 1.0}, "dmc.balance_cap"),
                                         ({"balance_cap": -2.0}, "dmc.balance_cap")])
def test_bad_loss_form_settings_are_rejected_by_key(change, key):
    with pytest.raises(ValueError, match=key):
        DMCConfig(**change)


def test_loss_form_settings_travel_with_the_method_settings():
    from nemo_dmc.methods import settings_from_dict, settings_to_dict

    form = DMCConfig(loss_reduction="sequence", balance="layer", balance_cap=3.0)
    assert settings_from_dict(settings_to_dict(form)) == form


def test_dms_takes_the_loss_form_from_dmc_settings_and_its_stats_use_it():
    from nemo_dmc.megatron.stats import DMCStats
    from nemo_dmc.methods import settings_for, settings_from_dict, settings_to_dict
    from nemo_dmc.methods.dms import DMSConfig

    dms = settings_for("dms", DMCConfig(balance="head", balance_cap=2.0), window=4)
    assert (dms.balance, dms.balance_cap, dms.window) == ("head", 2.0, 4)
    assert settings_from_dict(settings_to_dict(dms)) == dms
    stats = DMCStats(merge_fraction=FRACTIONS.mean(), layer_cr=torch.ones(2),
                     head_cr=torch.ones(2, 2), head_fraction=FRACTIONS)
    torch.testing.assert_close(stats.loss(4.0, dms), dmc_compression_loss(
        FRACTIONS, 4.0, balance="head", cap=2.0))
    assert stats.loss(4.0, DMSConfig()).item() == pytest.approx(0.0)  # default: global hinge
    with pytest.raises(ValueError, match="dms.balance_cap"):
        DMSConfig(balance_cap=0.5)
