"""The eager entry: `sparsify(model, example_inputs, config)` runs the backend's passes once and
writes the result back into the model as modules."""

from __future__ import annotations

import collections
import copy
from typing import Any

from torch import nn

from .calibration import Calibration, linear_module_types
from .capture import arguments, capture
from .checkpoint import record_sparse_layers
from .config import VNMConfig
from .modules import replace_linears
from .pipeline import PassState, run_passes
from .report import record


def sparsify(
    model: nn.Module,
    example_inputs: Any,
    config: VNMConfig | None = None,
    *,
    calibration: Calibration | None = None,
    inplace: bool = False,
) -> nn.Module:
    """The model with its permutations folded into its parameters and its eligible linears replaced
    by VNMLinear modules (the dense weights are dropped). Returns a copy unless inplace=True.

    example_inputs: a tuple of positional arguments, a dict of keyword arguments, or one tensor;
    the model's forward must trace into one graph on them (torch.compile fullgraph=True).
    The per-layer report is `vnm_compile.reports()[-1]`.
    """
    config = VNMConfig() if config is None else config
    if not isinstance(config, VNMConfig):
        raise ValueError(f"config must be a VNMConfig, got {type(config).__name__}")
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
    if calibration is not None and not isinstance(calibration, Calibration):
        raise ValueError(f"calibration must come from vnm_compile.calibrate, got {type(calibration).__name__}")
    args, kwargs = arguments(example_inputs)
    target = model if inplace else copy.deepcopy(model)
    gm, graph_inputs, parameters = capture(target, args, kwargs)
    state = run_passes(gm, graph_inputs, parameters, config, calibration)
    unreplaceable = _unreplaceable(target, state)
    if unreplaceable:  # decide again with those layers dense, so that graph and modules agree
        state = run_passes(gm, graph_inputs, parameters, config, calibration, extra_skips=unreplaceable)
    record(state.report)
    _write_back(target, state)
    record_sparse_layers(target)
    return target


def _unreplaceable(model: nn.Module, state: PassState) -> dict[str, str]:
    """Sparse layers that cannot become a module of their own, and why."""
    calls = collections.Counter(layer.name for layer in state.report.layers)
    reasons = {}
    for layer in state.report.sparse_layers:
        if layer.stored:  # a VNMLinear already: it stays as it is
            continue
        if calls[layer.name] > 1:
            reasons[layer.name] = f"runs {calls[layer.name]} times per forward; one module holds one weight"
            continue
        try:
            module = model.get_submodule(layer.name)
        except AttributeError:
            module = None
        if not isinstance(module, linear_module_types()):
            reasons[layer.name] = "not an nn.Linear or Conv1D module, which sparsify replaces"
    return reasons


def _write_back(model: nn.Module, state: PassState) -> None:
    for name in state.fold.permuted:
        tensor = state.fold.tensors[name]
        owner_name, _, leaf = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        if leaf in owner._parameters:
            owner._parameters[leaf].data = tensor  # shared by every module the parameter is tied to
        elif leaf in owner._buffers:
            owner._buffers[leaf] = tensor
        else:
            raise ValueError(f"{name} was permuted but is neither a parameter nor a buffer of the model")
    replace_linears(model, {layer.name: layer.weight for layer in state.report.sparse_layers if not layer.stored})
