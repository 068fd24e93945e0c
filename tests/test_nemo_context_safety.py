"""A NeMo 2 ``context/io.json`` builds nothing outside the allow-listed NeMo / nemo-dmc Llama
model and config classes unless the user sets ``NEMO_DMC_TRUST_NEMO_CONTEXT=1``; our own
exports still load with their shape and DMC settings.

The injected call would create a marker file; the tests assert it was never created."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("nemo.collections.llm", reason="needs the `nemo` extra")

import fiddle as fdl  # noqa: E402
from fiddle._src.experimental import serialization  # noqa: E402

from megatron_utils import TINY_GQA  # noqa: E402
from nemo_dmc.checkpoints.nemo_context import (  # noqa: E402
    TRUST_ENV,
    UntrustedContextError,
    read_nemo_settings,
)
from nemo_dmc.checkpoints.resolve import resolve_checkpoint  # noqa: E402
from nemo_dmc.core import DMCConfig  # noqa: E402
from nemo_dmc.megatron.model import build_model  # noqa: E402
from nemo_dmc.nemo.checkpoint import export_nemo_checkpoint, load_nemo_model  # noqa: E402

DMC = DMCConfig(init_offset=0.0, window=4, target_cr=3.0)


@pytest.fixture(autouse=True)
def _untrusted(monkeypatch):
    monkeypatch.delenv(TRUST_ENV, raising=False)


def _export(tmp_path: Path, dmc: DMCConfig | None = DMC) -> Path:
    export_nemo_checkpoint(build_model(TINY_GQA, dmc), TINY_GQA, dmc, tmp_path / "nemo")
    return tmp_path / "nemo"


def _set_argument(checkpoint: Path, owner_path: str, name: str, value: Any) -> Path:
    """Set argument ``name`` of the object at ``owner_path`` (e.g. ``<root>.config``) in
    ``io.json`` to ``value`` (a fiddle config is serialised with its objects merged in)."""
    file = checkpoint / "context" / "io.json"
    data = json.loads(file.read_text())
    if isinstance(value, fdl.Buildable):
        extra = serialization.Serialization(value).result

        def rename(node: Any) -> Any:
            if isinstance(node, dict):
                if node.get("type") == "ref":
                    return {"type": "ref", "key": f"injected_{node['key']}"}
                return {k: rename(v) for k, v in node.items()}
            return [rename(v) for v in node] if isinstance(node, (list, tuple)) else node

        data["objects"].update({f"injected_{k}": rename(v) for k, v in extra["objects"].items()})
        value = rename(extra["root"])
    objects = data["objects"]
    owner = next(obj for obj in objects.values() if owner_path in (obj.get("paths") or ()))
    attr = f"Attr(name='{name}')"
    if all(item[0] != attr for item in owner["items"]):  # a new argument: name it in metadata
        metadata = objects[owner["metadata"]["key"]]
        names_ref = dict(metadata["items"])["Attr(name='argument_names')"]
        names = objects[names_ref["key"]]["items"]
        names.append([f"Index(index={len(names)})", name])
        owner["items"].append([attr, None])
    owner["items"] = [[key, value if key == attr else old] for key, old in owner["items"]]
    file.write_text(json.dumps(data))
    return file


def _touch(marker: Path) -> fdl.Config:
    return fdl.Config(subprocess.call, args=["touch", str(marker)])


def test_own_dmc_export_reads_its_shape_and_dmc_settings_without_the_opt_in(megatron_tp1,
                                                                              tmp_path):
    shape, dmc = read_nemo_settings(_export(tmp_path), vocab_size=TINY_GQA.vocab_size)
    assert shape == TINY_GQA and dmc == DMC
    assert resolve_checkpoint(tmp_path / "nemo").recorded_dmc_config() == DMC
    assert load_nemo_model(tmp_path / "nemo").config.dmc == DMC


def test_own_plain_export_reads_its_shape_without_the_opt_in(megatron_tp1, tmp_path):
    shape, dmc = read_nemo_settings(_export(tmp_path, None), vocab_size=TINY_GQA.vocab_size)
    assert shape == TINY_GQA and dmc is None


def test_a_context_naming_subprocess_call_is_refused_by_every_reader(megatron_tp1, tmp_path):
    from nemo_dmc.training.config import ConfigError, TrainConfig, validate_config

    nemo, marker = _export(tmp_path), tmp_path / "pwned"
    _set_argument(nemo, "<root>.config", "dmc_stage", _touch(marker))
    refused = r"context/io\.json names subprocess\.call.*" + TRUST_ENV
    with pytest.raises(UntrustedContextError, match=refused):
        resolve_checkpoint(nemo)  # generate / evaluate / convert / lm-eval load=
    with pytest.raises(UntrustedContextError, match=refused):
        load_nemo_model(nemo)
    cfg = TrainConfig(run_dir=str(tmp_path / "run"), model=TINY_GQA)
    cfg.checkpoint.pretrained = str(nemo)
    with pytest.raises(ConfigError, match=r"checkpoint\.pretrained.*io\.json.*subprocess\.call"):
        validate_config(cfg, world_size=1, cuda_available=False)
    assert not marker.exists()


def test_reading_the_settings_builds_only_the_config(megatron_tp1, tmp_path):
    nemo, marker = _export(tmp_path), tmp_path / "pwned"
    _set_argument(nemo, "<root>.optim", "lr_scheduler", _touch(marker))
    assert read_nemo_settings(nemo, vocab_size=TINY_GQA.vocab_size) == (TINY_GQA, DMC)
    assert not marker.exists()


def test_the_opt_in_lets_nemo_build_a_reference_outside_the_allow_list(megatron_tp1, tmp_path,
                                                                      monkeypatch):
    import torch

    nemo = _export(tmp_path)
    _set_argument(nemo, "<root>.config", "activation_func",
                  {"type": "pyref", "module": "torch", "name": "tanh"})
    with pytest.raises(UntrustedContextError, match=r"io\.json names torch\.tanh"):
        read_nemo_settings(nemo)
    monkeypatch.setenv(TRUST_ENV, "1")
    assert load_nemo_model(nemo).config.activation_func is torch.tanh


def test_what_nemo_records_once_it_tracks_more_types_is_a_safe_reference():
    """Once NeMo has tracked more types in a process (after a NeMo model was restored), its
    contexts record ``attention_backend=AttnBackend.auto`` and ``init_method`` as
    ``Partial(torch.nn.init.normal_, ...)``: values and initialisers, readable without opt-in."""
    from nemo_dmc.checkpoints.nemo_context import is_safe_reference

    assert is_safe_reference("megatron.core.transformer.enums", "AttnBackend.auto")
    assert is_safe_reference("megatron.core.transformer.enums", "AttnMaskType")
    assert not is_safe_reference("megatron.core.transformer.enums", "AttnBackend.auto.x")
    assert not is_safe_reference("megatron.core.transformer", "enums")
    assert is_safe_reference("fiddle._src.partial", "Partial")
    assert is_safe_reference("torch.nn.init", "normal_")
    assert not is_safe_reference("torch.nn.init", "_no_grad_fill_")
