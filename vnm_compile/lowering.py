"""lower: the rewritten graph compiled by Inductor, in the config's mode.

The rewritten graph reads its weights (compressed, permuted, or the parameters themselves) as
module buffers, which AOT autograd lifts into inputs. Inductor's CUDA graphs (mode="reduce-overhead")
copy every input into the graph's own memory on each replay unless it is marked static, and only a
graph that carries Dynamo's metadata has its static inputs found: so the graph handed to Inductor
keeps Dynamo's compile id and each placeholder's source, every weight buffer is registered once,
under a source of its own. Then the weights stay where they are and a replay copies only the real
inputs (token ids, positions), as for a dense model.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch
from torch import fx
from torch._dynamo.source import ConstantSource

from .kernels.op import traced_path
from .passes.common import copied_graph
from .pipeline import PassState


def lower(state: PassState, example_inputs: list[Any], record: bool = False) -> Callable:
    """`state.graph` compiled by Inductor in config.mode ("reduce-overhead": CUDA graphs). The graph
    Inductor lowers becomes the report's "lower" stage where `record` is set or the stages are logged
    (`StageRecorder.lowering`)."""
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx

    _register_each_buffer_once(state.graph)
    gm, read = _reading_inputs_only(state.graph)
    _keep_dynamo_metadata(gm, state.gm)
    patches = list_mode_options(state.config.mode)
    with torch.no_grad(), state.recorder.lowering(always=record):  # an inference graph: gradients are refused
        compiled = compile_fx(gm, [example_inputs[position] for position in read], config_patches=patches)
    return compiled if len(read) == len(example_inputs) else _ReadInputs(compiled, read)


def _reading_inputs_only(gm: fx.GraphModule) -> tuple[fx.GraphModule, list[int]]:
    """A copy of `gm` (sharing its buffers) without the placeholders of the inputs it does not read,
    and the positions of those it reads. The unread ones are the parameters whose layers now read
    compressed buffers: Inductor's code would check each one's size and strides at every call. An
    input whose sizes are symbolic stays (it may be where a size symbol comes from). Before that, each
    sparse linear whose kernel is chosen while tracing drops the operands its kernel does not read
    (`_read_operands_only`). `gm` itself keeps every input and operand: the report's measurements run
    it with all of them."""
    graph = copied_graph(gm)
    graph.output_node().meta = dict(gm.graph.output_node().meta)
    _read_operands_only(graph, gm)
    read = []
    for position, node in enumerate(list(graph.find_nodes(op="placeholder"))):
        value = node.meta.get("val", node.meta.get("example_value"))
        sizes = (*value.shape, *value.stride()) if isinstance(value, torch.Tensor) else (None,)
        if node.users or not all(isinstance(size, int) for size in sizes):
            read.append(position)
        else:
            graph.erase_node(node)
    copy = fx.GraphModule(gm, graph)
    copy.meta.update(gm.meta)
    return copy, read


# vnm.linear's arguments by name (kernels/op.py), and those that only some of its kernels read.
_POSITIONS = {argument.name: index for index, argument in enumerate(torch.ops.vnm.linear.default._schema.arguments)}
_OPTIONAL_OPERANDS = ("dense", "expanded", "channels", "cslt", "mma_values", "mma_metadata", "mma_columns")


def _read_operands_only(graph: fx.Graph, gm: fx.GraphModule) -> None:
    """Each vnm.linear of `graph` whose kernel is chosen while Inductor traces it passes only the optional
    operands that kernel reads: the others (a decode kernel's prefill layout, say) would be inputs
    checked at every call and never read. Their buffer reads go with them."""
    for node in graph.find_nodes(op="call_function", target=torch.ops.vnm.linear.default):
        path = _traced_path(node, gm)
        if path is None:
            continue
        from .kernels.dispatch import PATH_OPERANDS

        for name in _OPTIONAL_OPERANDS:
            if name not in PATH_OPERANDS.get(path, ()):
                _set_argument(node, name, None)
    for node in list(graph.find_nodes(op="get_attr")):
        if not node.users:
            graph.erase_node(node)


def _traced_path(linear: fx.Node, gm: fx.GraphModule) -> str | None:
    """The path vnm.linear `linear` takes as Inductor traces it (`traced_path`); None where the op leaves
    the choice to each call."""
    x, values = _argument(linear, "x"), _argument(linear, "values")
    example = x.meta.get("val", x.meta.get("example_value"))
    if not isinstance(example, torch.Tensor) or values.op != "get_attr":
        return None
    return traced_path(example, gm.get_buffer(values.target).shape[0], _argument(linear, "in_features"),
                       _argument(linear, "v"), _argument(linear, "m"), _argument(linear, "dense") is not None,
                       _argument(linear, "cslt") is not None, _argument(linear, "mma_values") is not None,
                       bool(_argument(linear, "plan_symbolic")))


def _argument(linear: fx.Node, name: str) -> Any:
    """vnm.linear's argument `name`, passed by position or keyword (None where left out)."""
    position = _POSITIONS[name]
    return linear.args[position] if position < len(linear.args) else linear.kwargs.get(name)


def _set_argument(linear: fx.Node, name: str, value: Any) -> None:
    position = _POSITIONS[name]
    if position < len(linear.args):
        linear.update_arg(position, value)
    elif name in linear.kwargs:
        linear.update_kwarg(name, value)


class _ReadInputs:
    """The compiled graph, called with every input Dynamo passes, of which it takes those it reads."""

    def __init__(self, compiled: Callable, read: list[int]):
        self.compiled = compiled
        self.taken = operator.itemgetter(*read) if len(read) > 1 else lambda args: tuple(args[p] for p in read)

    def __call__(self, *args: Any) -> Any:
        return self.compiled(*self.taken(args))  # itemgetter: a loop in C, at every call of the graph


def _register_each_buffer_once(gm: fx.GraphModule) -> None:
    """Point every read of one tensor at one buffer name (a weight read by two nodes, a tied parameter),
    so that no input is passed twice."""
    first: dict[int, str] = {}
    for name, tensor in gm.named_buffers():
        first.setdefault(id(tensor), name)
    buffers = dict(gm.named_buffers())
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.target in buffers:
            node.target = first[id(buffers[node.target])]
    read = {node.target for node in gm.graph.nodes if node.op == "get_attr"}
    for name in list(buffers):
        if name not in read:
            owner, _, leaf = name.rpartition(".")
            delattr(gm.get_submodule(owner), leaf)
    gm.recompile()


def _keep_dynamo_metadata(gm: fx.GraphModule, dynamo_gm: fx.GraphModule) -> None:
    """Dynamo's graph metadata and placeholder sources on the rewritten graph, and a source for each
    of its buffers: what AOT autograd needs to tell static inputs (parameters, buffers, inputs Dynamo
    marked static such as a static KV cache) from the ones a CUDA graph replay copies."""
    if "dynamo_compile_id" not in dynamo_gm.meta:  # not from Dynamo (a test's own graph)
        return
    gm.meta.update(dynamo_gm.meta)
    sources = {node.name: getattr(node, "_dynamo_source", None)
               for node in dynamo_gm.graph.find_nodes(op="placeholder")}
    for node in gm.graph.find_nodes(op="placeholder"):
        node._dynamo_source = sources.get(node.name)
    gm._param_name_to_source = {name: ConstantSource(f"vnm_compile weight {name}")
                                for name, _ in gm.named_buffers(remove_duplicate=False)}
