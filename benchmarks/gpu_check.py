"""One GPU call: the device's ceilings, then correctness and timings of many kernel variants.

    PYTHONPATH=. python3 benchmarks/gpu_check.py --out $OUT/check.json

Every variant is checked against a float64 reference (random token rows of a poisoned output)
before it is timed. Prefill times are CUDA-graph replays of one call (kernel time without Python's
launch cost, which do_bench counts); decode times are CUDA-graph replays of many calls that rotate
over enough weight copies to overflow L2, so the weight streams from device memory as it does in a
real decode step.

This is the exploration harness: its variant lists are those of the last round (benchmarks/NOTES.md
tells the rounds; results/gpu_check-round*.json hold each round's numbers). The sweep and the
tuning tables come from benchmarks/kernels.py.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
import warnings

if "--smoke" in sys.argv:  # CPU dry run of this script under the Triton interpreter, tiny shapes
    os.environ["TRITON_INTERPRET"] = "1"

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from vnm_compile.format import VNMWeight
from vnm_compile.kernels.decode import launch_decode, vnm_decode_kernel
from vnm_compile.kernels.prefill import channel_index, expand_weight, launch_prefill, transpose, vnm_prefill_kernel
from timing import DEVICE, ceilings, fake_weight, graph_us, log, precompile
import gluon_prefill

warnings.filterwarnings("ignore", message="column_select='optimal'")
L2_BYTES = 60 << 20


def graph_ms(calls) -> float:
    return graph_us(calls, replays=15) / 1e3


def random_weight(rows, cols, v, m, dtype, seed=0):
    torch.manual_seed(seed)
    return VNMWeight.from_dense(torch.randn(rows, cols, device=DEVICE).to(dtype), v, m)


def check(y, x, weight, bias=None, samples=256) -> float:
    """Relative error of y against float64 on random token rows; inf if anything is not finite."""
    if not torch.isfinite(y).all():
        return float("inf")
    rows = torch.randperm(x.shape[0], device=x.device)[:samples]
    ref = x[rows].double() @ weight.to_dense().double().T
    if bias is not None:
        ref += bias.double()
    return float((y[rows].double() - ref).norm() / ref.norm())


class Capture:
    """Stands in for a kernel in the launchers and keeps the last compiled kernel it ran."""

    def __init__(self, kernel):
        self.kernel, self.last = kernel, None

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.last = self.kernel[grid](*args, **kwargs)
            return self.last
        return run


class Kernels:
    """Routes each launcher's call to its kernel; `last` is the last compiled kernel run."""

    def __init__(self):
        self.prefill, self.decode, self.last = Capture(vnm_prefill_kernel), Capture(vnm_decode_kernel), None
        self.gluon = Capture(gluon_prefill.gluon_prefill_kernel)

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            kernel = self.prefill if "W_LEFT" in kwargs else self.gluon if "WORDS" in kwargs else self.decode
            self.last = kernel[grid](*args, **kwargs)
            return self.last
        return run



def compiled_stats():
    compiled = KERNEL.last
    try:
        ptx = compiled.asm.get("ptx", "")
        return {"regs": compiled.n_regs, "spills": compiled.n_spills, "shared": compiled.metadata.shared,
                "wgmma": ptx.count("wgmma.mma_async"), "mma_sync": ptx.count("mma.sync"),
                "cp_async": ptx.count("cp.async.ca") + ptx.count("cp.async.cg"), "cp_async_ca": ptx.count("cp.async.ca"),
                "cp_async_bulk": ptx.count("cp.async.bulk"), "ld_global": ptx.count("ld.global"),
                "ld_global_v4": ptx.count("ld.global.v4")}
    except Exception as error:
        return {"stats_error": repr(error)[:200]}


