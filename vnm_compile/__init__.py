"""vnm-compile: V:N:M structured sparsity for PyTorch transformers.

The public names below are imported on first use (`import vnm_compile` itself loads nothing heavy,
so the `vnm` command answers --help at once); `torch.compile(model, backend="vnm")` finds the
backend through its entry point.
"""

from __future__ import annotations

import importlib
from typing import Any

from .hf_registration import register_with_transformers

register_with_transformers()  # from_pretrained restores V:N:M checkpoints once vnm_compile is imported

# public name -> the module that defines it
_PUBLIC = {
    "sparsify": "api",
    "vnm_backend": "backend",
    "Bisection": "bisection", "bisect": "bisection",
    "Calibration": "calibration", "LayerStats": "calibration", "calibrate": "calibration",
    "load_compressed": "checkpoint", "save_compressed": "checkpoint",
    "register_method": "compression",
    "Refinement": "config", "VNMConfig": "config",
    "parallelize": "distributed",
    "explain": "explanation",
    "FinetuneSchedule": "recovery", "finetune": "recovery",
    "VNMWeight": "format", "analytic_speedup": "format", "is_vnm": "format", "log_mask_diversity": "format",
    "mask_count": "format", "select_vm": "format", "vnm_mask": "format",
    "vnm_linear": "kernels",
    "VNMLinear": "modules",
    "Report": "report", "reports": "report",
    "is_transposable": "transposable", "transposable_mask": "transposable",
    "compress_sequential": "sequential",
    "ActivationNorms": "scoring", "activation_norms": "scoring", "importance": "scoring",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'vnm_compile' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
