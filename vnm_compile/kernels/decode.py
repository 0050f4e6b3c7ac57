"""The decode kernel (1-16 tokens): stream the compressed weight once, expand 2:4 in registers.

With few tokens the product is bound by reading the weight, so the kernel reads only the
compressed bytes (values, metadata, column indices) with contiguous loads. Groups are taken two at
a time: one metadata byte holds both groups' nibbles and, for 16-bit weights with an even G, one
64-bit load holds both groups' value pairs, so no load is strided and no layout shuffle is needed.
The loads are register loads, waited on where they are used; PREFETCH issues the next tile's loads
before this tile is multiplied, so that two tiles are in flight (a program walks only a few tiles
of a short row, and the loads in flight set the bandwidth).

Three bodies multiply a tile. The product over a group's 4 kept columns split by slot,
    y[n, t] += sum_k W_k[n, g] * x[t, g*M + columns[b, g, k]],   k = 0..3,
where W_k[n, g] is the value row n keeps in slot k, or 0 (an elementwise select), runs on the FMA
units with a [BLOCK_N, BLOCK_J, BLOCK_T] accumulator summed once at the end, or, with USE_DOT, on
the tensor cores (tokens padded to 16) as one dot a tile: the W_k of its groups joined into
[BLOCK_N, 8 BLOCK_J] in (group, slot) order, times the activations of those kept channels
gathered in the same order. SELECT_X (16-bit weights) instead multiplies each of the 2 stored
values by the activation of its slot: the group's 4 activations (shared by the row block, L1/L2
hits: x is small) are packed into two 32-bit words, and one prmt byte permute picks both values'
activations; 1-4 tokens.

SPLIT_K > 1 splits the groups over program_id(1), for shapes with too few row tiles to fill the
GPU: each split stores its fp32 partial sums in a slice of its own, and the caller adds the slices.
No zeroed output and no atomics: nothing to fill first, the same bits on every run, and in a
compiled graph the sum and cast are plain ops, which Inductor can fuse into the next kernel.
Only builtins of triton.language are called, not its @triton.jit helpers such as tl.sum (see
prefill.py for why).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import dot_precision, interpreting, slot_weight, token_bucket
from .operands import Operands


@triton.jit
def _add(a, b):  # tl.sum's combine function; tl.sum itself is a helper the interpreter cannot call (see prefill.py)
    return a + b


@triton.jit
def _kept_channel(words, group, M, k: tl.constexpr):
    """The input channel kept in slot k of each group (its column word holds the 4 slots' bytes)."""
    return group * M + ((words >> (8 * k)) & 0xFF)


@triton.jit
def _gather_x(x_ptr, channel, C, offs_t, token_ok, stride_xt, stride_xc, IN_BOUNDS: tl.constexpr):
    """[len(channel), BLOCK_T]: the activations of the given input channels."""
    x_mask = token_ok[None, :]
    if not IN_BOUNDS:  # padding columns, or groups past the end
        x_mask = x_mask & (channel < C)[:, None]
    return tl.load(x_ptr + offs_t[None, :] * stride_xt + channel[:, None] * stride_xc, mask=x_mask, other=0.0)


@triton.jit
def _slot_x(x_ptr, words, group, M, C, offs_t, token_ok, stride_xt, stride_xc, k: tl.constexpr,
            IN_BOUNDS: tl.constexpr):
    """[BLOCK_J, BLOCK_T] activations of slot k of the groups (their k-th kept channel)."""
    return _gather_x(x_ptr, _kept_channel(words, group, M, k), C, offs_t, token_ok, stride_xt, stride_xc, IN_BOUNDS)


@triton.jit
def _unpack_group(pair, meta, h: tl.constexpr, half_int, HALF_BITS: tl.constexpr):
    """The two stored values' bits (lo, hi) of group h (0: even, 1: odd) of each pair, and their slots
    (s0, s1) from its metadata nibble."""
    nibble = (meta >> (4 * h)) & 15
    return pair.to(half_int), (pair >> HALF_BITS).to(half_int), nibble & 3, nibble >> 2


@triton.jit
def _bits(x):
    """The 16 bits of each element of x, zero-extended to int32."""
    return x.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF


@triton.jit
def _slot_activation(x01, x23, slot, dtype: tl.constexpr):
    """fp32 [BLOCK_N, BLOCK_J, BLOCK_T] activation of each row's `slot` from the packed words, by shifts."""
    word = tl.where((slot < 2)[:, :, None], x01[None, :, :], x23[None, :, :]) >> (16 * (slot & 1))[:, :, None]
    return word.to(tl.int16).to(dtype, bitcast=True).to(tl.float32)


@triton.jit
def _pick_products(acc, first, second, x01, x23, s0, s1, dtype: tl.constexpr, BYTE_PERMUTE: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_T: tl.constexpr):
    """acc + first * x[s0] + second * x[s1] for each row's two stored values (fp32 [BLOCK_N, BLOCK_J])
    in slots s0, s1 (int32 [BLOCK_N, BLOCK_J]), the group's 4 activations packed as 16-bit words in
    x01 (slots 0, 1) and x23 (slots 2, 3), [BLOCK_J, BLOCK_T].

    On the GPU one prmt byte permute picks both activations: selector nibbles 2s, 2s+1 take slot
    s's two bytes from the 8 bytes of x23:x01. The interpreter runs no PTX: there shifts pick them."""
    if BYTE_PERMUTE:
        selector = 0x1010 + s0 * 0x22 + s1 * 0x2200
        shape: tl.constexpr = (BLOCK_N, BLOCK_J, BLOCK_T)
        args = [tl.broadcast_to(acc, shape), tl.broadcast_to(first[:, :, None], shape),
                tl.broadcast_to(second[:, :, None], shape), tl.broadcast_to(x01[None, :, :], shape),
                tl.broadcast_to(x23[None, :, :], shape), tl.broadcast_to(selector[:, :, None], shape)]
        if dtype == tl.bfloat16:
            asm: tl.constexpr = _PICK_ASM_BF16
        else:
            asm: tl.constexpr = _PICK_ASM_FP16
        return tl.inline_asm_elementwise(asm, "=r,r,r,r,r,r,r", args, dtype=tl.float32, is_pure=True, pack=1)
    return (acc + first[:, :, None] * _slot_activation(x01, x23, s0, dtype)
            + second[:, :, None] * _slot_activation(x01, x23, s1, dtype))


# $0 = $1 + $2 * x[s0] + $3 * x[s1], with x[s0], x[s1] = prmt($4, $5, selector $6). One line each, no
# escapes: Inductor copies the kernel's globals into its generated code inside a string literal.
_PICK_ASM_BF16: tl.constexpr = tl.constexpr(  # bf16 -> fp32 is a shift
    "{ .reg .b32 xs, a0, a1; prmt.b32 xs, $4, $5, $6; shl.b32 a0, xs, 16; and.b32 a1, xs, 0xFFFF0000; "
    "fma.rn.f32 $0, $2, a0, $1; fma.rn.f32 $0, $3, a1, $0; }")
_PICK_ASM_FP16: tl.constexpr = tl.constexpr(
    "{ .reg .b32 xs; .reg .b16 g0, g1; .reg .f32 a0, a1; prmt.b32 xs, $4, $5, $6; mov.b32 {g0, g1}, xs; "
    "cvt.f32.f16 a0, g0; cvt.f32.f16 a1, g1; fma.rn.f32 $0, $2, a0, $1; fma.rn.f32 $0, $3, a1, $0; }")


@triton.jit
def _weight_tile(values_ptr, meta_ptr, cols_ptr, offs_n, row_ok, block, j0, half_g, G,
                 QUADS: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_J: tl.constexpr):
    """Group pairs j0 .. j0 + BLOCK_J of the rows offs_n: metadata bytes, both groups' value pairs,
    and the column words of the row block."""
    offs_j = j0 + tl.arange(0, BLOCK_J)
    w_mask = row_ok[:, None]
    if not EVEN_K:
        w_mask = w_mask & (offs_j < half_g)[None, :]
    meta = tl.load(meta_ptr + offs_n[:, None] * half_g + offs_j[None, :], mask=w_mask, other=0)
    odd_ok = (2 * offs_j + 1) < G
    if QUADS:  # both groups' value pairs in one 64-bit word
        quad = tl.load(values_ptr + offs_n[:, None] * half_g + offs_j[None, :], mask=w_mask, other=0)
        pair_even = quad.to(tl.int32)
        pair_odd = (quad >> 32).to(tl.int32)
    else:
        pair_even = tl.load(values_ptr + offs_n[:, None] * G + 2 * offs_j[None, :], mask=w_mask, other=0)
        pair_odd = tl.load(values_ptr + offs_n[:, None] * G + 2 * offs_j[None, :] + 1,
                           mask=w_mask & odd_ok[None, :], other=0)
    words_even = tl.load(cols_ptr + block * G + 2 * offs_j, mask=offs_j < half_g, other=0)
    words_odd = tl.load(cols_ptr + block * G + 2 * offs_j + 1, mask=odd_ok, other=0)
    return meta, pair_even, pair_odd, words_even, words_odd


@triton.jit
def _slot_of_pairs(lo_even, hi_even, s0_even, s1_even, lo_odd, hi_odd, s0_odd, s1_odd, k: tl.constexpr,
                   dtype: tl.constexpr):
    """[BLOCK_N, BLOCK_J, 2]: slot k's weight in the even and the odd group of each group pair."""
    return tl.join(slot_weight(lo_even, hi_even, s0_even, s1_even, k, dtype),
                   slot_weight(lo_odd, hi_odd, s0_odd, s1_odd, k, dtype))


@triton.jit
def _channel_of_pairs(even_group, M, words_even, words_odd, k: tl.constexpr):
    """[BLOCK_J, 2]: the input channel kept in slot k of the even and the odd group of each pair."""
    return tl.join(_kept_channel(words_even, even_group, M, k), _kept_channel(words_odd, even_group + 1, M, k))


@triton.jit
def _group_slot_order(slot0, slot1, slot2, slot3):
    """Per-slot tensors [..., BLOCK_J, 2] (j, h: group 2j + h) joined so that their flattening runs in
    (group, slot) order: joins append a dim, and the last-appended one varies fastest."""
    return tl.join(tl.join(slot0, slot2), tl.join(slot1, slot3))


@triton.jit
def _expanded_dot(acc, x_ptr, pair_even, pair_odd, meta, words_even, words_odd, offs_j, offs_t, token_ok, M, C,
                  stride_xt, stride_xc, half_int, HALF_BITS: tl.constexpr, IN_BOUNDS: tl.constexpr,
                  DOT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr):
    """acc + the tile's product on the tensor cores as one dot over its 8 BLOCK_J kept channels: the
    2:4 pairs expanded to their 4 slots in registers (joins: each thread's slots stay its own, no
    layout shuffle), the activations of those channels gathered in the same order."""
    dtype = x_ptr.dtype.element_ty
    lo_even, hi_even, s0_even, s1_even = _unpack_group(pair_even, meta, 0, half_int, HALF_BITS)
    lo_odd, hi_odd, s0_odd, s1_odd = _unpack_group(pair_odd, meta, 1, half_int, HALF_BITS)
    w = _group_slot_order(
        _slot_of_pairs(lo_even, hi_even, s0_even, s1_even, lo_odd, hi_odd, s0_odd, s1_odd, 0, dtype),
        _slot_of_pairs(lo_even, hi_even, s0_even, s1_even, lo_odd, hi_odd, s0_odd, s1_odd, 1, dtype),
        _slot_of_pairs(lo_even, hi_even, s0_even, s1_even, lo_odd, hi_odd, s0_odd, s1_odd, 2, dtype),
        _slot_of_pairs(lo_even, hi_even, s0_even, s1_even, lo_odd, hi_odd, s0_odd, s1_odd, 3, dtype),
    ).reshape(BLOCK_N, 8 * BLOCK_J)
    even_group = 2 * offs_j
    channel = _group_slot_order(
        _channel_of_pairs(even_group, M, words_even, words_odd, 0),
        _channel_of_pairs(even_group, M, words_even, words_odd, 1),
        _channel_of_pairs(even_group, M, words_even, words_odd, 2),
        _channel_of_pairs(even_group, M, words_even, words_odd, 3),
    ).reshape(8 * BLOCK_J)
    x = _gather_x(x_ptr, channel, C, offs_t, token_ok, stride_xt, stride_xc, IN_BOUNDS)
    if DOT_IN_FP32:
        w = w.to(tl.float32)
        x = x.to(tl.float32)
    return tl.dot(w, x, acc, input_precision=DOT_PRECISION)


def _even_k(args) -> bool:
    return ((args["G"] + 1) // 2) % (args["BLOCK_J"] * args["SPLIT_K"]) == 0 and args["G"] % 2 == 0


@triton.heuristics({"EVEN_K": _even_k})
@triton.jit
def vnm_decode_kernel(
    x_ptr, values_ptr, meta_ptr, cols_ptr, bias_ptr, y_ptr,
    R, C, T, G, M, stride_xt, stride_xc,  # x [T, C]: (C, 1) row-major, (1, T) channel-major
    TOKEN_BUCKET,  # only an autotuning key: T rounded up to a power of two
    V: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    QUADS: tl.constexpr,
    HALF_BITS: tl.constexpr,
    SPLIT_K: tl.constexpr,
    USE_DOT: tl.constexpr,
    SELECT_X: tl.constexpr,
    PREFETCH: tl.constexpr,
    BYTE_PERMUTE: tl.constexpr,
    EVEN_K: tl.constexpr,
    EVEN_C: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_J: tl.constexpr,
):
    dtype = x_ptr.dtype.element_ty
    half_int = tl.int16 if HALF_BITS == 16 else tl.int32
    # The stored dtypes reinterpreted here, not by tensor views: a view is an op of its own in every
    # graph that launches this kernel, a few microseconds of CPU a call.
    if QUADS or HALF_BITS == 32:  # a 64-bit word: both groups' 16-bit value pairs, or one group's 32-bit pair
        values_ptr = values_ptr.to(tl.pointer_type(tl.int64))
    else:
        values_ptr = values_ptr.to(tl.pointer_type(tl.int32))
    cols_ptr = cols_ptr.to(tl.pointer_type(tl.int32))  # a group's 4 column bytes as one word

    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_t = tl.program_id(2) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = offs_n < R
    token_ok = offs_t < T
    block = (tl.program_id(0) * BLOCK_N) // V
    half_g = (G + 1) // 2  # group pairs; also the metadata row length
    per_split = ((half_g + BLOCK_J - 1) // BLOCK_J + SPLIT_K - 1) // SPLIT_K * BLOCK_J
    j_start = tl.program_id(1) * per_split
    j_end = tl.minimum(half_g, j_start + per_split)

    if USE_DOT:
        acc = tl.full((BLOCK_N, BLOCK_T), 0.0, tl.float32)
    else:  # summed over the groups once, after the loop
        acc3 = tl.full((BLOCK_N, BLOCK_J, BLOCK_T), 0.0, tl.float32)
    if PREFETCH:
        meta, pair_even, pair_odd, words_even, words_odd = _weight_tile(
            values_ptr, meta_ptr, cols_ptr, offs_n, row_ok, block, j_start, half_g, G, QUADS, EVEN_K, BLOCK_J)
    for j0 in range(j_start, j_end, BLOCK_J):
        if PREFETCH:  # the next tile's loads are in flight while this one is multiplied
            j_next = j0 + BLOCK_J
            if EVEN_K:  # stay in bounds: the last prefetch re-reads the last tile, unused
                j_next = tl.minimum(j_next, j_end - BLOCK_J)
            next_meta, next_even, next_odd, next_words_even, next_words_odd = _weight_tile(
                values_ptr, meta_ptr, cols_ptr, offs_n, row_ok, block, j_next, half_g, G, QUADS, EVEN_K, BLOCK_J)
        else:
            meta, pair_even, pair_odd, words_even, words_odd = _weight_tile(
                values_ptr, meta_ptr, cols_ptr, offs_n, row_ok, block, j0, half_g, G, QUADS, EVEN_K, BLOCK_J)
        offs_j = j0 + tl.arange(0, BLOCK_J)
        if USE_DOT:
            acc = _expanded_dot(acc, x_ptr, pair_even, pair_odd, meta, words_even, words_odd, offs_j, offs_t,
                                token_ok, M, C, stride_xt, stride_xc, half_int, HALF_BITS, EVEN_C and EVEN_K,
                                DOT_PRECISION, DOT_IN_FP32, BLOCK_N, BLOCK_J)
        else:
            for h in tl.static_range(2):
                if h == 0:
                    pair = pair_even
                    words = words_even
                else:
                    pair = pair_odd
                    words = words_odd
                lo, hi, s0, s1 = _unpack_group(pair, meta, h, half_int, HALF_BITS)
                group = 2 * offs_j + h
                if SELECT_X and HALF_BITS == 16:  # each stored value times the activation of its slot
                    x0 = _slot_x(x_ptr, words, group, M, C, offs_t, token_ok, stride_xt, stride_xc, 0,
                                   EVEN_C and EVEN_K)
                    x1 = _slot_x(x_ptr, words, group, M, C, offs_t, token_ok, stride_xt, stride_xc, 1,
                                   EVEN_C and EVEN_K)
                    x2 = _slot_x(x_ptr, words, group, M, C, offs_t, token_ok, stride_xt, stride_xc, 2,
                                   EVEN_C and EVEN_K)
                    x3 = _slot_x(x_ptr, words, group, M, C, offs_t, token_ok, stride_xt, stride_xc, 3,
                                   EVEN_C and EVEN_K)
                    acc3 = _pick_products(acc3, lo.to(dtype, bitcast=True).to(tl.float32),
                                          hi.to(dtype, bitcast=True).to(tl.float32),
                                          _bits(x0) | (_bits(x1) << 16), _bits(x2) | (_bits(x3) << 16),
                                          s0.to(tl.int32), s1.to(tl.int32), dtype, BYTE_PERMUTE, BLOCK_N, BLOCK_J,
                                          BLOCK_T)
                else:  # each slot's weight selected, on the FMA units: no padding of the tokens to 16
                    for k in tl.static_range(4):
                        x_k = _slot_x(x_ptr, words, group, M, C, offs_t, token_ok, stride_xt, stride_xc, k,
                                      EVEN_C and EVEN_K)
                        w_k = slot_weight(lo, hi, s0, s1, k, dtype).to(tl.float32)
                        acc3 += w_k[:, :, None] * x_k.to(tl.float32)[None, :, :]

        if PREFETCH:
            meta, pair_even, pair_odd, words_even, words_odd = (
                next_meta, next_even, next_odd, next_words_even, next_words_odd)

    if not USE_DOT:
        acc = tl.reduce(acc3, 1, _add)
    acc = tl.trans(acc)  # [BLOCK_T, BLOCK_N]
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=row_ok, other=0.0).to(tl.float32)
        if SPLIT_K > 1:
            bias = tl.where(tl.program_id(1) == 0, bias, 0.0)
        acc += bias[None, :]
    y_ptrs = y_ptr + offs_t[:, None] * R + offs_n[None, :]
    if SPLIT_K > 1:  # this split's slice of the [SPLIT_K, T, R] partial sums
        y_ptrs += tl.program_id(1).to(tl.int64) * T * R
    y_mask = token_ok[:, None] & row_ok[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=y_mask)


def decode_arguments(x: torch.Tensor, operands: Operands, split_k: int, y: torch.Tensor) -> tuple[list, dict]:
    """The decode kernel's arguments but its config, for x [T, C] (`decode_input`) into y: (positional,
    constexpr)."""
    values, groups = operands.values, operands.groups
    quads = values.element_size() == 2 and groups % 2 == 0
    bias = operands.bias
    positional = [x, values, operands.metadata, operands.columns, bias if bias is not None else values, y,
                  operands.rows, operands.in_features, x.shape[0], groups, operands.m, x.stride(0), x.stride(1),
                  token_bucket(x.shape[0])]
    constexprs = dict(V=operands.v, HAS_BIAS=bias is not None, QUADS=quads, HALF_BITS=8 * values.element_size(),
                      SPLIT_K=split_k, EVEN_C=operands.in_features == groups * operands.m,
                      DOT_PRECISION=dot_precision(x.dtype), DOT_IN_FP32=x.dtype == torch.bfloat16 and interpreting(),
                      BYTE_PERMUTE=x.is_cuda and not interpreting())
    return positional, constexprs


def decode_output(x: torch.Tensor, rows: int, split_k: int) -> torch.Tensor:
    """What the kernel writes: y [T, R], or with split-K each split's fp32 partial sums [split_k, T, R]
    (every element written: a split with no groups writes zeros)."""
    if split_k > 1:
        return torch.empty(split_k, x.shape[0], rows, dtype=torch.float32, device=x.device)
    return torch.empty(x.shape[0], rows, dtype=x.dtype, device=x.device)


def decode_result(y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """y [T, R] in `dtype` from what the kernel wrote (`decode_output`): split-K's partial sums added."""
    return y.sum(0).to(dtype) if y.dim() == 3 else y


def decode_grid(rows: int, tokens: int, split_k: int, block_n: int, block_t: int) -> tuple[int, int, int]:
    return triton.cdiv(rows, block_n), split_k, triton.cdiv(tokens, block_t)


def _read_in_place(x: torch.Tensor) -> bool:
    """Whether the decode kernel reads x [T, C] as it is: row-major, or channel-major (a channel's
    tokens side by side, as passes/layout.py has producers write it)."""
    return x.stride(1) == 1 or x.stride(0) == 1


def decode_input(x: torch.Tensor) -> torch.Tensor:
    """x [T, C] as the decode kernel reads it: in place where it can, else a row-major copy."""
    return x if _read_in_place(x) else x.contiguous()


def launch_decode(kernel, x: torch.Tensor, operands: Operands, split_k: int = 1, out: torch.Tensor | None = None,
                  **config) -> torch.Tensor:
    """y [T, R] for x [T, C], row-major or channel-major (made for T <= BLOCK_T; more tokens take more
    programs).

    `kernel` is vnm_decode_kernel (config: its blocks, USE_DOT) or an autotuned wrapper; `out`, if
    given, receives y unless split-K stores partial sums of its own."""
    if not _read_in_place(x):
        raise ValueError(f"x must be row-major or channel-major (one stride 1), got strides {tuple(x.stride())}")
    y = out if out is not None and split_k == 1 else decode_output(x, operands.rows, split_k)
    positional, constexprs = decode_arguments(x, operands, split_k, y)
    grid = lambda meta: decode_grid(operands.rows, x.shape[0], split_k, meta["BLOCK_N"], meta["BLOCK_T"])
    kernel[grid](*positional, **constexprs, **config)
    return decode_result(y, x.dtype)