# ---------------------------------------------------------------- variants
# prefill: (BLOCK_N, BLOCK_T, BLOCK_K, W_LEFT, num_warps, num_stages, GROUP_N)
PREFILL_CONFIGS = [
    (64, 128, 64, True, 4, 3, 64), (64, 128, 64, True, 4, 4, 64), (64, 128, 64, True, 4, 3, 16),
    (64, 128, 128, True, 4, 3, 64), (64, 64, 64, True, 4, 3, 64), (64, 64, 128, True, 4, 3, 64),
    (64, 64, 64, True, 4, 4, 64), (64, 128, 64, True, 8, 3, 64),
    (128, 128, 64, True, 8, 3, 32), (128, 64, 64, True, 8, 3, 32), (32, 128, 64, False, 4, 4, 128),
    (32, 64, 64, False, 4, 3, 128),
    # round 11: 256-token tiles read each weight tile half as often (the L2 traffic of a 64-row tile)
    (64, 256, 64, True, 8, 3, 64), (64, 256, 64, True, 8, 4, 64), (64, 256, 32, True, 8, 4, 64),
    (64, 256, 64, True, 4, 3, 64), (64, 256, 64, False, 8, 3, 64), (64, 256, 64, True, 8, 3, 16),
    (128, 256, 64, True, 8, 3, 32),
]
# decode: (BLOCK_N, BLOCK_J, SPLIT_K, num_warps, num_stages, use_dot, select_x, prefetch). Rounds 9-10:
# the activation of each stored value's slot picked by one prmt byte permute (select_x), whole rows
# of group pairs a tile, and the next tile's loads issued before this one is multiplied (prefetch).
BASELINE_DECODE = [(8, 64, 1, 4, 4, False, False, False), (32, 32, 2, 4, 3, True, False, False)]
PICK_SHAPES = [(8, 64, 1, 4), (16, 64, 1, 4), (16, 64, 1, 2), (8, 32, 1, 1), (16, 32, 1, 2), (8, 128, 1, 4),
               (16, 128, 1, 4), (8, 256, 1, 4), (16, 256, 1, 8), (8, 256, 1, 8), (8, 128, 1, 2), (32, 128, 1, 8),
               (4, 256, 1, 4), (4, 128, 1, 2), (16, 16, 1, 1), (8, 64, 2, 4),
               # round 12: programs of 2-8 rows on 1-8 warps for one token on the H100
               (2, 256, 1, 4), (2, 128, 1, 2), (2, 64, 1, 1), (4, 64, 1, 1), (4, 128, 1, 4), (4, 256, 1, 8),
               (8, 64, 1, 2), (4, 256, 1, 2)]
DECODE_CONFIGS = BASELINE_DECODE + [
    (bn, bj, sk, warps, 4, False, True, prefetch) for bn, bj, sk, warps in PICK_SHAPES for prefetch in (False, True)]
# rounds 14-16: 4-16 tokens on the tensor cores as one dot a tile over its kept channels (the 2:4
# pairs expanded in registers by joins), 64 or 32 rows, split-K 1-4, prefetch (round 15 also timed
# 8 warps and split-K 8: slower)
DOT_SHAPES = [(64, bj, sk, 4) for bj in (16, 32) for sk in (1, 2, 4)] + [
    (32, bj, sk, 4) for bj in (16, 32) for sk in (2, 4)]
DECODE_CONFIGS += [(bn, bj, sk, warps, 3, True, False, True) for bn, bj, sk, warps in DOT_SHAPES]
# round 17: the winners under a register cap (maxnreg), for more programs an SM: (config, cap)
CAPPED_DECODE = [((4, 256, 1, 4, 4, False, True, False), cap) for cap in (64, 56)] + [
    ((4, 128, 1, 4, 4, False, True, False), cap) for cap in (64, 56)] + [
    ((4, 64, 1, 1, 4, False, True, False), 64), ((16, 64, 1, 4, 4, False, True, True), 168),
    ((16, 64, 1, 4, 4, False, True, True), 128), ((16, 32, 1, 2, 4, False, True, False), 128),
    ((64, 32, 4, 4, 3, True, False, True), 168), ((64, 32, 4, 4, 3, True, False, True), 128),
    ((64, 16, 4, 4, 3, True, False, True), 128), ((32, 16, 4, 4, 3, True, False, True), 96),
    ((32, 16, 4, 4, 3, True, False, True), 80)]


