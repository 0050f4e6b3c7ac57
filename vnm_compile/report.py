"""What the passes did to one graph: per layer, per permutation group, and how long each pass took."""

from __future__ import annotations

import collections
import logging
import os
from dataclasses import dataclass, field

import torch

from .config import VNMConfig
from .format import VNMWeight, analytic_speedup
from .passes.diff import StageDiff
from .passes.discover import Discovery
from .passes.permute import Permutations
from .passes.score import Scores
from .passes.sparsify import Sparsified
from .passes.verify import Verification

log = logging.getLogger("vnm_compile")


@dataclass
class LayerReport:
    name: str                        # module name, e.g. model.layers.3.mlp.up_proj
    node: str                        # FX node
    shape: tuple[int, int]           # (out_features, in_features)
    sparse: bool
    reason: str | None               # why it stays dense
    in_group: int | None
    out_group: int | None
    importance: float | None         # total importance of its weights
    retained: float | None           # fraction of it the mask keeps (with the permutations)
    retained_unpermuted: float | None  # the same without permutations, where searched
    error: float | None              # estimated relative output error
    stats: str | None                # where its activation statistics came from
    weight: VNMWeight | None         # compressed weight, in the permuted channel order
    input_perm: torch.Tensor | None  # position i of the compressed weight holds input channel input_perm[i]
    output_perm: torch.Tensor | None
    parameter: str = ""              # the weight's parameter name
    transposed: bool = False         # the weight is stored in x out (transformers' Conv1D)
    input: str = ""                  # FX node of the layer's input
    measured_error: float | None = None  # ||y' - y|| / ||y|| of its output on the example inputs (explain)
    kernel: str | None = None        # which implementation runs it, and why (explain)
    stored: bool = False             # compressed before this graph (a loaded or sparsified model's layer)

    @property
    def pattern(self) -> str:
        return f"{self.weight.v}:2:{self.weight.m}" if self.weight is not None else "dense"

    @property
    def sparsity(self) -> float:
        return 1 - 2 / self.weight.m if self.weight is not None else 0.0

    @property
    def dense_bytes(self) -> int | None:
        if self.weight is None:
            return None
        return self.shape[0] * self.shape[1] * self.weight.values.element_size()

    @property
    def predicted_speedup(self) -> float | None:
        return analytic_speedup(self.weight.v, self.weight.m) if self.weight is not None else None

    def masked_weight(self) -> torch.Tensor:
        """The compressed weight back in the model's channel order: out x in, zero where pruned."""
        if self.weight is None:
            raise ValueError(f"{self.name} was not sparsified ({self.reason})")
        dense = self.weight.to_dense()
        rows = self.output_perm if self.output_perm is not None else torch.arange(dense.shape[0])
        columns = self.input_perm if self.input_perm is not None else torch.arange(dense.shape[1])
        restored = torch.empty_like(dense)
        restored[rows.to(dense.device)[:, None], columns.to(dense.device)[None, :]] = dense
        return restored


@dataclass
class GroupReport:
    id: int
    size: int
    readers: list[str]               # module names of the linears whose inputs it holds
    writers: list[str]               # ... whose outputs it holds
    permuted: bool
    blocked_by: list[str]            # why it keeps its order (empty if it could be permuted)
    retained_before: float | None    # members' retained importance without / with permutation,
    retained_after: float | None     # as fractions of their total importance
    gain: float | None               # after / before - 1


