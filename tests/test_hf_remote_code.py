"""A DMC Hugging Face export is self-contained: stock transformers (``trust_remote_code=True``)
and stock lm-eval load it in a process where nemo_dmc cannot be imported, and our lm-eval
entry point takes ``--model hf`` on it without that flag."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.dynamic_module_utils import get_imports

from megatron_utils import TINY_GQA
from nemo_dmc.checkpoints.sharding import gather_full_state
from nemo_dmc.convert.hf_export import save_hf_checkpoint
from nemo_dmc.core import DMCConfig
from nemo_dmc.data.tokenizer import train_bpe_tokenizer
from nemo_dmc.evaluate.lm_eval_adapter import TASKS_DIR
from nemo_dmc.hf import DMCLlamaForCausalLM
from nemo_dmc.hf.remote_code import AUTO_MAP, BundleError, bundled_source, remote_code_files
from nemo_dmc.megatron import parallel
from nemo_dmc.methods import settings_for
from nemo_dmc.megatron.model import build_model
from nemo_dmc.megatron.parallel import seed_all
from nemo_dmc.training.launch import free_port

DMC = DMCConfig(init_offset=0.0, window=4)  # offset 0: random weights merge about half
METHODS = {"dmc": DMC, "dms": settings_for("dms", DMC, window=3),
           "h2o": settings_for("h2o", DMC, ratio=2.0)}
TEXTS = ["The list data type has some more methods. The pass key is 12345.",
         "def main():\n    return 0\n", "The grass is green. The sky is blue."] * 20
IDS = [[3, 17, 40, 5, 99, 12, 7, 61, 2, 30, 44], [8, 1, 250, 9, 31, 6, 77, 19, 4, 100, 23]]

# Started by `sitecustomize` in every process of a "fresh environment": nemo_dmc is absent.
BLOCKER = '''import importlib.abc, sys
class _NoNemoDMC(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "nemo_dmc" or name.startswith("nemo_dmc."):
            raise ModuleNotFoundError(f"No module named {name!r} (not installed here)", name=name)
sys.meta_path.insert(0, _NoNemoDMC())
'''
LOAD = '''import json, sys, torch
from transformers import AutoModelForCausalLM
ids, results = torch.tensor(json.loads(sys.argv[1])), {}
for folder in sys.argv[2:]:
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    with torch.no_grad():
        logits = model(ids, use_cache=False).logits
    generated = model.generate(ids[:1], max_new_tokens=6, do_sample=False)
    results[folder] = {"logits": logits.tolist(), "generated": generated.tolist(),
                       "module": type(model).__module__}
results["nemo_dmc"] = sorted(m for m in sys.modules if m.split(".")[0] == "nemo_dmc")
print(json.dumps(results))
'''


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    root = tmp_path_factory.mktemp("remote_code")
    tokenizer = train_bpe_tokenizer(TEXTS, root / "tok", vocab_size=300)
    model = replace(TINY_GQA, vocab_size=tokenizer.vocab_size)
    os.environ["MASTER_PORT"] = str(free_port())
    parallel.initialize(tensor_parallel_size=1, seed=1234)
    try:
        seed_all(2)
        state = gather_full_state(build_model(model, DMC))
    finally:
        parallel.shutdown()
    for name, method in METHODS.items():
        save_hf_checkpoint(state, model, root / name, method=method, tokenizer=tokenizer)
    return root / "dmc"


def _fresh_env(tmp: Path) -> dict[str, str]:
    """Environment of a process where nemo_dmc cannot be imported (and whose dynamic-module
    cache starts empty)."""
    site = tmp / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(BLOCKER)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return {**env, "PYTHONPATH": str(site), "HF_MODULES_CACHE": str(tmp / "modules"),
            "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _run(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, *args], env=env, cwd=cwd, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_export_carries_auto_map_and_a_bundle_needing_only_torch_and_transformers(export):
    config = json.loads((export / "config.json").read_text())
    assert config["auto_map"] == AUTO_MAP
    files = sorted(p.name for p in export.glob("*.py"))
    assert files == sorted(remote_code_files()) and "modeling_dmc_llama.py" in files
    assert not any(p.name.startswith("nemo_dmc_kernels_") and "dispatch" not in p.name
                   and "references" not in p.name for p in export.glob("*.py")), \
        "the Triton kernels stay out of the bundle"
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    for path in export.glob("*.py"):
        assert set(get_imports(path)) - stdlib <= {"torch", "transformers"}, path.name


def test_plain_llama_export_has_no_remote_code(tmp_path, megatron_tp1):
    seed_all(3)
    out = save_hf_checkpoint(gather_full_state(build_model(TINY_GQA, method=None)), TINY_GQA,
                             tmp_path / "plain")
    assert not list(out.glob("*.py"))
    assert "auto_map" not in json.loads((out / "config.json").read_text())


def test_bundle_refuses_import_forms_it_cannot_rewrite(tmp_path, monkeypatch):
    package = tmp_path / "nemo_dmc_probe"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "bad.py").write_text("import nemo_dmc.core\n")
    (package / "shared.py").write_text("import os; from nemo_dmc.core import DMCConfig\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(BundleError, match="bad:1"):
        bundled_source("nemo_dmc_probe.bad")
    with pytest.raises(BundleError, match="sharing its line"):
        bundled_source("nemo_dmc_probe.shared")


def test_fresh_environment_loads_the_exports_with_stock_transformers(export, tmp_path):
    folders = [str(export.parent / name) for name in METHODS]  # DMC, DMS and H2O exports
    result = _run(["-c", LOAD, json.dumps(IDS), *folders], _fresh_env(tmp_path), tmp_path)
    remote = json.loads(result.stdout.strip().splitlines()[-1])
    assert remote.pop("nemo_dmc") == [], "nemo_dmc was imported in the fresh environment"
    ids = torch.tensor(IDS)
    for folder in folders:
        assert remote[folder]["module"].startswith("transformers_modules.")
        ours = AutoModelForCausalLM.from_pretrained(folder).eval()  # nemo_dmc.hf's classes
        assert isinstance(ours, DMCLlamaForCausalLM)
        with torch.no_grad():
            logits = ours(ids, use_cache=False).logits
        torch.testing.assert_close(torch.tensor(remote[folder]["logits"]), logits, atol=1e-5,
                                   rtol=1e-5)
        generated = ours.generate(ids[:1], max_new_tokens=6, do_sample=False)
        assert remote[folder]["generated"] == generated.tolist(), folder


def _lm_eval(args: list[str], model_args: str, env, cwd: Path, out: Path) -> dict:
    _run([*args, "--model", "hf", "--model_args", model_args, "--tasks", "dmc_demo_choice",
          "--include_path", str(TASKS_DIR), "--device", "cpu", "--batch_size", "1",
          "--output_path", str(out)], env, cwd)
    (results,) = out.rglob("results_*.json")
    return json.loads(results.read_text())["results"]["dmc_demo_choice"]


def test_stock_lm_eval_and_our_entry_point_run_the_export_as_hf(export, tmp_path):
    stock = _lm_eval(["-m", "lm_eval"], f"pretrained={export},trust_remote_code=True,dtype=float32",
                     _fresh_env(tmp_path), tmp_path, tmp_path / "stock")
    # our entry point registers dmc_llama, so --model hf needs no trust_remote_code there
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules_ours"), "HF_HUB_OFFLINE": "1"}
    ours = _lm_eval(["-m", "nemo_dmc.evaluate.lm_eval_adapter"],
                    f"pretrained={export},dtype=float32", env, tmp_path, tmp_path / "ours")
    assert stock["acc,none"] == ours["acc,none"]
    assert stock["acc_norm,none"] == ours["acc_norm,none"]
