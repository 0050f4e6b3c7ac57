"""Per-layer input statistics that scoring (and reconstruction) draw on, gathered from real data."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from .reconstruct import HessianAccumulator
from .scoring import activation_norms, run_batch


@dataclass
class LayerStats:
    """What one linear's inputs looked like over the calibration tokens.

    act_norm: L2 norm of each input channel, [in_features] float32.
    hessian: X^T X of the inputs, [in_features, in_features] float32, for method="sparsegpt".
    """

    act_norm: torch.Tensor
    hessian: torch.Tensor | None = None

    def permuted(self, perm: torch.Tensor | None) -> LayerStats:
        """The statistics of the layer with its input channels in `perm`'s order."""
        if perm is None:
            return self
        hessian = None
        if self.hessian is not None:
            order = perm.to(self.hessian.device)
            hessian = self.hessian[order][:, order]
        return LayerStats(self.act_norm[perm.to(self.act_norm.device)], hessian)


@dataclass
class Calibration:
    """LayerStats by module name (`model.layers.3.mlp.up_proj`), from `calibrate`."""

    layers: dict[str, LayerStats]

    def __repr__(self) -> str:
        return f"Calibration({len(self.layers)} layers)"


def linear_module_types() -> tuple[type, ...]:
    """nn.Linear, and GPT-2's Conv1D (a linear with its weight stored in x out) when transformers is loaded."""
    pytorch_utils = sys.modules.get("transformers.pytorch_utils")
    conv1d = getattr(pytorch_utils, "Conv1D", None)
    return (nn.Linear,) if conv1d is None else (nn.Linear, conv1d)


def calibrate(model: nn.Module, batches: Iterable, hessians: bool = False) -> Calibration:
    """Run `batches` (tensors, tuples of args, or dicts of kwargs) through `model` without grad and
    record every linear's input statistics. Pass the result as `calibration=` to `sparsify`, or in
    `options={"calibration": ...}` of `torch.compile(backend="vnm")`; the model is not modified.
    hessians=True also keeps each linear's input Hessian (in_features^2 floats each), which
    method="sparsegpt" needs."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
    batches = list(batches)
    if not batches:
        raise ValueError("batches must hold at least one batch of inputs")
    if not hessians:
        norms = activation_norms(model, batches, module_types=linear_module_types())
        return Calibration({name: LayerStats(norm) for name, norm in norms.items()})
    with torch.no_grad(), HessianAccumulator(model, linear_module_types()) as stats:
        for batch in batches:
            run_batch(model, batch)
    found = stats.hessians()
    return Calibration({name: LayerStats(norm, found[name]) for name, norm in stats.norms().items()})
