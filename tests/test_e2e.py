"""benchmarks/e2e.py runs end to end on the CPU (--smoke: tiny Llama and ViT) and writes its files."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "e2e.py"


def _load():
    if str(SCRIPT.parent) not in sys.path:  # as when run as a script: its sibling modules import
        sys.path.insert(0, str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("e2e_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_smoke_run_writes_json_markdown_and_chart(tmp_path):
    e2e = _load()
    result = e2e.main(["--smoke", "--variants", "eager,vnm-64:2:8", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "e2e-cpu.json").read_text())
    assert data["models"].keys() == {"llama", "vit"} and data == json.loads(json.dumps(result))
    expected = {"llama": {"prefill b1x32", "prefill b2x16", "decode b1", "decode b2"}, "vit": {"b1", "b2", "b4"}}
    for name, model in data["models"].items():
        rows = model["rows"]
        assert {row["workload"] for row in rows} == expected[name]
        assert {row["variant"] for row in rows} == {"eager", "vnm-64:2:8"}
        for row in rows:
            assert "error" not in row and "skipped" not in row, row
            assert row["latency_ms"] > 0 and row["throughput"] > 0 and row["weight_bytes"] > 0
        for row in (r for r in rows if r["variant"] == "vnm-64:2:8"):
            assert row["graph_breaks"] == 0 and row["sparse_linears"] > 0 and row["passes_s"]["permute"] >= 0
            eager = next(r for r in rows if r["variant"] == "eager")
            assert row["weight_bytes"] < eager["weight_bytes"]  # compressed linears (no layout on CPU)
    markdown = (tmp_path / "e2e-cpu.md").read_text()
    assert "| prefill b1x32 | vnm-64:2:8 |" in markdown and "| b4 | eager |" in markdown
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "e2e-cpu.png").stat().st_size > 1000


def test_unknown_variant_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="unknown models or variants"):
        _load().main(["--smoke", "--variants", "vnm-64:2:7", "--out", str(tmp_path)])