# round 6: the prefill kernel on few tokens, x read in place (row-major, no transpose), streaming the
# expanded weight (4/M of dense) with no 2:4 expansion work: (BLOCK_N, BLOCK_T, BLOCK_K, W_LEFT,
# num_warps, num_stages, GROUP_N)
ROWX_CONFIGS = [
    (16, 16, 128, False, 4, 4, 1), (16, 16, 256, False, 4, 3, 1), (16, 16, 64, False, 4, 6, 1),
    (16, 16, 128, False, 2, 5, 1), (32, 16, 128, False, 4, 4, 1), (32, 16, 256, False, 4, 3, 1),
    (32, 16, 128, False, 4, 6, 1), (64, 16, 128, True, 4, 4, 1), (64, 16, 128, False, 4, 4, 1),
    (64, 16, 256, True, 8, 3, 1), (16, 32, 128, False, 4, 4, 1), (32, 32, 128, False, 4, 4, 1),
]


@triton.jit
def _sum(a, b):
    return a + b


@triton.jit
def loads_only_kernel(x_ptr, values_ptr, meta_ptr, cols_ptr, y_ptr, G, M, BLOCK_N: tl.constexpr,
                      BLOCK_J: tl.constexpr, GATHER_X: tl.constexpr):
    """The decode kernel's loads and nothing else: each row tile's 64-bit value quads, metadata bytes
    and the row block's column words (and, with GATHER_X, the 8 activations of each group pair's kept
    channels, one token), combined by integer adds so that no load is dead. Its time is what the
    decode kernel's access pattern costs before any 2:4 work (round 18)."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    block = (tl.program_id(0) * BLOCK_N) // 64
    half_g = (G + 1) // 2
    acc = tl.zeros((BLOCK_N, BLOCK_J), tl.int32)
    for j0 in range(0, half_g, BLOCK_J):
        offs_j = j0 + tl.arange(0, BLOCK_J)
        j_ok = offs_j < half_g
        quad = tl.load(values_ptr + offs_n[:, None] * half_g + offs_j[None, :], mask=j_ok[None, :], other=0)
        meta = tl.load(meta_ptr + offs_n[:, None] * half_g + offs_j[None, :], mask=j_ok[None, :], other=0)
        acc += (quad.to(tl.int32) ^ (quad >> 32).to(tl.int32)) + meta.to(tl.int32)
        words_even = tl.load(cols_ptr + block * G + 2 * offs_j, mask=j_ok, other=0)
        words_odd = tl.load(cols_ptr + block * G + 2 * offs_j + 1, mask=j_ok, other=0)
        if GATHER_X:
            for k in tl.static_range(4):
                x_even = tl.load(x_ptr + 2 * offs_j * M + ((words_even >> (8 * k)) & 0xFF), mask=j_ok, other=0)
                x_odd = tl.load(x_ptr + (2 * offs_j + 1) * M + ((words_odd >> (8 * k)) & 0xFF), mask=j_ok, other=0)
                acc += (x_even.to(tl.int16, bitcast=True).to(tl.int32)
                        ^ x_odd.to(tl.int16, bitcast=True).to(tl.int32))[None, :]
        else:
            acc += (words_even ^ words_odd)[None, :]
    tl.store(y_ptr + offs_n, tl.reduce(acc, 1, _sum))


# (BLOCK_N, BLOCK_J, num_warps) of the one-token picks; R must be a multiple of BLOCK_N
LOADS_ONLY_TILES = [(4, 128, 4), (4, 64, 1), (8, 128, 4), (4, 128, 2)]


KERNEL = Kernels()


def run_loads_only(x, weight, tile, gather_x):
    bn, bj, warps = tile
    rows = weight.values.shape[0]
    y = torch.empty(rows, dtype=torch.int32, device=x.device)
    loads_only_kernel[(rows // bn,)](x, weight.values.view(torch.int64), weight.metadata,
                                     weight.columns.view(torch.int32), y, weight.groups, weight.m, BLOCK_N=bn,
                                     BLOCK_J=bj, GATHER_X=gather_x, num_warps=warps)
    return y


def fits(cfg, v):
    """BLOCK_N must divide V: a tile's rows share one row block's kept channels."""
    return cfg[0] <= v


def run_prefill(layout, cfg, expanded, bias=None, out=None):
    """layout["xt"]: x.T from `transpose`, or the view x.t() of a row-major x."""
    bn, bt, bk, w_left, warps, stages, group_n = cfg
    weight = layout["weight"]
    return launch_prefill(
        KERNEL, layout["xt"], expanded, layout["channels"], bias, weight.v, weight.m, weight.in_features, out=out,
        BLOCK_N=bn, BLOCK_T=bt, BLOCK_K=bk, W_LEFT=w_left, GROUP_N=group_n, num_warps=warps, num_stages=stages,
    )


# Rounds 23-27: the Gluon prefill kernel (gluon_prefill.py), M = 8, V = 64: x read row-major in dense
# chunks once for ROW_BLOCKS row blocks, each block's kept channels picked in registers by byte
# permutes into wgmma's register A operand; round 24 brings x, weights and channel indices through
# a shared-memory ring; round 26 precomputes the selectors.
# (ROW_BLOCKS, CHUNK_GROUPS, STAGES, BLOCK_T, MMA_LAG)
GLUON_CONFIGS = [(1, 8, 4, 128, 1), (2, 8, 4, 64, 1), (4, 8, 4, 64, 1), (2, 8, 4, 128, 1), (4, 8, 4, 128, 0),
                 (4, 8, 4, 128, 1), (4, 8, 3, 128, 1)]


def gluon_fits(v, m):
    return DEVICE == "cuda" and v == 64 and m == 8


def run_gluon(x, selectors, weight, cfg, expanded, out=None):
    """x row-major (no transpose); `selectors` from gluon_prefill.pair_selectors, made once."""
    return gluon_prefill.launch(x, expanded, selectors, weight.v, weight.in_features, *cfg, out=out,
                                kernel=KERNEL)


def run_decode(x, weight, cfg, out=None, maxnreg=None):
    bn, bj, split_k, warps, stages, use_dot, select_x, prefetch = cfg
    cap = {} if maxnreg is None else {"maxnreg": maxnreg}
    block_t = 16 if use_dot else min(16, triton.next_power_of_2(x.shape[0]))
    return launch_decode(KERNEL, x, weight.values, weight.columns, weight.metadata, None, weight.v, weight.m,
                         weight.in_features, split_k=split_k, out=out, USE_DOT=use_dot, SELECT_X=select_x,
                         PREFETCH=prefetch,
                         BLOCK_N=bn, BLOCK_T=block_t, BLOCK_J=bj, num_warps=warps, num_stages=stages, **cap)


def decode_fits(cfg, tokens):
    """FMA configs whose [BLOCK_N, BLOCK_J, tokens] accumulator stays under ~64 registers a thread."""
    bn, bj, _, warps, _, use_dot, *_ = cfg
    return use_dot or bn * bj * min(16, triton.next_power_of_2(tokens)) <= 64 * 32 * warps


def compile_job(job):
    """Compile (and run once) one variant in a worker, filling Triton's on-disk cache."""
    kind, rows, cols, tokens, v, m, cfg = job
    torch.cuda.init()
    weight = fake_weight(rows, cols, v, m)
    try:
        if kind == "gluon":
            x = torch.randn(tokens, cols, device=DEVICE, dtype=torch.float16)
            selectors = gluon_prefill.pair_selectors(channel_index(weight.columns, m))
            run_gluon(x, selectors, weight, cfg, expand_weight(weight.values, weight.metadata))
        elif kind in ("prefill", "rowx"):
            x = torch.randn(tokens, cols, device=DEVICE, dtype=torch.float16)
            layout = {"xt": x.t() if kind == "rowx" else transpose(x), "weight": weight,
                      "channels": channel_index(weight.columns, m)}
            run_prefill(layout, cfg, expand_weight(weight.values, weight.metadata))
        else:
            run_decode(torch.randn(tokens, cols, device=DEVICE, dtype=torch.float16), weight, cfg)
        torch.cuda.synchronize()
        return None
    except Exception as error:  # reported, not fatal: the main process retries and records it
        return f"{job}: {error!r}"[:400]


