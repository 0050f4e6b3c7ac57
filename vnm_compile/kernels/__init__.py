"""V:N:M linear kernels: the torch.library operator, its reference implementation."""

from .op import vnm_linear
from .reference import reference_linear

__all__ = ["reference_linear", "vnm_linear"]
