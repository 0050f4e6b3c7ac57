"""The Gluon prefill kernel of rounds 23-27 (Triton's lower-level dialect): x reused across row blocks.

The package's prefill kernel gathers each row block's kept channels of x.T from L2 into shared
memory, so x is read R/V times (benchmarks/NOTES.md, rounds 2, 11, 21). Here a program owns
ROW_BLOCKS row blocks and BLOCK_T tokens (64 a warpgroup, tokens on the MMA's M side). Each step
brings one dense chunk of row-major x (CHUNK_GROUPS groups of M = 8 channels; no transpose), the row
blocks' expanded weight tiles and their byte-permute selectors (made once per weight from its
channel index) by cp.async into a ring of STAGES steps, issued STAGES - 1 steps ahead. The chunk is
read from shared memory once for all row blocks into registers, each thread holding all 8 channels
of the (token, group) pairs whose kept values it holds in wgmma's register A layout; for each row
block, byte permutes pick the block's 4 kept channels of every group inside each thread, and the
result is wgmma's A operand as it stands; the weight tiles are the B operand. MMA_LAG 1 leaves a
step's wgmmas running into the next step. Correct, and 1.5x slower than the package's kernel after
round 27: integer issue and shared-memory traffic bind (NOTES).
"""

from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import warpgroup_mma, warpgroup_mma_wait

# Two kept fp16 values of one group (8 channels in 4 words, $1-$4) packed in $0: one byte permute
# picks each value's half-word out of words 0-1, one out of words 2-3, a third keeps the right one of
# each ($5, $6: the selectors of `pair_selectors`). One line, no escapes.
_PICK_PAIR: gl.constexpr = gl.constexpr(
    "{ .reg .b32 lo, hi; prmt.b32 lo, $1, $2, $5; prmt.b32 hi, $3, $4, $5; prmt.b32 $0, lo, hi, $6; }")


@gluon.jit
def _picked(w0, w1, w2, w3, selectors, block: gl.constexpr, CHUNK_GROUPS: gl.constexpr, PAIRS: gl.constexpr,
            A_LAYOUT: gl.constexpr):
    """A row block's kept channels of the chunk (4 of each group's 8, as 2 pairs), picked in
    registers: wgmma's A operand [BLOCK_T tokens, 4 * CHUNK_GROUPS]. `selectors` holds the step's
    byte-permute selectors as [(row block, within or upper, group), pair] (0 past the last kept
    slot); `block` is the row block's place among the program's."""
    SELECTORS: gl.constexpr = gl.SliceLayout(0, PAIRS)  # [CHUNK_GROUPS, 2 pairs]
    within = selectors.slice(2 * block * CHUNK_GROUPS, CHUNK_GROUPS).load(SELECTORS)
    upper = selectors.slice((2 * block + 1) * CHUNK_GROUPS, CHUNK_GROUPS).load(SELECTORS)
    pairs = gl.inline_asm_elementwise(_PICK_PAIR, "=r,r,r,r,r,r,r",
                                      [w0, w1, w2, w3, gl.expand_dims(within, 0), gl.expand_dims(upper, 0)],
                                      dtype=gl.int32, is_pure=True, pack=1)  # [BLOCK_T, CHUNK_GROUPS, 2]
    low = (pairs & 0xFFFF).to(gl.int16).to(gl.float16, bitcast=True)
    high = (pairs >> 16).to(gl.int16).to(gl.float16, bitcast=True)
    picked = gl.join(low, high)
    return gl.convert_layout(gl.reshape(picked, [picked.shape[0], 4 * CHUNK_GROUPS]), A_LAYOUT, assert_trivial=True)


