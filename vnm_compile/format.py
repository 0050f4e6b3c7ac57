"""The V:N:M format: masks, the compressed weight, mask diversity and the choice of (V, M).

A weight W (R x C) is cut into V x M blocks. Each block keeps 4 of its M columns (the same 4 for its V
rows) and each row keeps 2 of those 4. Shapes that V or M do not divide are padded with zero rows and
columns internally; everything returned is cropped back to R x C.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

from .config import check_pattern

KEPT_COLUMNS = 4
KEPT_PER_ROW = 2
# "optimal" enumerates every 4-column subset; past this many (M > 12) it falls back to "l1".
MAX_ENUMERATED_SUBSETS = math.comb(12, 4)
WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Elements scored per chunk by the exhaustive column search and the row-pair choice. On the CPU a
# chunk's temporaries stay in cache; on a GPU each chunk costs ~40 kernel launches, so chunks are
# as large as a few hundred MB of temporaries allow (a 4096 x 11008 weight: 11 chunks, not 350).
_SEARCH_CHUNK = {"cpu": 16384, "other": 1 << 19}


def _search_chunk(device: torch.device) -> int:
    return _SEARCH_CHUNK["cpu" if device.type == "cpu" else "other"]


def _padded(t: torch.Tensor, v: int, m: int) -> torch.Tensor:
    """t (R x C) padded with zeros to multiples of v rows and m columns, viewed as [R/v, v, C/m, m]."""
    rows, cols = t.shape
    pad_rows, pad_cols = -rows % v, -cols % m
    if pad_rows or pad_cols:
        t = torch.nn.functional.pad(t, (0, pad_cols, 0, pad_rows))
    return t.reshape(t.shape[0] // v, v, t.shape[1] // m, m)


@functools.cache
def _column_subsets(m: int) -> torch.Tensor:
    """All 4-column subsets of range(m), [C(m,4), 4], in the order `_subset_scores` scores them.

    Pairs are ordered by their larger member, triples by their largest, quads likewise, so the
    subsets that extend by column d are always a prefix of the smaller ones.
    """
    pairs = [(a, b) for b in range(1, m) for a in range(b)]
    triples = [p + (c,) for c in range(2, m) for p in pairs[: math.comb(c, 2)]]
    quads = [t + (d,) for d in range(3, m) for t in triples[: math.comb(d, 3)]]
    return torch.tensor(quads, dtype=torch.long)


def _subset_scores(s: torch.Tensor, v: int) -> torch.Tensor:
    """Retained score of every 4-column subset, summed over the v rows of each block.

    s is [m, L]: column j's score for each of L (block, group, row) elements, rows innermost. The
    retained score of a row is the sum of its 2 largest scores inside the subset. It is built up by
    subset size: top2(S + {x}) = max(top2(S), x + max(S)), so each size reuses the previous one.
    Returns [C(m,4), L / v], subsets in `_column_subsets` order.
    """
    m = s.shape[0]
    top2_pairs = torch.cat([s[:b] + s[b] for b in range(1, m)])
    max_pairs = torch.cat([torch.maximum(s[:b], s[b]) for b in range(1, m)])
    top2_triples, max_triples = [], []
    for c in range(2, m):
        n = math.comb(c, 2)
        top2_triples.append(torch.maximum(top2_pairs[:n], max_pairs[:n] + s[c]))
        max_triples.append(torch.maximum(max_pairs[:n], s[c]))
    top2_t, max_t = torch.cat(top2_triples), torch.cat(max_triples)
    per_block = []
    for d in range(3, m):
        n = math.comb(d, 3)
        top2_quads = torch.maximum(top2_t[:n], max_t[:n] + s[d])
        per_block.append(top2_quads.view(n, -1, v).sum(-1))
    return torch.cat(per_block)


def _optimal_columns(blocks: torch.Tensor) -> torch.Tensor:
    """The 4 columns of each block that maximise its retained score, by exhaustive search.

    blocks is [B, v, G, m]; returns [B, G, 4] column indices, ascending.
    """
    n_blocks, v, groups, m = blocks.shape
    subsets = _column_subsets(m).to(blocks.device)
    best = torch.empty(n_blocks, groups, dtype=torch.long, device=blocks.device)
    chunk_size = _search_chunk(blocks.device)
    groups_per_chunk = max(1, chunk_size // v)
    for g0 in range(0, groups, groups_per_chunk):
        g1 = min(groups, g0 + groups_per_chunk)
        blocks_per_chunk = max(1, chunk_size // (v * (g1 - g0)))
        for b0 in range(0, n_blocks, blocks_per_chunk):
            b1 = min(n_blocks, b0 + blocks_per_chunk)
            chunk = blocks[b0:b1, :, g0:g1].permute(3, 0, 2, 1).reshape(m, -1)
            scores = _subset_scores(chunk, v)  # [subsets, (b1-b0) * (g1-g0)]
            best[b0:b1, g0:g1] = scores.argmax(0).view(b1 - b0, g1 - g0)
    return subsets[best]


def _l1_columns(blocks: torch.Tensor) -> torch.Tensor:
    """The paper's rule: the 4 columns of each block with the largest L1 norm of scores."""
    column_norms = blocks.sum(1)  # [B, G, m]
    order = torch.sort(column_norms, dim=-1, descending=True, stable=True).indices
    return order[..., :KEPT_COLUMNS].sort(dim=-1).values


