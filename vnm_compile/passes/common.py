"""What every pass shares: the graph's parameters by module name, running the graph on real inputs,
and the work of earlier compiles of the same parameters (`Reuse`)."""

from __future__ import annotations

import re
import weakref
from collections.abc import Callable, Hashable, Iterable, Iterator
from typing import Any, TypeVar

import torch
from torch import fx

T = TypeVar("T")
_MISSING = object()

_SOURCE_ATTRIBUTES = re.compile(r"\._(?:modules|parameters|buffers)\['([^']*)'\]")
_SUBSCRIPTS = re.compile(r"\['([^']*)'\]|\[(\d+)\]")
_ROOT = re.compile(r"^[LG]\['[^']*'\](?:\['[^']*'\]|\[\d+\])*")


def module_path(source: str) -> str:
    """`L['self']._modules['model']._modules['layers']._modules['3']` or `L['self'].model.layers[3]`
    -> `model.layers.3`: the dotted name relative to the root module the graph was traced from.

    The root is the frame local (or global) with any subscripts straight after it: a forward wrapped
    by a decorator `wrapper(*args, **kwargs)` sees the module as `L['args'][0]`."""
    path = _ROOT.sub("", source, count=1)
    path = _SOURCE_ATTRIBUTES.sub(lambda match: "." + match.group(1), path)
    path = _SUBSCRIPTS.sub(lambda match: "." + (match.group(1) or match.group(2)), path)
    return path.lstrip(".")


def attribute_name(name: str, taken) -> str:
    """A valid, unused attribute name for `name` (`model.layers.0.mlp.up_proj.weight` -> `model_layers_0_...`)."""
    attribute = re.sub(r"\W", "_", name)
    if not attribute or attribute[0].isdigit():
        attribute = "p_" + attribute
    base, index = attribute, 1
    while attribute in taken:
        attribute, index = f"{base}_{index}", index + 1
    return attribute


def copied_graph(gm: fx.GraphModule) -> fx.Graph:
    """A copy of gm's graph (same node names), to build a new GraphModule around."""
    graph = fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    return graph


def _source_name(source: Any) -> str:
    name = source.name
    return name() if callable(name) else name


def graph_parameters(gm: fx.GraphModule, example_inputs: list[Any]) -> dict[str, tuple[str, torch.Tensor]]:
    """FX node name -> (parameter name, live tensor) for every parameter or buffer the graph reads.

    Dynamo passes parameters either as placeholders (the default, with the source they came from)
    or as get_attr nodes of the graph module (export, or inline_inbuilt_nn_modules=False).
    """
    found: dict[str, tuple[str, torch.Tensor]] = {}
    placeholders = [node for node in gm.graph.nodes if node.op == "placeholder"]
    for node, value in zip(placeholders, example_inputs):
        grapharg = node.meta.get("grapharg")
        source = _source_name(grapharg.source) if grapharg is not None and grapharg.source is not None else ""
        from_module = "._parameters[" in source or "._buffers[" in source
        if isinstance(value, torch.Tensor) and (from_module or isinstance(value, torch.nn.Parameter)):
            found[node.name] = (module_path(source) if source else node.name, value)
    original_names = gm.meta.get("dynamo_flat_name_to_original_fqn", {})
    sources = getattr(gm, "_param_name_to_source", None) or {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            value = _fetch_attr(gm, node.target)
            if isinstance(value, torch.Tensor):
                if node.target in original_names:
                    name = original_names[node.target]
                elif node.target in sources:
                    name = module_path(_source_name(sources[node.target]))
                else:
                    name = node.target
                found[node.name] = (name, value)
    return found


def _fetch_attr(module: torch.nn.Module, target: str) -> Any:
    for part in target.split("."):
        module = getattr(module, part)
    return module


def concrete_inputs(gm: fx.GraphModule, example_inputs: list[Any], parameters: dict[str, torch.Tensor]) -> list[Any]:
    """Inputs to run a Dynamo graph eagerly: symbolic sizes become their example values, parameter
    placeholders get `parameters` (by FX node name), other tensors are copied, so that a graph that
    writes to an input cannot touch the caller's."""
    placeholders = [node.name for node in gm.graph.nodes if node.op == "placeholder"]
    concrete = []
    for name, value in zip(placeholders, example_inputs):
        if name in parameters:
            value = parameters[name]
        elif isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)):
            value = value.node.hint
        elif isinstance(value, torch.Tensor):
            value = value.detach().clone()
        concrete.append(value)
    return concrete


def node_outputs(gm: fx.GraphModule, inputs: list[Any],
                 dtype: torch.dtype | None = None) -> Iterator[tuple[fx.Node, Any]]:
    """Run `gm` node by node on `inputs` without grad, yielding each node with its value.

    With `dtype`, every floating-point tensor the graph reads (inputs, attributes) and every
    floating-point dtype it names (`.to(torch.float32)`, `.float()`) becomes `dtype`: a float32
    graph runs in float64 as it is written.
    """
    interpreter = _Interpreter(gm, dtype)
    with torch.no_grad():
        yield from interpreter.iterate(inputs)