def measure(run, timed, x, weight, rows, dtype, nbytes=None) -> dict:
    """One variant: `run(out)` into an output poisoned with NaN, checked against float64, then
    `timed()` in ms (GB/s over `nbytes` if given); an error is recorded, not raised."""
    try:
        y = run(torch.full((x.shape[0], rows), float("nan"), device=DEVICE, dtype=dtype))
        err = check(y, x, weight)
        stats = compiled_stats()
        ms = timed()
        return {"ms": ms, "err": err, **({"GBps": nbytes / ms / 1e6} if nbytes else {}), **stats}
    except Exception as error:
        return {"error": repr(error)[:300]}


def prefill_case(rows, cols, tokens, v, m, configs, results, dtype=torch.float16):
    key = f"{rows}x{cols}@{tokens} {v}:2:{m}"
    weight = random_weight(rows, cols, v, m, dtype)
    x = torch.randn(tokens, cols, device=DEVICE, dtype=dtype)
    layout = {"xt": transpose(x), "weight": weight, "channels": channel_index(weight.columns, m)}
    expanded = expand_weight(weight.values, weight.metadata)
    dense = weight.to_dense().contiguous()
    entry = {"rows": rows, "cols": cols, "tokens": tokens, "v": v, "m": m}
    entry["dense_ms"] = graph_ms([lambda: F.linear(x, dense)])
    kc = 4 * weight.groups
    xc = torch.randn(tokens, kc, device=DEVICE, dtype=dtype)
    wc = torch.randn(rows, kc, device=DEVICE, dtype=dtype)
    entry["condensed_ms"] = graph_ms([lambda: F.linear(xc, wc)])
    entry["transpose_ms"] = graph_ms([lambda: transpose(x)])
    entry["torch_transpose_ms"] = graph_ms([lambda: x.t().contiguous()])
    entry["variants"] = {}
    for cfg in configs:
        if not fits(cfg, v):
            continue
        entry["variants"][f"exp {cfg}"] = measure(
            lambda y: run_prefill(layout, cfg, expanded, out=y),
            lambda: graph_ms([lambda: run_prefill(layout, cfg, expanded)]), x, weight, rows, dtype)
    if gluon_fits(v, m):  # reads x row-major: compare with exp's +T ratio
        selectors = gluon_prefill.pair_selectors(layout["channels"])
        for cfg in GLUON_CONFIGS:
            entry["variants"][f"gl {cfg}"] = measure(
                lambda y: run_gluon(x, selectors, weight, cfg, expanded, out=y),
                lambda: graph_ms([lambda: run_gluon(x, selectors, weight, cfg, expanded)]), x, weight, rows, dtype)
    dense_ms, tr = entry["dense_ms"], entry["transpose_ms"]
    log(f"\n{key}: dense {dense_ms*1e3:.1f}us  condensed bound {entry['condensed_ms']*1e3:.1f}us "
        f"({dense_ms/entry['condensed_ms']:.2f}x)  transpose triton {tr*1e3:.1f}us torch "
        f"{entry['torch_transpose_ms']*1e3:.1f}us")
    for name, r in sorted(entry["variants"].items(), key=lambda kv: kv[1].get("ms", 1e9)):
        if "ms" in r:
            log(f"  {name:40s} {r['ms']*1e3:7.1f}us {dense_ms/r['ms']:.2f}x (+T {dense_ms/(r['ms']+tr):.2f}x) "
                f"{r['ms']/entry['condensed_ms']:.2f} of bound err {r['err']:.1e} regs {r.get('regs')} "
                f"spills {r.get('spills')} cp {r.get('cp_async')} (ca {r.get('cp_async_ca')}) ld {r.get('ld_global')} "
                f"wgmma {r.get('wgmma')} smem {r.get('shared')}")
        else:
            log(f"  {name:40s} ERROR {r['error']}")
    results["prefill"][key] = entry
    return entry


