"""benchmarks/kernels.py runs its sweep on the CPU (--smoke: Triton interpreter, tiny shapes) and writes
the columns of every contender, torch's 2:4 and cuSPARSELt skipped there with a note."""

import json
import os
import subprocess
import sys
from pathlib import Path

CUDA_ONLY_KEYS = ("torch24_graph_us", "torch24_eager_us", "vs_torch24", "cslt_us")


def test_smoke_sweep_writes_every_column(tmp_path):
    root = Path(__file__).resolve().parents[1]
    # 77 columns: neither V nor M divides them; 3 tokens take the decode path, 40 the transposed prefill
    command = [sys.executable, "-m", "benchmarks.kernels", "--smoke", "--shapes", "100x77", "--tokens", "3,40",
               "--patterns", "16:2:5,32:2:8", "--out-dir", str(tmp_path)]
    done = subprocess.run(command, cwd=root, env={**os.environ, "PYTHONPATH": str(root)}, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "kernels-cpu-smoke.json").read_text())
    cases = result["cases"]
    assert [(c["m"], c["dtype"], c["tokens"]) for c in cases] == [
        (m, dtype, tokens) for m in (5, 8) for dtype in ("float16", "bfloat16") for tokens in (3, 40)]
    assert {c["path"] for c in cases} == {"decode", "prefill"}
    assert all(c["err"] < {"float16": 2e-3, "bfloat16": 1e-2}[c["dtype"]] for c in cases)
    assert all(c[key] is None for c in cases for key in CUDA_ONLY_KEYS)
    assert any("CUDA only" in note for note in result["notes"])
    markdown = (tmp_path / "kernels-cpu-smoke.md").read_text()
    header = next(line for line in markdown.splitlines() if line.startswith("| weight"))
    assert all(f"| {column} |" in header for column in ("x dense", "torch 2:4", "x 2:4", "cslt", "2:4 eager"))
    assert "CUDA only" in markdown and "| 100x77 | 40 | 32:2:8 | bfloat16 | prefill |" in markdown
