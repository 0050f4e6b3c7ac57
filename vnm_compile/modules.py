"""VNMLinear: an nn.Module holding a V:N:M-compressed weight, what `vnm_compile.sparsify` puts in place
of a model's linears."""

from __future__ import annotations

import torch
from torch import nn

from .calibration import linear_module_types
from .format import VNMWeight
from .kernels import vnm_linear


class VNMLinear(nn.Module):
    """y = x @ W.T + b with W stored V:N:M-compressed, computed by torch.ops.vnm.linear.

    The compressed tensors (values, columns, metadata) and the bias are buffers, so state_dict()
    saves them and load_state_dict() restores them into a VNMLinear of the same shape and pattern.
    Gradients flow through it to its input (so adapters may sit before or after it); the values,
    as buffers, are not trained unless the caller sets `values.requires_grad_()` (the mask stays).
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
    """Replace, in place, each linear of `model` named in `weights` (nn.Linear, or GPT-2's Conv1D) by a
    VNMLinear holding that weight (out x in) and the linear's bias."""
    for name, weight in weights.items():
        module = model.get_submodule(name)
        if not isinstance(module, linear_module_types()):
            raise ValueError(f"{name} is a {type(module).__name__}, not an nn.Linear or Conv1D to replace")
        shape = tuple(module.weight.shape) if isinstance(module, nn.Linear) else tuple(module.weight.shape)[::-1]
        if tuple(weight.shape) != shape:
            raise ValueError(f"{name}: weight is {tuple(weight.shape)}, the linear {shape} (out x in)")
        parent, _, leaf = name.rpartition(".")
        bias = None if module.bias is None else module.bias.detach()
        setattr(model.get_submodule(parent), leaf, VNMLinear(weight, bias))
