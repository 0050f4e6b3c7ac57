"""benchmarks/e2e.py runs end to end on the CPU (--smoke: a tiny Llama) and writes its files."""

import json

import pytest

pytest.importorskip("transformers")
from benchmarks import e2e  # noqa: E402


@pytest.mark.slow
def test_smoke_run_writes_json_and_markdown(tmp_path):
    result = e2e.main(["--smoke", "--variants", "inductor,vnm-64:2:8", "--generate", "vnm-64:2:8", "--batches", "2",
                       "--out", str(tmp_path)])
    data = json.loads((tmp_path / "e2e-cpu.json").read_text())
    assert data == json.loads(json.dumps(result)) and data["commit"] and data["torch"]
    assert [(row["variant"], row["shape"]) for row in data["flow"]] == [
        (variant, shape) for variant in ("inductor", "vnm-64:2:8") for shape in ("1x64", "4x1", "1x1", "3x1", "1x32")]
    assert all("error" not in row and row["first_call_s"] > 0 for row in data["flow"])
    # vnm's passes run at the first compile and are shared with the later graphs; Inductor runs none
    passes = {row["shape"]: row["passes_s"] for row in data["flow"] if row["variant"] == "vnm-64:2:8"}
    assert 0 < passes["1x64"] < data["flow"][5]["first_call_s"]
    assert all(row["passes_s"] == 0 for row in data["flow"] if row["variant"] == "inductor")
    # where each first call's seconds went, by torch's timers: that call's compile, not the run's so far
    # (phases nest, and a phase timed in compile workers may sum past the wall time: Dynamo's outermost;
    # phases are rounded to hundredths, which may round up past the call's unrounded seconds)
    compiled = [row for row in data["flow"] if row["shape"] != "3x1"]
    assert all(0 < row["compile_phases_s"]["_compile.compile_inner"] <= row["first_call_s"] + 0.005 for row in compiled)
    assert "compile_fx_inner" in data["flow"][5]["compile_phases_s"]  # vnm's backend hands its graph to Inductor
    # another decode batch runs the graph the first one compiled: no compile phase
    assert all(row["compile_phases_s"] == {} for row in data["flow"] if row["shape"] == "3x1")
    # one compile: the first shape, the graph with a dynamic batch, one token, the one with a dynamic length too
    assert [row["graphs"] for row in data["flow"] if row["variant"] == "vnm-64:2:8"] == [1, 2, 3, 3, 4]
    (generated,) = data["generate"]
    assert generated["variant"] == "vnm-64:2:8" and generated["batch"] == 2 and generated["tokens_per_s"] > 0
    markdown = (tmp_path / "e2e-cpu.md").read_text()
    assert "| vnm-64:2:8 | 4x1 |" in markdown and "| vnm-64:2:8 | 2 |" in markdown


def test_unknown_variant_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="unknown variants"):
        e2e.main(["--smoke", "--variants", "vnm-64:2:7", "--out", str(tmp_path)])


def _earlier(device: str) -> dict:
    rows = [dict(variant=v, shape="1x1", wall_ms=1.0) for v in ("inductor", "vnm-64:2:8")]
    return dict(model="m", device=device, torch="t", triton="tr", date="d", commit="c", flow=rows,
                generate=[dict(variant="inductor", batch=1, tokens_per_s=1.0)])


def test_append_keeps_the_other_variants_rows_of_the_same_device():
    now = dict(model="m", device="gpu", torch="t", triton="tr", header="h.", flow=[], generate=[])
    result = e2e.appended(now, _earlier("gpu"), ["vnm-64:2:8"])
    assert [row["variant"] for row in result["flow"]] == ["inductor"]
    assert [row["variant"] for row in result["generate"]] == ["inductor"]
    assert "Rows of inductor" in result["header"]
    with pytest.raises(SystemExit, match="device"):
        e2e.appended(dict(now, flow=[]), _earlier("other gpu"), ["vnm-64:2:8"])


def test_shapes_pick_the_flow_and_empty_shapes_leave_generate_alone(tmp_path):
    result = e2e.main(["--smoke", "--variants", "vnm-64:2:8", "--shapes", "", "--generate", "vnm-64:2:8",
                       "--batches", "1", "--out", str(tmp_path)])
    assert result["flow"] == [] and [row["batch"] for row in result["generate"]] == [1]
    result = e2e.main(["--smoke", "--variants", "inductor", "--shapes", "2x1", "--generate", "", "--out",
                       str(tmp_path)])
    assert [row["shape"] for row in result["flow"]] == ["2x1"] and result["generate"] == []


def test_profile_records_where_a_calls_cpu_time_goes(tmp_path):
    """--profile: each flow call's CPU split (compiled region, guards, launches) in the row and the
    markdown, the profiler's table and Python's profile in a file per variant and shape."""
    result = e2e.main(["--smoke", "--variants", "inductor,vnm-64:2:8", "--shapes", "1x8,2x1", "--generate", "",
                       "--profile", "--out", str(tmp_path)])
    assert [(row["variant"], row["shape"]) for row in result["flow"]] == [
        ("inductor", "1x8"), ("inductor", "2x1"), ("vnm-64:2:8", "1x8"), ("vnm-64:2:8", "2x1")]
    for row in result["flow"]:
        assert row["guards_cpu_ms"] > 0 and row["region_cpu_ms"] > 0 and row["launches"] == 0  # no CUDA
        text = (tmp_path / f"e2e-cpu-flow-profile-{row['variant'].replace(':', '_')}-{row['shape']}.txt").read_text()
        assert "TorchDynamo Cache Lookup" in text and "(cProfile)" in text and "tottime" in text
    # the dynamic graph of a CPU compile dispatches each sparse linear per call
    assert result["flow"][3]["sparse_linear_cpu_us"] > 0
    markdown = (tmp_path / "e2e-cpu.md").read_text().split("Where a call's CPU time goes")[1]
    assert "| vnm-64:2:8 | 2x1 |" in markdown and "| inductor | 1x8 |" in markdown


def test_profile_records_where_a_decode_step_goes(tmp_path):
    result = e2e.main(["--smoke", "--variants", "vnm-64:2:8", "--shapes", "", "--generate", "vnm-64:2:8",
                       "--batches", "1", "--profile", "--out", str(tmp_path)])
    (row,) = result["generate"]
    profile = row["profile"]
    assert profile["decode_calls"] == row["new_tokens"] - 1  # the first token comes from the prompt's call
    assert profile["guards_cpu_ms"] > 0 and profile["graph_gpu_ms"] >= 0
    assert "TorchDynamo Cache Lookup" in (tmp_path / "e2e-cpu-profile-vnm-64_2_8-b1.txt").read_text()
    assert "| vnm-64:2:8 | 1 |" in (tmp_path / "e2e-cpu.md").read_text().split("Where a decode step goes")[1]
