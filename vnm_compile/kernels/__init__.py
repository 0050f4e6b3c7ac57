"""V:N:M linear kernels: the torch.library operator, the Triton kernels, the CPU reference.

The Triton modules are imported on first use, not here: under TRITON_INTERPRET=1 Triton decides
at a kernel's definition whether it is compiled or interpreted, so a process that wants the
interpreter (CPU tests) sets it before the first call of `triton_vnm_linear`.
"""

from __future__ import annotations

import torch

from ..format import VNMWeight
from .op import PrefillLayout, check_inputs, prefill_layout, vnm_linear
from .reference import reference_linear


def triton_vnm_linear(
    x: torch.Tensor,
    weight: VNMWeight,
    bias: torch.Tensor | None = None,
    dense_weight: torch.Tensor | None = None,
    layout: PrefillLayout | None = None,
    path: str | None = None,
) -> torch.Tensor:
    """The Triton implementation of `vnm_linear`, called directly (CUDA, or CPU tensors under
    TRITON_INTERPRET=1). path: None (dispatcher) or one of "decode", "decode_split", "prefill",
    "dense"."""
    from .dispatch import vnm_matmul

    check_inputs(x, weight, bias, dense_weight, layout)
    y = vnm_matmul(x.reshape(-1, weight.in_features), weight.values, weight.columns, weight.metadata, bias,
                   weight.v, weight.m, weight.in_features, dense=dense_weight,
                   expanded=layout.expanded if layout is not None else None,
                   channels=layout.channels if layout is not None else None, path=path)
    return y.reshape(*x.shape[:-1], weight.out_features)


__all__ = ["PrefillLayout", "prefill_layout", "reference_linear", "triton_vnm_linear", "vnm_linear"]