@dataclass
class Report:
    config: VNMConfig
    layers: list[LayerReport]
    groups: list[GroupReport]
    seconds: dict[str, float]        # per pass
    verification: Verification | None
    permute_stopped: str | None
    blockers: dict[str, str]         # FX node -> why it kept a channel space from being permuted
    stages: list[StageDiff] = field(default_factory=list)  # graph code before/after each stage
    output_error: float | None = None  # relative error of the graph's outputs vs dense (explain)
    # what came from earlier compiles of the same parameters (the vnm backend): per table (snapshots,
    # permutations, folded, compressed, buffers), (entries taken from them, entries looked up)
    reused: dict[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def sparse_layers(self) -> list[LayerReport]:
        return [layer for layer in self.layers if layer.sparse]

    def retained(self, permuted: bool = True) -> float:
        """Fraction of the sparse layers' importance the masks keep, with or without permutation."""
        total = sum(layer.importance for layer in self.sparse_layers)
        field = "retained" if permuted else "retained_unpermuted"
        kept = sum(layer.importance * (getattr(layer, field) if getattr(layer, field) is not None else layer.retained)
                   for layer in self.sparse_layers)
        return kept / total if total else 0.0

    def table(self) -> str:
        config = self.config
        retained = (f", retained importance {self.retained():.2%} (unpermuted {self.retained(False):.2%})"
                    if self.sparse_layers else "")
        lines = [f"vnm {config.v}:2:{config.m} {config.criterion} ({config.method}): "
                 f"{len(self.sparse_layers)} of {len(self.layers)} linears sparse{retained}; "
                 + ", ".join(f"{name} {seconds:.2f}s" for name, seconds in self.seconds.items())]
        width = max([len(layer.name) for layer in self.layers] + [5])
        lines.append(f"{'layer':<{width}}  {'shape':>11}  {'pattern':>8}  {'groups in/out':>13}  {'retained':>8}  "
                     f"{'unperm.':>8}  {'sparsity':>8}  {'bytes dense->sparse':>19}  {'est.err':>7}  "
                     f"{'meas.err':>8}  {'speedup':>7}  kernel / note")
        for layer in self.layers:
            shape = f"{layer.shape[0]}x{layer.shape[1]}"
            groups = f"{_group(layer.in_group)}/{_group(layer.out_group)}"
            size = (f"{_bytes(layer.dense_bytes)}->{_bytes(layer.weight.nbytes)}" if layer.weight is not None else "-")
            speedup = "-" if layer.predicted_speedup is None else f"{layer.predicted_speedup:.2f}x"
            note = ("stored" if layer.stored else layer.kernel) if layer.sparse else layer.reason
            lines.append(f"{layer.name:<{width}}  {shape:>11}  {layer.pattern:>8}  {groups:>13}  "
                         f"{_percent(layer.retained):>8}  {_percent(layer.retained_unpermuted):>8}  "
                         f"{_percent(layer.sparsity if layer.sparse else None):>8}  {size:>19}  "
                         f"{_number(layer.error):>7}  {_number(layer.measured_error):>8}  {speedup:>7}  {note or ''}")
        lines.append(f"{'group':>5}  {'size':>6}  {'in/out':>7}  {'before':>7}  {'after':>7}  {'gain':>7}  status")
        kept_order: dict[str, list[int]] = {}
        for group in self.groups:
            if group.blocked_by:  # the first reason, without the node that gave it
                kept_order.setdefault(group.blocked_by[0].partition(": ")[2], []).append(group.id)
                continue
            lines.append(f"{group.id:>5}  {group.size:>6}  {len(group.readers):>3}/{len(group.writers):<3}  "
                         f"{_percent(group.retained_before):>7}  {_percent(group.retained_after):>7}  "
                         f"{_percent(group.gain, signed=True):>7}  {'permuted' if group.permuted else 'not permuted'}")
        for reason, ids in kept_order.items():
            lines.append(f"kept order, {len(ids)} group(s) ({', '.join(map(str, ids))}): {reason}")
        if self.permute_stopped:
            lines.append(f"permutation search stopped early: {self.permute_stopped}")
        if any(hits for hits, _ in self.reused.values()):
            lines.append("reused from an earlier compile of the same parameters: "
                         + ", ".join(f"{table} {hits}/{lookups}" for table, (hits, lookups) in self.reused.items()))
        if self.verification is not None:
            check = self.verification
            sparse = "" if check.sparse_error is None else f", sparse vs masked dense {check.sparse_error:.2g}"
            lines.append(f"verified ({check.dtype}): permuted vs original {check.permuted_error:.2g}{sparse}")
        if self.output_error is not None:
            lines.append(f"measured output error vs dense on the example inputs: {self.output_error:.4f}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def html(self, path: str | os.PathLike) -> str:
        """Write the report as one self-contained HTML file (table, stage diffs, group graph); returns the path."""
        from .report_html import render_html

        if not isinstance(path, (str, os.PathLike)):
            raise ValueError(f"path must be a file path, got {type(path).__name__}")
        with open(path, "w", encoding="utf-8") as out:
            out.write(render_html(self))
        return os.fspath(path)


def _bytes(count: int | None) -> str:
    if count is None:
        return "-"
    for unit in ("B", "KiB", "MiB"):
        if count < 1024:
            return f"{count:.0f}{unit}" if unit == "B" else f"{count:.1f}{unit}"
        count /= 1024
    return f"{count:.1f}GiB"


def _group(group: int | None) -> str:
    return "-" if group is None else str(group)


def _percent(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.2%}" if signed else f"{value:.2%}"


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def build_report(
    config: VNMConfig,
    discovery: Discovery,
    scores: Scores,
    permutations: Permutations,
    sparse: Sparsified | None,
    verification: Verification | None,
    seconds: dict[str, float],
    stages: list[StageDiff] | None = None,
    reused: dict[str, tuple[int, int]] | None = None,
) -> Report:
    layers = []
    for site in discovery.linears.values():
        result = sparse.layers.get(site.node) if sparse is not None else None
        # from the compression, which a recompile reuses: scoring a weight again costs as much as its first time
        total = result.importance if result is not None else None
        unpermuted = permutations.unpermuted.get(site.node)
        layers.append(LayerReport(
            site.name, site.node, (site.out_features, site.in_features),
            sparse=bool(result and result.sparse),
            reason=result.reason if result else (site.skip_reason or "sparsify=False"),
            in_group=site.in_group, out_group=site.out_group, importance=total,
            retained=result.retained if result else None,
            retained_unpermuted=unpermuted / total if unpermuted is not None and total else None,
            error=result.error if result else None, stats=scores.source.get(site.node),
            weight=result.weight if result else None,
            input_perm=permutations.of(site.in_group), output_perm=permutations.of(site.out_group),
            parameter=site.weight, transposed=site.transposed, input=site.input, stored=site.stored))
    names = {site.node: site.name for site in discovery.linears.values()}
    groups = []
    for group in discovery.groups.values():
        search = permutations.searches.get(group.id)
        groups.append(GroupReport(
            group.id, group.size, [names[node] for node in group.readers], [names[node] for node in group.writers],
            permuted=group.id in permutations.perms, blocked_by=group.blocked_by,
            retained_before=search.before / search.total if search and search.total else None,
            retained_after=search.after / search.total if search and search.total else None,
            gain=search.gain if search else None))
    # the recorder's own list: the lower stage, recorded once Inductor has run, lands in the report too
    return Report(config, layers, groups, seconds, verification, permutations.stopped, discovery.blockers,
                  stages if stages is not None else [], reused=reused or {})


_REPORTS: collections.deque[Report] = collections.deque(maxlen=16)


def reports() -> list[Report]:
    """Reports of the last 16 graphs the vnm backend or `sparsify` handled in this process, oldest
    first. They hold the compressed weights (shared with the compiled graphs while those live)."""
    return list(_REPORTS)


def record(report: Report) -> None:
    """Keep `report` for `reports()` and log it (the entries whose caller gets no report back)."""
    _REPORTS.append(report)
    log.info("%s", report)
