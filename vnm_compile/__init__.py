"""vnm-compile: V:N:M structured sparsity for PyTorch transformers."""

from .api import sparsify
from .backend import reports, vnm_backend
from .bisect import Bisection, bisect
from .calibration import Calibration, LayerStats, calibrate
from .config import VNMConfig
from .explain import explain
from .finetune import FinetuneSchedule, finetune
from .format import VNMWeight, analytic_speedup, is_vnm, log_mask_diversity, mask_count, select_vm, vnm_mask
from .kernels import vnm_linear
from .modules import VNMLinear
from .report import Report
from .scoring import ActivationNorms, activation_norms, importance

__all__ = [
    "ActivationNorms",
    "Bisection",
    "Calibration",
    "FinetuneSchedule",
    "LayerStats",
    "Report",
    "VNMConfig",
    "VNMLinear",
    "VNMWeight",
    "activation_norms",
    "analytic_speedup",
    "bisect",
    "calibrate",
    "explain",
    "finetune",
    "importance",
    "is_vnm",
    "log_mask_diversity",
    "mask_count",
    "reports",
    "select_vm",
    "sparsify",
    "vnm_backend",
    "vnm_linear",
    "vnm_mask",
]
