"""The method seam: settings round-trip through every format, a new method is one file plus
its registration, and each DMC setting is declared in one place."""

import re
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch

from megatron_utils import TINY_GQA
from nemo_dmc.core import DMCConfig
from nemo_dmc.evaluate.config import EvaluateConfig
from nemo_dmc.methods import settings_for
from nemo_dmc.megatron.cpu_shims import causal_attention_mask
from nemo_dmc.megatron.model import build_model
from nemo_dmc.megatron.stats import layer_slots
from nemo_dmc.methods import (
    H2OSettings,
    StreamingSettings,
    TOVASettings,
    VanillaSettings,
    base,
    method_names,
    settings_from_dict,
    settings_to_dict,
)
from nemo_dmc.methods.eviction import EvictionMethod, EvictionSettings

REPO = Path(__file__).resolve().parents[1]
CFG = replace(TINY_GQA, seq_length=24)


@pytest.mark.parametrize("settings", [
    DMCConfig(window=None, target_cr=8.0, loss_weight=16.0), VanillaSettings(),
    H2OSettings(ratio=3.0, heavy_fraction=0.25), TOVASettings(ratio=2.0),
    StreamingSettings(ratio=4.0, sinks=2)], ids=lambda s: type(s).__name__)
def test_settings_round_trip_through_their_dict_form(settings):
    assert settings_from_dict(settings_to_dict(settings)) == settings


def test_settings_dicts_with_unknown_fields_or_methods_are_rejected_by_name():
    with pytest.raises(ValueError, match="kv_method: method 'dmc' has no setting.*windw"):
        settings_from_dict({"name": "dmc", "windw": 4}, key="kv_method")
    with pytest.raises(ValueError, match="unknown KV method 'lru'"):
        settings_from_dict({"name": "lru"})
    with pytest.raises(ValueError, match="dmc.target_cr"):
        DMCConfig(target_cr=0.5)


@dataclass(frozen=True)
class OldestFirstSettings(EvictionSettings):
    """A sliding window: StreamingLLM without sinks."""


class OldestFirstMethod(EvictionMethod):
    name = "oldest_first"
    settings_class = OldestFirstSettings

    def scores(self, probs, mass, live, positions, budget):
        return positions.float().expand_as(live), live


@pytest.fixture
def registered(monkeypatch):
    """``OldestFirstMethod`` registered for one test (the registry is a plain dict)."""
    monkeypatch.setitem(base._REGISTRY, OldestFirstMethod.name, OldestFirstMethod)
    return OldestFirstMethod


def _forward(model):
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, CFG.vocab_size, (2, CFG.seq_length), generator=g)
    positions = torch.arange(CFG.seq_length).expand(2, -1)
    with torch.no_grad():
        return model(tokens, positions, causal_attention_mask(CFG.seq_length))


def test_a_new_method_is_one_class_plus_its_registration(megatron_tp1, registered):
    assert "oldest_first" in method_names()
    EvaluateConfig(load="x", method="oldest_first", ratio=4.0)  # evaluation knows it
    settings = settings_for("oldest_first", DMCConfig(), ratio=4.0)
    assert settings == OldestFirstSettings(ratio=4.0)
    model = build_model(CFG, settings).eval()
    streaming = build_model(CFG, StreamingSettings(ratio=4.0, sinks=0, min_slots=1)).eval()
    streaming.load_state_dict(model.state_dict())
    torch.testing.assert_close(_forward(model), _forward(streaming))
    assert (layer_slots(model) == CFG.seq_length // 4).all()


def test_every_dmc_setting_default_is_declared_once():
    """No module restates a DMC setting with a default value (DMCConfig is their home; DMS's
    own eviction window is declared in its settings class; distillation's softmax
    temperature is another setting than DMC's Gumbel temperature)."""
    pattern = re.compile(r"(^\s*|[(,]\s*)(dmc_)?(init_offset|temperature|window|target_cr|"
                         r"decision_scale|loss_weight|hard_bias)\s*:\s*[^=,)\n]+=\s*-?[\d.]")
    home = REPO / "nemo_dmc" / "core" / "config.py"
    found = [f"{path.relative_to(REPO)}:{n}: {line.strip()}"
             for path in sorted((REPO / "nemo_dmc").rglob("*.py")) + sorted(
                 (REPO / "kernels").rglob("*.py")) if path != home
             for n, line in enumerate(path.read_text().splitlines(), 1)
             if pattern.search(line) and "sampling" not in str(path)
             and not str(path).endswith("inference/config.py")
             and not (str(path).endswith("methods/dms.py") and "window: int" in line)
             and not path.name == "distill.py"]
    assert not found, "DMC defaults restated outside nemo_dmc/core/config.py:\n" + "\n".join(found)
