"""A model's forward as one Dynamo graph, for the entries that run the passes eagerly (`sparsify`,
`explain`, `bisect`, `finetune`): the graph, the example inputs Dynamo passes a backend, and its parameters."""

from __future__ import annotations

from typing import Any

import torch
from torch import fx, nn

from .passes.common import graph_parameters


def arguments(example_inputs: Any) -> tuple[tuple, dict]:
    """example_inputs as (args, kwargs): a tuple of positional arguments, a dict of keyword arguments, or one tensor."""
    if isinstance(example_inputs, dict):
        return (), example_inputs
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    raise ValueError("example_inputs must be a tuple of arguments, a dict of keyword arguments or a tensor, "
                     f"got {type(example_inputs).__name__}")


def _call(model: nn.Module, *args: Any, **kwargs: Any) -> Any:
    return model(*args, **kwargs)


def capture(model: nn.Module, args: tuple, kwargs: dict) -> tuple[fx.GraphModule, list[Any], dict]:
    """The model's forward as one Dynamo graph, the example inputs Dynamo passes to a backend, and
    the graph's parameters (read while Dynamo's metadata is still attached)."""
    captured = []

    def keep(gm: fx.GraphModule, example_inputs: list[Any]):
        captured.append((gm, list(example_inputs), graph_parameters(gm, example_inputs)))
        return gm.forward

    compiled = torch.compile(_call, backend=keep, fullgraph=True, dynamic=False)
    try:
        with torch.no_grad():
            compiled(model, *args, **kwargs)
    except (torch._dynamo.exc.Unsupported, torch._dynamo.exc.UserError) as error:
        raise ValueError("sparsify needs the model's forward to trace into one graph on example_inputs "
                         f"(torch.compile fullgraph=True failed: {error}); torch.compile(model, backend='vnm') "
                         "handles graph breaks") from error
    finally:
        torch._dynamo.reset_code(_call.__code__)  # leave no cache entry behind
    return captured[0]