@gluon.jit
def _load_step(x_smem, w_smem, selector_smem, x_ptr, w_ptr, selector_ptr, t0, T, words_per_row, first, R, kept,
               step, steps, STAGES: gl.constexpr, ROW_BLOCKS: gl.constexpr, V: gl.constexpr,
               CHUNK_GROUPS: gl.constexpr, BLOCK_T: gl.constexpr, EVEN: gl.constexpr):
    """cp.async of step `step`'s x chunk, its row blocks' expanded weight tiles and their
    byte-permute selectors into ring slot `step % STAGES`, as one commit group: masked, or where
    the tiles divide the problem (EVEN) unmasked, steps past the last reloading the last.
    One copy a buffer: copies into one buffer at indices the compiler cannot tell apart would each
    get a CTA barrier."""
    KS: gl.constexpr = 4 * CHUNK_GROUPS
    WARPS: gl.constexpr = BLOCK_T // 16
    X_COPY: gl.constexpr = gl.BlockedLayout([1, 1, 4], [32 // CHUNK_GROUPS, CHUNK_GROUPS, 1], [WARPS, 1, 1], [2, 1, 0])
    W_COPY: gl.constexpr = gl.BlockedLayout([1, 8], [256 // KS, KS // 8], [WARPS, 1], [1, 0])  # kept slots fastest
    SELECTOR_COPY: gl.constexpr = gl.BlockedLayout([1], [32], [WARPS], [0])
    slot = step % STAGES
    k0 = step * KS
    if EVEN:
        k0 = gl.minimum(step, steps - 1) * KS

    tokens = t0 + gl.arange(0, BLOCK_T, layout=gl.SliceLayout(1, gl.SliceLayout(2, X_COPY)))
    groups = gl.arange(0, CHUNK_GROUPS, layout=gl.SliceLayout(1, gl.SliceLayout(0, X_COPY)))
    word = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(0, X_COPY)))
    columns = gl.expand_dims(k0 + gl.expand_dims(groups, 1) * 4 + gl.expand_dims(word, 0), 0)  # 4 words a group
    rows_x = gl.expand_dims(gl.expand_dims(tokens, 1), 2)
    x_mask = None
    if not EVEN:
        x_mask = (rows_x < T) & (columns < words_per_row)
    async_copy.async_copy_global_to_shared(x_smem.index(slot), x_ptr + rows_x * words_per_row + columns, mask=x_mask)

    rows = first * V + gl.arange(0, ROW_BLOCKS * V, layout=gl.SliceLayout(1, W_COPY))
    slots = k0 + gl.arange(0, KS, layout=gl.SliceLayout(0, W_COPY))
    w_mask = None
    if not EVEN:
        w_mask = gl.expand_dims(rows < R, 1) & gl.expand_dims(slots < kept, 0)
    async_copy.async_copy_global_to_shared(
        w_smem.index(slot), w_ptr + gl.expand_dims(rows, 1) * kept + gl.expand_dims(slots, 0), mask=w_mask)

    entry = gl.arange(0, ROW_BLOCKS * 4 * CHUNK_GROUPS, layout=SELECTOR_COPY)  # [row block, within or upper, group, pair]
    block = first + entry // (4 * CHUNK_GROUPS)
    pair = k0 // 2 + entry // 2 % CHUNK_GROUPS * 2 + entry % 2
    selector_mask = None
    if not EVEN:
        selector_mask = (block * V < R) & (pair < kept // 2)
    async_copy.async_copy_global_to_shared(
        selector_smem.index(slot), selector_ptr + (block * (kept // 2) + pair) * 2 + entry // (2 * CHUNK_GROUPS) % 2,
        mask=selector_mask)
    async_copy.commit_group()


@gluon.jit
def _store_row_block(acc, y_ptr, block, R, T, t0, V: gl.constexpr, MMA: gl.constexpr):
    tokens = t0 + gl.arange(0, acc.shape[0], layout=gl.SliceLayout(1, MMA))
    rows = block * V + gl.arange(0, V, layout=gl.SliceLayout(0, MMA))
    mask = gl.expand_dims(tokens < T, 1) & gl.expand_dims(rows < R, 0)
    gl.store(y_ptr + gl.expand_dims(tokens, 1) * R + gl.expand_dims(rows, 0), acc.to(y_ptr.dtype.element_ty),
             mask=mask)


@gluon.jit
def gluon_prefill_kernel(x_ptr, w_ptr, selector_ptr, y_ptr, R, C, T, G,
                         V: gl.constexpr, ROW_BLOCKS: gl.constexpr, CHUNK_GROUPS: gl.constexpr,
                         STAGES: gl.constexpr, BLOCK_T: gl.constexpr, MMA_LAG: gl.constexpr, EVEN: gl.constexpr,
                         WORDS: gl.constexpr, PAIRS: gl.constexpr, X_SMEM: gl.constexpr):
    """y [T, R] from row-major x [T, C] read as int32 words [T, C / 2] (M = 8), the expanded weight
    [R, 4G] and the selectors [ceil(R/V), 2G, 2] of `pair_selectors`; the layouts come from
    `layouts`."""
    KS: gl.constexpr = 4 * CHUNK_GROUPS
    WARPS: gl.constexpr = BLOCK_T // 16
    MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[WARPS, 1], instr_shape=[16, V, 16])
    A_LAYOUT: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=2)
    W_SMEM: gl.constexpr = gl.NVMMASharedLayout.get_default_for([ROW_BLOCKS * V, KS], gl.float16)
    SELECTOR_SMEM: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [0])
    GROUP_WORDS: gl.constexpr = gl.SliceLayout(2, PAIRS)  # [BLOCK_T, CHUNK_GROUPS]: one word of each group

    t0 = gl.program_id(1) * BLOCK_T
    first = gl.program_id(0) * ROW_BLOCKS
    kept = 4 * G
    steps = (kept + KS - 1) // KS
    words_per_row = C // 2
    x_smem = gl.allocate_shared_memory(gl.int32, [STAGES, BLOCK_T, CHUNK_GROUPS, 4], X_SMEM)
    w_smem = gl.allocate_shared_memory(gl.float16, [STAGES, ROW_BLOCKS * V, KS], W_SMEM)
    selector_smem = gl.allocate_shared_memory(gl.int32, [STAGES, ROW_BLOCKS * 4 * CHUNK_GROUPS], SELECTOR_SMEM)
    acc0 = gl.zeros([BLOCK_T, V], gl.float32, MMA)
    acc1 = gl.zeros([BLOCK_T, V], gl.float32, MMA)
    acc2 = gl.zeros([BLOCK_T, V], gl.float32, MMA)
    acc3 = gl.zeros([BLOCK_T, V], gl.float32, MMA)
    # The A operands of the wgmmas still in flight (MMA_LAG 1), kept alive through the wait's deps.
    a0 = gl.zeros([BLOCK_T, KS], gl.float16, A_LAYOUT)
    a1 = gl.zeros([BLOCK_T, KS], gl.float16, A_LAYOUT)
    a2 = gl.zeros([BLOCK_T, KS], gl.float16, A_LAYOUT)
    a3 = gl.zeros([BLOCK_T, KS], gl.float16, A_LAYOUT)

    for step in gl.static_range(STAGES - 1):
        _load_step(x_smem, w_smem, selector_smem, x_ptr, w_ptr, selector_ptr, t0, T, words_per_row, first, R, kept,
                   step, steps, STAGES, ROW_BLOCKS, V, CHUNK_GROUPS, BLOCK_T, EVEN)
    for step in range(steps):
        async_copy.wait_group(STAGES - 2)  # this step's copies, from this thread
        gl.thread_barrier()  # and from every other thread (cp.async writes need no proxy fence before wgmma)
        slot = step % STAGES
        x_words = x_smem.index(slot).load(WORDS)
        evens, odds = gl.split(gl.reshape(x_words, [BLOCK_T, CHUNK_GROUPS, 2, 2]))  # words 0, 2 and 1, 3
        w0, w2 = gl.split(evens)
        w1, w3 = gl.split(odds)
        w0 = gl.expand_dims(gl.convert_layout(w0, GROUP_WORDS, assert_trivial=True), 2)
        w1 = gl.expand_dims(gl.convert_layout(w1, GROUP_WORDS, assert_trivial=True), 2)
        w2 = gl.expand_dims(gl.convert_layout(w2, GROUP_WORDS, assert_trivial=True), 2)
        w3 = gl.expand_dims(gl.convert_layout(w3, GROUP_WORDS, assert_trivial=True), 2)
        selectors = selector_smem.index(slot).reshape([ROW_BLOCKS * 2 * CHUNK_GROUPS, 2])
        weights = w_smem.index(slot)
        n0 = _picked(w0, w1, w2, w3, selectors, 0, CHUNK_GROUPS, PAIRS, A_LAYOUT)
        acc0 = warpgroup_mma(n0, weights.slice(0, V).permute((1, 0)), acc0, is_async=True)
        n1, n2, n3 = a1, a2, a3
        if ROW_BLOCKS >= 2:
            n1 = _picked(w0, w1, w2, w3, selectors, 1, CHUNK_GROUPS, PAIRS, A_LAYOUT)
            acc1 = warpgroup_mma(n1, weights.slice(V, V).permute((1, 0)), acc1, is_async=True)
        if ROW_BLOCKS >= 4:
            n2 = _picked(w0, w1, w2, w3, selectors, 2, CHUNK_GROUPS, PAIRS, A_LAYOUT)
            acc2 = warpgroup_mma(n2, weights.slice(2 * V, V).permute((1, 0)), acc2, is_async=True)
            n3 = _picked(w0, w1, w2, w3, selectors, 3, CHUNK_GROUPS, PAIRS, A_LAYOUT)
            acc3 = warpgroup_mma(n3, weights.slice(3 * V, V).permute((1, 0)), acc3, is_async=True)
        acc0, acc1, acc2, acc3, a0, a1, a2, a3, n0, n1, n2, n3 = warpgroup_mma_wait(
            MMA_LAG * ROW_BLOCKS, deps=(acc0, acc1, acc2, acc3, a0, a1, a2, a3, n0, n1, n2, n3))
        a0, a1, a2, a3 = n0, n1, n2, n3
        gl.thread_barrier()  # the previous step's slot is free in every warpgroup: refill it
        _load_step(x_smem, w_smem, selector_smem, x_ptr, w_ptr, selector_ptr, t0, T, words_per_row, first, R, kept,
                   step + STAGES - 1, steps, STAGES, ROW_BLOCKS, V, CHUNK_GROUPS, BLOCK_T, EVEN)
    acc0, acc1, acc2, acc3, a0, a1, a2, a3 = warpgroup_mma_wait(0, deps=(acc0, acc1, acc2, acc3, a0, a1, a2, a3))
    async_copy.wait_group(0)
    _store_row_block(acc0, y_ptr, first, R, T, t0, V, MMA)
    if ROW_BLOCKS >= 2:
        _store_row_block(acc1, y_ptr, first + 1, R, T, t0, V, MMA)
    if ROW_BLOCKS >= 4:
        _store_row_block(acc2, y_ptr, first + 2, R, T, t0, V, MMA)
        _store_row_block(acc3, y_ptr, first + 3, R, T, t0, V, MMA)


def _a_operand_bases(tokens: int, kept_slots: int) -> tuple[list, list, list]:
    """wgmma's register A layout (fp16, tokens / 16 warps) of a [tokens, kept_slots] tile as
    linear-layout bases (register, lane, warp) over (token, slot)."""
    registers = [[0, 1], [8, 0]] + [[0, 8 << i] for i in range(kept_slots.bit_length() - 4)]
    warps = [[16 << i, 0] for i in range(tokens.bit_length() - 5)]
    return registers, [[0, 2], [0, 4], [1, 0], [2, 0], [4, 0]], warps


def layouts(tokens: int, chunk_groups: int) -> tuple[gl.DistributedLinearLayout, gl.DistributedLinearLayout,
                                                      gl.SharedLinearLayout]:
    """(words, pairs, shared words) for M = 8: the layout of a chunk of x as int32 words
    [tokens, chunk_groups, 4], of the picked pairs [tokens, chunk_groups, 2], and of the chunk in
    shared memory. Kept slot k = 4 g + 2 p + h of the A layout is half h of pair p of group g; a
    thread holds all 4 words of each group it picks from (the lanes that differ in p only hold the
    same words: a broadcast), so the pick never leaves the thread. A quarter-warp's 16-byte reads
    cover groups g, g + 1 of tokens t, t + 1: in shared memory token bit 0 flips group bit 1, so
    the four fall in different banks."""
    registers, lanes, warps = _a_operand_bases(tokens, 4 * chunk_groups)
    split = lambda basis: [basis[0], basis[1] >> 2, (basis[1] >> 1) & 1]  # (token, group, pair); drops h
    half = [0, 1]
    pairs = gl.DistributedLinearLayout([split(b) for b in registers if b != half], [split(b) for b in lanes],
                                       [split(b) for b in warps], [], [tokens, chunk_groups, 2])
    words = gl.DistributedLinearLayout(
        [[0, 0, 1], [0, 0, 2]] + [split(b) for b in registers if b != half and split(b)[2] == 0],
        [split(b) if split(b)[2] == 0 else [0, 0, 0] for b in lanes], [split(b) for b in warps], [],
        [tokens, chunk_groups, 4])
    shared = gl.SharedLinearLayout(
        [[0, 0, 1], [0, 0, 2]] + [[0, 1 << i, 0] for i in range(chunk_groups.bit_length() - 1)] + [[1, 2, 0]]
        + [[1 << i, 0, 0] for i in range(1, tokens.bit_length() - 1)])
    return words, pairs, shared


def pair_selectors(channels: torch.Tensor) -> torch.Tensor:
    """The byte-permute selectors [blocks, kept / 2, 2] (within, upper) of `_PICK_PAIR` for the
    channel index [blocks, kept] at M = 8: kept slots 2q and 2q + 1 are pair q of their group. Made
    once per weight, so the kernel spends no instructions on them."""
    even, odd = channels[:, 0::2] & 7, channels[:, 1::2] & 7
    byte_even = ((even >> 1) & 1) * 4 + (even & 1) * 2  # the value's first byte within its 2 words
    byte_odd = ((odd >> 1) & 1) * 4 + (odd & 1) * 2
    within = byte_even | ((byte_even + 1) << 4) | (byte_odd << 8) | ((byte_odd + 1) << 12)
    upper_even = (even >> 2) * 4  # words 0-1 or 2-3, then the even value to the low half
    upper_odd = (odd >> 2) * 4 + 2
    upper = upper_even | ((upper_even + 1) << 4) | (upper_odd << 8) | ((upper_odd + 1) << 12)
    return torch.stack([within, upper], dim=-1).to(torch.int32).contiguous()


def launch(x: torch.Tensor, expanded: torch.Tensor, selectors: torch.Tensor, v: int, in_features: int,
           row_blocks: int, chunk_groups: int, stages: int = 3, block_t: int = 64, mma_lag: int = 1,
           out: torch.Tensor | None = None, kernel=gluon_prefill_kernel) -> torch.Tensor:
    """y = x @ W.T from row-major fp16 x [T, C] at M = 8 (C even), with `pair_selectors` of the
    weight's channel index; chunk_groups 4 or 8; block_t 64 (one warpgroup) or 128 (two); mma_lag 1
    leaves a step's wgmmas running into the next step.
    `kernel` stands in for gluon_prefill_kernel (gpu_check's capture of the compiled kernel)."""
    tokens, rows, groups = x.shape[0], expanded.shape[0], expanded.shape[1] // 4
    y = torch.empty(tokens, rows, dtype=x.dtype, device=x.device) if out is None else out
    words, pairs, shared = layouts(block_t, chunk_groups)
    grid = (triton.cdiv(triton.cdiv(rows, v), row_blocks), triton.cdiv(tokens, block_t))
    even = rows % (row_blocks * v) == 0 and tokens % block_t == 0 and groups % chunk_groups == 0
    kernel[grid](x.view(torch.int32), expanded, selectors, y, rows, in_features, tokens, groups, V=v,
                 ROW_BLOCKS=row_blocks, CHUNK_GROUPS=chunk_groups, STAGES=stages, BLOCK_T=block_t,
                 MMA_LAG=mma_lag, EVEN=even, WORDS=words, PAIRS=pairs, X_SMEM=shared, num_warps=block_t // 16)
    return y
