"""How one linear's weight becomes a VNMWeight: the compression methods, registered by name.

Every entry (the backend's sparsify pass, `vnm.sparsify`, the block-by-block `compress_sequential`,
`explain`, `bisect`) compresses a weight through `compress`, with the method `config.method` names.
A method takes the weight (out x in), its importance scores (`vnm_compile.importance` under the
config's criterion, same shape) and its input statistics, and returns the compressed weight.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from .format import VNMWeight
from .reconstruct import reconstruct

if TYPE_CHECKING:
    from .calibration import LayerStats
    from .config import VNMConfig

Method = Callable[[torch.Tensor, torch.Tensor, "LayerStats | None", "VNMConfig"], VNMWeight]
_METHODS: dict[str, Method] = {}


def register_method(name: str) -> Callable[[Method], Method]:
    """Decorator: make `method` available as VNMConfig(method=name)."""
    def register(method: Method) -> Method:
        _METHODS[name] = method
        return method
    return register


def method_names() -> tuple[str, ...]:
    return tuple(_METHODS)


def compress(weight: torch.Tensor, scores: torch.Tensor, stats: LayerStats | None, config: VNMConfig) -> VNMWeight:
    """`weight` compressed by config.method at config's pattern."""
    return _METHODS[config.method](weight, scores, stats, config)


@register_method("mask")
def mask_weight(weight: torch.Tensor, scores: torch.Tensor, stats: LayerStats | None, config: VNMConfig) -> VNMWeight:
    """Keep the weights under the V:N:M mask that retains the most importance."""
    return VNMWeight.from_dense(weight, config.v, config.m, scores=scores, column_select=config.column_select)


@register_method("sparsegpt")
def reconstruct_weight(weight: torch.Tensor, scores: torch.Tensor, stats: LayerStats | None,
                       config: VNMConfig) -> VNMWeight:
    """Choose the mask by the OBS saliency and update the kept weights to preserve the layer's output on
    the calibration inputs (`reconstruct`); the scores are not used."""
    if stats is None or stats.hessian is None:
        raise ValueError("method='sparsegpt' needs the inputs' Hessians: calibrate with "
                         "vnm_compile.calibrate(model, batches, hessians=True), or give calibration inputs")
    updated, mask = reconstruct(weight, stats.hessian, config.v, config.m, column_select=config.column_select)
    return VNMWeight.from_dense(updated, config.v, config.m, mask=mask)


def estimated_error(weight: torch.Tensor, compressed: VNMWeight, stats: LayerStats) -> float:
    """||(W - W') diag(a)|| / ||W diag(a)||, a the input channels' norms: the relative output error on
    the calibration inputs if their channels were uncorrelated (what config.max_layer_error bounds)."""
    scale = stats.act_norm.to(weight.device, torch.float32)
    dense = weight.float()
    difference = ((dense - compressed.to_dense().float()) * scale).norm()
    return float(difference / (dense * scale).norm().clamp_min(torch.finfo(torch.float32).tiny))
