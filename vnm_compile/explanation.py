"""explain: what the vnm passes do to a model, layer by layer, measured on its example inputs.

    report = vnm_compile.explain(model, example_inputs, config)
    print(report)              # the per-layer table
    report.html("vnm.html")    # table, stage diffs side by side, permutation groups as a graph

The HTML is one file with inline CSS and SVG: nothing is fetched, so it opens offline.
"""

from __future__ import annotations

import collections
import os
from typing import Any

import torch
from torch import nn

from .capture import arguments, capture
from .config import VNMConfig
from .lowering import lower
from .passes.common import node_outputs
from .passes.score import oriented_weight
from .pipeline import PassState, run_passes
from .report import Report


def explain(model: nn.Module, example_inputs: Any, config: VNMConfig | None = None) -> Report:
    """Run the passes on the model's graph (the model is left alone) and measure, on example_inputs,
    each sparse layer's output error against its dense output and the whole graph's output error.
    With config.inductor (the default), the rewritten graph is also compiled by Inductor once, for
    the report's last stage diff ("lower": the aten graph Inductor turns into kernels).

    example_inputs: a tuple of positional arguments, a dict of keyword arguments, or one tensor; the
    forward must trace into one graph on them (as for `vnm_compile.sparsify`).
    """
    config = VNMConfig() if config is None else config
    if not isinstance(config, VNMConfig):
        raise ValueError(f"config must be a VNMConfig, got {type(config).__name__}")
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
    args, kwargs = arguments(example_inputs)
    gm, graph_inputs, found = capture(model, args, kwargs)
    state = run_passes(gm, graph_inputs, found, config)
    if config.inductor:  # for the lower stage: the graph Inductor lowers
        lower(state, graph_inputs, record=True)
    measure(state)
    return state.report


def write_explanation(state: PassState, path: str | os.PathLike) -> str:
    """The backend's `explain` option: measure, then write the HTML report. A model compiled into
    several graphs (graph breaks) writes `path` for the first and `<stem>.<n><suffix>` after it."""
    measure(state)
    path = os.fspath(path)
    _written[path] += 1
    if _written[path] > 1:
        stem, suffix = os.path.splitext(path)
        path = f"{stem}.{_written[path] - 1}{suffix}"
    return state.report.html(path)


_written: collections.Counter[str] = collections.Counter()


def measure(state: PassState) -> None:
    """Fill the report's measured errors and kernel choices by running the dense graph once.

    A layer's error is ||x (W - W')^T|| / ||y|| with x, y its dense input and output: the error it
    adds on its own, not the error that reaches it from the layers before.
    """
    report, gm = state.report, state.gm
    parameters = {name: tensor for name, tensor in state.found.values()}
    inputs = state.inputs()
    sparse = {layer.node: layer for layer in report.sparse_layers}
    waiting = collections.Counter(layer.input for layer in sparse.values())
    held: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for node, value in node_outputs(gm, inputs):
            if waiting[node.name]:
                held[node.name] = value
            layer = sparse.get(node.name)
            if layer is None:
                continue
            x = held[layer.input]
            dense = oriented_weight(parameters[layer.parameter], layer.transposed)
            removed = (dense.float() - layer.masked_weight().float().to(dense.device))
            difference = x.float().reshape(-1, x.shape[-1]) @ removed.T
            layer.measured_error = float(difference.norm() / value.float().norm().clamp_min(1e-30))
            layer.kernel = _kernel(layer.weight.device, x.numel() // x.shape[-1], layer)
            waiting[layer.input] -= 1
            if not waiting[layer.input]:
                del held[layer.input]
        expected = floating_outputs(gm(*inputs))
        got = floating_outputs(state.graph(*inputs))
    report.output_error = relative_error(got, expected)


def relative_error(outputs: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    """||outputs - reference|| / ||reference|| over all the tensors together."""
    difference = sum(float((a.double() - b.double()).norm() ** 2) for a, b in zip(outputs, reference))
    total = sum(float(b.double().norm() ** 2) for b in reference)
    return (difference / total) ** 0.5 if total else difference ** 0.5


def floating_outputs(outputs: Any) -> list[torch.Tensor]:
    """The floating-point tensors among a forward's outputs, in pytree order."""
    leaves = torch.utils._pytree.tree_leaves(outputs)
    return [leaf for leaf in leaves if isinstance(leaf, torch.Tensor) and leaf.is_floating_point()]


def _kernel(device: torch.device, tokens: int, layer) -> str:
    if device.type != "cuda":
        return "reference (CPU)"
    try:
        from .kernels.dispatch import choose_path
    except ImportError:
        return "torch.ops.vnm.linear (no dispatch table in this build)"
    weight = layer.weight
    path = choose_path(weight.out_features, weight.in_features, tokens, weight.v, weight.m, weight.dtype, device,
                       has_dense=False)
    return f"{path}: dispatch for {tokens} tokens on {torch.cuda.get_device_name(device)}"
