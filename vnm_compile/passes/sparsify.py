"""sparsify: the eligible linears become `torch.ops.vnm.linear` on compressed V:N:M weights.

Compressing one weight is `COMPRESSORS[config.method]`: given the (permuted) weight, its importance
scores and its input statistics, return a VNMWeight. "mask" keeps the weights the mask keeps; a
reconstruction method (e.g. SparseGPT) registers another entry that also updates the kept weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import fx

from ..calibration import LayerStats
from ..config import VNMConfig
from ..format import VNMWeight
from ..reconstruct import reconstruct
from .discover import Discovery, LinearSite
from .common import attribute_name, copied_graph
from .fold import Folded
from .permute import Permutations
from .score import Scores, oriented_weight

Compressor = Callable[[torch.Tensor, torch.Tensor, LayerStats, VNMConfig], VNMWeight]


def mask_weight(weight: torch.Tensor, scores: torch.Tensor, stats: LayerStats, config: VNMConfig) -> VNMWeight:
    """method="mask": keep the weights under the V:N:M mask that retains the most importance."""
    return VNMWeight.from_dense(weight, config.v, config.m, scores=scores, column_select=config.column_select)


def reconstruct_weight(weight: torch.Tensor, scores: torch.Tensor, stats: LayerStats, config: VNMConfig) -> VNMWeight:
    """method="sparsegpt": choose the mask by the OBS saliency and update the kept weights to
    preserve the layer's output on the calibration inputs (`reconstruct`); scores are not used."""
    updated, mask = reconstruct(weight, stats.hessian, config.v, config.m, column_select=config.column_select)
    return VNMWeight.from_dense(updated, config.v, config.m, mask=mask)


COMPRESSORS: dict[str, Compressor] = {"mask": mask_weight, "sparsegpt": reconstruct_weight}


def compressor(method: str) -> Compressor:
    """The registered compression step of `method`; an error, never a fallback, if there is none."""
    if method not in COMPRESSORS:
        raise ValueError(f"method={method!r} is not available: no compression step is registered for it "
                         f"(available: {sorted(COMPRESSORS)}); use method='mask'")
    return COMPRESSORS[method]


@dataclass
class LayerResult:
    node: str
    name: str
    sparse: bool
    reason: str | None            # why it stays dense
    retained: float | None        # fraction of its importance the mask keeps
    error: float | None           # estimated relative output error (see _estimated_error)
    weight: VNMWeight | None      # the compressed weight, in the permuted channel order


@dataclass
class Sparsified:
    gm: fx.GraphModule
    layers: dict[str, LayerResult]   # every linear of the graph, by FX node
    replaced: dict[str, str]         # linear node -> the vnm.linear node that took its place


def sparsify(
    folded: Folded, discovery: Discovery, scores: Scores, permutations: Permutations, config: VNMConfig
) -> Sparsified:
    """A copy of `folded.gm` in which every eligible linear calls torch.ops.vnm.linear on its
    compressed weight, unless its estimated error exceeds config.max_layer_error."""
    compress = compressor(config.method)
    gm = fx.GraphModule(folded.gm, copied_graph(folded.gm))
    nodes = {node.name: node for node in gm.graph.nodes}
    layers, replaced = {}, {}
    for site in discovery.linears.values():
        if site.skip_reason is not None:
            layers[site.node] = LayerResult(site.node, site.name, False, site.skip_reason, None, None, None)
            continue
        result = _compress(site, folded, scores, permutations, config, compress)
        layers[site.node] = result
        if result.sparse:
            replaced[site.node] = _rewrite(gm, nodes[site.node], nodes[site.input], result.weight, config).name
    _drop_unused_attributes(gm)
    return Sparsified(gm, layers, replaced)


def _compress(site: LinearSite, folded: Folded, scores: Scores, permutations: Permutations,
              config: VNMConfig, compress: Compressor) -> LayerResult:
    weight = oriented_weight(folded.tensors[site.weight], site.transposed)
    importance = scores.importance[site.node]
    out_perm, in_perm = permutations.of(site.out_group), permutations.of(site.in_group)
    if out_perm is not None:
        importance = importance[out_perm]
    if in_perm is not None:
        importance = importance[:, in_perm]
    stats = scores.stats[site.node].permuted(in_perm)
    compressed = compress(weight, importance, stats, config)
    kept = torch.where(compressed.mask(), importance, 0).sum(dtype=torch.float64)
    retained = float(kept / importance.sum(dtype=torch.float64).clamp_min(torch.finfo(torch.float64).tiny))
    error = _estimated_error(weight, compressed, stats)
    if config.max_layer_error is not None and error > config.max_layer_error:
        reason = f"estimated output error {error:.3f} exceeds max_layer_error={config.max_layer_error:g}"
        return LayerResult(site.node, site.name, False, reason, retained, error, None)
    return LayerResult(site.node, site.name, True, None, retained, error, compressed)


def _estimated_error(weight: torch.Tensor, compressed: VNMWeight, stats: LayerStats) -> float:
    """||(W - W') diag(a)|| / ||W diag(a)||, a the input channels' norms: the relative output error
    on the calibration inputs if their channels were uncorrelated."""
    scale = stats.act_norm.to(weight.device, torch.float32)
    dense = weight.float()
    difference = ((dense - compressed.to_dense().float()) * scale).norm()
    return float(difference / (dense * scale).norm().clamp_min(torch.finfo(torch.float32).tiny))


def _rewrite(gm: fx.GraphModule, node: fx.Node, x: fx.Node, weight: VNMWeight, config: VNMConfig) -> fx.Node:
    if node.target is torch.addmm:
        bias = node.args[0]
    elif len(node.args) > 2 or "bias" in node.kwargs:
        bias = node.args[2] if len(node.args) > 2 else node.kwargs["bias"]
    else:
        bias = None
    reads = []
    with gm.graph.inserting_before(node):
        for part in ("values", "columns", "metadata"):
            attribute = attribute_name(f"{node.name}_{part}", dict(gm.named_buffers()))
            gm.register_buffer(attribute, getattr(weight, part))
            reads.append(gm.graph.get_attr(attribute))
        sparse = gm.graph.call_function(
            torch.ops.vnm.linear.default, (x, *reads, bias, weight.v, weight.m, weight.in_features))
    sparse.meta = dict(node.meta)
    node.replace_all_uses_with(sparse)
    gm.graph.erase_node(node)
    return sparse


def _drop_unused_attributes(gm: fx.GraphModule) -> None:
    """Free the dense weights that no node reads any more."""
    for node in list(gm.graph.nodes):
        if node.op == "get_attr" and not node.users:
            gm.graph.erase_node(node)
    still_read = {node.target for node in gm.graph.nodes if node.op == "get_attr"}
    for name, _ in list(gm.named_buffers()):
        if name not in still_read:
            delattr(gm, name)
    gm.recompile()
