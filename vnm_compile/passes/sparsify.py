"""sparsify: the eligible linears become `torch.ops.vnm.linear` on compressed V:N:M weights.

Each weight is compressed by `vnm_compile.compression.compress` (the method config.method names),
in the permuted channel order, with its permuted importance and input statistics.

The sparse linears that read one input (q/k/v, gate/up) are fused (config.fuse): one vnm.linear on
their concatenated rows (`concat_rows`), split back into their outputs, so the input is gathered
(and, for prefill, transposed) once and one kernel launch does the work of several. Each vnm.linear
reads its weight as graph buffers, with the layouts the config keeps beside it: the prefill layout
(4/M of the dense bytes; otherwise the prefill path builds it on every call) and the dense masked
weight (the dense bytes; lets the dispatcher run cuBLAS where that measured faster).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import operator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import fx

from ..compression import compress, estimated_error
from ..config import VNMConfig
from ..format import VNMWeight, concat_rows
from ..kernels import sparse_mma
from ..kernels.op import cusparselt_refusal, cusparselt_weight, prefill_layout
from .common import Reuse, attribute_name, copied_graph, reused
from .discover import LinearSite
from .fold import Folded
from .permute import Permutations
from .score import Scores, oriented_weight

if TYPE_CHECKING:
    from ..pipeline import PassState

log = logging.getLogger("vnm_compile")

@dataclass
class LayerResult:
    node: str
    name: str
    sparse: bool
    reason: str | None            # why it stays dense
    importance: float | None      # total importance of its weights
    retained: float | None        # fraction of its importance the mask keeps
    error: float | None           # estimated relative output error (compression.estimated_error)
    weight: VNMWeight | None      # the compressed weight, in the permuted channel order


@dataclass
class Sparsified:
    gm: fx.GraphModule
    layers: dict[str, LayerResult]   # every linear of the graph, by FX node
    replaced: dict[str, str]         # linear node -> the node that now computes its output
    fused: dict[str, list[str]] = field(default_factory=dict)    # fused vnm.linear node -> its linears
    unfused: dict[str, str] = field(default_factory=dict)        # input node -> why its readers stay apart


def sparsify(state: PassState) -> Sparsified | None:
    """A copy of the folded graph in which every eligible linear calls torch.ops.vnm.linear on its
    compressed weight, unless its estimated error exceeds config.max_layer_error; None with
    config.sparsify=False. With config.fuse, the sparse linears that read one input run as one
    vnm.linear on their concatenated rows.

    With `state.reuse`, a weight an earlier compile compressed (the same parameter, permuted the same
    way) keeps that result, and the buffers emitted for the same compressed weights are those tensors."""
    config, reuse = state.config, state.reuse
    if not config.sparsify:
        return None
    folded, discovery, scores, permutations = state.fold, state.discover, state.score, state.permute
    gm = fx.GraphModule(folded.gm, copied_graph(folded.gm))
    nodes = {node.name: node for node in gm.graph.nodes}
    layers = {}
    for site in discovery.linears.values():
        if site.skip_reason is not None:
            layers[site.node] = LayerResult(site.node, site.name, False, site.skip_reason, None, None, None, None)
        elif site.stored:
            weight = _stored_weight(nodes[site.node], gm)
            layers[site.node] = LayerResult(site.node, site.name, True, None, None, None, None, weight)
        else:
            compute = functools.partial(_compress, site, folded, scores, permutations, config)
            result = reused(reuse, "compressed", (folded.sources[site.weight], site.transposed), compute)
            layers[site.node] = dataclasses.replace(result, node=site.node, name=site.name)
    readers: dict[str, list[str]] = {}  # input node -> its sparse linears, in graph order
    for node in gm.graph.nodes:
        if node.name in layers and layers[node.name].sparse:
            readers.setdefault(discovery.linears[node.name].input, []).append(node.name)
    result = Sparsified(gm, layers, {})
    for x, linears in readers.items():
        reason = _unfusable([nodes[name] for name in linears], [layers[name].weight for name in linears], gm)
        if config.fuse and reason is None:
            _rewrite_fused(result, [nodes[name] for name in linears], nodes[x], config, reuse)
            continue
        if config.fuse and len(linears) > 1:
            result.unfused[x] = reason
            log.info("sparsify: %s stay separate linears: %s", ", ".join(layers[n].name for n in linears), reason)
        for name in linears:
            node = nodes[name]
            sparse = _emit(gm, node, nodes[x], [layers[name].weight], _bias(node), name, config, reuse)
            sparse.meta = dict(node.meta)
            node.replace_all_uses_with(sparse)
            gm.graph.erase_node(node)
            result.replaced[name] = sparse.name
    _drop_unused_attributes(gm)
    return result


def _compress(site: LinearSite, folded: Folded, scores: Scores, permutations: Permutations,
              config: VNMConfig) -> LayerResult:
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
    total = importance.sum(dtype=torch.float64)
    retained = float(kept / total.clamp_min(torch.finfo(torch.float64).tiny))
    error = estimated_error(weight, compressed, stats)
    if config.max_layer_error is not None and error > config.max_layer_error:
        reason = f"estimated output error {error:.3f} exceeds max_layer_error={config.max_layer_error:g}"
        return LayerResult(site.node, site.name, False, reason, float(total), retained, error, None)
    return LayerResult(site.node, site.name, True, None, float(total), retained, error, compressed)


def _stored_weight(node: fx.Node, gm: fx.GraphModule) -> VNMWeight:
    """The compressed weight a vnm.linear already in the graph reads."""
    values, columns, metadata = (gm.get_buffer(arg.target) for arg in node.args[1:4])
    return VNMWeight(values, columns, metadata, *node.args[5:8])


def _bias(node: fx.Node) -> fx.Node | None:
    if node.target is torch.ops.vnm.linear.default:
        return node.args[4]
    if node.target is torch.addmm:
        return node.args[0]
    if len(node.args) > 2:
        return node.args[2]
    return node.kwargs.get("bias")


def _unfusable(linears: list[fx.Node], weights: list[VNMWeight], gm: fx.GraphModule) -> str | None:
    """Why the sparse linears that read one input cannot run as one vnm.linear, or None if they can."""
    if len(linears) < 2:
        return "a single reader"
    ragged = [f"{node.name} ({w.out_features} rows)" for node, w in zip(linears[:-1], weights[:-1])
              if w.out_features % w.v]
    if ragged:
        return f"v={weights[0].v} does not divide the rows of {', '.join(ragged)}"
    if len({(w.v, w.m, w.in_features, w.dtype, w.device) for w in weights}) > 1:
        return "their compressed weights differ in pattern, dtype or device"
    biases = [_bias(node) for node in linears]
    if any(b is not None and not (isinstance(b, fx.Node) and b.op == "get_attr") for b in biases):
        return "a bias is computed in the graph, not a parameter"
    return None


def _rewrite_fused(result: Sparsified, linears: list[fx.Node], x: fx.Node, config: VNMConfig,
                   reuse: Reuse | None) -> None:
    """One vnm.linear on the linears' concatenated rows, split back into their outputs."""
    gm = result.gm
    weights = [result.layers[node.name].weight for node in linears]
    biases = [_bias(node) for node in linears]
    bias = None
    if any(b is not None for b in biases):
        parts = [gm.get_buffer(b.target) if b is not None else None for b in biases]
        concatenated = lambda: torch.cat([part if part is not None else w.values.new_zeros(w.out_features)
                                          for part, w in zip(parts, weights)])
        if reuse is None:
            fused_bias = concatenated()
        else:
            key = (tuple(map(id, weights)), tuple(None if part is None else id(part) for part in parts))
            fused_bias = reuse.cached("fused biases", key, concatenated, keep=(weights, parts))
        bias_name = attribute_name(f"{linears[0].name}_fused_bias", dict(gm.named_buffers()))
        gm.register_buffer(bias_name, fused_bias)
        with gm.graph.inserting_before(linears[0]):
            bias = gm.graph.get_attr(bias_name)
    name = "_".join(node.name for node in linears)
    fused = _emit(gm, linears[0], x, weights, bias, name, config, reuse)
    with gm.graph.inserting_before(linears[0]):
        pieces = gm.graph.call_function(torch.split, (fused, [w.out_features for w in weights]), {"dim": -1})
        for index, node in enumerate(linears):
            piece = gm.graph.call_function(operator.getitem, (pieces, index))
            piece.meta = dict(node.meta)  # it takes the linear's place
            node.replace_all_uses_with(piece)
            result.replaced[node.name] = piece.name
    for node in linears:
        gm.graph.erase_node(node)
    result.fused[fused.name] = [node.name for node in linears]


