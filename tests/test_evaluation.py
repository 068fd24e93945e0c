"""``nemo_dmc.evaluate`` and ``python -m nemo_dmc.evaluate``."""

import json
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from megatron.core import dist_checkpointing
from omegaconf import OmegaConf
from torch import nn

from megatron_utils import TINY_GQA
from nemo_dmc.core import DMCConfig
from nemo_dmc.data.tokenizer import train_bpe_tokenizer
from nemo_dmc.evaluate import EvaluateConfig, run
from nemo_dmc.evaluate.compression import CompressionTally, write_heatmap
from nemo_dmc.evaluate.config import register_schema
from nemo_dmc.evaluate.data import heldout_batches
from nemo_dmc.evaluate.passkey import (
    NEEDLE,
    PasskeyPrompt,
    answer_correct,
    make_passkey_prompt,
    passkey_accuracy,
    passkey_prompts,
)
from nemo_dmc.evaluate.perplexity import heldout_perplexity
from nemo_dmc.kvcache.paged import CacheLayout
from nemo_dmc.megatron.cpu_shims import causal_attention_mask
from nemo_dmc.megatron.model import build_model
from nemo_dmc.megatron.parallel import seed_all
from nemo_dmc.megatron.stats import collect_dmc_stats, layer_slots
from nemo_dmc.training.batches import MicroBatches, RandomTokens, Splits
from nemo_dmc.training.launch import free_port
from nemo_dmc.training.loop import validate

REPO = Path(__file__).resolve().parents[1]
SHAPE = replace(TINY_GQA, vocab_size=384, seq_length=128)
TEXTS = ["The list data type has some more methods. The pass key is 12345.",
         "def main():\n    return 0\n", "The grass is green. The sky is blue."] * 20
DMC = DMCConfig(init_offset=0.0, window=5)  # random weights then merge about half the time


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_bpe_tokenizer(TEXTS, tmp_path_factory.mktemp("tok") / "tokenizer", vocab_size=300)


def _model():
    seed_all(31)
    return build_model(SHAPE, DMC).eval()


def _layout(block_size: int = 16) -> CacheLayout:
    return CacheLayout(num_layers=SHAPE.num_layers, kv_heads=SHAPE.kv_heads,
                       head_dim=SHAPE.head_dim, window=DMC.window, block_size=block_size,
                       num_blocks=1, max_sequences=1, max_sequence_length=SHAPE.seq_length)


