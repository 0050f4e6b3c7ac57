"""verify: the rewritten graphs compute what they should, node by node, on the example inputs.

1. permuted dense vs original: every node's value, its permuted dimensions put back in order, must
   match to rounding; a mismatch means a permutation was not folded consistently.
2. sparse vs masked dense: the graph with torch.ops.vnm.linear must match the permuted dense graph
   whose converted linears use their masked weights (VNMWeight.to_dense()).
Both run in float64 when the graph and the op allow it, else in the graph's own dtypes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import fx

from .common import attribute_name, copied_graph, node_outputs
from .discover import Discovery
from .permute import Permutations
from .score import oriented_weight
from .sparsify import Sparsified

if TYPE_CHECKING:
    from ..pipeline import PassState

# Largest relative error (L2, per node) accepted: (permuted vs original, sparse vs masked dense).
TOLERANCES = {
    torch.float64: (1e-9, 1e-9),
    torch.float32: (1e-5, 1e-4),
    torch.float16: (1e-2, 2e-2),
    torch.bfloat16: (2e-2, 5e-2),
}


class VerificationError(RuntimeError):
    pass


@dataclass
class Verification:
    dtype: str                   # what the comparisons ran in ("float64", or the graph's own)
    permuted_error: float        # largest relative error of a node, permuted dense vs original
    sparse_error: float | None   # largest relative error of a node, sparse vs masked dense


def verify(state: PassState) -> Verification | None:
    """With config.verify: raise VerificationError naming the first node whose value is off; else None."""
    if not state.config.verify:
        return None
    return check_graphs(state.gm, state.fold.gm, state.sparsify, state.discover, state.permute, state.inputs)


def check_graphs(original: fx.GraphModule, folded: fx.GraphModule, sparse: Sparsified | None, discovery: Discovery,
                 permutations: Permutations, inputs: Callable[[], list[Any]]) -> Verification:
    """The comparisons above; `inputs()` gives fresh inputs for one run of the original graph."""
    try:
        return _verify(original, folded, sparse, discovery, permutations, inputs, torch.float64)
    except VerificationError:
        raise
    except Exception:  # the graph or the op does not run in float64 here: compare in its own dtypes
        return _verify(original, folded, sparse, discovery, permutations, inputs, None)


def _verify(original, folded, sparse, discovery, permutations, inputs, dtype) -> Verification:
    expected = dict(_tensor_values(original, inputs(), dtype))
    restore = _restorer(discovery, permutations)
    permuted = _compare(expected, _tensor_values(folded, inputs(), dtype), restore, 0, "permuted dense vs original")
    sparse_error = None
    if sparse is not None:
        expected = dict(_tensor_values(_masked_dense(folded, sparse, discovery), inputs(), dtype))
        renamed = {new: old for old, new in sparse.replaced.items()}
        values = ((renamed.get(name, name), value) for name, value in _tensor_values(sparse.gm, inputs(), dtype))
        sparse_error = _compare(expected, values, lambda name, value: value, 1, "sparse vs masked dense")
    return Verification("float64" if dtype else "graph dtype", permuted, sparse_error)


def _tensor_values(gm: fx.GraphModule, inputs: list[Any], dtype) -> Iterator[tuple[str, torch.Tensor]]:
    for node, value in node_outputs(gm, inputs, dtype):
        if node.op in ("call_function", "call_method") and isinstance(value, torch.Tensor):
            yield node.name, value


def _restorer(discovery: Discovery, permutations: Permutations) -> Callable[[str, torch.Tensor], torch.Tensor]:
    """Undo the folded permutations on a node's value, dimension by dimension."""
    inverse = {group: torch.argsort(perm) for group, perm in permutations.perms.items()}

    def restore(name: str, value: torch.Tensor) -> torch.Tensor:
        groups = discovery.value_groups.get(name)
        if isinstance(groups, tuple):
            for dim, group in enumerate(groups):
                if group in inverse:
                    value = value.index_select(dim, inverse[group].to(value.device))
        return value

    return restore


def _compare(expected: dict[str, torch.Tensor], values, restore, which: int, what: str) -> float:
    worst = 0.0
    for name, value in values:
        if name not in expected:
            continue
        reference = expected[name]
        value = restore(name, value)
        error = _relative_error(value, reference)
        tolerance = TOLERANCES.get(reference.dtype, TOLERANCES[torch.float32])[which]
        if error > tolerance:
            raise VerificationError(f"verify: {what} differs first at node {name!r}: relative error "
                                    f"{error:.3g} > {tolerance:g} ({reference.dtype})")
        worst = max(worst, error)
    return worst


def _relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    if value.shape != reference.shape:
        return float("inf")
    if not reference.is_floating_point():
        return 0.0 if torch.equal(value, reference) else float("inf")
    value, reference = value.double(), reference.double()
    finite = torch.isfinite(reference)
    if not torch.equal(finite, torch.isfinite(value)) or not torch.equal(value[~finite], reference[~finite]):
        return float("inf")
    difference = (value[finite] - reference[finite]).norm()
    scale = reference[finite].norm()
    if scale > 0:
        return float(difference / scale)
    return 0.0 if difference == 0 else float("inf")


def _masked_dense(folded: fx.GraphModule, sparse: Sparsified, discovery: Discovery) -> fx.GraphModule:
    """The permuted dense graph with each converted linear reading its masked weight instead."""
    graph = copied_graph(folded)
    reference = fx.GraphModule(folded, graph)
    nodes = {node.name: node for node in graph.nodes}
    for name, layer in sparse.layers.items():
        site = discovery.linears[name]
        if not layer.sparse or site.stored:  # a stored layer is the same op in both graphs
            continue
        node = nodes[name]
        position = 2 if node.target is torch.addmm else 1
        attribute = attribute_name(f"{name}_masked_weight", dict(reference.named_buffers()))
        reference.register_buffer(attribute, oriented_weight(layer.weight.to_dense(), site.transposed))
        with graph.inserting_before(node):
            masked = graph.get_attr(attribute)
        node.update_arg(position, masked)
    reference.recompile()
    return reference