def _emit(gm: fx.GraphModule, before: fx.Node, x: fx.Node, weights: list[VNMWeight], bias: fx.Node | None,
          name: str, config: VNMConfig, reuse: Reuse | None) -> fx.Node:
    """A vnm.linear node (before `before`) on `weights`' concatenated rows, held as buffers with the
    layouts the config keeps: with `reuse`, the buffers an earlier compile emitted for these weights."""
    if reuse is None:
        tensors = _buffers(weights, config)
    else:
        tensors = reuse.cached("buffers", tuple(map(id, weights)), lambda: _buffers(weights, config), keep=weights)
    weight = weights[0]
    reads = {}
    with gm.graph.inserting_before(before):
        for part, tensor in tensors.items():
            attribute = attribute_name(f"{name}_{part}", dict(gm.named_buffers()))
            gm.register_buffer(attribute, tensor)
            reads[part] = gm.graph.get_attr(attribute)
        # A dynamic-shape graph's small token counts run in graphs of their own, per bucket: each graph's
        # kernels are chosen for the largest count it serves (kernels/op.py), with no per-call dispatch.
        return gm.graph.call_function(
            torch.ops.vnm.linear.default,
            (x, reads["values"], reads["columns"], reads["metadata"], bias, weight.v, weight.m, weight.in_features,
             reads.get("dense"), reads.get("expanded"), reads.get("channels"), reads.get("cslt"),
             reads.get("mma_values"), reads.get("mma_metadata"), reads.get("mma_columns")),
            {"plan_symbolic": True} if config.small_token_graphs(weight.device) else {})


