"""Retrofitting with decision adapters in the trainer: from an original checkpoint (no
adapter weights), with the base frozen (``optim.trainable=decisions``) or not."""

from __future__ import annotations

import pytest
import torch

from nemo_dmc.checkpoints.run_dir import latest_checkpoint
from nemo_dmc.core import DMCConfig
from nemo_dmc.megatron.model import build_model
from nemo_dmc.checkpoints.weights import load_weights_checkpoint
from nemo_dmc.training.config import ConfigError, validate_config
from test_training_loop import micro_config, records, train  # noqa: F401 (fixture)

ADAPTER = ("dmc.decision_source=adapter", "stage=[retrofit,finetune]", "dmc.loss_weight=30",
           "dmc.decision_scale=8",
           "stage.retrofit.steps=8", "stage.finetune.steps=2", "dmc.target_cr=4")


def _weights(path, megatron_ok=True):
    from nemo_dmc.core import ModelConfig
    from nemo_dmc.megatron import parallel
    from nemo_dmc.training.launch import free_port
    import os

    os.environ["MASTER_PORT"] = str(free_port())
    parallel.initialize(tensor_parallel_size=1, seed=0)
    try:
        cfg = micro_config(path.parent)
        model = build_model(cfg.model, DMCConfig(decision_source="adapter"))
        load_weights_checkpoint(model, path)
        return {k: v.clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}
    finally:
        parallel.shutdown()


@pytest.mark.parametrize("trainable", ["decisions", "all"])
def test_adapter_retrofit_from_an_original_checkpoint(train, tmp_path, trainable):
    [_] = train(tmp_path / "base", "stage=pretrain", "stage.pretrain.steps=2")
    base = latest_checkpoint(tmp_path / "base" / "checkpoints" / "pretrain")
    run_dir = tmp_path / trainable
    retrofit, finetune = train(run_dir, *ADAPTER, f"optim.trainable={trainable}",
                               f"checkpoint.pretrained={base}")
    logged = records(run_dir, "retrofit")
    assert logged[0]["cr"] < 1.1 < logged[-1]["cr"]  # starts appending, learns to merge
    before = _weights(base)
    after = _weights(latest_checkpoint(run_dir / "checkpoints" / "finetune"))
    adapter = [k for k in after if "decision_adapter" in k]
    assert adapter and all(torch.count_nonzero(before[k]) == 0 for k in adapter
                           if k.endswith("linear.weight"))
    assert any(not torch.equal(before[k], after[k]) for k in adapter)
    base_keys = [k for k in after if "decision_adapter" not in k]
    changed = [k for k in base_keys if not torch.equal(before[k], after[k])]
    assert (changed == []) == (trainable == "decisions")


@pytest.mark.parametrize("overrides,key", [
    (("dmc.decision_source=adapter", "stage=[zero_out,retrofit]"), "stage.zero_out"),
    (("optim.trainable=decisions", "stage=retrofit"), "optim.trainable"),
    (("optim.trainable=everything",), "optim.trainable"),
    (("dmc.decision_source=adapter", "optim.trainable=decisions", "stage=pretrain"),
     "optim.trainable"),
    (("dmc.decision_source=probe",), "dmc.decision_source"),
])
def test_adapter_settings_are_checked_by_name(tmp_path, overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate_config(micro_config(tmp_path, *overrides), 1, False)


def test_decision_lr_mult_is_checked_by_name(tmp_path):
    with pytest.raises(ConfigError, match=r"optim\.decision_lr_mult"):
        validate_config(micro_config(tmp_path, "optim.decision_lr_mult=0"), 1, False)
