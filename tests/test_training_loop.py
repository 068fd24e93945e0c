"""End-to-end stage runs in this process (2-layer model, random tokens)."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import List

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from nemo_dmc.core import DMCConfig
from nemo_dmc.megatron import parallel
from nemo_dmc.megatron.model import build_model
from nemo_dmc.megatron.zero_out import decision_channel_rows
from nemo_dmc.train import CONFIG_DIR, to_train_config
from nemo_dmc.checkpoints.run_dir import latest_checkpoint
from nemo_dmc.checkpoints.weights import load_weights_checkpoint
from nemo_dmc.training.config import ConfigError, TrainConfig
from nemo_dmc.training.launch import free_port
from nemo_dmc.training.metrics import StageSummary
from nemo_dmc.training.runner import run

MICRO_RUN = ["model=micro", "data=random", "logging=quiet", "data.micro_batch_size=2",
             "data.global_batch_size=4", "optim.lr=1e-2"]


def micro_config(run_dir: Path, *overrides: str) -> TrainConfig:
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[f"run_dir={run_dir}", *MICRO_RUN, *overrides])
    return to_train_config(cfg)


@pytest.fixture
def train():
    """``train(run_dir, *overrides)`` runs conf/config.yaml in-process on one rank; the
    rendezvous variables a run exports are removed afterwards."""
    saved = dict(os.environ)

    def _train(run_dir: Path, *overrides: str) -> List[StageSummary]:
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
            os.environ.pop(key, None)
        return run(micro_config(run_dir, *overrides))

    yield _train
    os.environ.clear()
    os.environ.update(saved)


def records(run_dir: Path, stage: str, split: str = "train") -> List[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["stage"] == stage and r["split"] == split]


def test_chain_prints_validation_perplexity_and_realised_cr_per_stage(train, tmp_path, capsys):
    summaries = train(tmp_path, "stage.zero_out.steps=2", "stage.retrofit.steps=3",
                      "stage.finetune.steps=2")
    assert [s.stage for s in summaries] == ["zero_out", "retrofit", "finetune"]
    lines = [line for line in capsys.readouterr().out.splitlines() if "realised CR" in line]
    assert [line.split("]")[0] + "]" for line in lines] == ["[zero_out]", "[retrofit]", "[finetune]"]
    for summary, line in zip(summaries, lines):
        assert math.isfinite(summary.validation.perplexity) and summary.validation.cr >= 1.0
        assert len(summary.validation.layer_cr) == 2
        assert f"ppl {summary.validation.perplexity:.1f}" in line


def test_zero_out_stage_ends_with_zeroed_decision_projections(train, tmp_path):
    train(tmp_path, "stage=zero_out", "stage.zero_out.steps=2")
    final = latest_checkpoint(tmp_path / "checkpoints" / "zero_out")
    os.environ["MASTER_PORT"] = str(free_port())
    parallel.initialize(tensor_parallel_size=1, seed=0)
    try:
        model = build_model(micro_config(tmp_path).model, DMCConfig())
        ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(), model)
        load_weights_checkpoint(ddp, final)
        rows = decision_channel_rows(groups=2, heads_per_group=2, head_dim=16)
        for layer in model.decoder.layers:
            weight = layer.self_attention.linear_qkv.weight
            assert torch.count_nonzero(weight[rows]) == 0
            assert torch.count_nonzero(weight) > weight.numel() // 2
    finally:
        parallel.shutdown()


def test_retrofit_target_ramps_linearly_from_one_to_the_final_ratio(train, tmp_path):
    train(tmp_path, "stage=retrofit", "stage.retrofit.steps=4", "dmc.target_cr=3")
    assert [r["target_cr"] for r in records(tmp_path, "retrofit")] == [1.5, 2.0, 2.5, 3.0]


def test_finetune_holds_the_final_ratio(train, tmp_path):
    train(tmp_path, "stage=finetune", "stage.finetune.steps=2", "dmc.target_cr=3")
    assert [r["target_cr"] for r in records(tmp_path, "finetune")] == [3.0, 3.0]


def test_dmc_loss_is_the_shortfall_of_merges_below_the_target(train, tmp_path):
    train(tmp_path, "stage=retrofit", "stage.retrofit.steps=3")
    for r in records(tmp_path, "retrofit"):
        shortfall = (1 - 1 / r["target_cr"]) - (1 - 1 / r["cr"])
        assert shortfall > 0
        assert r["dmc_loss"] == pytest.approx(shortfall, abs=1e-5)


def test_a_stage_run_alone_continues_from_the_previous_stage_final_checkpoint(train, tmp_path):
    chained, alone = tmp_path / "chained", tmp_path / "alone"
    steps = ["stage.zero_out.steps=2", "stage.retrofit.steps=2"]
    train(chained, "stage=[zero_out,retrofit]", *steps)
    train(alone, "stage=zero_out", *steps)
    train(alone, "stage=retrofit", *steps)
    assert records(alone, "retrofit") and len(records(alone, "zero_out")) == 2
    for a, b in zip(records(chained, "retrofit"), records(alone, "retrofit")):
        assert (a["lm_loss"], a["dmc_loss"], a["cr"]) == (b["lm_loss"], b["dmc_loss"], b["cr"])


def test_a_finished_stage_is_not_trained_again(train, tmp_path):
    train(tmp_path, "stage=retrofit", "stage.retrofit.steps=2")
    (summary,) = train(tmp_path, "stage=retrofit", "stage.retrofit.steps=2")
    assert summary.steps_run == 0
    assert len(records(tmp_path, "retrofit")) == 2
    assert len(records(tmp_path, "retrofit", "valid")) == 1  # validated again, recorded once


def test_validation_runs_every_interval_and_at_the_end(train, tmp_path):
    train(tmp_path, "stage=retrofit", "stage.retrofit.steps=5", "validation.interval=2")
    assert [r["step"] for r in records(tmp_path, "retrofit", "valid")] == [2, 4, 5]


def test_tensorboard_records_the_training_and_validation_scalars(train, tmp_path):
    train(tmp_path, "stage=retrofit", "stage.retrofit.steps=2", "logging.tensorboard=true")
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for name in ("lm_loss", "dmc_loss", "target_cr", "cr", "layer_cr/0", "layer_cr/1", "lr",
                 "tokens_per_s", "tokens", "budget_tokens", "grad_norm"):
        assert f"retrofit/train/{name}" in tags
    for name in ("lm_loss", "ppl", "cr", "layer_cr/1"):
        assert f"retrofit/valid/{name}" in tags


def test_retrofit_drives_the_realised_ratio_toward_the_target(train, tmp_path):
    (summary,) = train(tmp_path, "stage=retrofit", "stage.retrofit.steps=30", "dmc.target_cr=2")
    assert summary.validation.cr > 1.5


def test_trains_on_the_python_docs_corpus_prepared_into_the_cache(train, tmp_path):
    pydocs = ["data=pydocs", f"data.cache_dir={tmp_path / 'cache'}", "data.max_documents=40",
              "model.vocab_size=512", "stage=retrofit", "stage.retrofit.steps=2"]
    (summary,) = train(tmp_path / "run", *pydocs)
    assert math.isfinite(summary.validation.lm_loss)
    assert (tmp_path / "cache" / "train.bin").is_file() and (tmp_path / "cache" / "valid.idx").is_file()


def test_a_cache_prepared_with_other_settings_is_refused_by_name(train, tmp_path):
    pydocs = ["data=pydocs", f"data.cache_dir={tmp_path / 'cache'}", "model.vocab_size=512",
              "stage=retrofit", "stage.retrofit.steps=1"]
    train(tmp_path / "a", *pydocs, "data.max_documents=40")
    with pytest.raises(ConfigError, match="data.cache_dir"):
        train(tmp_path / "b", *pydocs, "data.max_documents=60")


def test_pretrain_stage_trains_plain_attention_and_feeds_a_dmc_retrofit(train, tmp_path):
    base = tmp_path / "base"
    [summary] = train(base, "stage=pretrain", "stage.pretrain.steps=3")
    assert summary.stage == "pretrain" and summary.validation.cr == 1.0
    trained = records(base, "pretrain")
    assert [r["target_cr"] for r in trained] == [1.0] * 3
    assert all(r["cr"] == 1.0 and r["dmc_loss"] == 0.0 for r in trained)  # no DMC decisions

    final = latest_checkpoint(base / "checkpoints" / "pretrain")
    [retrofit] = train(tmp_path / "dmc", "stage=retrofit", "stage.retrofit.steps=2",
                       f"checkpoint.pretrained={final}")
    assert retrofit.stage == "retrofit" and retrofit.target_cr == 4.0


def test_a_run_writes_its_config_so_its_checkpoints_load_without_hydra_files(train, tmp_path):
    from nemo_dmc.checkpoints.resolve import resolve_checkpoint

    train(tmp_path, "stage=retrofit", "stage.retrofit.steps=1", "dmc.window=3")
    resolved = resolve_checkpoint(tmp_path)
    assert not (tmp_path / ".hydra").exists() and resolved.run_config is not None
    assert resolved.path == latest_checkpoint(tmp_path / "checkpoints" / "retrofit")
    assert resolved.run_config.model.hidden_size == 64 and resolved.run_config.dmc.window == 3


def test_compression_loss_weight_speeds_up_following_the_ratio_ramp(train, tmp_path):
    crs = {}
    for weight in (0, 100):
        run_dir = tmp_path / f"w{weight}"
        train(run_dir, "stage=retrofit", "stage.retrofit.steps=10", "dmc.target_cr=4",
              f"dmc.loss_weight={weight}")
        logged = records(run_dir, "retrofit")
        assert all(r["dmc_loss"] > 0 for r in logged[:2])  # L_cr itself is logged either way
        crs[weight] = logged[-1]["cr"]
    assert crs[100] > crs[0] + 0.01


def test_a_stage_after_an_unfinished_previous_stage_is_refused_and_random_init_is_said(
        train, tmp_path, capsys):
    train(tmp_path, "stage=zero_out", "stage.zero_out.steps=4", "checkpoint.save_interval=2")
    assert "[zero_out] starting from a random init" in capsys.readouterr().out
    zero_out = tmp_path / "checkpoints" / "zero_out"
    shutil.rmtree(zero_out / "step_0000004")  # as if killed after step 2's save
    unfinished = r"stage zero_out in .* is unfinished \(step 2/4\); run stage=zero_out first"
    with pytest.raises(ConfigError, match=unfinished):
        train(tmp_path, "stage=retrofit", "stage.retrofit.steps=1")
    assert not (tmp_path / "checkpoints" / "retrofit").exists()
    train(tmp_path, "stage=zero_out", "stage.zero_out.steps=4")  # finish it: retrofit may run
    train(tmp_path, "stage=retrofit", "stage.retrofit.steps=1")
    assert "random init" not in capsys.readouterr().out


WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly hex jolly "
         "zebras under bright autumn skies and small rivers carry old stones to the sea").split()


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory) -> Path:
    """``tokenizer/`` and indexed datasets ``a`` and ``b`` of some 20-40 samples of 32 tokens."""
    from nemo_dmc.data.corpus import write_jsonl
    from nemo_dmc.data.preprocess import preprocess
    from nemo_dmc.data.tokenizer import train_bpe_tokenizer

    root = tmp_path_factory.mktemp("tiny_corpus")
    docs = [" ".join(WORDS[(7 * i + 3 * j) % len(WORDS)] for j in range(25 + i % 7))
            for i in range(24)]
    tokenizer = train_bpe_tokenizer(docs, root / "tokenizer", vocab_size=300)
    for name, part in (("a", docs[::2]), ("b", docs[1::2])):
        write_jsonl(part, root / f"{name}.jsonl")
        preprocess([root / f"{name}.jsonl"], root / name, tokenizer, show_progress=False)
    return root


def indexed(root: Path, train_prefixes: str, valid_prefixes: str = "") -> List[str]:
    return ["data=indexed", f"data.tokenizer={root / 'tokenizer'}", "model.vocab_size=384",
            "data.micro_batch_size=2", "data.global_batch_size=4",
            f"data.train_prefixes=[{train_prefixes}]", f"data.valid_prefixes=[{valid_prefixes}]"]


def losses(run_dir: Path, stage: str) -> List[tuple]:
    return [(r["lm_loss"], r["dmc_loss"], r["cr"]) for r in records(run_dir, stage)]


def test_stages_run_alone_read_the_samples_of_the_chained_run_across_an_epoch(
        train, tmp_path, tiny_corpus):
    from nemo_dmc.data.datasets import build_gpt_datasets
    from nemo_dmc.data.tokenizer import load_tokenizer

    data = indexed(tiny_corpus, str(tiny_corpus / "a"), str(tiny_corpus / "b"))
    steps = ["stage.zero_out.steps=2", "stage.retrofit.steps=12"]
    epoch = len(build_gpt_datasets(load_tokenizer(tiny_corpus / "tokenizer"), 32, 1234,
                                   train_blend=str(tiny_corpus / "a")).train)
    assert 2 * 4 < epoch < 14 * 4  # zero-out stays in the first epoch, the chain crosses it
    chained, alone = tmp_path / "chained", tmp_path / "alone"
    train(chained, *data, "stage=[zero_out,retrofit]", *steps)
    train(alone, *data, "stage=zero_out", *steps)
    train(alone, *data, "stage=retrofit", *steps)
    for stage in ("zero_out", "retrofit"):
        assert losses(alone, stage) == losses(chained, stage), stage


def test_trains_on_a_weighted_blend_and_on_a_split_of_one_blend(train, tmp_path, tiny_corpus):
    a, b = tiny_corpus / "a", tiny_corpus / "b"
    run = ["stage=retrofit", "stage.retrofit.steps=2"]
    (weighted,) = train(tmp_path / "weighted", *indexed(tiny_corpus, f"0.7,{a},0.3,{b}", str(b)),
                        *run)
    (split,) = train(tmp_path / "split", *indexed(tiny_corpus, str(a)), "data.split='70,30,0'",
                     *run)
    for summary in (weighted, split):
        assert summary.steps_run == 2 and math.isfinite(summary.validation.lm_loss)
    # the split's valid documents are another part of `a` than the held-out file `b`
    assert split.validation.lm_loss != weighted.validation.lm_loss


def test_trainer_data_follows_blend_weights_and_split(megatron_tp1, tmp_path, tiny_corpus):
    """The datasets the trainer reads: a 0.7/0.3 blend draws in proportion from `a` and `b`;
    a split of `a` gives train and valid disjoint document ranges."""
    from nemo_dmc.training.batches import build_splits

    a, b = tiny_corpus / "a", tiny_corpus / "b"
    cfg = micro_config(tmp_path, *indexed(tiny_corpus, f"0.7,{a},0.3,{b}", str(b)))
    epoch = build_splits(cfg, train_samples=40, valid_samples=4).train.datasets[0]
    share = np.bincount(epoch.dataset_index, minlength=2) / len(epoch.dataset_index)
    assert share[0] == pytest.approx(0.7, abs=0.05), share
    cfg = micro_config(tmp_path, *indexed(tiny_corpus, str(a)), "data.split='70,30,0'")
    splits = build_splits(cfg, train_samples=8, valid_samples=4)
    train_docs = set(splits.train.datasets[0].document_index.tolist())
    valid_docs = set(splits.valid.document_index.tolist())
    assert train_docs and valid_docs and not train_docs & valid_docs


def test_selective_recompute_checkpoints_the_core_attention_of_every_layer(
        train, tmp_path, monkeypatch):
    from megatron.core import tensor_parallel

    calls = []
    checkpoint = tensor_parallel.checkpoint

    def spy(function, *args):
        calls.append(function)
        return checkpoint(function, *args)

    monkeypatch.setattr(tensor_parallel, "checkpoint", spy)
    train(tmp_path, "stage=retrofit", "stage.retrofit.steps=1", "parallel.recompute=selective")
    # 2 layers x 2 micro-batches (4 samples / 2) in training; none in the hard validation,
    # 2 layers x 4 batches in its pass with training's noisy decisions (no grad)
    assert len(calls) == 2 * 2 + 2 * 4
    calls.clear()
    train(tmp_path / "plain", "stage=retrofit", "stage.retrofit.steps=1")
    assert not calls


@pytest.mark.gpu
def test_bf16_distributed_optimizer_run_saves_and_resumes_on_gpu(train, tmp_path, capsys):
    run = ["precision=auto", "optim.use_distributed_optimizer=true", "stage=retrofit",
           "stage.retrofit.steps=3", "checkpoint.save_interval=2", "checkpoint.keep_last=3"]
    whole = tmp_path / "whole"
    train(whole, *run)
    resumed = tmp_path / "resumed"
    shutil.copytree(whole, resumed)
    shutil.rmtree(resumed / "checkpoints" / "retrofit" / "step_0000003")
    capsys.readouterr()
    train(resumed, *run)
    step2 = resumed / "checkpoints" / "retrofit" / "step_0000002"
    assert f"[retrofit] resumed from {step2} (step 2)" in capsys.readouterr().out
    first, again = records(whole, "retrofit"), records(resumed, "retrofit")
    assert [r["step"] for r in again] == [1, 2, 3]  # step 3 replayed, recorded once
    assert again[-1]["lm_loss"] == pytest.approx(first[-1]["lm_loss"], rel=1e-3)
    assert again[-1]["cr"] == pytest.approx(first[-1]["cr"], rel=1e-3)


def test_progress_bar_by_default_only_on_a_terminal(tmp_path, capsys, monkeypatch):
    import sys

    from nemo_dmc.training.config import LoggingConfig
    from nemo_dmc.training.metrics import RunLogger

    cfg = LoggingConfig(tensorboard=False)  # progress_bar: null
    for tty in (False, True):
        monkeypatch.setattr(sys.stderr, "isatty", lambda tty=tty: tty)
        logger = RunLogger(tmp_path / str(tty), cfg, enabled=True)
        logger.start_stage("retrofit", steps=4, first_step=0, message="[retrofit] start")
        logger.advance({"lm_loss": 2.5})
        assert (logger._bar is not None) == tty
        logger.close()
    assert LoggingConfig(progress_bar=False).progress_bar is False


def test_progress_bar_is_drawn_on_the_logging_rank_only(tmp_path, capsys):
    """rank 0 (enabled) draws a tqdm bar that counts steps from the resume point; other ranks
    write nothing (no bar, no files)."""
    from nemo_dmc.training.config import LoggingConfig
    from nemo_dmc.training.metrics import RunLogger

    cfg = LoggingConfig(tensorboard=False, progress_bar=True)
    rank0 = RunLogger(tmp_path / "rank0", cfg, enabled=True)
    rank0.start_stage("retrofit", steps=10, first_step=4, message="[retrofit] start")
    rank0.advance({"lm_loss": 2.5})
    assert rank0._bar is not None and rank0._bar.n == 5 and rank0._bar.total == 10
    rank0.close()
    other = RunLogger(tmp_path / "rank1", cfg, enabled=False)
    other.start_stage("retrofit", steps=10, first_step=4, message="[retrofit] start")
    other.advance({"lm_loss": 2.5})
    other.close()
    assert other._bar is None and not (tmp_path / "rank1").exists()
    err = capsys.readouterr().err
    assert "retrofit" in err and "5/10" in err


def test_method_dms_trains_eviction_through_the_same_stages(train, tmp_path):
    summaries = train(tmp_path, "method=dms", "window=4", "stage=[zero_out,retrofit]",
                      "stage.zero_out.steps=2", "stage.retrofit.steps=3")
    assert [s.stage for s in summaries] == ["zero_out", "retrofit"]
    retrofit = records(tmp_path, "retrofit")
    assert retrofit and all(r["dmc_loss"] > 0 for r in retrofit)  # zeroed channel: keeps all
    cfg = micro_config(tmp_path, "method=dms", "window=4")
    assert cfg.method_settings().window == 4


def test_a_window_without_method_dms_is_an_error_naming_the_key(tmp_path):
    from nemo_dmc.training.config import validate_config

    with pytest.raises(ConfigError, match="^window: "):
        validate_config(micro_config(tmp_path, "window=4"), world_size=1, cuda_available=False)
