"""How one linear's weight is compressed: the compression methods, registered by name.

Every entry (the backend's sparsify pass, `vnm.sparsify`, the block-by-block `compress_sequential`,
`explain`, `bisect`) compresses a weight through `compress`, with the method `config.method` names.
A method takes the weight (out x in), its importance scores (`vnm_compile.importance` under the
config's criterion, same shape) and its input statistics, and returns the compressed weight: a
VNMWeight for pattern "vnm", else a `MaskedWeight` (N:M patterns have no kernel of their own).
`choose_mask` is the one place a pattern's mask is chosen.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from .format import MaskedWeight, VNMWeight, vnm_mask
from .reconstruct import reconstruct
from .transposable import exact_transposable_mask, nm_mask, transposable_mask

if TYPE_CHECKING:
    from .calibration import LayerStats
    from .config import VNMConfig

Compressed = VNMWeight | MaskedWeight
Method = Callable[[torch.Tensor, torch.Tensor, "LayerStats | None", "VNMConfig"], Compressed]
# Transposable masks of m x m blocks are enumerated exactly up to this m (optimal, and faster there).
EXACT_TRANSPOSABLE_MAX_M = 4
_METHODS: dict[str, Method] = {}


def register_method(name: str) -> Callable[[Method], Method]:
    """Decorator: make `method` available as VNMConfig(method=name)."""
    def register(method: Method) -> Method:
        _METHODS[name] = method
        return method
    return register


def method_names() -> tuple[str, ...]:
    return tuple(_METHODS)


def compress(weight: torch.Tensor, scores: torch.Tensor, stats: LayerStats | None, config: VNMConfig) -> Compressed:
    """`weight` compressed by config.method at config's pattern."""
    return _METHODS[config.method](weight, scores, stats, config)


def choose_mask(scores: torch.Tensor, config: VNMConfig) -> torch.Tensor:
    """The mask of config.pattern that keeps the most of `scores` (bool, same shape)."""
    if config.pattern == "vnm":
        return vnm_mask(scores, config.v, config.m, config.column_select)
    if config.pattern == "nm":
        return nm_mask(scores, config.n, config.m)
    solver = exact_transposable_mask if config.m <= EXACT_TRANSPOSABLE_MAX_M else transposable_mask
    return solver(scores, config.n, config.m)


def pruned(weight: torch.Tensor, mask: torch.Tensor, config: VNMConfig) -> Compressed:
    """`weight` kept where `mask` is, in config.pattern's compressed form."""
    if config.pattern == "vnm":
        return VNMWeight.from_dense(weight, config.v, config.m, mask=mask)
    return MaskedWeight(weight.detach() * mask, mask)


@register_method("mask")
def mask_weight(weight: torch.Tensor, scores: torch.Tensor, stats: LayerStats | None, config: VNMConfig) -> Compressed:
    """Keep the weights under the mask that retains the most importance."""
    return pruned(weight, choose_mask(scores, config), config)


@register_method("sparsegpt")
def reconstruct_weight(weight: torch.Tensor, scores: torch.Tensor, stats: LayerStats | None,
                       config: VNMConfig) -> Compressed:
    """Choose the mask by the OBS saliency, group of m columns by group, and update the kept weights to
    preserve the layer's output on the calibration inputs (`reconstruct`); the scores are not used."""
    if stats is None or stats.hessian is None:
        raise ValueError("method='sparsegpt' needs the inputs' Hessians: calibrate with "
                         "vnm_compile.calibrate(model, batches, hessians=True), or give calibration inputs")
    updated, mask = reconstruct(weight, stats.hessian, config.v, config.m, column_select=config.column_select,
                                group_mask=lambda saliency: choose_mask(saliency, config))
    return pruned(updated, mask, config)


def estimated_error(weight: torch.Tensor, compressed: Compressed, stats: LayerStats) -> float:
    """||(W - W') diag(a)|| / ||W diag(a)||, a the input channels' norms: the relative output error on
    the calibration inputs if their channels were uncorrelated (what config.max_layer_error bounds)."""
    scale = stats.act_norm.to(weight.device, torch.float32)
    dense = weight.float()
    difference = ((dense - compressed.to_dense().float()) * scale).norm()
    return float(difference / (dense * scale).norm().clamp_min(torch.finfo(torch.float32).tiny))
