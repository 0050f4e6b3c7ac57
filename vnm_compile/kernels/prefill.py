"""The prefill kernel (many tokens): a gather GEMM over the kept input channels.

y = x @ W.T is computed over the condensed K' = 4G kept channels: K index r = 4g + k is input
channel g*M + columns[b, g, k] of row block b. A program owns BLOCK_N weight rows (inside one row
block, so they share those channels) and BLOCK_T tokens; per BLOCK_K step it loads
  - the step's BLOCK_K absolute channel indices (int32, `channel_index`), one load a stage ahead,
  - the weight tile [BLOCK_N, BLOCK_K] in kept-channel order from the pre-expanded layout
    (`expand_weight`, [R, 4G], 4/M of the dense weight's bytes): a contiguous, pipelined load.
    (Gathering it element-wise from the compressed values -- values[n, 2g + (k == s1)] where slot
    k is one of the row's two, else 0 -- needs no extra memory but measured 4-8x slower on an
    H200: its loads are data-dependent 2-byte loads that Triton cannot pipeline; see
    benchmarks/NOTES.md.)
  - the activation tile [BLOCK_K, BLOCK_T] gathered from channel-major x.T [C, T]: each kept
    channel is a contiguous run of tokens, so the gather is 16-byte vector loads that Triton
    pipelines like a dense tile (from row-major x each element would be its own 2-byte load);
and multiplies them with one tl.dot, fp32 accumulation, bias and cast fused in the epilogue.
`transpose_kernel` writes x.T in tiles (one read and one write of x). For a few tokens
(at most ROW_MAJOR_MAX_TOKENS) x is small enough to stay in L2, its gathers are cheap next to the
weight stream, and the kernel reads it in place (a strided view) instead: no transpose launch.

Only builtins of triton.language are called, none of its @triton.jit helpers (tl.cdiv, tl.zeros):
an interpreted kernel (TRITON_INTERPRET=1, CPU tests) cannot call helpers that were compiled when
triton.language was imported, which torch.library.triton_op does early.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..format import KEPT_COLUMNS, unpack_slots
from .common import dot_precision, grid_order, interpreting, token_bucket
from .operands import Operands


@triton.heuristics({"EVEN_K": lambda a: (4 * a["G"]) % a["BLOCK_K"] == 0})
@triton.jit
def vnm_prefill_kernel(
    x_ptr, w_ptr, channel_ptr, bias_ptr, y_ptr,
    R, C, T, G,
    stride_xc, stride_xt,  # x as [C, T]: (T, 1) for x.T, (1, C) for row-major x read in place
    M, TOKEN_BUCKET,  # only autotuning keys (the group width; T rounded up to a power of two)
    V: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    W_LEFT: tl.constexpr,
    EVEN_K: tl.constexpr,
    EVEN_C: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
    Y_CHANNEL_MAJOR: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_N: tl.constexpr,
):
    pid_n, pid_t = grid_order(tl.program_id(0), R, T, BLOCK_N, BLOCK_T, GROUP_N)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = offs_n < R
    token_ok = offs_t < T
    block = (pid_n * BLOCK_N) // V  # BLOCK_N divides V: the tile is inside one row block
    kept = 4 * G

    if W_LEFT:
        acc = tl.full((BLOCK_N, BLOCK_T), 0.0, tl.float32)
    else:
        acc = tl.full((BLOCK_T, BLOCK_N), 0.0, tl.float32)
    for k0 in range(0, kept, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        if EVEN_K:
            channel = tl.load(channel_ptr + block * kept + offs_k)
            w_mask = row_ok[:, None]
        else:
            channel = tl.load(channel_ptr + block * kept + offs_k, mask=offs_k < kept, other=C)
            w_mask = row_ok[:, None] & (offs_k < kept)[None, :]
        w = tl.load(w_ptr + offs_n[:, None] * kept + offs_k[None, :], mask=w_mask, other=0.0)
        x_mask = token_ok[None, :]
        if not (EVEN_C and EVEN_K):  # padding columns, or steps past the end (channel = C)
            x_mask = x_mask & (channel < C)[:, None]
        x = tl.load(x_ptr + channel[:, None] * stride_xc + offs_t[None, :] * stride_xt, mask=x_mask, other=0.0)
        if DOT_IN_FP32:
            w = w.to(tl.float32)
            x = x.to(tl.float32)
        if W_LEFT:  # weight rows on the MMA's M side
            acc = tl.dot(w, x, acc, input_precision=DOT_PRECISION)
        else:  # tokens on the M side: suits row tiles narrower than 64
            acc = tl.dot(tl.trans(x), tl.trans(w), acc, input_precision=DOT_PRECISION)

    if W_LEFT != Y_CHANNEL_MAJOR:  # acc to the output's orientation
        acc = tl.trans(acc)
    if Y_CHANNEL_MAJOR:  # y as y.T [R, T], read channel-major by the next sparse linear (passes/layout.py)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=row_ok, other=0.0).to(tl.float32)[:, None]
        tl.store(y_ptr + offs_n[:, None] * T + offs_t[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & token_ok[None, :])
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=row_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + offs_t[:, None] * R + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=token_ok[:, None] & row_ok[None, :])


@triton.jit
def transpose_kernel(x_ptr, xt_ptr, T, C, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (offs_t < T)[:, None] & (offs_c < C)[None, :]
    tile = tl.load(x_ptr + offs_t[:, None] * C + offs_c[None, :], mask=mask)
    tl.store(xt_ptr + offs_c[None, :] * T + offs_t[:, None], tile, mask=mask)


ROW_MAJOR_MAX_TOKENS = 32


def channel_index(columns: torch.Tensor, m: int) -> torch.Tensor:
    """[ceil(R/V), 4G] int32: the absolute input channel of each kept column, g*M + columns[b, g, k]."""
    groups = columns.shape[1]
    start = torch.arange(groups, device=columns.device, dtype=torch.int32)[:, None] * m
    return (columns.to(torch.int32) + start).reshape(columns.shape[0], groups * KEPT_COLUMNS)


def expand_weight(values: torch.Tensor, metadata: torch.Tensor) -> torch.Tensor:
    """[R, 4G]: row n's weight on its block's kept channels (zeros where the row keeps none);
    4/M of the dense weight's bytes."""
    rows, groups = values.shape[0], values.shape[1] // 2
    slots = unpack_slots(metadata, groups)  # [R, G, 2]
    expanded = values.new_zeros(rows, groups, KEPT_COLUMNS)
    expanded.scatter_(2, slots, values.view(rows, groups, 2))
    return expanded.view(rows, groups * KEPT_COLUMNS)


