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

from collections.abc import Callable
from typing import Any

import torch
from torch import fx
from torch._dynamo.source import ConstantSource

from .pipeline import PassState


def lower(state: PassState, example_inputs: list[Any], record: bool = False) -> Callable:
    """`state.graph` compiled by Inductor in config.mode ("reduce-overhead": CUDA graphs). The graph
    Inductor lowers becomes the report's "lower" stage where `record` is set or the stages are logged
    (`StageRecorder.lowering`)."""
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx

    gm = state.graph
    _register_each_buffer_once(gm)
    _keep_dynamo_metadata(gm, state.gm)
    patches = list_mode_options(state.config.mode)
    with torch.no_grad(), state.recorder.lowering(always=record):  # an inference graph: gradients are refused
        return compile_fx(gm, example_inputs, config_patches=patches)


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