def decode_case(rows, cols, tokens, v, m, results, dtype=torch.float16):
    key = f"{rows}x{cols}@{tokens} {v}:2:{m}"
    weight = random_weight(rows, cols, v, m, dtype)
    copies = max(2, -(-3 * L2_BYTES // weight.nbytes))
    weights = [weight] + [VNMWeight(weight.values.clone(), weight.columns.clone(), weight.metadata.clone(), v, m, cols)
                          for _ in range(copies - 1)]
    dense_copies = max(2, -(-3 * L2_BYTES // (rows * cols * 2)))
    denses = [weight.to_dense().contiguous() for _ in range(dense_copies)]
    x = torch.randn(tokens, cols, device=DEVICE, dtype=dtype)
    entry = {"rows": rows, "cols": cols, "tokens": tokens, "v": v, "m": m, "compressed_bytes": weight.nbytes,
             "dense_bytes": rows * cols * 2}
    entry["dense_ms"] = graph_ms([lambda d=d: F.linear(x, d) for d in denses])
    if tokens == 1 and dtype == torch.float16 and weight.groups % 2 == 0:
        for gather_x in (False, True):
            entry[f"loads_only{'_x' if gather_x else ''}_ms"] = min(
                graph_ms([lambda w=w: run_loads_only(x, w, tile, gather_x) for w in weights])
                for tile in LOADS_ONLY_TILES if rows % tile[0] == 0)
    entry["variants"] = {}
    expanded = expand_weight(weight.values, weight.metadata)
    expanded_copies = [expanded] + [expanded.clone() for _ in range(max(1, -(-3 * L2_BYTES // expanded.nbytes)) - 1)]
    # rowx: x read in place (row-major), from 4 tokens on (round 6; round 8 measured a channel-major x.T)
    layout = {"xt": x.t(), "weight": weight, "channels": channel_index(weight.columns, m)}
    for cfg in ROWX_CONFIGS if tokens >= 4 else []:
        if not fits(cfg, v) or cfg[1] < min(16, triton.next_power_of_2(tokens)):
            continue
        entry["variants"][f"rowx {cfg}"] = measure(
            lambda y: run_prefill(layout, cfg, expanded, out=y),
            lambda: graph_ms([lambda e=e: run_prefill(layout, cfg, e) for e in expanded_copies]),
            x, weight, rows, dtype, expanded.nbytes)
    for cfg, cap in [(cfg, None) for cfg in DECODE_CONFIGS] + CAPPED_DECODE:
        if not fits(cfg, v) or not decode_fits(cfg, tokens):
            continue
        body = 'dot' if cfg[5] else 'prmt' if cfg[6] else 'fma'
        name = f"{body}{' pf' if cfg[7] else ''} bn{cfg[0]} bj{cfg[1]} sk{cfg[2]} w{cfg[3]} s{cfg[4]}"
        entry["variants"][name + (f" r{cap}" if cap else "")] = measure(
            lambda y: run_decode(x, weight, cfg, out=y, maxnreg=cap),
            lambda: graph_ms([lambda w=w: run_decode(x, w, cfg, maxnreg=cap) for w in weights]), x, weight, rows,
            dtype, weight.nbytes)
    dense_ms = entry["dense_ms"]
    log(f"\n{key}: dense {dense_ms*1e3:.1f}us ({entry['dense_bytes']/dense_ms/1e6:.0f} GB/s), "
        f"compressed {weight.nbytes/2**20:.1f} MiB")
    if "loads_only_ms" in entry:
        log("  loads only (same tiles, no 2:4 work): " + ", ".join(
            f"{name} {entry[key_ms]*1e3:.2f}us ({weight.nbytes/entry[key_ms]/1e6:.0f} GB/s)"
            for name, key_ms in (("weight", "loads_only_ms"), ("weight + x gathers", "loads_only_x_ms"))))
    for name, r in sorted(entry["variants"].items(), key=lambda kv: kv[1].get("ms", 1e9)):
        if "ms" in r:
            log(f"  {name:40s} {r['ms']*1e3:7.2f}us {dense_ms/r['ms']:.2f}x dense {r['GBps']:.0f} GB/s err "
                f"{r['err']:.1e} regs {r.get('regs')} spills {r.get('spills')} cp {r.get('cp_async')} "
                f"ld {r.get('ld_global')} mma {r.get('mma_sync')}")
        else:
            log(f"  {name:40s} ERROR {r['error']}")
    results["decode"][key] = entry


def best_variants_of(results):
    spec = []
    for kind, key in (("prefill", "4096x4096@8192 64:2:8"), ("prefill", "4096x4096@8192 64:2:16"),
                      ("decode", "4096x4096@1 64:2:8"), ("decode", "4096x4096@16 64:2:8")):
        entry = results[kind].get(key)
        if not entry:
            continue
        timed = [(r["ms"], name) for name, r in entry["variants"].items()
                 if "ms" in r and not name.startswith("gl ")]  # gl variants are not profiled
        name = min(timed)[1]
        case = [entry["rows"], entry["cols"], entry["tokens"], entry["v"], entry["m"]]
        if kind == "prefill":
            spec.append([kind, case, list(eval(name.split(" ", 1)[1]))])
        else:
            body, *parts = name.split()
            bn, bj, sk, w, st = (int(part[2:] if part[:2] in ("bn", "bj", "sk") else part[1:])
                                 for part in parts if part != "pf")
            spec.append([kind, case, [bn, bj, sk, w, st, body == "dot", body == "prmt", "pf" in parts]])
    log("profiling", spec)
    return spec


def profile(args):
    """Run the named variants once each (for ncu)."""
    spec = json.loads(args.profile)
    for kind, case, cfg in spec:
        rows, cols, tokens, v, m = case
        weight = random_weight(rows, cols, v, m, torch.float16)
        x = torch.randn(tokens, cols, device=DEVICE, dtype=torch.float16)
        if kind == "prefill":
            layout = {"xt": transpose(x), "weight": weight, "channels": channel_index(weight.columns, m)}
            exp = expand_weight(weight.values, weight.metadata)
            run_prefill(layout, tuple(cfg), exp)
        else:
            run_decode(x, weight, tuple(cfg))
    torch.cuda.synchronize()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="check.json")
    parser.add_argument("--skip-precompile", action="store_true")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--decode-only", action="store_true", help="skip the prefill cases")
    parser.add_argument("--prefill-only", action="store_true", help="skip the decode cases")
    parser.add_argument("--decode-tokens", default="1,2,4,8,16")
    parser.add_argument("--decode-shapes", default="4096x4096,11008x4096,4096x11008")
    parser.add_argument("--decode-m", default="8", help="M of the 64:2:M decode cases, comma-separated")
    parser.add_argument("--profile", help="JSON list of [kind, case, config] to run once each")
    parser.add_argument("--profile-best", help="a results JSON: run its fastest prefill and decode variants once")
    args = parser.parse_args()
    if args.profile_best:
        args.profile = json.dumps(best_variants_of(json.load(open(args.profile_best))))
    if args.profile:
        return profile(args)
    start = time.time()
    results = {"device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu",
               "torch": torch.__version__, "triton": triton.__version__,
               "date": time.strftime("%Y-%m-%d %H:%M"), "prefill": {}, "decode": {}}
    results["ceilings"] = ceilings()
    log(results["device"], results["ceilings"])

    first = (4096, 4096, 8192, 64, 8)
    others = [(200, 136, 17, 64, 8), (200, 136, 129, 64, 8),  # partial row blocks, chunks and token tiles
              (4096, 4096, 8192, 64, 16), (4096, 4096, 2048, 64, 8), (4096, 4096, 256, 64, 8),
              (4096, 4096, 64, 64, 8), (768, 3072, 2048, 64, 8), (3072, 768, 256, 64, 8), (4096, 4096, 8192, 128, 8),
              (768, 3072, 50432, 64, 8)]  # the ViT's fc2 at batch 256
    decode_shapes = [tuple(int(n) for n in shape.split("x")) for shape in args.decode_shapes.split(",")]
    decode_ms = [int(m) for m in args.decode_m.split(",")]
    decode_tokens = [int(t) for t in args.decode_tokens.split(",")]
    if args.smoke:
        first, others = (128, 96, 130, 64, 8), [(130, 77, 40, 32, 5)]
        decode_shapes, decode_tokens = [(192, 100)], [1, 3]
    if args.prefill_only:
        decode_shapes = []
    if not args.skip_precompile and not args.smoke:
        jobs = [] if args.decode_only else [("prefill", *first, cfg) for cfg in PREFILL_CONFIGS
                                            if fits(cfg, first[3])] + [
            ("gluon", *first, cfg) for cfg in GLUON_CONFIGS if gluon_fits(first[3], first[4])]
        jobs += [("decode", r, c, t, 64, m, cfg) for (r, c) in decode_shapes[:1] + decode_shapes[2:]
                 for t in decode_tokens for m in decode_ms for cfg in DECODE_CONFIGS if decode_fits(cfg, t)]
        jobs += [("rowx", r, c, t, 64, m, cfg) for (r, c) in decode_shapes[:1] + decode_shapes[2:]
                 for t in decode_tokens for m in decode_ms for cfg in ROWX_CONFIGS if t >= 4]
        precompile(compile_job, jobs)
    if args.decode_only:
        first, others = None, []
    best_configs = []
    if first is not None:
        prefill_case(*first, PREFILL_CONFIGS, results)
        first_key = f"{first[0]}x{first[1]}@{first[2]} {first[3]}:2:{first[4]}"
        ranked = sorted((r["ms"], name) for name, r in results["prefill"][first_key]["variants"].items()
                        if "ms" in r and r["err"] < 1e-2 and name.startswith("exp "))  # the configs of run_prefill
        best_configs = [eval(name.split(" ", 1)[1]) for _, name in ranked[:3]]
        log("best:", best_configs, f"[{time.time() - start:.0f}s]")
        json.dump(results, open(args.out, "w"), indent=1)

    def case_configs(case):
        extra = [c for c in PREFILL_CONFIGS if (c[0] == case[3] and case[3] != 64) or
                 (case[2] <= 256 and c[1] == 64 and c[0] <= case[3])]
        return list(dict.fromkeys(best_configs + extra))

    if others and not args.skip_precompile and not args.smoke:
        precompile(compile_job, [("prefill", *case, cfg) for case in others for cfg in case_configs(case)
                    if fits(cfg, case[3])] + [("gluon", *case, cfg) for case in others for cfg in GLUON_CONFIGS
                                              if gluon_fits(case[3], case[4])])
    for case in others:
        prefill_case(*case, case_configs(case), results)
        json.dump(results, open(args.out, "w"), indent=1)
    log(f"[{time.time() - start:.0f}s]")
    for (rows, cols), m, tokens in itertools.product(decode_shapes, decode_ms, decode_tokens):
        decode_case(rows, cols, tokens, 64, m, results)
        json.dump(results, open(args.out, "w"), indent=1)
    log(f"done in {time.time() - start:.0f}s")


if __name__ == "__main__":
    sys.exit(main())
