"""Transposable N:M masks: n kept per row AND per column of every m x m block.

A plain N:M weight is not N:M once transposed, so the backward pass (which reads W^T) gets no sparse
speedup; a transposable mask serves both. Choosing the mask that keeps the most score is, block by
block, a capacitated optimal-transport problem: maximise <scores, X> with row and column sums n and
0 <= X <= 1 (its optimum is a 0/1 matrix). `transposable_mask` solves it as TSENOR does (Meng, Makni
and Mazumder, 2025): entropy-regularised with an annealed regularisation, by Dykstra's alternating
projections tensorised over all blocks at once, then rounded to a feasible mask.

Also here: `nm_mask` (plain row-wise N:M, for comparison), `greedy_transposable_mask` (the simple
baseline: the same rounding keyed on the raw scores) and `exact_transposable_mask` (the optimum, by
enumeration for small blocks and by a linear program otherwise; the reference the gap is measured
against). Shapes that m does not divide are padded with zero scores inside and cropped back.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable

import numpy as np
import scipy.optimize
import scipy.sparse
import torch

from .format import _check_scores, _padded

# Dykstra defaults: the regularisation tau (in units of the block's largest score) grows
# geometrically from TAU_START to TAU_END over ITERATIONS rounds of (row, column, box) projections.
# Tuned on 256 x 256 scores (|randn|, Wanda-like, heavy-tailed, outliers, ties, row- and column-
# scaled): the retained score is within 0.3% of the optimum at 2:4 to 16:32 (mostly within 0.1%);
# fewer rounds or a faster schedule lose more at m >= 8, later taus gain little.
ITERATIONS = 200
TAU_START = 20.0
TAU_END = 400.0
# Block elements solved per chunk. On the CPU a chunk's temporaries stay in cache through the ~15
# passes of a Dykstra round (twice as fast as one big chunk at 4096 x 4096); on a GPU chunks are as
# large as a few hundred MB of temporaries allow, so each kernel launch does more work.
_CHUNK_ELEMENTS = {"cpu": 1 << 18, "other": 1 << 24}
# Exact reference: enumerate the feasible blocks when there are at most _MAX_ENUMERATED (found among
# at most _MAX_CANDIDATES row-pattern combinations); otherwise solve linear programs.
_MAX_ENUMERATED = 5000
_MAX_CANDIDATES = 250_000
_LP_BLOCKS_PER_SOLVE = 64  # one LP for many blocks is faster per block, up to about this many


def _check_pattern(n: object, m: object) -> None:
    if not isinstance(m, int) or isinstance(m, bool) or m < 2:
        raise ValueError(f"m must be an integer >= 2 (the block side), got {m!r}")
    if not isinstance(n, int) or isinstance(n, bool) or not 0 < n < m:
        raise ValueError(f"n must be an integer with 0 < n < m = {m} (kept per row and column), got {n!r}")


def _blocks(t: torch.Tensor, m: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """t (R x C) as m x m blocks [B, m, m] of `dtype`, zero-padded to multiples of m."""
    tiles = _padded(t.to(dtype), m, m)  # [R/m, m, C/m, m]
    return tiles.permute(0, 2, 1, 3).reshape(-1, m, m)


def _unblock(blocks: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Inverse of `_blocks`: [B, m, m] back to R x C (cropped)."""
    m = blocks.shape[-1]
    row_blocks, col_blocks = -(-shape[0] // m), -(-shape[1] // m)
    tiles = blocks.view(row_blocks, col_blocks, m, m).permute(0, 2, 1, 3)
    return tiles.reshape(row_blocks * m, col_blocks * m)[: shape[0], : shape[1]]


@torch.no_grad()
def _solve(
    scores: torch.Tensor,
    n: int,
    m: int,
    solve: Callable[[torch.Tensor], torch.Tensor],
    dtype: torch.dtype = torch.float32,
    block_size: int = 0,
) -> torch.Tensor:
    """Validate, cut `scores` into blocks, run `solve` ([b, m, m] scores -> [b, m, m] bool) on
    chunks of blocks (so temporaries stay bounded; a block's temporaries take about `block_size`
    elements, m*m by default), and put the mask back together."""
    _check_pattern(n, m)
    _check_scores(scores)
    if not scores.numel():
        return torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    if scores.dtype == torch.float64 and dtype != torch.float64:  # keep huge or tiny scores finite in float32
        scores = scores / scores.amax().clamp_min(torch.finfo(torch.float64).tiny)
    blocks = _blocks(scores, m, dtype)
    per_chunk = max(1, _CHUNK_ELEMENTS["cpu" if blocks.device.type == "cpu" else "other"] // (block_size or m * m))
    return _unblock(torch.cat([solve(chunk) for chunk in blocks.split(per_chunk)]), scores.shape)


# ---------------------------------------------------------------------------------------- Dykstra
def _dykstra(blocks: torch.Tensor, n: int, iterations: int, tau_start: float, tau_end: float) -> torch.Tensor:
    """The entropy-regularised transport plan of every block, as log(plan) / tau ("P", in units of
    the block's largest score; the plan is exp(tau * P)).

    Scores are divided by each block's largest, so tau means the same at any magnitude, and the
    work stays in the log domain, so no tau overflows or underflows. Each round projects (in KL)
    onto row sums n, column sums n, then entries <= 1; only the box is not affine, so only it
    carries Dykstra's correction. P in score units makes annealing tau a warm start: the
    potentials carry over while the regularisation 1/tau shrinks.
    """
    peak = blocks.amax(dim=(1, 2), keepdim=True)
    plan = blocks / torch.where(peak > 0, peak, 1.0)
    correction = torch.zeros_like(plan)
    log_n = math.log(n)
    for tau in np.geomspace(tau_start, tau_end, iterations).tolist():
        plan -= (torch.logsumexp(plan * tau, dim=2, keepdim=True) - log_n) / tau
        plan -= (torch.logsumexp(plan * tau, dim=1, keepdim=True) - log_n) / tau
        plan += correction
        correction = plan.clamp(min=0.0)
        plan -= correction  # = min(plan + correction, 0), the KL projection onto entries <= 1
    return plan


# ---------------------------------------------------------------------------------------- rounding
def _greedy(keys: torch.Tensor, scores: torch.Tensor, n: int) -> torch.Tensor:
    """Greedy by descending key (ties: higher score, then lower index): an entry is taken if its
    row and column still have room when its turn comes. Some rows and columns may end short of n
    (see `_repair`).

    Rather than m*m sequential turns, rounds take at once every entry that is among the first
    `room` still-takeable entries of both its row and its column: the sequential greedy takes each
    of those (nothing before it can fill its row or column), so the result is the same, in a few
    rounds instead of m*m steps.
    """
    count, m, _ = keys.shape
    by_score = scores.flatten(1).argsort(dim=1, descending=True, stable=True)
    order = by_score.gather(1, keys.flatten(1).gather(1, by_score).argsort(dim=1, descending=True, stable=True))
    position = torch.empty_like(order).scatter_(1, order, torch.arange(m * m, device=keys.device).expand_as(order))
    position = position.view(count, m, m)
    by_row, by_col = position.argsort(dim=2), position.argsort(dim=1)
    kept = torch.zeros(count, m, m, dtype=torch.bool, device=keys.device)
    while True:
        row_room = n - kept.sum(2, keepdim=True)
        col_room = n - kept.sum(1, keepdim=True)
        open_ = ~kept & (row_room > 0) & (col_room > 0)
        if not bool(open_.any()):
            return kept
        # How many open entries come up to each entry (itself included) in its row, in its column.
        row_turn = torch.empty(count, m, m, dtype=torch.long, device=keys.device)
        row_turn.scatter_(2, by_row, open_.gather(2, by_row).cumsum(2))
        col_turn = torch.empty_like(row_turn).scatter_(1, by_col, open_.gather(1, by_col).cumsum(1))
        kept |= open_ & (row_turn <= row_room) & (col_turn <= col_room)


def _repair(kept: torch.Tensor, scores: torch.Tensor, n: int) -> torch.Tensor:
    """Fill rows and columns short of n by augmenting paths, one per block per pass.

    A path starts at a short row, alternates an untaken entry (taken) and a taken entry (dropped),
    and ends at a short column: it adds one to both ends and leaves every other count alone. A
    breadth-first search over all blocks at once finds the fewest-step path; on the way back each
    step takes the highest-scoring untaken entry and drops the lowest-scoring taken one. Such a
    path exists while any row is short (an n-regular 0/1 block always exists: max-flow argument).
    """
    count, m, _ = kept.shape
    device = kept.device
    unreached = torch.iinfo(torch.int32).max
    while True:
        row_short = kept.sum(2) < n
        col_short = kept.sum(1) < n
        active = row_short.any(1)
        if not bool(active.any()):
            return kept
        sub = active.nonzero()[:, 0]
        k, s = kept[sub], scores[sub]
        # Breadth-first levels: rows at even levels, columns at odd levels.
        row_level = torch.where(row_short[sub], 0, unreached).int()
        col_level = torch.full_like(row_level, unreached)
        for level in range(0, 2 * m, 2):
            frontier = row_level == level
            reach_cols = (frontier[:, :, None] & ~k).any(1) & (col_level == unreached)
            col_level = torch.where(reach_cols, level + 1, col_level)
            reach_rows = (reach_cols[:, None, :] & k).any(2) & (row_level == unreached)
            row_level = torch.where(reach_rows, level + 2, row_level)
        # End at the nearest short column (lowest index among equals).
        end_level = torch.where(col_short[sub], col_level, unreached)
        col = end_level.argmin(1)
        level = end_level.gather(1, col[:, None])[:, 0]
        index = torch.arange(len(sub), device=device)
        add = torch.zeros_like(k)
        drop = torch.zeros_like(k)
        while bool((level > 0).any()):
            live = level > 0
            # Row one level before `col`, joined to it by an untaken entry: the best such entry.
            row_ok = (row_level == (level - 1)[:, None]) & ~k[index, :, col]
            row = torch.where(row_ok, s[index, :, col], -math.inf).argmax(1)
            add[index[live], row[live], col[live]] = True
            # Column one level before `row`, joined to it by a taken entry: the cheapest to drop.
            col_ok = (col_level == (level - 2)[:, None]) & k[index, row, :]
            prev = torch.where(col_ok, s[index, row, :], math.inf).argmin(1)
            has_prev = live & (level > 1)
            drop[index[has_prev], row[has_prev], prev[has_prev]] = True
            col = torch.where(has_prev, prev, col)
            level = torch.where(has_prev, level - 2, 0)
        kept[sub] = (k | add) & ~drop


def _round(keys: torch.Tensor, scores: torch.Tensor, n: int) -> torch.Tensor:
    return _repair(_greedy(keys, scores, n), scores, n)


# ---------------------------------------------------------------------------------------- masks
def transposable_mask(
    scores: torch.Tensor,
    n: int,
    m: int,
    *,
    iterations: int = ITERATIONS,
    tau_start: float = TAU_START,
    tau_end: float = TAU_END,
) -> torch.Tensor:
    """Boolean transposable N:M mask (True = kept) of the same shape as `scores`, on its device.

    Every m x m block keeps exactly n entries in each row and each column (at most n in blocks
    that the padding to a multiple of m cuts), chosen to keep a large total score: `iterations`
    rounds of Dykstra's projections on the entropy-regularised problem, with the regularisation
    tau (relative to each block's largest score) annealed geometrically from `tau_start` to
    `tau_end`, then greedy rounding by the plan with an augmenting-path repair. Deterministic.
    """
    if not isinstance(iterations, int) or isinstance(iterations, bool) or iterations < 1:
        raise ValueError(f"iterations must be a positive integer, got {iterations!r}")
    if not (isinstance(tau_start, (int, float)) and isinstance(tau_end, (int, float))
            and 0 < tau_start <= tau_end < math.inf):
        raise ValueError(f"tau_start and tau_end must satisfy 0 < tau_start <= tau_end < inf, "
                         f"got {tau_start!r}, {tau_end!r}")
    return _solve(scores, n, m, lambda blocks: _round(_dykstra(blocks, n, iterations, tau_start, tau_end), blocks, n))


def greedy_transposable_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """The simple baseline: take entries by descending score where row and column have room, then
    repair rows and columns left short (the rounding `transposable_mask` applies to its plan)."""
    return _solve(scores, n, m, lambda blocks: _round(blocks, blocks, n))


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Plain (row-wise) N:M mask: the n highest scores of every m consecutive entries of each row
    (a last group that the shape cuts short keeps its n best, all of it if shorter)."""
    _check_pattern(n, m)
    _check_scores(scores)
    rows, cols = scores.shape
    padded = torch.nn.functional.pad(scores, (0, -cols % m), value=-1.0)  # below every real score
    groups = padded.view(rows, -1, m)
    kept = torch.zeros(groups.shape, dtype=torch.bool, device=scores.device)
    kept.scatter_(2, groups.topk(n, dim=2).indices, True)
    return kept.view(rows, -1)[:, :cols]


def is_transposable(mask: torch.Tensor, n: int, m: int) -> bool:
    """Whether a boolean mask keeps at most n per row and per column of every m x m block."""
    _check_pattern(n, m)
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.dim() != 2:
        raise ValueError("mask must be a 2-D boolean tensor")
    blocks = _blocks(mask, m)
    return bool((blocks.sum(2) <= n).all()) and bool((blocks.sum(1) <= n).all())


# ---------------------------------------------------------------------------------------- exact
@functools.cache
def _feasible_blocks(n: int, m: int) -> torch.Tensor | None:
    """Every m x m 0/1 block with n per row and column, [K, m*m] float64, or None if too many."""
    if math.comb(m, n) ** m > _MAX_CANDIDATES:
        return None
    row_patterns = [sum(1 << j for j in c) for c in itertools.combinations(range(m), n)]
    found = []
    for rows in itertools.product(row_patterns, repeat=m):
        if all(sum(r >> j & 1 for r in rows) == n for j in range(m)):
            found.append([r >> j & 1 for r in rows for j in range(m)])
            if len(found) > _MAX_ENUMERATED:
                return None
    return torch.tensor(found, dtype=torch.float64)


def _exact_lp(blocks: np.ndarray, n: int) -> np.ndarray:
    """Optimal blocks by one LP over many blocks (HiGHS dual simplex returns a vertex; the constraint
    matrix, block-diagonal bipartite incidence, is totally unimodular, so the vertex is 0/1)."""
    count, m, _ = blocks.shape
    eye = scipy.sparse.identity(m, format="csr")
    ones = np.ones((1, m))
    one_block = scipy.sparse.vstack([scipy.sparse.kron(eye, ones), scipy.sparse.kron(ones, eye)])
    constraints = scipy.sparse.block_diag([one_block] * count, format="csr")
    peak = blocks.max(axis=(1, 2), keepdims=True)
    costs = -(blocks / np.where(peak > 0, peak, 1.0))  # HiGHS's tolerances are absolute: scale to [0, 1]
    result = scipy.optimize.linprog(
        costs.reshape(-1), A_eq=constraints, b_eq=np.full(2 * m * count, float(n)), bounds=(0, 1), method="highs-ds"
    )
    if result.status != 0:
        raise RuntimeError(f"linprog failed: {result.message}")
    return (result.x > 0.5).reshape(count, m, m)


def exact_transposable_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """The transposable N:M mask of the largest total score (the reference the gap is measured
    against). Where the feasible blocks are few (every n at m <= 5; 1:6, 5:6) all are scored at once,
    on the scores' device; otherwise linear programs on the CPU solve blocks, 64 at a time (slow:
    milliseconds a block at m = 8, tens at m = 32)."""
    _check_pattern(n, m)
    patterns = _feasible_blocks(n, m)
    if patterns is None:
        def solve(blocks: torch.Tensor) -> torch.Tensor:
            parts = blocks.cpu().numpy()
            solved = [_exact_lp(parts[i : i + _LP_BLOCKS_PER_SOLVE], n)
                      for i in range(0, len(parts), _LP_BLOCKS_PER_SOLVE)]
            return torch.from_numpy(np.concatenate(solved)).to(blocks.device)

        return _solve(scores, n, m, solve, torch.float64)

    def pick(blocks: torch.Tensor) -> torch.Tensor:
        candidates = patterns.to(blocks.device)
        best = (blocks.flatten(1) @ candidates.T).argmax(1)
        return candidates[best].view_as(blocks).bool()

    return _solve(scores, n, m, pick, torch.float64, block_size=len(patterns))
