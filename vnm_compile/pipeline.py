"""The passes over one Dynamo graph, in order: each stage reads the `PassState` and adds its result.

    discover -> score -> permute -> fold -> sparsify -> layout -> verify     (vnm_compile/passes/)

A stage is a function `stage(state) -> result` stored on the state under the stage's name; it
returns None where the config turns it off (sparsify=False, verify=False, ...). `run_passes` runs
them, times each, records the graph each hands on (for explain's diffs), and builds the report.
Every entry runs the same stages: the backend (then lowering.lower), `vnm.sparsify`, `explain`, `bisect`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from .calibration import Calibration
from .config import VNMConfig
from .passes import discover, fold, layout, permute, score, sparsify, verify
from .passes.common import Reuse, concrete_inputs, reused
from .passes.diff import StageRecorder
from .passes.discover import Discovery
from .passes.fold import Folded
from .passes.permute import Permutations
from .passes.score import Scores
from .passes.sparsify import Sparsified
from .passes.verify import Verification
from .report import Report, build_report

log = logging.getLogger("vnm_compile")


@dataclass
class PassState:
    """What the stages share. Inputs: Dynamo's graph, its parameters (FX node -> (name, live tensor),
    read and never written), the example inputs Dynamo gave, the config and calibration, linears a
    caller keeps dense (`extra_skips`, name -> reason), and the work of earlier compiles of the same
    parameters (`reuse`). Then each stage's result, in order."""

    gm: fx.GraphModule
    found: dict[str, tuple[str, torch.Tensor]]
    example_inputs: list[Any]
    config: VNMConfig
    calibration: Calibration | None = None
    extra_skips: dict[str, str] = field(default_factory=dict)
    reuse: Reuse | None = None
    discover: Discovery | None = None
    score: Scores | None = None
    permute: Permutations | None = None
    fold: Folded | None = None
    sparsify: Sparsified | None = None
    layout: dict[str, list[str]] | None = None
    verify: Verification | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    recorder: StageRecorder | None = None
    report: Report | None = None

    def __post_init__(self) -> None:
        self.parameters = {node: name for node, (name, _) in self.found.items()}
        self.weights = {name: reused(self.reuse, "parameters", id(tensor), tensor.detach)
                        for name, tensor in self.found.values()}

    def inputs(self) -> list[Any]:
        """Fresh concrete inputs for one run of Dynamo's graph (parameters by their live values)."""
        placeholders = {node: self.weights[name] for node, name in self.parameters.items()}
        return concrete_inputs(self.gm, self.example_inputs, placeholders)

    @property
    def graph(self) -> fx.GraphModule:
        """The latest graph: sparse, else permuted dense, else Dynamo's."""
        if self.sparsify is not None:
            return self.sparsify.gm
        return self.fold.gm if self.fold is not None else self.gm


# (name, stage, whether it hands on a graph to record)
STAGES: tuple[tuple[str, Callable[[PassState], Any], bool], ...] = (
    ("discover", discover, True),
    ("score", score, True),
    ("permute", permute, True),
    ("fold", fold, True),
    ("sparsify", sparsify, True),
    ("layout", layout, True),
    ("verify", verify, False),
)


def run_passes(gm: fx.GraphModule, example_inputs: list[Any], found: dict[str, tuple[str, torch.Tensor]],
               config: VNMConfig, calibration: Calibration | None = None, extra_skips: dict[str, str] | None = None,
               reuse: Reuse | None = None) -> PassState:
    """Run every stage on a Dynamo graph whose parameters are `found` (`graph_parameters`, taken while
    Dynamo's metadata is still on the graph); `state.graph` is the rewritten graph, `state.report`
    what happened. `reuse`, made for exactly these parameters and this config, lends the work of
    earlier compiles and keeps this one's; the report's `reused` says what was taken."""
    if config.pattern != "vnm":
        raise ValueError(f"pattern={config.pattern!r} makes masked dense weights, which no kernel runs: the "
                         "passes take pattern='vnm' (use vnm_compile.compress_sequential for N:M patterns)")
    if config.refine is not None:
        raise ValueError("refine needs the block-by-block path (vnm_compile.compress_sequential); "
                         "the passes compress one layer at a time")
    state = PassState(gm, found, example_inputs, config, calibration, dict(extra_skips or {}), reuse)
    earlier = reuse.tally() if reuse is not None else {}
    state.recorder = StageRecorder(gm)  # the graph code after each stage, diffed against the one before
    for name, stage, records in STAGES:
        start = time.perf_counter()
        result = stage(state)
        if result is None:
            continue
        setattr(state, name, result)
        state.seconds[name] = time.perf_counter() - start
        if records:
            state.recorder.record(name, state.graph)
    reused = reuse.tally(since=earlier) if reuse is not None else None
    state.report = build_report(config, state.discover, state.score, state.permute, state.sparsify, state.verify,
                                state.seconds, state.recorder.stages, reused)
    if config.sparsify and not state.report.sparse_layers:
        reasons = sorted({layer.reason for layer in state.report.layers})
        log.warning("vnm: none of the %d linears of this graph is sparsified%s", len(state.report.layers),
                    f" ({'; '.join(reasons[:3])})" if reasons else ": it holds no nn.Linear or Conv1D")
    return state
