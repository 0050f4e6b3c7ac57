"""Every benchmark runs as a module of the benchmarks package (`python3 -m benchmarks.<name>`): each
imports from the package and parses its arguments."""

import importlib
import sys

import pytest

pytest.importorskip("transformers")

MODULES = ["accuracy", "checkpoint", "corpus", "e2e", "kernels", "recovery", "sparse_mma_check", "tensor_core_peaks",
           "tp", "transposable"]


@pytest.mark.parametrize("name", MODULES)
def test_benchmark_module_prints_its_usage(name, monkeypatch, capsys):
    module = importlib.import_module(f"benchmarks.{name}")
    monkeypatch.setattr(sys, "argv", [f"benchmarks.{name}", "--help"])
    with pytest.raises(SystemExit) as exit_info:
        module.main()
    assert exit_info.value.code == 0
    assert "usage:" in capsys.readouterr().out