def _buffers(weights: list[VNMWeight], config: VNMConfig) -> dict[str, torch.Tensor]:
    """The tensors a vnm.linear on `weights`' concatenated rows reads, by the op's argument."""
    weight = concat_rows(weights) if len(weights) > 1 else weights[0]
    tensors = {part: getattr(weight, part) for part in ("values", "columns", "metadata")}
    keep_layout = config.prefill_layout if config.prefill_layout is not None else weight.device.type == "cuda"
    if config.keep_dense:
        tensors["dense"] = weight.to_dense().contiguous()
    if config.keep_cusparselt:
        refusal = cusparselt_refusal(weight)
        if refusal is None:
            tensors["cslt"] = cusparselt_weight(weight)
        else:
            log.info("sparsify: no cuSPARSELt copy of %s: %s", weight, refusal)
    if keep_layout:
        layout = prefill_layout(weight)
        tensors["expanded"], tensors["channels"] = layout.expanded, layout.channels
    if _keeps_sparse_mma_layout(weight, config, has_cslt="cslt" in tensors):
        mma = sparse_mma.pack(weight)
        tensors["mma_values"], tensors["mma_metadata"], tensors["mma_columns"] = mma.values, mma.metadata, mma.columns
    return tensors


def _keeps_sparse_mma_layout(weight: VNMWeight, config: VNMConfig, has_cslt: bool) -> bool:
    """Whether a vnm.linear on `weight` keeps the sparse tensor-core kernel's layout: where asked and the
    kernel takes the weight, or by default where the dispatcher would run that kernel at some token count."""
    if config.sparse_mma_layout is False:
        return False
    refusal = sparse_mma.refusal(weight)
    if refusal is None and not sparse_mma.available(weight.device):
        refusal = f"the kernel does not run on {weight.device} (compute capability 8.0+ and torch's NVRTC)"
    if refusal is not None:
        if config.sparse_mma_layout:
            log.info("sparsify: no sparse tensor-core layout of %s: %s", weight, refusal)
        return False
    if config.sparse_mma_layout:
        return True
    from ..kernels.dispatch import sparse_mma_pays  # CUDA only: keeps the Triton kernels unloaded on CPU

    return sparse_mma_pays(*weight.shape, weight.v, weight.m, weight.dtype, weight.device, config.keep_dense,
                           has_cslt)


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
