"""permute: channel permutations under which the V:N:M mask keeps more importance.

Objective. A linear with importance S (out x in), output permutation Po and input permutation Pi
retains sum(S' * mask(S')), S' = S[Po][:, Pi], mask = the V:N:M mask of S' (config.column_select).
A group's permutation moves the columns of its readers and the rows of its writers; a group step
maximises the sum over the group's members with every other group's permutation held fixed. Steps
visit the groups in graph order, config.permute_rounds times: a linear's input and output
permutations are improved in turn.

One group step. Positions are taken slot by slot: slot k holds the positions p with p % m == k,
one in each column group of m. The channels in slot k are lifted out and put back by one
`linear_sum_assignment`, the gain of channel c at position p being
  readers: over the row blocks b, relu(c's column sum in b - the 4th largest column sum among the
    other m-1 channels of p's column group): what c adds to the block's 4 best columns. At m = 4
    every block keeps all its columns and only each row's 2 of 4 matter, so the sum runs over rows
    with the 2nd largest score of the 3 others as the threshold;
  writers: c's row summed over the columns p's row block keeps (the 4 largest column sums in each
    group of m of the block's other rows): what c's row keeps if the block's choice stays. At m = 4
    the row order does not change the objective and writers add nothing.
These gains approximate the objective (the exact gain of a move depends on every channel of a block
at once, and each row keeps only 2 of the 4 columns), so after each step the true objective is
evaluated and the step is kept only if it improved: permuting never retains less than not permuting.
Each assignment is len(slot) = n/m square (1376 for a 11008-channel group at m = 8); a slot of more
than MAX_ASSIGNMENT positions is cut into consecutive chunks solved one by one.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from scipy.optimize import linear_sum_assignment
from tqdm.auto import tqdm

from ..config import VNMConfig
from ..format import KEPT_COLUMNS, KEPT_PER_ROW, vnm_mask
from .common import reused
from .discover import Discovery, Group
from .score import Scores

if TYPE_CHECKING:
    from ..pipeline import PassState

MAX_ASSIGNMENT = 2048
# Elements of the temporary that one slice of the readers' gain may hold.
_GAIN_CHUNK = 1 << 24


@dataclass
class GroupSearch:
    """A group's members' importance: in total, retained without permutation, and with the final ones."""

    group: int
    total: float
    before: float
    after: float
    steps: int
    steps_kept: int
    seconds: float

    @property
    def gain(self) -> float:
        """Relative gain in retained importance, after / before - 1."""
        return self.after / self.before - 1 if self.before > 0 else 0.0


@dataclass
class Permutations:
    perms: dict[int, torch.Tensor]   # group id -> perm: position i holds original channel perm[i]
    searches: dict[int, GroupSearch]
    unpermuted: dict[str, float]     # linear node -> importance its mask retains without permutation
    stopped: str | None = None       # why the search stopped before its last round

    def of(self, group: int | None) -> torch.Tensor | None:
        return None if group is None else self.perms.get(group)


def permute(state: PassState) -> Permutations:
    """Search one permutation per permutable group that holds linears to sparsify.

    With `state.reuse`, the permutations an earlier compile of the same parameters found are taken if it
    searched every group of this graph (a group known by the parameter dimensions it holds and its
    size, whatever discovery numbered it); otherwise all groups are searched and stored for the next."""
    discovery, scores, config, reuse = state.discover, state.score, state.config, state.reuse
    members = scores.importance
    groups = [group for group in discovery.groups.values()
              if group.permutable and group.size > 1 and _members(group, members)]
    if not config.permute or not config.permute_rounds or not groups:
        return Permutations({}, {}, {})
    search = _Search(discovery, scores, config)
    involved = {node for group in groups for node in _members(group, members)}

    def retained(node: str, perms: dict[int, torch.Tensor], known: float | None = None) -> float:
        """search.retained, kept in `reuse` for permutations it holds (by their ids): a reused graph
        takes the numbers of the compile that found its permutations instead of masking every weight again."""
        compute = (lambda: known) if known is not None else (lambda: search.retained(node, perms))
        site = discovery.linears[node]
        used = [perms.get(group) for group in (site.out_group, site.in_group)]
        key = (site.weight, site.transposed, *(None if perm is None else id(perm) for perm in used))
        return reused(reuse, "retained", key, compute, keep=used)

    def total(node: str) -> float:
        """The linear's total importance, kept in `reuse` like `retained`."""
        site = discovery.linears[node]
        return reused(reuse, "importance", (site.weight, site.transposed),
                      lambda: float(members[node].sum(dtype=torch.float64)))

    before = {node: retained(node, {}) for node in involved}
    signatures = {group.id: (frozenset(group.dims), group.size) for group in groups}
    recalled = reuse.recall("permutations", signatures.values()) if reuse is not None else None
    if recalled is not None:
        perms = {group: recalled[signature] for group, signature in signatures.items()
                 if recalled[signature] is not None}
        current = {node: retained(node, perms) for node in involved}
        steps, stopped = {group.id: [0, 0, 0.0] for group in groups}, None
    else:
        perms, current, steps, stopped = _search_groups(groups, search, before, config)
        if reuse is not None:  # a group searched and left in order is stored too, as None
            reuse.store("permutations", {signatures[group.id]: perms.get(group.id) for group in groups})
            current = {node: retained(node, perms, known=current[node]) for node in involved}
    searches = {}
    for group in groups:
        nodes = _members(group, members)
        count, kept, seconds = steps[group.id]
        searches[group.id] = GroupSearch(group.id, sum(map(total, nodes)), sum(before[node] for node in nodes),
                                         sum(current[node] for node in nodes), count, kept, seconds)
    return Permutations(perms, searches, before, stopped)


