"""The lm-evaluation-harness model type ``nemo_dmc`` (``nemo_dmc.evaluate.lm_eval_adapter``)."""

import importlib
import os
import sys
from types import SimpleNamespace

import pytest
import torch

from nemo_dmc.evaluate.passkey import full_logits
from nemo_dmc.megatron import parallel
from nemo_dmc.training.launch import free_port


def test_missing_lm_eval_is_an_error_naming_the_eval_extra(monkeypatch):
    for name in ("lm_eval", "lm_eval.api", "lm_eval.api.model", "lm_eval.api.registry",
                 "lm_eval.utils"):
        monkeypatch.setitem(sys.modules, name, None)  # None in sys.modules: ImportError
    monkeypatch.delitem(sys.modules, "nemo_dmc.evaluate.lm_eval_adapter", raising=False)
    with pytest.raises(ImportError, match="`eval` extra"):
        importlib.import_module("nemo_dmc.evaluate.lm_eval_adapter")


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    pytest.importorskip("lm_eval")
    from test_evaluation import TEXTS, _run_dir

    from nemo_dmc.data.tokenizer import train_bpe_tokenizer
    from nemo_dmc.evaluate.lm_eval_adapter import NemoDMCLM

    root = tmp_path_factory.mktemp("lm_eval")
    os.environ["MASTER_PORT"] = str(free_port())
    parallel.initialize(1, 1)
    run_dir = _run_dir(root / "run", train_bpe_tokenizer(TEXTS, root / "tok", vocab_size=300))
    parallel.shutdown()
    model = NemoDMCLM(load=str(run_dir), batch_size=3, max_gen_toks=6)
    yield model
    parallel.shutdown()


def _requests(*args):
    return [SimpleNamespace(args=a) for a in args]


def _token_logprobs(lm, tokens):
    """log p(tokens[t + 1] | tokens[:t + 1]) from one DMC forward of the whole sequence."""
    logits = full_logits(lm.model, torch.tensor([tokens]), lm.tokenizer.vocab_size)[0]
    return logits.log_softmax(-1)[:-1].gather(-1, torch.tensor(tokens[1:])[:, None])[:, 0]


def test_loglikelihood_sums_the_continuation_token_logprobs(lm):
    pairs = [("The list data type", " has some more methods."), ("def main():", "\n    return 0"),
             ("The grass is", " green.")]
    results = lm.loglikelihood(_requests(*pairs))
    for (context, continuation), (score, greedy) in zip(pairs, results):
        ctx, whole = lm.tok_encode(context), lm.tok_encode(context + continuation)
        logprobs = _token_logprobs(lm, whole)[len(ctx) - 1:]
        assert score == pytest.approx(float(logprobs.sum()), abs=1e-4)
        logits = full_logits(lm.model, torch.tensor([whole]), lm.tokenizer.vocab_size)[0]
        predicted = logits[len(ctx) - 1:-1].argmax(-1)
        assert greedy == bool((predicted == torch.tensor(whole[len(ctx):])).all())


def test_loglikelihood_rolling_scores_every_token_once(lm):
    text = "The list data type has some more methods."
    [score] = lm.loglikelihood_rolling(_requests((text,)))
    tokens = [lm.eot_token_id] + lm.tok_encode(text)
    assert score == pytest.approx(float(_token_logprobs(lm, tokens).sum()), abs=1e-4)


def test_generate_until_decodes_greedily_with_the_compressed_cache_and_cuts_at_stop(lm):
    context = "The list data type"
    [free] = lm.generate_until(_requests((context, {"until": ["\x00"], "max_gen_toks": 6})))
    tokens, generated = lm.tok_encode(context), []
    for _ in range(6):  # greedy by full forwards with hard decisions, stopping at EOD
        logits = full_logits(lm.model, torch.tensor([tokens]), lm.tokenizer.vocab_size)[0, -1]
        token = int(logits.argmax())
        if token == lm.eot_token_id:
            break
        tokens.append(token)
        generated.append(token)
    assert free == lm.tok_decode(generated)
    assert lm.generation_cr and lm.generation_cr[-1] >= 1.0
    if len(free) > 1:
        stop = free[1]
        [cut] = lm.generate_until(_requests((context, {"until": [stop], "max_gen_toks": 6})))
        assert cut == free[:free.index(stop)]


def test_local_demo_tasks_run_offline_through_simple_evaluate(lm, monkeypatch):
    import lm_eval
    from lm_eval.tasks import TaskManager

    from nemo_dmc.evaluate.lm_eval_adapter import TASKS_DIR

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    out = lm_eval.simple_evaluate(model=lm, tasks=["dmc_demo"], task_manager=manager,
                                  bootstrap_iters=0, log_samples=False)
    results = out["results"]
    assert 0.0 <= results["dmc_demo_choice"]["acc,none"] <= 1.0
    assert 0.0 <= results["dmc_demo_continue"]["exact_match,strip"] <= 1.0
    assert results["dmc_demo_rolling"]["word_perplexity,none"] > 1.0
    assert out["n-samples"]["dmc_demo_choice"]["effective"] == 8


def test_model_type_is_registered_and_validates_its_arguments(lm):
    from lm_eval.api.registry import get_model

    from nemo_dmc.evaluate.lm_eval_adapter import NemoDMCLM

    assert get_model("nemo_dmc") is NemoDMCLM
    with pytest.raises(ValueError, match="^ratio: "):
        NemoDMCLM(load="unused", method="h2o")
    with pytest.raises(ValueError, match="^method: "):
        NemoDMCLM(load="unused", method="lru")