def _run_dir(path: Path, tokenizer) -> Path:
    """A run directory as the trainer leaves it: config, tokenizer, a finetune checkpoint."""
    model = _model()
    tokenizer.save(path / "tokenizer")
    config = {"model": asdict(SHAPE), "dmc": {"target_cr": 4.0, "init_offset": 0.0,
                                              "temperature": 0.1, "window": 5},
              "data": {"source": "random", "tokenizer": str(path / "tokenizer"), "seed": 7}}
    (path / ".hydra").mkdir(parents=True)
    (path / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    step = path / "checkpoints" / "finetune" / "step_0000002"
    step.mkdir(parents=True)
    dist_checkpointing.save({"model": model.sharded_state_dict(prefix="module.")}, str(step))
    return path


register_schema()  # as `python -m nemo_dmc.evaluate` does


def _compose(*overrides: str) -> EvaluateConfig:
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return OmegaConf.to_object(compose("evaluate", overrides=list(overrides)))


# -- perplexity and compression ------------------------------------------------------------


def test_perplexity_equals_exp_of_validate_loss_on_the_same_batches(megatron_tp1):
    model = _model()
    data = RandomTokens(SHAPE.vocab_size, SHAPE.seq_length, 8, seed=3)
    batches = MicroBatches(Splits(data, data), micro_batch_size=4, global_batch_size=4,
                           dp_rank=0, dp_size=1, device=torch.device("cpu"))
    expected = validate(model, batches, causal_attention_mask(SHAPE.seq_length), 2,
                        SHAPE.num_layers)
    tally = CompressionTally(_layout())
    result = heldout_perplexity(model, heldout_batches(data, 8, 4),
                                after_forward=lambda b: tally.add(layer_slots(model),
                                                                  SHAPE.seq_length, True))
    assert result.sequences == 8 and result.tokens == 8 * SHAPE.seq_length
    assert result.loss == pytest.approx(expected.lm_loss, rel=1e-5)
    assert result.perplexity == pytest.approx(expected.perplexity, rel=1e-5)
    assert 1.2 < tally.cr and tally.cr == pytest.approx(expected.cr, rel=1e-5)
    assert tally.layer_cr.tolist() == pytest.approx(expected.layer_cr, rel=1e-5)


def test_per_head_cr_matches_collect_dmc_stats(megatron_tp1):
    model = _model()
    tokens = torch.randint(SHAPE.vocab_size, (3, SHAPE.seq_length),
                           generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model(tokens, torch.arange(SHAPE.seq_length).expand_as(tokens),
              causal_attention_mask(SHAPE.seq_length))
    stats = collect_dmc_stats(model)
    tally = CompressionTally(_layout())
    tally.add(layer_slots(model), SHAPE.seq_length, open_state=True)
    assert tally.head_cr.shape == (SHAPE.num_layers, SHAPE.kv_heads)
    assert torch.allclose(tally.head_cr.float(), stats.head_cr.float(), rtol=1e-5)
    assert torch.allclose(tally.layer_cr.float(), stats.layer_cr.float(), rtol=1e-5)
    assert tally.cr == pytest.approx(float(stats.cr), rel=1e-5)


def test_kv_bytes_are_slots_held_times_slot_bytes_against_the_uncompressed_cache():
    tally = CompressionTally(_layout(block_size=4))
    slots = torch.tensor([[[5, 8, 1, 2], [3, 3, 3, 3]]])  # [1 sequence, 2 layers, 4 heads]
    tally.add(slots, seq=8, open_state=False)
    mem, slot_bytes = tally.memory(), 2 * SHAPE.head_dim * 4
    assert mem.slots == 28 and mem.logical == 28 * slot_bytes
    assert mem.vanilla == 8 * 2 * 4 * slot_bytes
    assert mem.allocated == (2 + 2 + 1 + 1 + 4 * 1) * 4 * slot_bytes
    assert tally.cr == pytest.approx(64 / 28)
    assert tally.head_cr[0].tolist() == pytest.approx([8 / 5, 1.0, 8.0, 4.0])


def test_heatmap_png_is_written(tmp_path):
    path = write_heatmap(torch.tensor([[1.0, 2.0, 4.0], [3.0, 1.5, 8.0]]), tmp_path / "h.png", "CR")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -- passkey -------------------------------------------------------------------------------


def test_passkey_prompts_are_deterministic_and_exactly_as_long_as_asked(tokenizer):
    first = passkey_prompts(tokenizer, [96, 128], [0.0, 0.5, 1.0], samples=2, seed=4)
    assert first == passkey_prompts(tokenizer, [96, 128], [0.0, 0.5, 1.0], samples=2, seed=4)
    assert [p.passkey for p in first] != [p.passkey for p in
                                          passkey_prompts(tokenizer, [96, 128], [0.0, 0.5, 1.0],
                                                          samples=2, seed=5)]
    assert len(first) == 12 and all(len(p.tokens) == p.length for p in first)
    assert all(len(p.passkey) == 5 and p.passkey.isdigit() for p in first)


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_passkey_needle_and_answer_sit_where_the_prompt_says(tokenizer, depth):
    prompt = make_passkey_prompt(tokenizer, 128, depth, "40917")
    needle = tokenizer.encode(NEEDLE.format(key="40917"))
    assert prompt.tokens[prompt.needle_start:prompt.needle_start + len(needle)] == tuple(needle)
    assert tokenizer.decode(prompt.answer) == " 40917"
    assert tokenizer.decode(prompt.tokens[:prompt.answer_start]).endswith("The pass key is")
    filler = prompt.answer_start - len(tokenizer.encode(" What is the pass key? The pass key is")) \
        - len(needle)
    assert prompt.needle_start == round(depth * filler)


def test_passkey_length_too_short_is_an_error_naming_the_key(tokenizer):
    with pytest.raises(ValueError, match="^passkey.lengths: 10 tokens"):
        make_passkey_prompt(tokenizer, 10, 0.5, "12345")


def test_answer_correct_requires_argmax_at_every_answer_position():
    prompt = PasskeyPrompt(tokens=(5, 6, 7, 1, 2), needle_start=0, answer_start=3,
                           passkey="12", length=5, depth=0.0)
    logits = torch.zeros(5, 10)
    logits[2, 1] = logits[3, 2] = 1.0  # position t predicts token t + 1
    assert answer_correct(logits, prompt)
    logits[3, 9] = 2.0
    assert not answer_correct(logits, prompt)


class _Oracle(nn.Module):
    """Teacher-forced logits that predict the next prompt token, except in rows starting
    with ``wrong_first``."""

    def __init__(self, vocab: int, wrong_first: int) -> None:
        super().__init__()
        self.vocab, self.wrong_first = vocab, wrong_first

    def forward(self, tokens, positions, mask):
        nxt = torch.nn.functional.pad(tokens[:, 1:], (0, 1))
        nxt[tokens[:, 0] == self.wrong_first, -2] = 0
        return torch.nn.functional.one_hot(nxt, self.vocab).float()


def test_passkey_accuracy_counts_each_length_and_depth_cell(megatron_tp1):
    def prompt(first, length, depth):
        return PasskeyPrompt(tokens=(first,) + (3,) * (length - 3) + (4, 5), needle_start=0,
                             answer_start=length - 2, passkey="45", length=length, depth=depth)

    prompts = [prompt(1, 6, 0.0), prompt(2, 6, 0.0), prompt(1, 8, 0.0), prompt(1, 8, 1.0)]
    report = passkey_accuracy(_Oracle(10, wrong_first=2), prompts, vocab_size=10, batch_size=3)
    assert (report.correct, report.total, report.accuracy) == (3, 4, 0.75)
    assert [(c["length"], c["depth"], c["accuracy"]) for c in report.cells] == [
        (6, 0.0, 0.5), (8, 0.0, 1.0), (8, 1.0, 1.0)]


# -- the CLI -------------------------------------------------------------------------------


def test_evaluate_cli_writes_results_heatmap_and_summary(megatron_tp1, tmp_path, tokenizer,
                                                         capsys):
    run_dir = _run_dir(tmp_path / "run", tokenizer)
    results = run(_compose(f"load={run_dir}", "data.num_sequences=6", "data.micro_batch_size=4",
                           "passkey.lengths=[96,128]", "passkey.depths=[0.0,1.0]",
                           "passkey.samples=1"))
    out_dir = run_dir / "evaluation" / "dmc"
    saved = json.loads((out_dir / "results.json").read_text())
    assert saved["checkpoint"].endswith("finetune/step_0000002") and saved["method"] == "dmc"
    assert saved["config"]["load"] == str(run_dir)
    assert saved["perplexity"]["sequences"] == 6 and saved["perplexity"]["source"] == "random"
    comp = saved["compression"]
    assert len(comp["layer_cr"]) == SHAPE.num_layers
    assert len(comp["head_cr"]) == SHAPE.num_layers and len(comp["head_cr"][0]) == SHAPE.kv_heads
    assert comp["cr"] > 1.2 and comp["kv_bytes"]["fraction_of_vanilla"] == pytest.approx(
        1 / comp["cr"])
    assert saved["passkey"]["total"] == 4 and len(saved["passkey"]["cells"]) == 4
    assert (out_dir / "head_cr_heatmap.png").is_file()
    assert results["perplexity"] == saved["perplexity"]
    out = capsys.readouterr().out
    assert "held-out perplexity" in out and "realised CR" in out and "passkey accuracy" in out


def test_vanilla_method_holds_every_token(megatron_tp1, tmp_path, tokenizer):
    run_dir = _run_dir(tmp_path / "run", tokenizer)
    dmc = run(_compose(f"load={run_dir}", "data.num_sequences=4", "passkey.enabled=false",
                       f"output_dir={tmp_path / 'dmc'}"))
    vanilla = run(_compose(f"load={run_dir}", "data.num_sequences=4", "passkey.enabled=false",
                           "method=vanilla", f"output_dir={tmp_path / 'vanilla'}"))
    assert vanilla["compression"]["cr"] == 1.0 and vanilla["heatmap"] is None
    assert vanilla["compression"]["kv_bytes"]["logical"] == \
        vanilla["compression"]["kv_bytes"]["vanilla"]
    assert vanilla["perplexity"]["loss"] != pytest.approx(dmc["perplexity"]["loss"])
    assert (tmp_path / "vanilla" / "results.json").is_file()
    # seq_length= evaluates shorter held-out sequences than the checkpoint's model.seq_length
    short = run(_compose(f"load={run_dir}", "data.num_sequences=4", "passkey.enabled=false",
                         "method=vanilla", "seq_length=32", f"output_dir={tmp_path / 'short'}"))
    assert short["perplexity"]["tokens"] < vanilla["perplexity"]["tokens"]
    assert short["model"]["seq_length"] == 32


def test_eviction_method_reports_its_realised_ratio(megatron_tp1, tmp_path, tokenizer):
    run_dir = _run_dir(tmp_path / "run", tokenizer)
    results = run(_compose(f"load={run_dir}", "data.num_sequences=4", "passkey.enabled=false",
                           "method=streaming", "ratio=2", "sinks=2"))
    assert results["compression"]["cr"] == pytest.approx(2.0)  # 64 of 128 slots kept
    assert (run_dir / "evaluation" / "streaming_2" / "results.json").is_file()
    assert results["heatmap"] is not None


def test_dms_method_reports_window_plus_survivors(megatron_tp1, tmp_path, tokenizer):
    run_dir = _run_dir(tmp_path / "run", tokenizer)
    results = run(_compose(f"load={run_dir}", "data.num_sequences=4", "passkey.enabled=false",
                           "method=dms", "window=8"))
    assert (run_dir / "evaluation" / "dms_w8" / "results.json").is_file()
    cr = results["compression"]["cr"]
    assert 1.3 < cr < 128 / 8  # init offset 0 (the run's dmc.*): about half evicted
    assert results["config"]["window"] == 8 and results["heatmap"] is not None


def test_a_misspelt_key_fails_naming_it():
    with pytest.raises(ConfigCompositionException) as err:
        _compose("load=x", "passkey.lenghts=[64]")
    assert "lenghts" in str(err.value) + str(err.value.__cause__)


def test_missing_checkpoint_is_an_error_naming_the_load_key(tmp_path, monkeypatch):
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    with pytest.raises(FileNotFoundError, match="^load: "):
        run(EvaluateConfig(load=str(tmp_path / "nowhere")))


@pytest.mark.parametrize("overrides, key", [((), "load"), (("load=x", "method=h2o"), "ratio"),
                                            (("load=x", "method=lru"), "method"),
                                            (("load=x", "kv.dtype=int3"), "kv.dtype"),
                                            (("load=x", "seq_length=0"), "seq_length"),
                                            (("load=x", "method=dmc", "window=4"), "window"),
                                            (("load=x", "ratio=4"), "ratio")])
def test_bad_values_are_errors_naming_the_key(overrides, key):
    with pytest.raises(ValueError, match=f"^{key}: "):
        _compose(*overrides).validate()


# -- passkey lengths (review fixes) --------------------------------------------------------


def _needed(tokenizer) -> int:
    """Tokens of needle + question + answer (no filler) for a 5-digit key."""
    from nemo_dmc.evaluate.passkey import ANSWER, QUESTION

    return sum(len(tokenizer.encode(t.format(key="12345")))
               for t in (NEEDLE, QUESTION, ANSWER))


def test_default_passkey_lengths_too_short_for_the_prompt_are_dropped(tokenizer):
    from nemo_dmc.evaluate.runner import build_passkey_prompts

    need = _needed(tokenizer)
    seq = 4 * (need - 1)  # seq / 4 cannot hold the needle; seq / 2 and seq can
    cfg = _compose("load=x", "passkey.samples=1")
    lengths, dropped, prompts = build_passkey_prompts(cfg, tokenizer, seq)
    assert dropped == [seq // 4] and lengths == [seq // 2, seq]
    assert {p.length for p in prompts} == {seq // 2, seq}
    lengths, dropped, prompts = build_passkey_prompts(cfg, tokenizer, need // 2)
    assert lengths == [] and prompts == [] and dropped


def test_explicit_passkey_lengths_too_short_are_an_error_naming_the_key(tokenizer):
    from nemo_dmc.evaluate.runner import build_passkey_prompts

    cfg = _compose("load=x", "passkey.lengths=[10,128]")
    with pytest.raises(ValueError, match="^passkey.lengths: 10 tokens"):
        build_passkey_prompts(cfg, tokenizer, 128)


@pytest.mark.parametrize("overrides, key", [(("load=x", "passkey.lengths=[0]"), "passkey.lengths"),
                                            (("load=x", "passkey.samples=0"), "passkey.samples"),
                                            (("load=x", "passkey.digits=13"), "passkey.digits")])
def test_bad_passkey_values_are_errors_naming_the_key(overrides, key):
    with pytest.raises(ValueError, match=f"^{key}: "):
        _compose(*overrides).validate()


def test_bad_passkey_lengths_fail_before_the_perplexity_pass(megatron_tp1, tmp_path, tokenizer,
                                                             monkeypatch):
    import nemo_dmc.evaluate.runner as runner

    def never(*args, **kwargs):
        raise AssertionError("the perplexity pass ran before the passkey prompts were checked")

    monkeypatch.setattr(runner, "heldout_perplexity", never)
    run_dir = _run_dir(tmp_path / "run", tokenizer)
    with pytest.raises(ValueError, match="^passkey.lengths: 10 tokens"):
        run(_compose(f"load={run_dir}", "data.num_sequences=2", "passkey.lengths=[10]"))


def test_evaluate_takes_a_free_port_when_the_inherited_one_is_taken(megatron_tp1, tmp_path,
                                                                    tokenizer, monkeypatch):
    """Concurrent evaluations (bench/reproduce.py --jobs 2) must not collide on one default
    MASTER_PORT: a plain ``python -m nemo_dmc.evaluate`` rendezvouses on a free port."""
    import socket

    from nemo_dmc.megatron import parallel

    run_dir = _run_dir(tmp_path / "run", tokenizer)
    parallel.shutdown()  # as in a fresh `python -m nemo_dmc.evaluate` process
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"):
        monkeypatch.setenv(key, "0")
        monkeypatch.delenv(key)
    with socket.socket() as busy:  # another evaluation's rendezvous port
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        monkeypatch.setenv("MASTER_PORT", str(busy.getsockname()[1]))
        results = run(_compose(f"load={run_dir}", "data.num_sequences=2", "passkey.enabled=false",
                               f"output_dir={tmp_path / 'out'}"))
    assert results["perplexity"]["sequences"] == 2
