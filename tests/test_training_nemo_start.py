"""The trainer starts a stage from a NeMo 2 checkpoint (``checkpoint.pretrained``)."""

from __future__ import annotations

import pytest

pytest.importorskip("nemo.collections.llm", reason="needs the `nemo` extra")

from nemo_dmc.megatron import parallel  # noqa: E402
from nemo_dmc.megatron.model import build_model  # noqa: E402
from nemo_dmc.nemo.checkpoint import export_nemo_checkpoint  # noqa: E402
from nemo_dmc.training.config import ConfigError, validate_config  # noqa: E402
from nemo_dmc.training.launch import free_port  # noqa: E402
from test_training_loop import micro_config, records, train  # noqa: E402,F401


def test_a_stage_starts_from_a_nemo2_checkpoint_whose_shape_is_checked(train, tmp_path, capsys,
                                                                        monkeypatch):
    nemo = tmp_path / "nemo"
    cfg = micro_config(tmp_path / "run")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    parallel.initialize(tensor_parallel_size=1, seed=7)
    try:
        export_nemo_checkpoint(build_model(cfg.model, cfg.dmc.core()), cfg.model, cfg.dmc.core(),
                               nemo)
    finally:
        parallel.shutdown()
    assert (nemo / "context").is_dir() and not (nemo / "model_config.yaml").exists()

    other = micro_config(tmp_path / "run", "model.hidden_size=128", f"checkpoint.pretrained={nemo}")
    with pytest.raises(ConfigError, match=r"model.hidden_size.*128.*has 64.*context"):
        validate_config(other, world_size=1, cuda_available=False)

    # The context records the padded vocabulary (NeMo builds the model from it as is):
    # a tokenizer vocabulary that pads to the same size matches.
    assert cfg.model.vocab_size % cfg.model.make_vocab_size_divisible_by == 0
    smaller = micro_config(tmp_path / "run", f"model.vocab_size={cfg.model.vocab_size - 50}",
                           f"checkpoint.pretrained={nemo}")
    validate_config(smaller, world_size=1, cuda_available=False)

    (summary,) = train(tmp_path / "run", "stage=retrofit", "stage.retrofit.steps=1",
                       f"checkpoint.pretrained={nemo}")
    assert f"[retrofit] initial weights from {nemo / 'weights'}" in capsys.readouterr().out
    assert summary.steps_run == 1 and len(records(tmp_path / "run", "retrofit")) == 1