def prefill_output(xt: torch.Tensor, rows: int, channel_major_out: bool) -> torch.Tensor:
    """y [T, R]: row-major, or channel-major (the view y.T.t() of a contiguous [R, T])."""
    tokens = xt.shape[1]
    if channel_major_out:
        return torch.empty(rows, tokens, dtype=xt.dtype, device=xt.device).t()
    return torch.empty(tokens, rows, dtype=xt.dtype, device=xt.device)


def prefill_arguments(xt: torch.Tensor, expanded: torch.Tensor, channels: torch.Tensor, operands: Operands,
                      y: torch.Tensor) -> tuple[list, dict]:
    """The prefill kernel's arguments but its config: (positional, constexpr). xt is x.T [C, T], either
    channel-major (from `transpose_kernel` or its producer) or the strided view `x.t()` of a row-major x."""
    tokens, bias = xt.shape[1], operands.bias
    groups = expanded.shape[1] // KEPT_COLUMNS
    positional = [xt, expanded, channels, bias if bias is not None else expanded, y,
                  expanded.shape[0], operands.in_features, tokens, groups, xt.stride(0), xt.stride(1), operands.m,
                  token_bucket(tokens)]
    constexprs = dict(V=operands.v, HAS_BIAS=bias is not None, EVEN_C=operands.in_features == groups * operands.m,
                      DOT_PRECISION=dot_precision(xt.dtype), DOT_IN_FP32=xt.dtype == torch.bfloat16 and interpreting(),
                      Y_CHANNEL_MAJOR=y.stride(1) != 1)  # a single token or row: both layouts are the same memory
    return positional, constexprs


def prefill_grid(rows: int, tokens: int, block_n: int, block_t: int) -> tuple[int, int, int]:
    return triton.cdiv(rows, block_n) * triton.cdiv(tokens, block_t), 1, 1


def launch_prefill(kernel, xt: torch.Tensor, expanded: torch.Tensor, channels: torch.Tensor, operands: Operands,
                   out: torch.Tensor | None = None, channel_major_out: bool = False, **config) -> torch.Tensor:
    """y [T, R] from xt [C, T], the expanded weight [R, 4G] and its channel index [ceil(R/V), 4G];
    `kernel` is vnm_prefill_kernel (config: its blocks) or an autotuned wrapper. y is row-major, or
    channel-major with channel_major_out; `out`, if given, is either."""
    y = prefill_output(xt, expanded.shape[0], channel_major_out) if out is None else out
    positional, constexprs = prefill_arguments(xt, expanded, channels, operands, y)
    grid = lambda meta: prefill_grid(expanded.shape[0], xt.shape[1], meta["BLOCK_N"], meta["BLOCK_T"])
    kernel[grid](*positional, **constexprs, **config)
    return y
