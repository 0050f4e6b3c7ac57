"""VNMLinear: an nn.Module holding a V:N:M-compressed weight, what `vnm_compile.sparsify` puts in place
of a model's linears."""

from __future__ import annotations

import torch
from torch import nn

from .format import VNMWeight
from .kernels import vnm_linear


class VNMLinear(nn.Module):
    """y = x @ W.T + b with W stored V:N:M-compressed, computed by torch.ops.vnm.linear.

    The compressed tensors (values, columns, metadata) and the bias are buffers, so state_dict()
    saves them and load_state_dict() restores them into a VNMLinear of the same shape and pattern.
    Inference only: a backward through it raises.
    """

    def __init__(self, weight: VNMWeight, bias: torch.Tensor | None = None):
        super().__init__()
        if not isinstance(weight, VNMWeight):
            raise TypeError(f"weight must be a VNMWeight, got {type(weight).__name__}")
        if bias is not None and bias.shape != (weight.out_features,):
            raise ValueError(f"bias must have shape ({weight.out_features},), got {tuple(bias.shape)}")
        self.v, self.m = weight.v, weight.m
        self.in_features, self.out_features = weight.in_features, weight.out_features
        self.register_buffer("values", weight.values)
        self.register_buffer("columns", weight.columns)
        self.register_buffer("metadata", weight.metadata)
        self.register_buffer("bias", None if bias is None else bias.detach())

    @property
    def weight(self) -> VNMWeight:
        return VNMWeight(self.values, self.columns, self.metadata, self.v, self.m, self.in_features)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # load_state_dict(strict=False) would drop a dense weight silently and keep the old compressed one
        if f"{prefix}weight" in state_dict:
            raise ValueError(f"layer {prefix.removesuffix('.')}: the state dict has a dense weight, this layer "
                             "holds a V:N:M-compressed one; load a compressed checkpoint (vnm_compile.load_compressed) "
                             "or compress the weight with VNMWeight.from_dense")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return vnm_linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"pattern={self.v}:2:{self.m}, bias={self.bias is not None}")


def replace_linears(model: nn.Module, weights: dict[str, VNMWeight]) -> None:
    """Put a VNMLinear holding weights[name] (and the module's bias) in place of each named linear of
    `model`, in place."""
    for name, weight in weights.items():
        parent_name, _, leaf = name.rpartition(".")
        module = model.get_submodule(name)
        bias = module.bias.detach() if getattr(module, "bias", None) is not None else None
        setattr(model.get_submodule(parent_name), leaf, VNMLinear(weight, bias))
