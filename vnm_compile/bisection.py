"""bisect: find the sparse layer that costs the most output error, by turning layers back to dense in halves.

    result = vnm_compile.bisect(model, example_inputs, config, budget=16)
    result.culprits        # ['model.layers.1.mlp.down_proj']
    print(result)          # every step: which layers were sparse, and the error they gave

The graph is captured once; each evaluation reruns the passes with all but the suspects kept dense
and compares the rewritten graph's outputs with the dense graph's. For bisecting by hand, the config's
`only=` / `exclude=` globs do the same on any entry point.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .capture import arguments, capture
from .config import VNMConfig
from .explanation import floating_outputs, relative_error
from .passes.common import concrete_inputs
from .pipeline import run_passes

Metric = Callable[[list[torch.Tensor], list[torch.Tensor]], float]


@dataclass
class Bisection:
    culprits: list[str]                  # the suspects left when the search ended (one, budget permitting)
    full_error: float                    # the metric with every eligible layer sparse
    steps: list[tuple[list[str], float]] = field(default_factory=list)  # sparse layers -> metric

    def __str__(self) -> str:
        lines = [f"all {len(self.steps[0][0]) if self.steps else 0} sparse layers: error {self.full_error:.4g}"]
        for sparse, error in self.steps[1:]:
            shown = ", ".join(sparse) if len(sparse) <= 4 else f"{sparse[0]} .. {sparse[-1]} ({len(sparse)} layers)"
            lines.append(f"only {shown} sparse: error {error:.4g}")
        lines.append(f"culprit{'s' if len(self.culprits) > 1 else ''}: {', '.join(self.culprits)}")
        return "\n".join(lines)


def bisect(
    model: nn.Module,
    example_inputs: Any,
    config: VNMConfig | None = None,
    metric: Metric | None = None,
    budget: int = 32,
) -> Bisection:
    """Halve the set of suspects (the layers the config sparsifies) until one is left or `budget`
    evaluations are spent: sparsify each half alone, keep the half whose metric is larger.

    metric(outputs, reference) -> float compares the floating-point tensors the traced forward
    returns, sparse and dense; larger is worse. The default is their relative L2 error.
    budget: the most evaluations (runs of the passes) to spend, the first (all layers sparse) included.
    """
    config = VNMConfig() if config is None else config
    if not isinstance(config, VNMConfig):
        raise ValueError(f"config must be a VNMConfig, got {type(config).__name__}")
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
    if metric is None:
        metric = relative_error
    elif not callable(metric):
        raise ValueError(f"metric must be a callable (outputs, reference) -> float, got {type(metric).__name__}")
    if not isinstance(budget, int) or isinstance(budget, bool) or budget < 1:
        raise ValueError(f"budget must be a positive number of evaluations, got {budget!r}")
    if not config.sparsify:
        raise ValueError("config.sparsify is False: there is nothing to bisect")
    args, kwargs = arguments(example_inputs)
    gm, graph_inputs, found = capture(model, args, kwargs)
    inputs = concrete_inputs(gm, graph_inputs, {node: tensor for node, (_, tensor) in found.items()})
    with torch.no_grad():
        reference = floating_outputs(gm(*inputs))

    def evaluate(kept_dense: list[str]) -> tuple[list[str], float]:
        reason = "kept dense by bisect"
        state = run_passes(gm, graph_inputs, found, config, extra_skips={name: reason for name in kept_dense})
        with torch.no_grad():
            error = float(metric(floating_outputs(state.graph(*inputs)), reference))
        sparse = list(dict.fromkeys(layer.name for layer in state.report.sparse_layers))
        return sparse, error

    suspects, full_error = evaluate([])
    steps = [(suspects, full_error)]
    everything = list(suspects)
    while len(suspects) > 1 and len(steps) + 2 <= budget:
        halves = suspects[: len(suspects) // 2], suspects[len(suspects) // 2:]
        errors = []
        for half in halves:
            sparse, error = evaluate([name for name in everything if name not in half])
            steps.append((sparse, error))
            errors.append(error)
        suspects = list(halves[0] if errors[0] >= errors[1] else halves[1])
    return Bisection(suspects, full_error, steps)
