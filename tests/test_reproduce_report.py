"""bench/reproduce.py: its commands, and the table and plot it builds from evaluation results."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def reproduce():
    spec = importlib.util.spec_from_file_location("reproduce", REPO / "bench" / "reproduce.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["reproduce"] = module
    spec.loader.exec_module(module)
    return module


def _result(cr: float, ppl: float, passkey: float, groups: int = 8, layers: int = 2) -> dict:
    kv = {"fraction_of_vanilla": 1 / cr, "logical": 100 / cr, "vanilla": 100,
          "open_state": 1 if cr > 1 else 0}
    layer_cr = [cr * (1 + i) for i in range(layers)]  # differs by layer, as retrofits do
    return {"compression": {"cr": cr, "kv_bytes": kv, "layer_cr": layer_cr},
            "perplexity": {"perplexity": ppl}, "passkey": {"accuracy": passkey},
            "model": {"num_query_groups": groups}}


def test_report_tables_every_evaluation_against_the_continued_vanilla_model(reproduce, tmp_path):
    layout = reproduce.Layout(tmp_path, tmp_path / "kept")
    results = {"base": _result(1.0, 30.0, 0.5), "vanilla_continued": _result(1.0, 20.0, 0.5),
               "dmc_cr4": _result(3.9, 20.4, 0.5), "gqa_cr4": _result(1.0, 25.0, 0.25, groups=2),
               "h2o_cr4": _result(3.9, 40.0, 0.0), "dms_cr4": _result(4.2, 21.0, 0.5),
               "tova_dms_cr4": _result(3.4, 30.0, 0.0), "dms_cr4_full": _result(1.0, 20.0, 0.5),
               "dms_frozen_cr4": _result(4.0, 33.0, 0.5),
               "streaming_dms_frozen_cr4": _result(4.0, 45.0, 0.0)}
    for name, result in results.items():
        out = layout.root / "eval" / name
        out.mkdir(parents=True)
        (out / "results.json").write_text(json.dumps(result))
    rows = {row.method: row for row in reproduce.load_rows(layout, [4])}
    assert set(rows) == {"base (pretrained)", "vanilla, continued", "DMC", "GQA up-trained", "H2O",
                         "DMS", "TOVA, at DMS's state",
                         "DMS, base frozen (adapters only, distilled)",
                         "StreamingLLM (sinks + window), at frozen DMS's state"}
    assert (rows["GQA up-trained"].ratio, rows["GQA up-trained"].kv_fraction) == (4.0, 0.25)
    table = reproduce.results_table(list(rows.values()))
    # Per-layer ratios for the retrofits only (eviction and GQA are uniform by construction);
    # each row also against its own weights with the whole cache (DMC's was not evaluated).
    assert "| DMC | retrofit | 4 | 3.90 | 0.256 | 0.266 | 20.40 | +2.0% | - | 50% | 3.9 / 7.8 |" \
        in table
    assert "| DMS | retrofit | 4 | 4.20 | 0.238 | 0.248 | 21.00 | +5.0% | +5.0% | 50% | 4.2 / 8.4 |" \
        in table
    assert "| GQA up-trained | retrofit | 4 | 4.00 | 0.250 | 0.250 | 25.00 | +25.0% | +0.0% | 25% | - |" \
        in table
    assert "| H2O | continued | 4 | 3.90 | 0.256 | 0.266 | 40.00 | +100.0% | +100.0% | 0% | - |" \
        in table
    # The frozen retrofit and the eviction beside it run on the base: compared with the base.
    assert "| DMS, base frozen (adapters only, distilled) | base | 4 | 4.00 | 0.250 | 0.260 | 33.00 " \
        "| +65.0% | +10.0% | 50% | 4.0 / 8.0 |" in table
    assert "at frozen DMS's state | base | 4 | 4.00 | 0.250 | 0.260 | 45.00 | +125.0% | +50.0% |" \
        in table

    reproduce.plot(list(rows.values()), tmp_path / "plot.png")
    assert (tmp_path / "plot.png").read_bytes()[:4] == b"\x89PNG"


def test_benchmarks_section_is_replaced_between_markers_only(reproduce, tmp_path):
    doc = tmp_path / "B.md"
    start, end = reproduce.MARKERS
    doc.write_text(f"head\n{start}\nold\n{end}\ntail\n")
    reproduce.write_between_markers(doc, "new table")
    assert doc.read_text() == f"head\n{start}\nnew table\n{end}\ntail\n"
    doc.write_text("no markers")
    with pytest.raises(ValueError, match="markers"):
        reproduce.write_between_markers(doc, "x")


def test_dry_run_prints_the_pipeline_commands(reproduce, capsys, tmp_path):
    reproduce.main(["--dry-run", "--steps", "base", "eval", "--ratios", "4",
                    "--root", str(tmp_path)])
    out = capsys.readouterr().out
    assert "python -m nemo_dmc.train name=repro_base" in out and "stage=pretrain" in out
    assert "method=dmc" in out and "method=tova" in out and "method=streaming" in out
    assert "method=dms" in out and "tova_dms_cr4" in out
    assert "output_dir=runs/repro/eval/dms_cr4_full" not in out  # --root is honoured
    lines = out.splitlines()
    assert any(f"load={tmp_path}/dms_cr4 method=vanilla " in line
               and line.endswith(f"output_dir={tmp_path}/eval/dms_cr4_full") for line in lines)
    assert any(f"load={tmp_path}/base method=h2o " in line
               and f"output_dir={tmp_path}/eval/h2o_dms_frozen_cr4 ratio=" in line for line in lines)
    with pytest.raises(SystemExit):
        reproduce.main(["--dry-run", "--ratios", "3", "--root", str(tmp_path)])
