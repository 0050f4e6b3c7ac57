"""layout: sparse linears whose input comes out of a pointwise kernel read it channel-major.

The prefill kernel gathers the kept input channels of x.T, so a row-major x costs a transpose per
call (a read and a write of the activations: 18% of a DeiT-base step at batch 256). Where the input
is made by elementwise ops on the output of a matmul or attention (the GELU or SwiGLU before an
MLP's down projection, the head merge before the output projection), this stage makes it a
channel-major copy in the graph; Inductor then writes it that way from the kernel that computes it,
and the op reads it in place. Where that elementwise work reads a sparse linear's output and
nothing else uses it (fc1 -> GELU -> fc2, gate/up -> SwiGLU -> down), the producing linear writes
channel-major too, so that the elementwise kernel reads and writes one layout instead of
transposing. Inputs that come out of a normalisation are left alone: Inductor may fuse the
transposed store into the norm's reduction, whose stores then stop coalescing (slower than the
transpose it saves). Graphs compiled for a few tokens are left alone too: the decode kernels read x
in place in either layout, so no copy is saved there. A graph whose token count is symbolic counts
as the count its kernels are planned for (the largest of its bucket, or many tokens: kernels/op.py).
"""

from __future__ import annotations

import math
import operator
from typing import TYPE_CHECKING, Any

import torch
from torch import fx

from ..kernels.operands import channel_major

if TYPE_CHECKING:
    from ..pipeline import PassState

# What keeps a channel-major tensor channel-major: elementwise math, and splits of its last dimension
# (views; a view that merges dimensions could fail on it).
_LAYOUT_KEEPING = {
    "add", "sub", "mul", "div", "truediv", "neg", "gelu", "silu", "relu", "sigmoid", "tanh", "to", "float", "half",
    "bfloat16", "type_as", "getitem", "split", "chunk",
}
# What Inductor computes without a kernel boundary between the producer and its consumer.
_ELEMENTWISE = _LAYOUT_KEEPING | {
    "view", "reshape", "transpose", "permute", "contiguous", "flatten", "unflatten", "squeeze", "unsqueeze"}
# Outputs written by a kernel that is not fused with what follows.
_KERNEL_OUTPUTS = {"scaled_dot_product_attention", "linear", "matmul", "bmm"}


def layout(state: PassState) -> dict[str, list[str]] | None:
    """The layout stage: channel-major inputs and outputs where they pay (`channel_major_layouts`), on the
    sparse graph that Inductor will lower (the copies it adds are free only where Inductor fuses them
    into their producer); None without a sparse graph or without Inductor."""
    if state.sparsify is None or not state.config.inductor:
        return None
    return channel_major_layouts(state.sparsify.gm)


def channel_major_layouts(gm: fx.GraphModule) -> dict[str, list[str]]:
    """Give each eligible vnm.linear (CUDA input, more than ROW_MAJOR_MAX_TOKENS tokens where the
    graph was traced, made by elementwise ops on kernel outputs) a channel-major copy of its input,
    one per input node, and make each vnm.linear whose output reaches only such copies write it
    channel-major; returns the names of the vnm.linear nodes changed, under "inputs" and "outputs"."""
    copies: dict[fx.Node, fx.Node] = {}
    inputs = []
    for node in list(gm.graph.nodes):
        if not _is_sparse_linear(node):
            continue
        x = node.args[0]
        if x not in copies:
            if not (_prefill_sized(node) and _from_kernel_outputs(x, set())):
                continue
            with gm.graph.inserting_after(x):
                copies[x] = gm.graph.call_function(channel_major, (x,))
        node.replace_input_with(x, copies[x])
        inputs.append(node.name)
    copy_nodes = set(copies.values())
    outputs = []
    for node in gm.graph.nodes:
        if _is_sparse_linear(node) and _prefill_sized(node) and _reaches_only(node, copy_nodes, set()):
            node.update_kwarg("channel_major_out", True)
            outputs.append(node.name)
    gm.recompile()
    return {"inputs": inputs, "outputs": outputs}


def _is_sparse_linear(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is torch.ops.vnm.linear.default


def _reaches_only(node: fx.Node, copies: set[fx.Node], seen: set[fx.Node]) -> bool:
    """Whether every use of `node`'s value, followed through layout-keeping ops, is one of `copies`."""
    if node in seen:
        return True
    seen.add(node)
    return bool(node.users) and all(
        user in copies or (_name(user) in _LAYOUT_KEEPING and _reaches_only(user, copies, seen))
        for user in node.users)


def _prefill_sized(linear: fx.Node) -> bool:
    """Whether the vnm.linear `linear` runs on more tokens than the prefill kernel reads row-major: the
    count its graph was traced with, or, where the count is symbolic and the op plans for it
    (plan_symbolic, kernels/op.py), the count it plans for."""
    example = linear.args[0].meta.get("example_value", linear.args[0].meta.get("val"))
    if not isinstance(example, torch.Tensor) or example.device.type != "cuda" or example.dim() < 2:
        return False
    from ..kernels.common import planned_count  # CUDA graphs only: keeps the kernels unloaded on CPU
    from ..kernels.prefill import ROW_MAJOR_MAX_TOKENS

    sizes = example.shape[:-1]
    if linear.kwargs.get("plan_symbolic", False):
        return planned_count(math.prod(sizes)) > ROW_MAJOR_MAX_TOKENS
    return math.prod(_hint(size) for size in sizes) > ROW_MAJOR_MAX_TOKENS


def _hint(size: Any) -> int:
    """The size the graph was traced with (a dynamic size's hint; 0 when it has none)."""
    if isinstance(size, torch.SymInt):
        return size.node.hint or 0
    return int(size)


def _from_kernel_outputs(node: fx.Node, seen: set[fx.Node]) -> bool:
    """Whether `node` is made by elementwise ops from at least one kernel output and from nothing
    else but parameters and constants."""
    if node in seen:
        return True
    seen.add(node)
    if node.op in ("get_attr", "placeholder"):
        return True
    name = _name(node)
    if node.target is torch.ops.vnm.linear.default or name in _KERNEL_OUTPUTS:
        return True
    if name not in _ELEMENTWISE:
        return False
    inputs = [arg for arg in node.all_input_nodes if not _is_size(arg)]
    return all(_from_kernel_outputs(arg, seen) for arg in inputs) and any(
        arg.op not in ("get_attr", "placeholder") for arg in inputs)


def _is_size(node: fx.Node) -> bool:
    """A size (x.shape[0], x.size(1), a symbolic size), read by a view: no data flows through it."""
    example = node.meta.get("example_value", node.meta.get("val"))
    if isinstance(example, (int, torch.SymInt)):
        return True
    if _name(node) in ("size", "sym_size", "sym_size_int"):
        return True
    if node.target is getattr and node.args[1:] == ("shape",):
        return True
    return node.target is operator.getitem and isinstance(node.args[0], fx.Node) and _is_size(node.args[0])


def _name(node: fx.Node) -> str:
    return str(node.target) if node.op == "call_method" else getattr(node.target, "__name__", "")
