"""bench/smollm2_quality.py: eviction beside each retrofit runs on the weights it kept, and the
table's deltas compare each row with those weights."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def quality():
    sys.path.insert(0, str(REPO / "bench"))
    spec = importlib.util.spec_from_file_location("smollm2_quality", REPO / "bench" / "smollm2_quality.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["smollm2_quality"] = module  # its dataclasses look themselves up there
    spec.loader.exec_module(module)
    return module


def _write(layout, name: str, ppl: dict, cr: float = 1.0) -> None:
    for text, value in ppl.items():
        out = layout.root / "eval" / f"{name}_{text}"
        out.mkdir(parents=True)
        kv = {"logical": 100 / cr, "vanilla": 100, "open_state": 0}
        (out / "results.json").write_text(json.dumps({
            "compression": {"cr": cr, "kv_bytes": kv, "layer_cr": [cr, cr]},
            "perplexity": {"perplexity": value}, "passkey": {"accuracy": 0.5}, "ratio": cr}))


def test_eviction_base_follows_what_the_recipe_trains(quality, tmp_path):
    layout = quality.Layout(tmp_path, tmp_path / "kept")
    assert quality.eviction_base(layout, "dms_adapter") == (layout.imported, "original")
    assert quality.eviction_base(layout, "dms_adapter_all") == (layout.vanilla, "continued")
    # frozen, but on the continued weights: eviction runs on those
    assert quality.eviction_base(layout, "dms_adapter_on_continued") == \
        (layout.vanilla, "continued")


def test_rows_compare_with_their_own_base_weights(quality, tmp_path):
    layout = quality.Layout(tmp_path, tmp_path / "kept")
    _write(layout, "original", {"pydocs": 10.0, "plays": 40.0})
    _write(layout, "vanilla_continued", {"pydocs": 8.0, "plays": 38.0})
    _write(layout, "dms_adapter_cr4", {"pydocs": 10.5, "plays": 42.0}, cr=4)
    _write(layout, "tova_for_dms_adapter_cr4", {"pydocs": 12.0, "plays": 44.0}, cr=4)
    _write(layout, "dms_adapter_all_cr4", {"pydocs": 8.4, "plays": 38.0}, cr=4)
    (layout.root / "eval" / "dms_adapter_all_cr4_plays" / "results.json").write_text(json.dumps({
        "compression": {"cr": 2, "kv_bytes": {"logical": 50, "vanilla": 100, "open_state": 0}},
        "perplexity": {"perplexity": 38.0}, "passkey": {}, "ratio": 2}))
    rows = quality.load_rows(layout, [4.0], ["dms_adapter", "dms_adapter_all"])
    assert [r.base for r in rows] == ["original", "continued", "original", "original", "continued"]
    table = quality.results_table(rows).splitlines()
    assert "| 0.250 / 0.250 | 10.50 | +5.0% | 42.00 | +5.0% |" in table[4]  # DMS vs the original
    assert "| 12.00 | +20.0% | 44.00 | +10.0% |" in table[5]  # TOVA on the original weights
    assert "| 0.250 / 0.500 | 8.40 | +5.0% | 38.00 | +0.0% |" in table[6]  # vs continued
    quality.plot(rows, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").stat().st_size > 0
