"""The "vnm" torch.compile backend: the passes on Dynamo's graph, then Inductor.

    model = torch.compile(model, backend="vnm", options={"v": 64, "m": 8})

Dynamo hands over the graph and, as example inputs, the real parameters. The passes read them and
never write them; the compiled graph computes with what they made at compile time (permuted and
compressed weights, inference only), so every call first checks that the parameters it was made
from are unchanged (`_FrozenGraph`): a changed, reloaded or replaced parameter raises, naming it,
instead of serving stale weights. No dense copy of a compressed weight outlives its compile.
`options` are VNMConfig's fields, plus "calibration": the result of
`vnm_compile.calibrate(model, batches)`, and "explain": the path of an HTML report
(`vnm_compile.explain`) to write for each compiled graph.

Dynamo compiles one model into several graphs (another input shape, the dynamic-shape graph, the
decode graph). A graph that reads the same parameter tensors, unchanged, under the same config as
an earlier one takes that compile's work (`Reuse`): one permutation search, one compressed copy of
each weight, and the same buffers in every graph. The compiled graphs hold it; it is freed with them.
A dynamic-shape graph on CUDA runs each small token count (up to `static_tokens`) in a static graph
compiled for it on first sight, where Inductor launches the kernels without a per-call dispatch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import os
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import fx
from torch._subclasses.fake_tensor import disable_fake_tensor_cache

from .calibration import Calibration
from .config import VNMConfig
from .explanation import write_explanation
from .lowering import lower
from .passes.common import Reuse, graph_parameters
from .pipeline import PassState, run_passes
from .report import record

log = logging.getLogger("vnm_compile")

def vnm_backend(gm: fx.GraphModule, example_inputs: list[Any], options: dict[str, Any] | None = None,
                mode: str | None = None) -> Callable:
    """torch.compile backend "vnm" (registered through the `torch_dynamo_backends` entry point).

    `mode` is torch.compile's (it passes either mode or options, never both): "reduce-overhead"
    lowers with Inductor's CUDA graphs, like options={"mode": "reduce-overhead"}.
    """
    options = dict(options or {})
    if mode is not None:
        options["mode"] = mode
    calibration = options.pop("calibration", None)
    if calibration is not None and not isinstance(calibration, Calibration):
        raise ValueError(f"calibration must come from vnm_compile.calibrate(model, batches), "
                         f"got {type(calibration).__name__}")
    explain_path = options.pop("explain", None)
    if explain_path is not None and not isinstance(explain_path, (str, os.PathLike)):
        raise ValueError(f"explain must be the path of the HTML report to write, got {explain_path!r}")
    config = VNMConfig.from_options(options)
    if any(node.op == "call_module" for node in gm.graph.nodes):
        raise ValueError("the vnm backend needs modules inlined into the graph; leave "
                         "torch._dynamo.config.inline_inbuilt_nn_modules at its default (True)")
    found = graph_parameters(gm, example_inputs)
    reuse = _reuse_for(found, config, calibration)
    compiled, token_symbols = _compile(gm, example_inputs, found, config, calibration, reuse, explain_path)
    limit = max((config.static_graph_tokens(value.device) for value in example_inputs
                 if isinstance(value, torch.Tensor)), default=0)
    if limit and token_symbols:
        context = torch._guards.TracingContext.try_get()
        if context is not None and context.fake_mode is not None and context.fake_mode.shape_env is not None:
            # Inductor traces a static graph with Dynamo's own fake inputs, whose pinned sizes read as
            # values: the call's real tensors would be given fresh size symbols.
            traced = [node.meta["example_value"] for node in gm.graph.find_nodes(op="placeholder")]
            static = lambda args: _compile(gm, args, found, config, calibration, reuse, None, traced)[0]
            return _StaticPerTokenCount(compiled, static, token_symbols, limit, context)
    return compiled


def _compile(gm: fx.GraphModule, example_inputs: list[Any], found: dict[str, tuple[str, torch.Tensor]],
             config: VNMConfig, calibration: Calibration | None, reuse: Reuse | None,
             explain_path: str | os.PathLike | None,
             traced_inputs: list[Any] | None = None) -> tuple[_FrozenGraph, dict[int, Any]]:
    """The passes and Inductor on Dynamo's graph; with the symbols of the token dimensions the sparse
    linears read (by the placeholder that passes each, empty in a static graph)."""
    state = run_passes(gm, example_inputs, found, config, calibration, reuse=reuse)
    record(state.report)
    compiled = (lower(state, traced_inputs or example_inputs, record=explain_path is not None) if config.inductor
                else state.graph)
    if explain_path is not None:
        write_explanation(state, explain_path)
    token_symbols = _token_symbols(state)
    snapshotted = _snapshotted(gm, found)
    # The permuted dense weights live in graph modules, which are reference cycles: free them now,
    # not at some later collection, so that they never hold memory the model runs with.
    del state
    gc.collect()
    return _FrozenGraph(compiled, snapshotted, reuse), token_symbols


def _token_symbols(state: PassState) -> dict[int, Any]:
    """The size symbols of the sparse linears' token dimensions, by the position of the placeholder
    that passes each (a KV cache's length, read by attention alone, is not among them)."""
    if state.sparsify is None:
        return {}
    nodes = {node.name: node for node in state.gm.graph.nodes}
    symbols = set()
    for site in state.discover.linears.values():
        example = nodes[site.input].meta.get("example_value") if site.skip_reason is None else None
        if isinstance(example, torch.Tensor):
            for size in example.shape[:-1]:
                if isinstance(size, torch.SymInt):
                    symbols |= size.node.expr.free_symbols
    positions = {}
    for index, node in enumerate(state.gm.graph.find_nodes(op="placeholder")):
        example = node.meta.get("example_value")
        if isinstance(example, torch.SymInt) and example.node.expr in symbols:
            positions[index] = example.node.expr
    return positions


class _StaticPerTokenCount:
    """A dynamic-shape graph that runs small token counts in static graphs of their own.

    In the dynamic graph each sparse linear picks its kernel when called (tens of microseconds of
    CPU a call); a static graph has Inductor launch the kernels directly. So a call whose token
    symbols are all at most `limit` runs a graph compiled for exactly those sizes, on its first
    sight, as Dynamo compiles the specialisations of `mark_dynamic(..., specialize_on=...)`: the
    same graph under Dynamo's shape environment with the symbols pinned to the call's values.
    Other calls run the dynamic graph."""

    def __init__(self, dynamic: Callable, static: Callable[[list[Any]], Callable], symbols: dict[int, Any],
                 limit: int, context: Any):
        self.dynamic, self.static, self.symbols, self.limit, self.context = dynamic, static, symbols, limit, context
        self.compiled: dict[tuple[int, ...], Callable] = {}

    def __call__(self, *args: Any) -> Any:
        sizes = tuple(args[index] for index in self.symbols)
        if max(sizes) > self.limit:
            return self.dynamic(*args)
        compiled = self.compiled.get(sizes)
        if compiled is None:
            compiled = self.compiled[sizes] = self._specialise(list(args), sizes)
        return compiled(*args)

    @torch._dynamo.disable
    def _specialise(self, args: list[Any], sizes: tuple[int, ...]) -> Callable:
        """The static graph for these sizes; the dynamic graph, with a logged reason, where it fails to
        compile (the static graph is an optimisation: the dynamic one computes the same)."""
        try:
            with pinned(self.context, dict(zip(self.symbols.values(), sizes))):
                return self.static(args)
        except Exception as error:  # any compile failure: the dynamic graph serves
            log.warning("vnm: no static graph for token sizes %s (%s: %s); these calls run the dynamic-shape "
                        "graph", sizes, type(error).__name__, error)
            return self.dynamic


@contextlib.contextmanager
def pinned(context: Any, sizes: dict[Any, int]) -> Iterator[None]:
    """Dynamo's tracing context with each size symbol pinned to a value, to compile its graph again
    for those sizes (as Dynamo compiles a `specialize_on` case). The caches that key on symbols, not
    on their values, are bypassed: compile caches, fake tensors' dispatch cache, simplified sizes."""
    shape_env = context.fake_mode.shape_env
    try:
        with contextlib.ExitStack() as stack:
            for source, size in zip(_sources(shape_env, sizes), sizes.values()):
                stack.enter_context(shape_env.patch_source_specialization(source, lambda s, size=size: s == size))
            _forget_simplified_sizes(shape_env)
            stack.enter_context(torch._guards.tracing(context))
            stack.enter_context(disable_fake_tensor_cache(context.fake_mode))
            stack.enter_context(torch._inductor.config.patch(fx_graph_cache=False))
            stack.enter_context(torch._functorch.config.patch(enable_autograd_cache=False))
            yield
    finally:
        _forget_simplified_sizes(shape_env)


def _forget_simplified_sizes(shape_env: Any) -> None:
    """Drop the ShapeEnv's caches of sizes simplified by its replacements, which pinning a symbol
    changes without telling them (torch 2.13 also caches each symbolic size's simplified form)."""
    shape_env._update_version_counter()
    if hasattr(shape_env, "_replacements_version_counter"):
        shape_env._replacements_version_counter += 1


def _sources(shape_env: Any, symbols: Any) -> list[Any]:
    """The source Dynamo made each symbol from (an input's size), named as patch_source_specialization
    looks it up."""
    found = []
    for symbol in symbols:
        sources = shape_env.var_to_sources.get(symbol)
        if not sources:
            raise RuntimeError(f"no source for the size symbol {symbol} in Dynamo's shape environment")
        found.append(sources[0])
    return found


# Reuse by parameters (id, version, data pointer), config and calibration. Held weakly: the compiled
# graphs hold their Reuse, so it lives while one of them does, and no longer.
_REUSE: weakref.WeakValueDictionary[tuple, Reuse] = weakref.WeakValueDictionary()
# How a graph is lowered or checked, not what it computes.
_NOT_IN_SOLUTION = ("mode", "inductor", "verify", "static_tokens")


def _reuse_for(found: dict[str, tuple[str, torch.Tensor]], config: VNMConfig,
               calibration: Calibration | None) -> Reuse | None:
    """The Reuse of earlier compiles of exactly these parameter tensors, unchanged since, under the
    same config and calibration; a new one (registered) if there is none. None where a tensor keeps
    no version counter (an inference tensor), so that a change could not be seen."""
    tensors = list({id(tensor): tensor for _, tensor in found.values()}.values())
    try:
        versions = Reuse.versions(tensors)
    except RuntimeError:
        return None
    solution = tuple((field.name, getattr(config, field.name)) for field in dataclasses.fields(config)
                     if field.name not in _NOT_IN_SOLUTION)
    key = (solution, id(calibration), tuple((id(tensor), version) for tensor, version in versions))
    reuse = _REUSE.get(key)
    if reuse is None or not reuse.serves(tensors, calibration):  # ids recycled by other tensors
        reuse = Reuse(tensors, calibration)
        _REUSE[key] = reuse
    return reuse


@dataclasses.dataclass(frozen=True)
class _Snapshot:
    """A parameter the compiled graph was made from: where Dynamo passes it, and what it was."""

    position: int
    name: str
    tensor: torch.Tensor
    version: int


def _snapshotted(gm: fx.GraphModule, found: dict[str, tuple[str, torch.Tensor]]) -> list[_Snapshot]:
    positions = {node.name: index for index, node in enumerate(gm.graph.find_nodes(op="placeholder"))}
    snapshots = []
    for node, (name, tensor) in found.items():
        if node in positions and not tensor.is_inference():  # an inference tensor keeps no version
            snapshots.append(_Snapshot(positions[node], name, tensor, tensor._version))
    return snapshots


_FROZEN_MESSAGE = (
    "the vnm backend compiles for inference: the compiled model computes with frozen, permuted and "
    "compressed snapshots of the weights taken at compile time, so no gradient flows back to the "
    "live parameters. Run it under torch.no_grad() (or torch.inference_mode()), or train the dense "
    "model and compile again."
)


class _FrozenSnapshot(torch.autograd.Function):
    """Identity on the outputs whose backward refuses: training on stale weights never happens silently."""

    @staticmethod
    def forward(ctx, anchor: torch.Tensor, *outputs: Any) -> tuple:
        return tuple(out.view_as(out) if isinstance(out, torch.Tensor) else out for out in outputs)

    @staticmethod
    def backward(ctx, *grads: Any) -> tuple:
        raise RuntimeError(_FROZEN_MESSAGE)


class _FrozenGraph:
    """The compiled graph as Dynamo calls it: first a check that every parameter it was made from is
    the same tensor, unwritten since (its version counter), else an error naming it; then the graph,
    whose outputs refuse a backward. It holds the work it shares with the model's other compiled
    graphs (`reuse`), which lives as long as one of them does."""

    def __init__(self, compiled: Callable, snapshots: list[_Snapshot], reuse: Reuse | None):
        self.compiled, self.snapshots, self.reuse = compiled, snapshots, reuse

    def __call__(self, *args: Any) -> Any:
        for snapshot in self.snapshots:
            current = args[snapshot.position]
            if current is not snapshot.tensor or current._version != snapshot.version:
                raise RuntimeError(
                    f"parameter {snapshot.name} changed after torch.compile(backend='vnm') compressed the model "
                    f"({'replaced' if current is not snapshot.tensor else 'written in place'}, e.g. by "
                    "load_state_dict or an optimizer step); the compiled graph would serve stale weights. "
                    "Call torch.compiler.reset() and compile the model again.")
        if not torch.is_grad_enabled():  # inference: no output to guard, and no search over the inputs
            return self.compiled(*args)
        anchor = next((arg for arg in args if isinstance(arg, torch.Tensor) and arg.requires_grad), None)
        if anchor is None:
            return self.compiled(*args)
        with torch.no_grad():
            outputs = self.compiled(*args)
        differentiable = [isinstance(out, torch.Tensor) and out.is_floating_point() for out in outputs]
        wrapped = iter(_FrozenSnapshot.apply(anchor, *[out for out, d in zip(outputs, differentiable) if d]))
        return type(outputs)(next(wrapped) if d else out for out, d in zip(outputs, differentiable))
