"""score: importance of every weight of the linears to sparsify, from their inputs' statistics.

The statistics come from `calibrate(model, batches)` when given (by module name), otherwise from
running the graph once on the example inputs and measuring each linear's input.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import fx

from ..calibration import LayerStats
from ..config import VNMConfig
from ..scoring import importance
from .common import node_outputs, reused
from .discover import LinearSite

if TYPE_CHECKING:
    from ..pipeline import PassState

log = logging.getLogger("vnm_compile")


@dataclass
class Scores:
    importance: Mapping[str, torch.Tensor]  # linear node -> [out_features, in_features] float32, graph order
    stats: dict[str, LayerStats]            # linear node -> statistics of its input
    source: dict[str, str]                  # linear node -> "calibration" or "example inputs"


class _Importance(Mapping[str, torch.Tensor]):
    """Each linear's importance, computed from its weight and input statistics on every access:
    held for all linears at once, float32 scores would take twice the bytes of a half-precision model."""

    def __init__(self, sites: dict[str, LinearSite], weights: dict[str, torch.Tensor], stats: dict[str, LayerStats],
                 config: VNMConfig):
        self._sites, self._weights, self._stats, self._config = sites, weights, stats, config

    def __getitem__(self, node: str) -> torch.Tensor:
        site = self._sites[node]
        weight = oriented_weight(self._weights[site.weight], site.transposed)
        act_norm = self._stats[node].act_norm.to(weight.device)
        return importance(weight, self._config.criterion, act_norm, self._config.ria_exponent)

    def __contains__(self, node: object) -> bool:
        return node in self._sites

    def __iter__(self) -> Iterator[str]:
        return iter(self._sites)

    def __len__(self) -> int:
        return len(self._sites)


def oriented_weight(weight: torch.Tensor, transposed: bool) -> torch.Tensor:
    """The weight as out_features x in_features, whichever way the graph stores it."""
    return weight.t() if transposed else weight


def score(state: PassState) -> Scores:
    """Importance per weight of every eligible linear (config.criterion), and the statistics behind it:
    from `state.calibration` where it has the layer, else from one run of the graph on the example
    inputs. A non-finite weight or statistic raises, naming the layer; a layer whose inputs were all
    zero (no signal to score by) is logged as a warning."""
    discovery, config, calibration, reuse = state.discover, state.config, state.calibration, state.reuse
    eligible = [site for site in discovery.linears.values() if site.skip_reason is None and not site.stored]
    for site in eligible:
        check = lambda site=site: _finite(state.weights[site.weight])
        # `reuse` serves only unchanged parameters: one check of each is enough
        if not reused(reuse, "finite", site.weight, check):
            raise ValueError(f"layer {site.name}: its weight {site.weight} holds NaN or Inf values; "
                             "fix the weights (or keep the layer dense with skip=) before sparsifying")
    stats: dict[str, LayerStats] = {}
    source: dict[str, str] = {}
    hessians = config.method == "sparsegpt"
    if calibration is not None:
        for site in eligible:
            layer = calibration.layers.get(site.name)
            if layer is not None and layer.act_norm.shape == (site.in_features,):
                if hessians and layer.hessian is None:
                    raise ValueError("method='sparsegpt' needs the inputs' Hessians: calibrate with "
                                     "vnm_compile.calibrate(model, batches, hessians=True)")
                stats[site.node], source[site.node] = layer, "calibration"
    missing = [site for site in eligible if site.node not in stats]
    if missing:
        for node, layer in _input_stats(state.gm, missing, state.inputs(), hessians).items():
            stats[node], source[node] = layer, "example inputs"
    for site in eligible:
        act_norm = stats[site.node].act_norm
        if not _finite(act_norm):
            raise ValueError(f"layer {site.name}: its input statistics ({source[site.node]}) hold NaN or Inf "
                             "values; the calibration or example inputs overflowed before this layer")
        if not bool(act_norm.any()):
            log.warning("layer %s: its inputs (%s) are all zero, so the %s scores carry no signal and its mask "
                        "is arbitrary; calibrate on real data (vnm_compile.calibrate) or use criterion='abs'",
                        site.name, source[site.node], config.criterion)
    return Scores(_Importance({site.node: site for site in eligible}, state.weights, stats, config), stats, source)


def _finite(tensor: torch.Tensor) -> bool:
    return bool(torch.isfinite(tensor).all())


def _input_stats(gm: fx.GraphModule, sites: list, inputs: list[Any], hessians: bool) -> dict[str, LayerStats]:
    """Run the graph once and take the L2 norm of each input channel of each site's input (and, if
    `hessians`, the input's X^T X)."""
    readers: dict[str, list[str]] = {}
    for site in sites:
        readers.setdefault(site.input, []).append(site.node)
    stats: dict[str, LayerStats] = {}
    for node, value in node_outputs(gm, inputs):
        if node.name in readers:
            x = value.detach().reshape(-1, value.shape[-1])
            act_norm = x.double().square().sum(0).sqrt().float()
            layer = LayerStats(act_norm, x.float().T @ x.float() if hessians else None)
            for linear in readers[node.name]:
                stats[linear] = layer
    return stats
