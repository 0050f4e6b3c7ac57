"""Small pieces shared by the prefill and decode kernels and their launchers."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


def interpreting() -> bool:
    """Whether Triton kernels defined now run under the interpreter (TRITON_INTERPRET=1)."""
    knobs = getattr(triton, "knobs", None)  # Triton < 3.4 has no knobs
    return bool(knobs.runtime.interpret) if knobs is not None else os.environ.get("TRITON_INTERPRET") == "1"


# The token count an unbounded symbolic count (a dynamic-shape graph's, whose small counts run graphs
# of their own) is planned for: a prompt's.
MANY_TOKENS = 2048


def planned_count(tokens) -> int:
    """`tokens`, or where it is symbolic the largest value its range allows (the backend's graph for a
    bucket of small counts), MANY_TOKENS where that is unbounded: the count kernels and configs are
    chosen for, read from the range without comparing the symbol (which would add a guard, and a
    recompile where it flips)."""
    if isinstance(tokens, int):
        return tokens
    node = getattr(tokens, "node", None)  # a SymInt's; anything else symbolic has no range at hand
    highest = node.shape_env.bound_sympy(node.expr).upper if node is not None else None
    return int(highest) if highest is not None and highest.is_Integer else MANY_TOKENS


def token_bucket(tokens) -> int:
    """Tokens rounded up to a power of two, at most 8192: the autotuning key's token dimension, and the
    dispatcher's plans'. Plain int arithmetic: it runs on every planned call."""
    count = max(1, planned_count(tokens))
    return 1 << min(13, (count - 1).bit_length())


def dot_precision(dtype: torch.dtype) -> str:
    # float32 weights keep float32 accuracy (tf32 would lose ~3 decimal digits).
    return "ieee" if dtype == torch.float32 else "tf32"


@triton.jit
def grid_order(pid, R, T, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr, GROUP_N: tl.constexpr):
    """(row tile, token tile) of program `pid`: GROUP_N row tiles sweep the token tiles together, so
    a token tile's activations and a row tile's weights are both reused from L2."""
    tiles_n = (R + BLOCK_N - 1) // BLOCK_N
    tiles_t = (T + BLOCK_T - 1) // BLOCK_T
    per_group = GROUP_N * tiles_t
    first_n = (pid // per_group) * GROUP_N
    group_rows = tl.minimum(tiles_n - first_n, GROUP_N)
    return first_n + (pid % per_group) % group_rows, (pid % per_group) // group_rows


@triton.jit
def slot_weight(lo, hi, s0, s1, k: tl.constexpr, dtype: tl.constexpr):
    """The dense weight in slot k of a group: a row's first stored value where its first slot
    s0 == k, its second where s1 == k, else 0 (lo, hi: the two values' bits)."""
    bits = tl.where(s0 == k, lo, tl.where(s1 == k, hi, 0))
    return bits.to(dtype, bitcast=True)