class _Interpreter(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, dtype: torch.dtype | None):
        super().__init__(gm, garbage_collect_values=True)
        self._dtype = dtype

    def iterate(self, inputs: list[Any]) -> Iterator[tuple[fx.Node, Any]]:
        self.args_iter = iter(inputs)
        self.env = {}
        for node in self.graph.nodes:
            value = self.run_node(node)
            if node.op == "output":
                return
            self.env[node] = value
            yield node, value
            for dead in self.user_to_last_uses.get(node, []):
                del self.env[dead]

    def _cast(self, value: Any) -> Any:
        if self._dtype is None:
            return value
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            return value.to(self._dtype)
        if isinstance(value, torch.dtype) and value.is_floating_point:
            return self._dtype
        return value

    def placeholder(self, target, args, kwargs):
        return self._cast(next(self.args_iter))

    def fetch_attr(self, target: str):
        return self._cast(super().fetch_attr(target))

    def call_function(self, target, args, kwargs):
        return super().call_function(target, *self._cast_dtypes(args, kwargs))

    def call_method(self, target, args, kwargs):
        if self._dtype is not None and target in ("float", "half", "bfloat16", "double"):
            target, args = "to", (args[0], self._dtype)
        return super().call_method(target, *self._cast_dtypes(args, kwargs))

    def _cast_dtypes(self, args, kwargs):
        cast = lambda value: self._cast(value) if isinstance(value, torch.dtype) else value
        return fx.node.map_aggregate(args, cast), fx.node.map_aggregate(kwargs, cast)


def reused(reuse: Reuse | None, table: str, key: Hashable, compute: Callable[[], T], keep: Any = None,
           weak: bool = False) -> T:
    """`reuse.cached(table, key, compute, keep, weak)`, or `compute()` where there is no reuse."""
    return compute() if reuse is None else reuse.cached(table, key, compute, keep, weak)


class Reuse:
    """What earlier compiles of one set of parameters, under one config, computed: the graphs Dynamo
    compiles for one model (other input shapes, the dynamic-shape graph, the decode graph) share
    its permutations, permuted parameters, compressed weights, frozen clones and buffers, so the model
    gets one sparse version, searched and stored once.

    It serves only the very tensors it was made for, unchanged since (`serves`). Ids in its keys are
    those of these tensors or of objects the entries keep alive (`keep`), or that earlier tables
    keep: an id in a key is never one recycled by another object.
    """

    def __init__(self, parameters: list[torch.Tensor], calibration: object | None = None):
        self._parameters = [(weakref.ref(tensor), version) for tensor, version in self.versions(parameters)]
        self._calibration = weakref.ref(calibration) if calibration is not None else None
        self._tables: dict[str, dict[Hashable, Any]] = {}
        self._counts: dict[str, tuple[int, int]] = {}  # table -> (hits, lookups), over every compile

    @staticmethod
    def versions(parameters: Iterable[torch.Tensor]) -> list[tuple[torch.Tensor, tuple[int, int]]]:
        """Each tensor, in the order of their ids, with what says it is unchanged: its version
        counter (bumped by in-place writes) and its data pointer (which `tensor.data = ...` moves
        without a bump). Raises RuntimeError for a tensor that keeps neither (an inference tensor)."""
        return [(tensor, (tensor._version, tensor.data_ptr())) for tensor in sorted(parameters, key=id)]

    def serves(self, parameters: list[torch.Tensor], calibration: object | None) -> bool:
        """Whether these are the tensors (and calibration) it was made for, all unchanged since."""
        current = self.versions(parameters)
        same_calibration = (calibration is None if self._calibration is None else self._calibration() is calibration)
        return same_calibration and len(current) == len(self._parameters) and all(
            ref() is tensor and version == recorded
            for (ref, recorded), (tensor, version) in zip(self._parameters, current))

    def cached(self, table: str, key: Hashable, compute: Callable[[], T], keep: Any = None, weak: bool = False) -> T:
        """The value stored under `key`, or `compute()` stored there; `keep` (the objects whose ids
        the key holds) lives as long as the entry. A `weak` entry holds its value only while
        something else does (a compiled graph reading it), so intermediate copies die with their compile."""
        entries = self._tables.setdefault(table, {})
        value = entries[key][1] if key in entries else _MISSING
        if weak and value is not _MISSING:
            value = value()
            value = _MISSING if value is None else value  # died with the compile that read it
        self._count(table, int(value is not _MISSING), 1)
        if value is _MISSING:
            value = compute()
            entries[key] = (keep, weakref.ref(value) if weak else value)
        return value

    def recall(self, table: str, keys: Iterable[Hashable]) -> dict[Hashable, Any] | None:
        """The values of all `keys`, or None if any is missing (then all are computed again)."""
        entries, keys = self._tables.setdefault(table, {}), list(keys)
        found = all(key in entries for key in keys)
        self._count(table, len(keys) if found else 0, len(keys))
        return {key: entries[key][1] for key in keys} if found else None

    def store(self, table: str, values: dict[Hashable, Any]) -> None:
        self._tables.setdefault(table, {}).update({key: (None, value) for key, value in values.items()})

    def tally(self, since: dict[str, tuple[int, int]] | None = None) -> dict[str, tuple[int, int]]:
        """Per table, (entries found, entries looked up) over its life, or after `since` (an earlier tally)."""
        since = since or {}
        return {table: (hits - since.get(table, (0, 0))[0], lookups - since.get(table, (0, 0))[1])
                for table, (hits, lookups) in self._counts.items() if lookups > since.get(table, (0, 0))[1]}

    def _count(self, table: str, hits: int, lookups: int) -> None:
        before = self._counts.get(table, (0, 0))
        self._counts[table] = (before[0] + hits, before[1] + lookups)