def _search_groups(groups: list[Group], search: _Search, before: dict[str, float], config: VNMConfig
                   ) -> tuple[dict[int, torch.Tensor], dict[str, float], dict[int, list], str | None]:
    """Alternating group steps, config.permute_rounds times: the permutations, each linear's retained
    importance under them, per group [steps, steps kept, seconds], and why the search stopped early.

    A step reads the permutations of the groups that share a linear with its group, no others. So
    each round runs in waves (`_waves`): a group's step starts once every neighbour before it in
    graph order has stepped, beside the other groups that are ready, on threads (scipy's assignment
    releases the GIL). The steps and their results are those of stepping the groups one by one."""
    members = search.importance
    perms: dict[int, torch.Tensor] = {}
    current = dict(before)
    steps = {group.id: [0, 0, 0.0] for group in groups}
    deadline = time.monotonic() + config.permute_budget_s
    waves = _waves(groups, members)
    progress = tqdm(total=config.permute_rounds * len(groups), desc="vnm permute", unit="group",
                    disable=None, leave=False)

    def step(group: Group, perms: dict[int, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float], float]:
        start = time.perf_counter()
        perm = search.step(group, perms)
        trial = {**perms, group.id: perm}
        retained = {node: search.retained(node, trial) for node in _members(group, members)}
        progress.update()
        return perm, retained, time.perf_counter() - start

    with progress, ThreadPoolExecutor(max_workers=max(1, min(max(map(len, waves)), os.cpu_count() or 1))) as pool:
        for round_index in range(config.permute_rounds):
            for wave in waves:
                if time.monotonic() > deadline:
                    return perms, current, steps, (f"time budget of {config.permute_budget_s:g} s spent in "
                                                   f"round {round_index + 1}")
                results = list(pool.map(functools.partial(step, perms=perms), wave))
                for group, (perm, retained, seconds) in zip(wave, results):
                    kept = sum(retained.values()) > sum(current[node] for node in retained)
                    if kept:  # the wave's groups share no linear: their updates are disjoint
                        perms, current = {**perms, group.id: perm}, {**current, **retained}
                    record = steps[group.id]
                    record[0] += 1
                    record[1] += kept
                    record[2] += seconds
    return perms, current, steps, None


def _waves(groups: list[Group], members: Mapping[str, torch.Tensor]) -> list[list[Group]]:
    """The groups (in graph order) as waves: each group one wave after the latest of the groups
    before it that share a linear with it. Groups of one wave share no linear."""
    wave_of: dict[int, int] = {}
    last_wave_reading: dict[str, int] = {}  # linear -> the latest wave of a group it belongs to
    for group in groups:
        nodes = _members(group, members)
        wave_of[group.id] = 1 + max((last_wave_reading[node] for node in nodes if node in last_wave_reading),
                                    default=-1)
        for node in nodes:
            last_wave_reading[node] = wave_of[group.id]
    waves: list[list[Group]] = [[] for _ in range(max(wave_of.values(), default=-1) + 1)]
    for group in groups:
        waves[wave_of[group.id]].append(group)
    return waves


def _members(group: Group, members: dict) -> list[str]:
    return list(dict.fromkeys(node for node in group.readers + group.writers if node in members))


