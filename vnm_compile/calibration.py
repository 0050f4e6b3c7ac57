"""Per-layer input statistics that scoring (and reconstruction) draw on, gathered from real data."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

from .scoring import activation_norms


@dataclass
class LayerStats:
    """What one linear's inputs looked like over the calibration tokens.

    act_norm: L2 norm of each input channel, [in_features] float32.
    """

    act_norm: torch.Tensor

    def permuted(self, perm: torch.Tensor | None) -> "LayerStats":
        """The statistics of the layer with its input channels in `perm`'s order."""
        return self if perm is None else LayerStats(self.act_norm[perm.to(self.act_norm.device)])


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


def calibrate(model: nn.Module, batches: Iterable) -> Calibration:
    """Run `batches` (tensors, tuples of args, or dicts of kwargs) through `model` without grad and
    record every linear's input statistics. Pass the result as `calibration=` to `sparsify`, or in
    `options={"calibration": ...}` of `torch.compile(backend="vnm")`; the model is not modified."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
    batches = list(batches)
    if not batches:
        raise ValueError("batches must hold at least one batch of inputs")
    norms = activation_norms(model, batches, module_types=linear_module_types())
    return Calibration({name: LayerStats(norm) for name, norm in norms.items()})
