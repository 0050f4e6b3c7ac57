"""What the passes did to one graph: per layer, per permutation group, and how long each pass took."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import VNMConfig
from .format import VNMWeight
from .passes.discover import Discovery
from .passes.permute import Permutations
from .passes.score import Scores
from .passes.sparsify import Sparsified
from .passes.verify import Verification


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
        lines.append(f"{'layer':<{width}}  {'shape':>11}  {'status':<6}  {'retained':>8}  {'unperm.':>8}  "
                     f"{'est.err':>7}  {'groups in/out':>13}  note")
        for layer in self.layers:
            shape = f"{layer.shape[0]}x{layer.shape[1]}"
            groups = f"{_group(layer.in_group)}/{_group(layer.out_group)}"
            lines.append(f"{layer.name:<{width}}  {shape:>11}  {'sparse' if layer.sparse else 'dense':<6}  "
                         f"{_percent(layer.retained):>8}  {_percent(layer.retained_unpermuted):>8}  "
                         f"{_number(layer.error):>7}  {groups:>13}  {layer.reason or ''}")
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
        if self.verification is not None:
            check = self.verification
            sparse = "" if check.sparse_error is None else f", sparse vs masked dense {check.sparse_error:.2g}"
            lines.append(f"verified ({check.dtype}): permuted vs original {check.permuted_error:.2g}{sparse}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


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
) -> Report:
    layers = []
    for site in discovery.linears.values():
        result = sparse.layers.get(site.node) if sparse is not None else None
        importance = scores.importance.get(site.node)
        total = float(importance.sum(dtype=torch.float64)) if importance is not None else None
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
            input_perm=permutations.of(site.in_group), output_perm=permutations.of(site.out_group)))
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
    return Report(config, layers, groups, seconds, verification, permutations.stopped, discovery.blockers)