class _Search:
    def __init__(self, discovery: Discovery, scores: Scores, config: VNMConfig):
        self.linears = discovery.linears
        self.importance = scores.importance
        self.v, self.m, self.column_select = config.v, config.m, config.column_select

    def _permuted(self, node: str, perms: dict[int, torch.Tensor]) -> torch.Tensor:
        site, scores = self.linears[node], self.importance[node]
        if site.out_group in perms:
            scores = scores[perms[site.out_group].to(scores.device)]
        if site.in_group in perms:
            scores = scores[:, perms[site.in_group].to(scores.device)]
        return scores

    def retained(self, node: str, perms: dict[int, torch.Tensor]) -> float:
        scores = self._permuted(node, perms)
        mask = vnm_mask(scores, self.v, self.m, self.column_select)
        return float(torch.where(mask, scores, 0).sum(dtype=torch.float64))

    def step(self, group: Group, perms: dict[int, torch.Tensor]) -> torch.Tensor:
        """One sweep over the m slots of the group's positions; returns the new permutation."""
        n, v, m = group.size, self.v, self.m
        perm = perms.get(group.id, torch.arange(n)).clone()  # on the CPU, like the assignment solver
        others = {key: value for key, value in perms.items() if key != group.id}
        units, rows = [], []
        for node in group.readers:  # their columns, in original order
            if node in self.importance:
                scores = self._permuted(node, others)
                if self.linears[node].out_group == group.id:  # writes its own input space
                    scores = scores[perm.to(scores.device)]
                if m > KEPT_COLUMNS:  # a block's column choice: its column sums
                    scores = torch.nn.functional.pad(scores, (0, 0, 0, -scores.shape[0] % v)).view(-1, v, n).sum(1)
                units.append(scores)
        for node in group.writers:  # their rows, in original order
            if node in self.importance and m > KEPT_COLUMNS:
                scores = self._permuted(node, others)
                if self.linears[node].in_group == group.id:  # reads its own output space
                    scores = scores[:, perm.to(scores.device)]
                rows.append(torch.nn.functional.pad(scores, (0, -scores.shape[1] % m)))
        for slot in range(m):
            for chunk in torch.arange(slot, n, m).split(MAX_ASSIGNMENT):
                channels = perm[chunk]
                gain = torch.zeros(len(chunk), len(chunk), dtype=torch.float64)
                for unit_scores in units:
                    on = unit_scores.device
                    gain += _reader_gain(unit_scores, perm.to(on), chunk.to(on), channels.to(on), slot, m).cpu()
                for row_scores in rows:
                    on = row_scores.device
                    gain += _writer_gain(row_scores, perm.to(on), chunk.to(on), channels.to(on), v, m).cpu()
                assigned, position = linear_sum_assignment(gain.numpy(), maximize=True)
                perm[chunk[torch.from_numpy(position)]] = channels[torch.from_numpy(assigned)]
        return perm


def _reader_gain(sums: torch.Tensor, perm: torch.Tensor, chunk: torch.Tensor, channels: torch.Tensor,
                 slot: int, m: int) -> torch.Tensor:
    """gain[i, j]: what channel channels[i] adds to the best columns of the column group of position
    chunk[j], summed over units: row blocks (sums of their rows, 4 kept of m) or, at m = 4, rows
    (2 kept of 4). sums is [units, n], channels in original order."""
    n = perm.numel()
    kept = KEPT_COLUMNS if m > KEPT_COLUMNS else KEPT_PER_ROW
    offsets = torch.tensor([k for k in range(m) if k != slot], device=sums.device)
    neighbours = (chunk // m * m)[:, None] + offsets          # [L, m-1] positions
    present = neighbours < n
    values = sums[:, perm[neighbours.clamp(max=n - 1)]] * present  # absent (padding) columns score 0
    threshold = values.topk(kept, dim=-1).values[..., -1]  # [units, L]: the last one kept now
    candidate = sums[:, channels]                              # [units, L]
    gain = torch.zeros(len(chunk), len(chunk), dtype=torch.float64, device=sums.device)
    step = max(1, _GAIN_CHUNK // (len(chunk) ** 2))
    for b0 in range(0, sums.shape[0], step):
        gain += (candidate[b0:b0 + step, :, None] - threshold[b0:b0 + step, None, :]).clamp_min(0).sum(0)
    return gain


def _writer_gain(rows: torch.Tensor, perm: torch.Tensor, chunk: torch.Tensor, channels: torch.Tensor,
                 v: int, m: int) -> torch.Tensor:
    """gain[i, j]: channel channels[i]'s row summed over the columns kept by the row block of position
    chunk[j], as chosen by that block's other rows. rows is [n, C padded to m], rows in original order."""
    n, width = rows.shape
    staying = rows[perm]                                      # rows by position
    staying[chunk] = 0
    column_sums = torch.nn.functional.pad(staying, (0, 0, 0, -n % v)).view(-1, v, width).sum(1)
    grouped = column_sums.view(column_sums.shape[0], -1, m)  # m > 4 here: at m = 4 writers add nothing
    kept = torch.zeros_like(grouped).scatter_(-1, grouped.topk(KEPT_COLUMNS, dim=-1).indices, 1.0)
    return (rows[channels] @ kept.view_as(column_sums).T)[:, chunk // v]
