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
A dynamic-shape graph on CUDA runs small token counts (up to `small_tokens`) in graphs compiled per
power-of-two bucket of counts on first sight, where Inductor launches the kernels chosen for the
bucket without a per-call dispatch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import itertools
import logging
import os
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import sympy
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
    limit = max((config.small_token_graphs(value.device) for value in example_inputs
                 if isinstance(value, torch.Tensor)), default=0)
    if limit and token_symbols:
        context = torch._guards.TracingContext.try_get()
        if context is not None and context.fake_mode is not None and context.fake_mode.shape_env is not None:
            # Inductor traces a bucket's graph with Dynamo's own fake inputs, whose size symbols carry the
            # bucket's range: the call's real tensors would be given fresh, unbounded symbols.
            traced = [node.meta["example_value"] for node in gm.graph.find_nodes(op="placeholder")]
            bucket = lambda args: _compile(gm, args, found, config, calibration, reuse, None, traced)[0]
            return _GraphPerTokenBucket(compiled, bucket, token_symbols, limit, context)
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


def token_range(size: int, limit: int) -> tuple[int, int]:
    """The bucket of a token count up to `limit`: the counts of its token bucket (`token_bucket`, the
    count rounded up to a power of two, by which the dispatch table and the tuned configs are keyed),
    up to `limit`: 2, 3-4, 5-8, 9-16, ... They share their kernels' choice."""
    from .kernels.common import token_bucket  # bucket graphs are made on CUDA: the CPU keeps Triton unloaded

    top = token_bucket(size)
    return top // 2 + 1, min(top, limit)


class _GraphPerTokenBucket:
    """A dynamic-shape graph that runs small token counts in graphs of their own, one per bucket.

    Where the dynamic graph serves every count, each sparse linear picks its kernel when called (tens
    of microseconds of CPU a call); a graph whose token count is bounded has Inductor launch the kernels
    chosen for its largest count directly. So a call whose token symbols are all at most `limit` runs
    the graph of its counts' buckets (`token_range`), compiled on its first sight: the same graph under
    Dynamo's shape environment with each symbol's range narrowed to its bucket. Other calls run the
    dynamic graph, whose kernels are chosen for many tokens."""

    def __init__(self, dynamic: Callable, bucket: Callable[[list[Any]], Callable], symbols: dict[int, Any],
                 limit: int, context: Any):
        self.dynamic, self.bucket, self.symbols, self.limit, self.context = dynamic, bucket, symbols, limit, context
        self.compiled: dict[tuple[tuple[int, int], ...], Callable] = {}

    def __call__(self, *args: Any) -> Any:
        sizes = tuple(args[index] for index in self.symbols)
        if max(sizes) > self.limit:
            return self.dynamic(*args)
        ranges = tuple(token_range(size, self.limit) for size in sizes)
        compiled = self.compiled.get(ranges)
        if compiled is None:
            compiled = self.compiled[ranges] = self._compile_bucket(list(args), ranges)
        return compiled(*args)

    @torch._dynamo.disable
    def _compile_bucket(self, args: list[Any], ranges: tuple[tuple[int, int], ...]) -> Callable:
        """The graph for these token ranges; the dynamic graph, with a logged reason, where it fails to
        compile (a bucket's graph is an optimisation: the dynamic one computes the same)."""
        try:
            with bounded(self.context, dict(zip(self.symbols.values(), ranges))):
                return self.bucket(args)
        except Exception as error:  # any compile failure: the dynamic graph serves
            log.warning("vnm: no graph for token ranges %s (%s: %s); these calls run the dynamic-shape graph",
                        ranges, type(error).__name__, error)
            return self.dynamic


@contextlib.contextmanager
def bounded(context: Any, ranges: dict[Any, tuple[int, int]]) -> Iterator[None]:
    """Dynamo's tracing context with each size symbol's range narrowed to (lowest, highest), to compile
    its graph again for those sizes. What the compile derives from the narrowed ranges stays in it: the
    shape environment's ranges, replacements, guards and the axioms they imply are restored, and the
    caches that key on symbols, not on their ranges, are bypassed (compile caches, fake tensors' dispatch
    cache, simplified sizes). Nothing checks a guard the compile adds (Dynamo built its guards and froze
    the environment before), so the compile fails unless each holds for every size in the ranges."""
    from torch.utils._sympy.value_ranges import ValueRanges

    shape_env = context.fake_mode.shape_env
    saved = {name: dict(getattr(shape_env, name)) for name in ("var_to_range", "replacements", "axioms")}
    guards = len(shape_env.guards)
    try:
        for symbol, (lowest, highest) in ranges.items():
            if symbol not in shape_env.var_to_range:
                raise RuntimeError(f"no range for the size symbol {symbol} in Dynamo's shape environment")
            shape_env.var_to_range[symbol] = ValueRanges(lowest, highest)
        _forget_simplified_sizes(shape_env)
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch._guards.tracing(context))
            stack.enter_context(disable_fake_tensor_cache(context.fake_mode))
            stack.enter_context(torch._inductor.config.patch(fx_graph_cache=False))
            stack.enter_context(torch._functorch.config.patch(enable_autograd_cache=False))
            yield
        broken = [guard.expr for guard in shape_env.guards[guards:] if not _holds_throughout(guard.expr, ranges)]
        if broken:
            raise RuntimeError(f"the compile assumed {broken}, which not every size in {list(ranges.values())} meets")
    finally:
        del shape_env.guards[guards:]
        for name, entries in saved.items():
            getattr(shape_env, name).clear()
            getattr(shape_env, name).update(entries)
        _forget_simplified_sizes(shape_env)


def _holds_throughout(condition: Any, ranges: dict[Any, tuple[int, int]]) -> bool:
    """Whether a guard's condition is true for every combination of the symbols' sizes in their ranges
    (false where it reads another symbol)."""
    if condition.free_symbols - set(ranges):
        return False
    return all(condition.xreplace(dict(zip(ranges, sizes))) is sympy.true
               for sizes in itertools.product(*(range(low, high + 1) for low, high in ranges.values())))


def _forget_simplified_sizes(shape_env: Any) -> None:
    """Drop the ShapeEnv's caches of sizes simplified by its ranges and replacements, which changing them
    directly does not tell (torch 2.13 also caches each symbolic size's simplified form)."""
    shape_env._update_version_counter()
    if hasattr(shape_env, "_replacements_version_counter"):
        shape_env._replacements_version_counter += 1


# Reuse by parameters (id, version, data pointer), config and calibration. Held weakly: the compiled
# graphs hold their Reuse, so it lives while one of them does, and no longer.
_REUSE: weakref.WeakValueDictionary[tuple, Reuse] = weakref.WeakValueDictionary()
# How a graph is lowered or checked, not what it computes.
_NOT_IN_SOLUTION = ("mode", "inductor", "verify", "small_tokens")


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