def _choose(scores: torch.Tensor, v: int, m: int, column_select: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per block the 4 kept columns [B, G, 4] and per row the 2 kept of them [B, v, G, 2] (slots 0..3)."""
    _check_scores(scores)
    if column_select not in ("optimal", "l1"):
        raise ValueError(f"column_select must be 'optimal' or 'l1', got {column_select!r}")
    if column_select == "optimal" and math.comb(m, KEPT_COLUMNS) > MAX_ENUMERATED_SUBSETS:
        warnings.warn(
            f"column_select='optimal' would enumerate C({m},4) = {math.comb(m, 4)} column subsets per "
            f"block (more than {MAX_ENUMERATED_SUBSETS}); using the 'l1' rule instead",
            stacklevel=3,
        )
        column_select = "l1"
    blocks = _padded(scores.float(), v, m)
    columns = _optimal_columns(blocks) if column_select == "optimal" else _l1_columns(blocks)
    kept = blocks.gather(3, columns[:, None].expand(-1, v, -1, -1))  # [B, v, G, 4]
    return columns, _best_pair(kept)


_SLOT_PAIRS = ((0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3))


def _best_pair(kept: torch.Tensor) -> torch.Tensor:
    """The 2 slots (ascending) with the largest sum among the last dimension's 4; ties go to the first pair.

    A running maximum over the 6 pairs, in place on cache-sized chunks of contiguous per-slot vectors,
    is several times faster than topk over a dimension of 4.
    """
    by_slot = kept.movedim(-1, 0).reshape(KEPT_COLUMNS, -1)
    best_index = torch.zeros(by_slot.shape[1], dtype=torch.long, device=kept.device)
    step = _search_chunk(kept.device) * 4
    for start in range(0, by_slot.shape[1], step):
        chunk = by_slot[:, start : start + step].contiguous()
        chunk_index = best_index[start : start + step]
        best = chunk[0] + chunk[1]
        pair, better = torch.empty_like(best), torch.empty_like(best, dtype=torch.bool)
        for index, (i, j) in enumerate(_SLOT_PAIRS[1:], start=1):
            torch.add(chunk[i], chunk[j], out=pair)
            torch.gt(pair, best, out=better)
            chunk_index.masked_fill_(better, index)
            torch.maximum(best, pair, out=best)
    pairs = torch.tensor(_SLOT_PAIRS, device=kept.device)
    return pairs[best_index].view(*kept.shape[:-1], KEPT_PER_ROW)


def _check_scores(scores: torch.Tensor) -> None:
    if not isinstance(scores, torch.Tensor) or scores.dim() != 2 or not scores.is_floating_point():
        raise ValueError("scores must be a 2-D floating-point tensor (out_features x in_features)")
    if scores.numel() and not _finite_non_negative(scores):
        raise ValueError("scores must be finite and non-negative, e.g. importance(weight) or weight.abs()")


def _finite_non_negative(t: torch.Tensor) -> bool:
    lowest, highest = torch.aminmax(t)  # a NaN anywhere makes both NaN
    return bool(lowest >= 0) and bool(torch.isfinite(highest))


def _mask_from_choice(columns: torch.Tensor, slots: torch.Tensor, v: int, m: int, shape: torch.Size) -> torch.Tensor:
    n_blocks, groups = columns.shape[:2]
    kept_columns = columns[:, None].expand(-1, v, -1, -1).gather(3, slots)  # [B, v, G, 2]
    mask = torch.zeros(n_blocks, v, groups, m, dtype=torch.bool, device=columns.device)
    mask.scatter_(3, kept_columns, True)
    return mask.view(n_blocks * v, groups * m)[: shape[0], : shape[1]]


def vnm_mask(scores: torch.Tensor, v: int, m: int, column_select: str = "optimal") -> torch.Tensor:
    """Boolean V:N:M mask (True = kept) of the same shape as `scores`, maximising the kept score.

    column_select="optimal" picks each block's 4 columns to maximise the sum over its rows of each
    row's 2 best scores among them (exhaustive over the C(m,4) subsets); "l1" takes the 4 columns
    with the largest summed score (the V:N:M paper's rule). Then each row keeps its 2 best.
    """
    check_pattern(v, m, allow_small_v=True)
    columns, slots = _choose(scores, v, m, column_select)
    return _mask_from_choice(columns, slots, v, m, scores.shape)


def is_vnm(mask: torch.Tensor, v: int, m: int) -> bool:
    """Whether a boolean mask fits V:N:M: per V x M block at most 4 columns used, per row at most 2."""
    check_pattern(v, m, allow_small_v=True)
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.dim() != 2:
        raise ValueError("mask must be a 2-D boolean tensor")
    blocks = _padded(mask, v, m)
    rows_ok = bool((blocks.sum(-1) <= KEPT_PER_ROW).all())
    columns_ok = bool((blocks.any(1).sum(-1) <= KEPT_COLUMNS).all())
    return rows_ok and columns_ok


def _choice_from_mask(mask: torch.Tensor, v: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The (columns, slots) that store a V:N:M mask; blocks or rows that keep fewer are filled up."""
    blocks = _padded(mask, v, m)
    index = torch.arange(m, device=mask.device)
    # Used columns first, then the lowest unused ones; the fill holds zeros.
    column_rank = blocks.any(1).long() * m + (m - 1 - index)
    columns = column_rank.topk(KEPT_COLUMNS, dim=-1).indices.sort(dim=-1).values
    kept = blocks.gather(3, columns[:, None].expand(-1, v, -1, -1))
    slot_rank = kept.long() * KEPT_COLUMNS + (KEPT_COLUMNS - 1 - torch.arange(KEPT_COLUMNS, device=mask.device))
    slots = slot_rank.topk(KEPT_PER_ROW, dim=-1).indices.sort(dim=-1).values
    return columns, slots


def pack_slots(slots: torch.Tensor) -> torch.Tensor:
    """[R, G, 2] slots (0..3, ascending) -> [R, ceil(G/2)] uint8: 4 bits a group, two groups a byte."""
    nibbles = (slots[..., 0] | (slots[..., 1] << 2)).to(torch.uint8)
    if nibbles.shape[1] % 2:
        nibbles = torch.nn.functional.pad(nibbles, (0, 1))
    return nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)


def unpack_slots(metadata: torch.Tensor, groups: int) -> torch.Tensor:
    """Inverse of the metadata packing: [R, ceil(G/2)] uint8 -> [R, G, 2] int64 slots."""
    nibbles = torch.stack((metadata & 0xF, metadata >> 4), dim=-1).view(metadata.shape[0], -1)[:, :groups]
    return torch.stack((nibbles & 3, (nibbles >> 2) & 3), dim=-1).long()


def kept_columns(columns: torch.Tensor, metadata: torch.Tensor, v: int, m: int) -> torch.Tensor:
    """Absolute input column (of the padded G * m) of every stored value, [R, 2G] int64."""
    rows, groups = metadata.shape[0], columns.shape[1]
    slots = unpack_slots(metadata, groups)  # [R, G, 2]
    block_of_row = torch.arange(rows, device=columns.device) // v
    in_group = columns.long()[block_of_row].gather(2, slots)
    group_start = torch.arange(groups, device=columns.device)[:, None] * m
    return (in_group + group_start).reshape(rows, -1)


@dataclass
class VNMWeight:
    """A V:N:M-compressed weight of shape (out_features, in_features).

    values   [R, 2G]       the 2 kept values of each row in each group of m columns (G = ceil(C/m))
    columns  [ceil(R/v), G, 4] uint8   which 4 of the m columns each row block keeps, ascending
    metadata [R, ceil(G/2)] uint8      per row and group, 4 bits: the 2 slots (of the 4) holding values
    """

    values: torch.Tensor
    columns: torch.Tensor
    metadata: torch.Tensor
    v: int
    m: int
    in_features: int

    def __post_init__(self) -> None:
        check_pattern(self.v, self.m, allow_small_v=True)
        rows, twice_groups = self.values.shape
        groups = -(-self.in_features // self.m)
        expected = {
            "values": ((rows, 2 * groups), self.values),
            "columns": ((-(-rows // self.v), groups, KEPT_COLUMNS), self.columns),
            "metadata": ((rows, -(-groups // 2)), self.metadata),
        }
        for name, (shape, tensor) in expected.items():
            if tuple(tensor.shape) != shape:
                raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected {shape} for "
                                 f"{rows}x{self.in_features} at {self.v}:2:{self.m}")
        if self.values.dtype not in WEIGHT_DTYPES:
            raise ValueError(f"values dtype must be one of {WEIGHT_DTYPES}, got {self.values.dtype}")
        if self.columns.dtype != torch.uint8 or self.metadata.dtype != torch.uint8:
            raise ValueError("columns and metadata must be uint8 tensors")

    @classmethod
    def from_dense(
        cls,
        weight: torch.Tensor,
        v: int,
        m: int,
        scores: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        column_select: str = "optimal",
    ) -> VNMWeight:
        """Compress `weight`, keeping what `mask` keeps, or else what maximises `scores` (default |w|)."""
        check_pattern(v, m, allow_small_v=True)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise ValueError("weight must be a 2-D tensor (out_features x in_features)")
        if weight.dtype not in WEIGHT_DTYPES:
            raise ValueError(f"weight dtype must be one of {WEIGHT_DTYPES}, got {weight.dtype}")
        if mask is not None and scores is not None:
            raise ValueError("pass scores or mask, not both")
        weight = weight.detach()
        if mask is None:
            scores = weight.abs() if scores is None else scores
            if scores.shape != weight.shape:
                raise ValueError(f"scores has shape {tuple(scores.shape)}, expected {tuple(weight.shape)}")
            columns, slots = _choose(scores.to(weight.device), v, m, column_select)
            mask = _mask_from_choice(columns, slots, v, m, weight.shape)
        else:
            if mask.shape != weight.shape:
                raise ValueError(f"mask has shape {tuple(mask.shape)}, expected {tuple(weight.shape)}")
            if not is_vnm(mask, v, m):
                raise ValueError(f"mask is not a valid {v}:2:{m} pattern (see is_vnm)")
            mask = mask.to(weight.device)
            columns, slots = _choice_from_mask(mask, v, m)
        rows, cols = weight.shape
        blocks = _padded(weight * mask, v, m)
        kept_columns = columns[:, None].expand(-1, v, -1, -1).gather(3, slots)
        values = blocks.gather(3, kept_columns).reshape(-1, 2 * blocks.shape[2])[:rows]
        slots = slots.reshape(-1, blocks.shape[2], KEPT_PER_ROW)[:rows]
        return cls(values.contiguous(), columns.to(torch.uint8), pack_slots(slots), v, m, cols)

    @property
    def out_features(self) -> int:
        return self.values.shape[0]

    @property
    def groups(self) -> int:
        return self.values.shape[1] // 2

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.out_features, self.in_features))

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.values, self.columns, self.metadata))

    def kept_columns(self) -> torch.Tensor:
        """Absolute input column of every stored value, [R, 2G] int64."""
        return kept_columns(self.columns, self.metadata, self.v, self.m)

    def to_dense(self) -> torch.Tensor:
        """The dense weight with zeros where the mask pruned; exact inverse of `from_dense`."""
        dense = self.values.new_zeros(self.out_features, self.groups * self.m)
        dense.scatter_(1, self.kept_columns(), self.values)
        return dense[:, : self.in_features]

    def mask(self) -> torch.Tensor:
        """The boolean mask this weight stores (kept positions, including kept zeros)."""
        mask = torch.zeros(self.out_features, self.groups * self.m, dtype=torch.bool, device=self.device)
        mask.scatter_(1, self.kept_columns(), True)
        return mask[:, : self.in_features]

    def to(self, *args, **kwargs) -> VNMWeight:
        """Move to a device and/or cast the values' dtype (indices stay uint8)."""
        values = self.values.to(*args, **kwargs)
        device = values.device
        return VNMWeight(values, self.columns.to(device), self.metadata.to(device), self.v, self.m, self.in_features)

    def state_dict(self) -> dict[str, torch.Tensor]:
        layout = torch.tensor([self.v, self.m, self.out_features, self.in_features], dtype=torch.int64)
        return {"values": self.values, "columns": self.columns, "metadata": self.metadata, "layout": layout}

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> VNMWeight:
        missing = {"values", "columns", "metadata", "layout"} - set(state)
        if missing:
            raise ValueError(f"state dict lacks {sorted(missing)}")
        v, m, rows, cols = (int(x) for x in state["layout"].tolist())
        weight = cls(state["values"], state["columns"], state["metadata"], v, m, cols)
        if weight.out_features != rows:
            raise ValueError(f"values has {weight.out_features} rows, layout says {rows}")
        return weight

    def __repr__(self) -> str:
        return (f"VNMWeight({self.out_features}x{self.in_features}, {self.v}:2:{self.m}, {self.dtype}, "
                f"{self.nbytes / 2**20:.2f} MiB)")


@dataclass
class MaskedWeight:
    """A weight pruned to a pattern that has no kernel here (N:M, transposable N:M): held dense, zero
    off its mask. `to_dense()` and `mask()` as for a VNMWeight."""

    dense: torch.Tensor
    kept: torch.Tensor  # bool, the mask

    def to_dense(self) -> torch.Tensor:
        return self.dense

    def mask(self) -> torch.Tensor:
        return self.kept

    @property
    def shape(self) -> torch.Size:
        return self.dense.shape


def concat_rows(weights: Sequence[VNMWeight]) -> VNMWeight:
    """One weight holding the rows of `weights` in order, so x @ W.T is the outputs of all of them
    side by side (fused q/k/v or gate/up projections). They must share v, m, in_features and dtype,
    and v must divide the rows of every weight but the last, so that no row block straddles two."""
    if not weights or not all(isinstance(w, VNMWeight) for w in weights):
        raise ValueError("weights must be a non-empty sequence of VNMWeight")
    first = weights[0]
    for w in weights[1:]:
        if (w.v, w.m, w.in_features, w.dtype, w.device) != (first.v, first.m, first.in_features, first.dtype,
                                                            first.device):
            raise ValueError(f"weights must share v, m, in_features, dtype and device: {first!r} vs {w!r}")
    for w in weights[:-1]:
        if w.out_features % w.v:
            raise ValueError(f"v={w.v} does not divide the {w.out_features} rows of {w!r}: a row block "
                             "would straddle two weights (only the last may be ragged)")
    return VNMWeight(torch.cat([w.values for w in weights]), torch.cat([w.columns for w in weights]),
                     torch.cat([w.metadata for w in weights]), first.v, first.m, first.in_features)


def mask_count(v: int, m: int) -> int:
    """The exact number of distinct masks a v x m block admits (each row exactly 2 kept).

    C(m,4) * 6^v over-counts: a mask whose rows use only 2 or 3 columns fits several 4-subsets.
    Counting masks by the number k of columns their rows use (inclusion-exclusion over those k):
    sum_k C(m,k) * sum_j (-1)^(k-j) C(k,j) C(j,2)^v, for k = 2, 3, 4.
    """
    check_pattern(v, m, allow_small_v=True)
    total = 0
    for used in range(2, KEPT_COLUMNS + 1):
        onto = sum((-1) ** (used - j) * math.comb(used, j) * math.comb(j, 2) ** v for j in range(2, used + 1))
        total += math.comb(m, used) * onto
    return total


def log_mask_diversity(v: int, m: int) -> float:
    """Natural log of the number of masks of a v x m block, per weight element."""
    return math.log(mask_count(v, m)) / (v * m)


def analytic_speedup(v: int, m: int) -> float:
    """Predicted prefill speedup over dense without sparse tensor cores.

    The kernel multiplies only the 4 kept columns of every m (m/4 less work); a row block of v rows
    reuses each gathered activation tile v times, so small blocks pay more for the gather: v/(v+16).
    """
    return (m / KEPT_COLUMNS) * v / (v + 16)


def select_vm(
    target_speedup: float,
    speedup_model: Callable[[int, int], float] = analytic_speedup,
    v_choices: Iterable[int] = (16, 32, 64, 128),
    m_choices: Iterable[int] = range(4, 33),
) -> tuple[int, int]:
    """The (v, m) whose predicted speedup meets the target with the most mask diversity per element."""
    admissible = [(v, m) for v in v_choices for m in m_choices if speedup_model(v, m) >= target_speedup]
    if not admissible:
        raise ValueError(f"no (v, m) reaches target_speedup={target_speedup} under {speedup_model.__name__}")
    return max(admissible, key=lambda vm: (log_mask_diversity(*vm), -vm[1]))
