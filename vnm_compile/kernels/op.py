"""`torch.ops.vnm.linear`: the V:N:M linear as a torch.library operator, and its Python entry."""

from __future__ import annotations

import torch

from ..format import VNMWeight
from .reference import reference_linear


@torch.library.custom_op("vnm::linear", mutates_args=())
def linear(
    x: torch.Tensor,
    values: torch.Tensor,
    columns: torch.Tensor,
    metadata: torch.Tensor,
    bias: torch.Tensor | None,
    v: int,
    m: int,
    in_features: int,
) -> torch.Tensor:
    return reference_linear(x, values, columns, metadata, bias, v, m, in_features)


@linear.register_fake
def _(x, values, columns, metadata, bias, v, m, in_features):
    torch._check(x.shape[-1] == in_features, lambda: f"x has {x.shape[-1]} features, expected {in_features}")
    return x.new_empty(*x.shape[:-1], values.shape[0])


def _backward(ctx, grad):
    raise RuntimeError(
        "vnm.linear is inference-only: its weights are frozen compressed snapshots taken at compile "
        "time, so no gradient flows through a sparsified layer. Run it under torch.no_grad(), or "
        "train the dense model and sparsify again."
    )


linear.register_autograd(_backward, setup_context=lambda ctx, inputs, output: None)


def vnm_linear(x: torch.Tensor, weight: VNMWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ weight.T + bias for a V:N:M weight; x is [..., in_features], y is [..., out_features]."""
    if not isinstance(weight, VNMWeight):
        raise TypeError(f"weight must be a VNMWeight, got {type(weight).__name__}")
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[-1] != weight.in_features:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x must be [..., {weight.in_features}] (the weight's in_features), got {shape}")
    if x.dtype != weight.dtype:
        raise ValueError(f"x has dtype {x.dtype} but the weight is {weight.dtype}; cast one to match")
    if x.device != weight.device:
        raise ValueError(f"x is on {x.device} but the weight is on {weight.device}")
    if bias is not None and (bias.shape != (weight.out_features,) or bias.dtype != x.dtype or bias.device != x.device):
        raise ValueError(f"bias must be a [{weight.out_features}] {x.dtype} tensor on {x.device}, "
                         f"got {tuple(bias.shape)} {bias.dtype} on {bias.device}")
    return linear(x, weight.values, weight.columns, weight.metadata, bias, weight.v, weight.m, weight.in_features)
