"""diff: what each stage did to the graph, as a unified diff of the FX code with provenance.

Before a stage runs, every node of its input graph is stamped with its own name (node.meta[ORIGIN]).
The passes copy a node's meta onto the node that takes its place (`read.meta = dict(node.meta)`,
`graph_copy`), so after the stage a node whose stamp names another node replaced that node, and a
node without a stamp is new. The stamps are refreshed for the next stage.

The last stage, "lower", is Inductor's: the graph it lowers to kernels, after AOT autograd, the
decompositions and its own post-grad passes, captured by `capture_lowering`. Those aten nodes carry
torch's provenance (`node.meta["from_node"]`), which names the node of our graph each came from.

Each stage's graphs are also logged: the diffs on the "vnm_compile.stages" logger at INFO (shown by
`TORCH_LOGS=vnm_compile`), the graph code as TORCH_TRACE structured artifacts (for tlparse).
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

from torch import fx
from torch._inductor import config as inductor_config
from torch._inductor.custom_graph_pass import CustomGraphPass

ORIGIN = "vnm_origin"
_ASSIGNMENT = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*) = ")

log = logging.getLogger("vnm_compile.stages")


@dataclass
class StageDiff:
    stage: str
    before: str                          # graph code the stage was given
    after: str                           # graph code it handed on, new nodes annotated with what they replace
    provenance: dict[str, str] = field(default_factory=dict)  # new node -> the node it replaced, or "new"

    @property
    def changed(self) -> bool:
        return self.before != self.after

    def unified(self, context: int = 3) -> str:
        lines = difflib.unified_diff(self.before.splitlines(), self.after.splitlines(),
                                     f"before {self.stage}", f"after {self.stage}", n=context, lineterm="")
        return "\n".join(lines)


class StageRecorder:
    """Call `record(stage, gm)` with the graph each stage hands on, in pipeline order."""

    def __init__(self, gm: fx.GraphModule):
        self.stages: list[StageDiff] = []
        self._code = _stamp(gm)
        self._names = {node.name for node in gm.graph.nodes}

    def record(self, stage: str, gm: fx.GraphModule) -> StageDiff:
        provenance = _provenance(gm)
        after = _graph_code(gm, provenance)
        if after == self._code:  # share the text: reports of big graphs stay small
            after = self._code
        diff = StageDiff(stage, self._code, after, provenance)
        self.stages.append(diff)
        self._code = _stamp(gm) if provenance else after
        self._names = {node.name for node in gm.graph.nodes}
        _log(diff)
        return diff

    @contextlib.contextmanager
    def lowering(self, always: bool = False) -> Iterator[None]:
        """Record the graphs Inductor lowers within the block as the "lower" stage, each aten node
        annotated with the node of the last recorded graph it came from; unless `always`, only
        where the stages are logged or traced (recording bypasses Inductor's FX graph cache)."""
        if not (always or log.isEnabledFor(logging.INFO) or os.environ.get("TORCH_TRACE")):
            yield
            return
        hook = _LoweredGraphs(inductor_config.post_grad_custom_post_pass, self._names)
        with inductor_config.patch(post_grad_custom_post_pass=hook):
            yield
        if hook.codes:
            diff = StageDiff("lower", self._code, "".join(hook.codes), hook.provenance)
            self.stages.append(diff)
            _log(diff)


class _LoweredGraphs(CustomGraphPass):
    """Inductor's post-grad custom pass that keeps the code of the graphs it is given (after running
    the pass configured before it, if any). It has no uuid, so Inductor bypasses its FX graph cache
    while it is installed: a cache hit would skip the pass and leave nothing to show."""

    def __init__(self, previous, known: set[str]):
        self.previous = previous if isinstance(previous, (list, tuple)) else [previous]
        self.known = known
        self.codes: list[str] = []
        self.provenance: dict[str, str] = {}

    def __call__(self, graph: fx.Graph) -> None:
        for custom_pass in self.previous:
            if custom_pass is not None:
                custom_pass(graph)
        origins = {node.name: _lowered_from(node, self.known) for node in graph.nodes}
        origins = {name: origin for name, origin in origins.items() if origin is not None and origin != name}
        self.provenance.update(origins)
        self.codes.append(_graph_code(graph, {name: f"lowered from {origin}" for name, origin in origins.items()}))

    def uuid(self) -> None:
        return None


def _stamp(gm: fx.GraphModule) -> str:
    """Stamp every node with its name; the graph's code, for the next stage's diff."""
    for node in gm.graph.nodes:
        node.meta[ORIGIN] = node.name
    return _graph_code(gm, {})


def _provenance(gm: fx.GraphModule) -> dict[str, str]:
    """New node -> what it replaced: the node whose meta it carries, or for an unstamped node,
    "new" plus the replacement it feeds (e.g. the compressed values a vnm.linear reads)."""
    provenance = {}
    for node in gm.graph.nodes:
        origin = node.meta.get(ORIGIN)
        if origin is not None and origin != node.name:
            provenance[node.name] = origin + _from_node(node)
    for node in gm.graph.nodes:
        if ORIGIN not in node.meta and node.op != "output":  # copied graphs make a fresh output node
            fed = [user.name for user in node.users if user.name in provenance]
            provenance[node.name] = "new" + (f", read by {fed[0]}" if fed else "")
    return provenance


def _from_node(node: fx.Node) -> str:
    """torch's own provenance, where the graph carries it."""
    sources = node.meta.get("from_node") or []
    names = [getattr(source, "name", None) for source in sources]
    names = [name for name in names if name and name != node.meta.get(ORIGIN)]
    return f" (from {', '.join(names)})" if names else ""


def _lowered_from(node: fx.Node, known: set[str]) -> str | None:
    """The first node named in torch's provenance chain of `node` that the graph before lowering has."""
    sources = list(node.meta.get("from_node") or [])
    while sources:
        source = sources.pop(0)
        if getattr(source, "name", None) in known:
            return source.name
        sources.extend(getattr(source, "from_node", None) or [])
    return None


def _graph_code(gm: fx.GraphModule | fx.Graph, provenance: dict[str, str]) -> str:
    """The graph's Python code without torch's source comments, each new node's line annotated."""
    graph = gm.graph if isinstance(gm, fx.GraphModule) else gm
    code = graph.python_code("self").src
    lines = []
    for line in code.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        assigned = _ASSIGNMENT.match(line)
        if assigned and assigned.group(1) in provenance:
            origin = provenance[assigned.group(1)]
            line += f"  # {origin}" if origin.startswith(("new", "lowered")) else f"  # replaces {origin}"
        lines.append(line)
    return "\n".join(lines) + "\n"


def _log(diff: StageDiff) -> None:
    if log.isEnabledFor(logging.INFO):
        log.info("vnm stage %s:\n%s", diff.stage, diff.unified() if diff.changed else "(graph unchanged)")
    try:
        from torch._logging import trace_structured
    except ImportError:  # a torch without structured tracing
        return
    trace_structured("artifact", metadata_fn=lambda: {"name": f"vnm_after_{diff.stage}", "encoding": "string"},
                     payload_fn=lambda: diff.after)
    if diff.changed:
        trace_structured("artifact", metadata_fn=lambda: {"name": f"vnm_diff_{diff.stage}", "encoding": "string"},
                         payload_fn=diff.unified)
