"""fold: apply the permutations to the parameters, so that nothing is permuted at run time.

Every parameter dimension of a permuted group is reordered once, here; the rewritten graph reads the
reordered copies as attributes and ignores the live parameters that Dynamo still passes in (a
parameter no permutation touches is read as it is, until the backend freezes the final graph).
"""

from __future__ import annotations

import functools
from collections.abc import Hashable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import fx

from .common import attribute_name, copied_graph, reused

if TYPE_CHECKING:
    from ..pipeline import PassState


@dataclass
class Folded:
    gm: fx.GraphModule
    tensors: dict[str, torch.Tensor]   # parameter name -> the parameter with the permutations applied
    attributes: dict[str, str]         # parameter name -> the gm attribute that holds it
    permuted: set[str]                 # the parameters a permutation reordered
    sources: dict[str, Hashable]       # parameter name -> (its tensor's id, its permutations): what
                                       # its folded tensor is, in every compile of the same parameters


def fold(state: PassState) -> Folded:
    """A copy of Dynamo's graph that reads every parameter from a permuted copy held as a buffer (the
    parameter itself where no permutation touches it).

    With `state.reuse`, a tensor permuted the same way by an earlier compile is that same tensor while
    a compiled graph still reads it; a permuted weight that only fed its compression is not kept.
    """
    gm, discovery, parameters, weights = state.gm, state.discover, state.parameters, state.weights
    permutations, reuse = state.permute, state.reuse
    tensors, permuted, sources = {}, set(), {}
    # one device-to-host copy per permutation, not one per parameter dimension it reorders
    encoded = {id(perm): perm.cpu().numpy().tobytes() for perm in permutations.perms.values()}
    for name, weight in weights.items():
        perms = [permutations.of(discovery.parameter_groups.get((name, dim))) for dim in range(weight.dim())]
        if any(perm is not None for perm in perms):
            permuted.add(name)
        sources[name] = (id(weight), tuple(None if perm is None else encoded[id(perm)] for perm in perms))
        compute = functools.partial(_permuted, weight, perms)
        tensors[name] = reused(reuse, "folded", sources[name], compute, keep=weight, weak=True)
    holder = torch.nn.Module()
    attributes = {}
    for name, tensor in tensors.items():
        attribute = attribute_name(name, attributes.values())
        holder.register_buffer(attribute, tensor)
        attributes[name] = attribute
    graph = copied_graph(gm)
    placeholders = [node for node in graph.nodes if node.op == "placeholder"]
    after = placeholders[-1] if placeholders else None
    for node in list(graph.nodes):
        if node.name not in parameters:
            continue
        attribute = attributes[parameters[node.name]]
        if node.op == "get_attr":
            node.target = attribute
            continue
        with graph.inserting_after(after):
            read = graph.get_attr(attribute)
        read.meta = dict(node.meta)
        node.replace_all_uses_with(read)
        after = read
    return Folded(fx.GraphModule(holder, graph), tensors, attributes, permuted, sources)


def _permuted(tensor: torch.Tensor, perms: list[torch.Tensor | None]) -> torch.Tensor:
    """`tensor` with dimension d reordered by perms[d] where that is not None."""
    for dim, perm in enumerate(perms):
        if perm is not None:
            tensor = tensor.index_select(dim, perm.to(tensor.device))
    return tensor
