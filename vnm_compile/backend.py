"""The "vnm" torch.compile backend: the passes on Dynamo's graph, then Inductor.

    model = torch.compile(model, backend="vnm", options={"v": 64, "m": 8})

Dynamo hands over the graph and, as example inputs, the real parameters. The passes read them in
place, never writing to them; the compiled graph is frozen (inference only, like Inductor's
freezing): it reads permuted, compressed copies, and clones of the parameters it reads unchanged,
and ignores the live parameters. No dense copy of a compressed weight outlives its compile.
`options` are VNMConfig's fields, plus "calibration": the result of
`vnm_compile.calibrate(model, batches)`, and "explain": the path of an HTML report
(`vnm_compile.explain`) to write for each compiled graph.

Dynamo compiles one model into several graphs (another input shape, the dynamic-shape graph, the
decode graph). A graph that reads the same parameter tensors, unchanged, under the same config as
an earlier one takes that compile's work (`Reuse`): one permutation search, one compressed copy of
each weight, and the same buffers in every graph. The compiled graphs hold it; it is freed with them.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import gc
import logging
import os
import time
import weakref
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import fx

from .calibration import Calibration
from .config import VNMConfig
from .passes import channel_major_layouts, discover, fold, permute, score, sparsify, verify
from .passes.common import Reuse, concrete_inputs, graph_parameters
from .passes.diff import StageRecorder
from .passes.fold import Folded
from .passes.sparsify import compressor
from .report import Report, build_report

log = logging.getLogger("vnm_compile")

_REPORTS: collections.deque[Report] = collections.deque(maxlen=16)


def reports() -> list[Report]:
    """Reports of the last 16 graphs the vnm backend (or `sparsify`) handled in this process, oldest
    first. They hold the compressed weights (shared with the compiled graphs while those live)."""
    return list(_REPORTS)


@dataclass
class Transformed:
    gm: fx.GraphModule   # the rewritten graph: sparse, or permuted dense with sparsify=False
    report: Report
    folded: Folded       # the permuted parameters
    stages: StageRecorder


def transform(
    gm: fx.GraphModule,
    example_inputs: list[Any],
    found: dict[str, tuple[str, torch.Tensor]],
    config: VNMConfig,
    calibration: Calibration | None = None,
    extra_skips: dict[str, str] | None = None,
    reuse: Reuse | None = None,
) -> Transformed:
    """Run discover, score, permute, fold, sparsify, layout (and verify) on a Dynamo graph whose parameters
    are `found` (`graph_parameters`, taken while Dynamo's metadata is still on the graph).

    `reuse`, made for exactly these parameters and this config (`_reuse_for`), lends the work of
    earlier compiles and keeps this one's; the report's `reused` says what was taken."""
    compressor(config.method)  # an unavailable method fails here, before any work
    if config.refine_steps:
        raise ValueError("refine_steps > 0 needs the block-by-block path (vnm_compile.sequential.compress_sequential); "
                         "the passes compress one layer at a time")
    names = {node: name for node, (name, _) in found.items()}
    earlier = reuse.tally() if reuse is not None else {}
    weights = {name: reuse.cached("parameters", id(tensor), tensor.detach) if reuse is not None else tensor.detach()
               for name, tensor in found.values()}
    placeholders = {node: weights[name] for node, name in names.items()}
    inputs: Callable[[], list[Any]] = lambda: concrete_inputs(gm, example_inputs, placeholders)
    seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def timed(name: str):
        start = time.perf_counter()
        yield
        seconds[name] = time.perf_counter() - start

    stages = StageRecorder(gm)  # the graph code after each stage, diffed against the one before
    with timed("discover"):
        discovery = discover(gm, names, config, extra_skips)
    stages.record("discover", gm)
    with timed("score"):
        scores = score(gm, discovery, weights, inputs(), config, calibration)
    stages.record("score", gm)
    with timed("permute"):
        permutations = permute(discovery, scores, config, reuse)
    stages.record("permute", gm)
    with timed("fold"):
        folded = fold(gm, discovery, names, weights, permutations, reuse)
    stages.record("fold", folded.gm)
    sparse = None
    if config.sparsify:
        with timed("sparsify"):
            sparse = sparsify(folded, discovery, scores, permutations, config, reuse)
        stages.record("sparsify", sparse.gm)
        if config.inductor:  # the copies it adds are free only where Inductor fuses them into their producer
            with timed("layout"):
                channel_major_layouts(sparse.gm)
            stages.record("layout", sparse.gm)
    verification = None
    if config.verify:
        with timed("verify"):
            verification = verify(gm, folded.gm, sparse, discovery, permutations, inputs)
    reused = reuse.tally(since=earlier) if reuse is not None else None
    report = build_report(config, discovery, scores, permutations, sparse, verification, seconds, stages.stages,
                          reused)
    _REPORTS.append(report)
    log.info("%s", report)
    return Transformed(sparse.gm if sparse is not None else folded.gm, report, folded, stages)


def lower(transformed: Transformed, example_inputs: list[Any], record: bool = False) -> Callable:
    """The rewritten graph compiled by Inductor, in the config's mode ("reduce-overhead": CUDA graphs).
    The graph Inductor lowers becomes the report's "lower" stage where `record` is set or the stages
    are logged (`StageRecorder.lowering`)."""
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx

    patches = list_mode_options(transformed.report.config.mode)
    with torch.no_grad(), transformed.stages.lowering(always=record):  # an inference graph: gradients are refused
        return compile_fx(transformed.gm, example_inputs, config_patches=patches)


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
    transformed = transform(gm, example_inputs, found, config, calibration, reuse=reuse)
    _freeze(transformed.gm, [tensor for _, tensor in found.values()], reuse)
    compiled = lower(transformed, example_inputs, record=explain_path is not None) if config.inductor else transformed.gm
    if explain_path is not None:
        from .explain import write_explanation

        write_explanation(transformed, gm, example_inputs, found, explain_path)
    # The permuted dense weights live in graph modules, which are reference cycles: free them now,
    # not at some later collection, so that they never hold memory the model runs with.
    del transformed
    gc.collect()
    return _inference_only(compiled, reuse)


def _freeze(gm: fx.GraphModule, parameters: list[torch.Tensor], reuse: Reuse | None) -> None:
    """Give `gm` clones of the live parameters it reads unchanged (norms, embeddings, the linears
    that stay dense), so that later writes to the model never reach the compiled graph. With
    `reuse`, every graph of the model reads the same clone."""
    storages = {tensor.untyped_storage().data_ptr() for tensor in parameters}
    for name, buffer in list(gm.named_buffers()):
        if buffer.untyped_storage().data_ptr() in storages:
            clone = (reuse.cached("snapshots", id(buffer), buffer.clone) if reuse is not None else buffer.clone())
            owner, _, leaf = name.rpartition(".")
            gm.get_submodule(owner).register_buffer(leaf, clone)


# Reuse by parameters (id, version, data pointer), config and calibration. Held weakly: the compiled
# graphs hold their Reuse, so it lives while one of them does, and no longer.
_REUSE: weakref.WeakValueDictionary[tuple, Reuse] = weakref.WeakValueDictionary()
# How a graph is lowered or checked, not what it computes.
_NOT_IN_SOLUTION = ("mode", "inductor", "verify")


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


def _inference_only(compiled: Callable, reuse: Reuse | None = None) -> Callable:
    def run(*args: Any) -> Any:
        anchor = next((arg for arg in args if isinstance(arg, torch.Tensor) and arg.requires_grad), None)
        if anchor is None or not torch.is_grad_enabled():
            return compiled(*args)
        with torch.no_grad():
            outputs = compiled(*args)
        differentiable = [isinstance(out, torch.Tensor) and out.is_floating_point() for out in outputs]
        wrapped = iter(_FrozenSnapshot.apply(anchor, *[out for out, d in zip(outputs, differentiable) if d]))
        return type(outputs)(next(wrapped) if d else out for out, d in zip(outputs, differentiable))

    run.reuse = reuse  # the work shared with the model's other compiled graphs lives as long as one of them
    return run
