"""vnm-compile: V:N:M structured sparsity for PyTorch transformers."""

from .config import VNMConfig
from .format import VNMWeight, analytic_speedup, is_vnm, log_mask_diversity, mask_count, select_vm, vnm_mask
from .kernels import vnm_linear
from .scoring import ActivationNorms, activation_norms, importance

__all__ = [
    "ActivationNorms",
    "VNMConfig",
    "VNMWeight",
    "activation_norms",
    "analytic_speedup",
    "importance",
    "is_vnm",
    "log_mask_diversity",
    "mask_count",
    "select_vm",
    "vnm_linear",
    "vnm_mask",
]
