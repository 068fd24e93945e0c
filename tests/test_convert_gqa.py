"""GQA up-training baseline: mean-pooled KV heads, and a checkpoint the trainer continues."""

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from megatron_utils import TINY_GQA
from nemo_dmc.convert.gqa import main, mean_pool_kv_heads
from nemo_dmc.core import ModelConfig
from nemo_dmc.megatron.cpu_shims import causal_attention_mask
from nemo_dmc.megatron.model import build_model
from nemo_dmc.megatron.stats import method_attentions
from nemo_dmc.methods import VanillaSettings

REPO = Path(__file__).resolve().parents[1]
QKV = "self_attention.linear_qkv.weight"


def _plain_model(cfg: ModelConfig, state=None):
    model = build_model(cfg, VanillaSettings()).eval()  # plain attention
    if state is not None:
        model.load_state_dict(state)
    return model


def _logits(model, cfg: ModelConfig, seq=16):
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (2, seq), generator=g)
    with torch.no_grad():
        return model(tokens, torch.arange(seq).expand(2, seq), causal_attention_mask(seq))


def _tie_kv_heads(state, cfg: ModelConfig, groups: int):
    """Copy each new group's first old KV head over the other old heads it will absorb."""
    state = {k: v.clone() if torch.is_tensor(v) else v for k, v in state.items()}
    per_group = cfg.num_attention_heads // cfg.kv_heads
    merged = cfg.kv_heads // groups
    for name, w in state.items():
        if name.endswith(QKV):
            x = w.view(cfg.kv_heads, per_group + 2, cfg.head_dim, -1)
            for old in range(cfg.kv_heads):
                x[old, per_group:] = x[old - old % merged, per_group:]
    return state


@pytest.mark.parametrize("groups", [2, 1])
def test_pooling_equal_kv_heads_leaves_the_model_function_unchanged(megatron_tp1, groups):
    model = _plain_model(TINY_GQA)
    tied = _tie_kv_heads(model.state_dict(), TINY_GQA, groups)
    before = _logits(_plain_model(TINY_GQA, tied), TINY_GQA)

    state, cfg = mean_pool_kv_heads(tied, TINY_GQA, groups)
    assert cfg == replace(TINY_GQA, num_query_groups=groups)
    after = _logits(_plain_model(cfg, state), cfg)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)

    # The check can fail: pooling heads that differ changes the function.
    untied, _ = mean_pool_kv_heads(model.state_dict(), TINY_GQA, groups)
    assert not torch.allclose(_logits(_plain_model(cfg, untied), cfg), _logits(model, TINY_GQA),
                              atol=1e-3)


def test_pooled_heads_follow_megatrons_qkv_layout(megatron_tp1):
    # 8 query heads, 4 KV heads -> 2 groups: megatron's own split of the pooled weight gives
    # the same query heads in the same order, and each new K/V head is the mean of two.
    model = _plain_model(TINY_GQA)
    state, cfg = mean_pool_kv_heads(model.state_dict(), TINY_GQA, 2)
    pooled = _plain_model(cfg, state)
    hidden = torch.randn(5, 2, TINY_GQA.hidden_size)
    old = method_attentions(model)[0].get_query_key_value_tensors(hidden)
    new = method_attentions(pooled)[0].get_query_key_value_tensors(hidden)
    torch.testing.assert_close(new[0], old[0])  # queries [s, b, 8, d]
    for i in (1, 2):  # keys, values [s, b, groups, d]
        mean = old[i].reshape(5, 2, 2, 2, TINY_GQA.head_dim).mean(dim=3)
        torch.testing.assert_close(new[i], mean, rtol=1e-6, atol=1e-6)


def test_pooling_leaves_other_weights_and_the_source_untouched(megatron_tp1):
    source = {k: v for k, v in _plain_model(TINY_GQA).state_dict().items() if torch.is_tensor(v)}
    copy = {k: v.clone() for k, v in source.items()}
    state, _ = mean_pool_kv_heads(source, TINY_GQA, 1)
    assert all(torch.equal(source[k], copy[k]) for k in source)
    changed = {k for k in state if state[k] is not source[k]}
    assert changed == {k for k in source if k.endswith(QKV)} and len(changed) == 2


def test_groups_must_divide_the_kv_heads():
    with pytest.raises(ValueError, match=r"groups=3 must divide the checkpoint's 4 KV heads"):
        mean_pool_kv_heads({}, TINY_GQA, 3)


def test_cli_reports_a_missing_source(tmp_path, capsys):
    assert main(["--src", str(tmp_path / "nope"), "--dst", str(tmp_path / "out"),
                 "--groups", "1"]) == 2
    assert "--src" in capsys.readouterr().err


def test_cli_writes_a_checkpoint_the_trainer_continues_with_fewer_groups(tmp_path, capsys):
    from nemo_dmc.checkpoints.weights import read_model_config, save_weights_checkpoint
    from nemo_dmc.megatron import parallel
    from nemo_dmc.training.launch import free_port

    micro = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                        ffn_hidden_size=128, vocab_size=256, seq_length=32)  # conf/model/micro
    os.environ["MASTER_PORT"] = str(free_port())
    parallel.initialize(tensor_parallel_size=1, seed=0)
    try:
        save_weights_checkpoint(build_model(micro, method=None), micro, tmp_path / "src")
    finally:
        parallel.shutdown()

    dst = tmp_path / "gqa1"
    assert main(["--src", str(tmp_path / "src"), "--dst", str(dst), "--groups", "3"]) == 2
    assert "must divide" in capsys.readouterr().err and not dst.exists()
    assert main(["--src", str(tmp_path / "src"), "--dst", str(dst), "--groups", "1"]) == 0
    assert read_model_config(dst) == replace(micro, num_query_groups=1)

    run = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "nemo_dmc.train", "model=micro", "data=random", "stage=pretrain",
         "stage.pretrain.steps=1", "logging=quiet", f"checkpoint.pretrained={dst}",
         "model.num_query_groups=1", f"hydra.run.dir={run}"],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"initial weights from {dst / 'weights'}" in result.stdout + result.stderr
    assert (run / "checkpoints" / "pretrain" / "step_0000001").is_dir()
