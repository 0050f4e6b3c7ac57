"""Benchmark sweep of the V:N:M kernels against cuBLAS, the condensed-K bound and torch's 2:4.

    python3 -m benchmarks.kernels --tune      # times every candidate, writes the tables
    python3 -m benchmarks.kernels             # times what the shipped tables dispatch to
    python3 -m benchmarks.kernels --smoke     # CPU dry run: Triton interpreter, tiny shapes

Shapes: Llama-2-7B (4096x4096, 11008x4096, 4096x11008) and DeiT-base (768x768, 3072x768, 768x3072)
weights; tokens 1..8192; patterns 64:2:4..64:2:16, 128:2:8, 32:2:8; fp16 and bf16. Baselines:
cuBLAS dense (F.linear), dense on the condensed K' = 4C/M (the perfect-gather bound), torch's 2:4
(`to_sparse_semi_structured`, cuSPARSELt; eager and inside a CUDA graph) on a magnitude 2:4 mask of
the same dense weight, for every pattern, and cuSPARSELt on the V:N:M weight itself over its full
width where M % 4 == 0 (the dispatcher's "cusparselt" path; such a weight is a valid 2:4 weight).
Those two need CUDA: a smoke run skips them (n/a), with a note. Also measured: the device's copy
bandwidth and dense fp16 peak.

Timing: every contender is replayed in a CUDA graph of many calls that rotate over enough weight
copies to overflow L2 (the weights stream from device memory, as in a model; from 2048 tokens four
copies), so Python's launch cost stays out of kernel times. (The tables in the package were tuned
with do_bench from 2048 tokens, which counts launch cost on kernels of a few microseconds; see
benchmarks/NOTES.md.) `--tune` writes
vnm_compile/kernels/tables/<gpu>.json: per key the fastest sparse path and config (fp16 tunes;
bf16 reuses the fp16 config), the dense time and, where measured, the cuSPARSELt time and the sparse
tensor-core kernel's best time and config (`kernels/sparse_mma.py`, each dtype tuned), which the
dispatcher reads. Without --tune the sweep times the shipped choices through the kernels' entry
(`dispatch.kernel_linear`), with and without the dense weight, and writes
benchmarks/results/kernels-<gpu>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

if "--smoke" in sys.argv:  # CPU dry run of this script under the Triton interpreter, tiny shapes
    os.environ.update(TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")  # on the CPU on GPU machines too

import torch
import torch.nn.functional as F
import triton
from torch.sparse import to_sparse_semi_structured
from triton.testing import do_bench

from benchmarks.sparse_mma_check import precompile as compile_sparse_mma
from benchmarks.timing import DEVICE, ceilings, fake_weight, graph_us, log, precompile
from vnm_compile.format import VNMWeight
from vnm_compile.kernels import (
    Operands,
    PrefillLayout,
    cusparselt_weight,
    decode,
    dispatch,
    operands,
    prefill,
    prefill_layout,
    sparse_mma,
    tuning,
)
from vnm_compile.kernels.common import token_bucket
from vnm_compile.transposable import nm_mask

warnings.filterwarnings("ignore", message="column_select='optimal'")
SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (768, 768), (3072, 768), (768, 3072)]
TOKENS = [1, 4, 16, 64, 256, 2048, 8192]
PATTERNS = [(64, 4), (64, 5), (64, 6), (64, 8), (64, 16), (128, 8), (32, 8)]
DTYPES = [torch.float16, torch.bfloat16]
GRAPH_MAX_TOKENS = 256
ROTATE_BYTES = 180 << 20  # 3x the H200's L2
DECODE_MAX_TOKENS = 16
SPLIT_CONFIGS = [tuning.decode_config(64, 16, 32, True, 4, 3), tuning.decode_config(16, 4, 32, False, 4, 4),
                 # rounds 14-15: one dot a tile, the next tile prefetched
                 tuning.decode_config(64, 16, 32, True, 4, 3, prefetch=True),
                 tuning.decode_config(32, 16, 16, True, 4, 3, prefetch=True)]
ROOT = Path(__file__).resolve().parent
MMA_TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 1e-2}  # against float64, as the GPU tests check
CUDA_ONLY_NOTE = "torch 2:4 and cuSPARSELt run on CUDA only: skipped in this CPU run (n/a)."


# ------------------------------------------------------------------------------------------ timing
def bench_us(calls: list, tokens: int) -> float:
    """graph_us over the weight copies of `calls`; long calls need only a few copies."""
    return graph_us(calls[:4] if tokens > GRAPH_MAX_TOKENS else calls, replays=7)


# ------------------------------------------------------------------------------------------ problems
class Problem:
    """One (shape, pattern, dtype): the weight in every form the contenders need, rotated copies."""

    def __init__(self, rows, cols, v, m, dtype, weight: VNMWeight):
        self.rows, self.cols, self.v, self.m, self.dtype = rows, cols, v, m, dtype
        self.weight = weight.to(dtype)
        self.dense = self.weight.to_dense().contiguous()
        self.layout = prefill_layout(self.weight)
        self.groups = self.weight.groups
        self.copies = min(512, max(2, -(-ROTATE_BYTES // self.weight.nbytes)))
        self.weights = [self.weight] + [
            VNMWeight(self.weight.values.clone(), self.weight.columns.clone(), self.weight.metadata.clone(),
                      v, m, cols) for _ in range(self.copies - 1)]
        self.layouts = [self.layout] + [PrefillLayout(self.layout.expanded.clone(), self.layout.channels)
                                        for _ in range(self.rotated(self.layout.expanded.nbytes) - 1)]
        self.denses = [self.dense] + [self.dense.clone() for _ in range(self.rotated(self.dense.nbytes) - 1)]
        self.mmas = self.sparse_mma_layouts()
        # what the library entry reads: each weight copy with a prefill layout (and the sparse tensor-core
        # kernel's, where it runs), or with a dense copy
        self.sparse_operands = [operands(w, layout=self.layouts[i % len(self.layouts)],
                                         mma=self.mmas[i % len(self.mmas)] if self.mmas else None)
                                for i, w in enumerate(self.weights)]
        self.dense_operands = [operands(self.weight, dense_weight=d) for d in self.denses]
        self.errors: dict[str, str] = {}  # why a baseline is missing: shapes or dtypes cuSPARSELt refuses
        self.torch24 = self.torch_2to4()
        self.cslt_operands = self.cusparselt()

    def rotated(self, nbytes: int) -> int:
        """How many copies of a tensor of `nbytes` the calls rotate over: enough to overflow L2."""
        return min(self.copies, -(-ROTATE_BYTES // nbytes))

    def torch_2to4(self) -> list:
        """Copies of torch's 2:4 weight (cuSPARSELt) made from a magnitude 2:4 mask of the dense weight."""
        if DEVICE != "cuda":
            return []
        try:
            masked = self.dense * nm_mask(self.dense.abs(), 2, 4)
            first = to_sparse_semi_structured(masked)
        except (RuntimeError, ValueError) as error:
            self.errors["torch24_error"] = repr(error)[:200]
            return []
        return [first] + [to_sparse_semi_structured(masked) for _ in range(self.rotated(first.packed.nbytes) - 1)]

    def cusparselt(self) -> list[Operands]:
        """Operands with copies of the V:N:M weight compressed for cuSPARSELt (M % 4 == 0)."""
        if DEVICE != "cuda" or self.m % 4:
            return []
        try:
            first = cusparselt_weight(self.weight)
        except (RuntimeError, ValueError) as error:
            self.errors["cslt_error"] = repr(error)[:200]
            return []
        cslts = [first] + [first.clone() for _ in range(self.rotated(first.nbytes) - 1)]
        return [operands(self.weight, cslt=cslt) for cslt in cslts]

    def sparse_mma_layouts(self) -> list[sparse_mma.SparseMMALayout]:
        """Copies of the sparse tensor-core kernel's layout, where the kernel runs and takes the weight."""
        if DEVICE != "cuda" or not sparse_mma.available() or sparse_mma.refusal(self.weight) is not None:
            return []
        first = sparse_mma.pack(self.weight)
        return [first] + [sparse_mma.SparseMMALayout(first.values.clone(), first.metadata.clone(), first.columns,
                                                     self.v, self.m, self.rows, self.cols)
                          for _ in range(self.rotated(first.nbytes) - 1)]

    def x(self, tokens):
        return torch.randn(tokens, self.cols, device=DEVICE, dtype=self.dtype)

    def kernel_calls(self, path, config, x):
        """Closures running one explicit kernel config of `path` on each weight copy."""
        if path == "prefill":
            return [lambda ops=ops: launch_prefill(x, ops, config) for ops in self.sparse_operands[:len(self.layouts)]]
        split_k = decode_split_k(path)
        return [lambda ops=ops: decode.launch_decode(decode.vnm_decode_kernel, x, ops, split_k=split_k,
                                                     **tuning.config_record(config))
                for ops in self.sparse_operands]


def launch_prefill(x: torch.Tensor, ops: Operands, config: triton.Config) -> torch.Tensor:
    """The prefill kernel in one config on x as the dispatcher hands it over: read in place up to
    ROW_MAJOR_MAX_TOKENS, else transposed (one read and one write of x, timed with the kernel)."""
    xt = x.t() if x.shape[0] <= prefill.ROW_MAJOR_MAX_TOKENS else x.t().contiguous()
    return prefill.launch_prefill(prefill.vnm_prefill_kernel, xt, ops.expanded, ops.channels, ops,
                                  **tuning.config_record(config))


def decode_split_k(path):
    return dispatch.DECODE_SPLIT_K if path == "decode_split" else 1


def candidate_list(problem_shape, tokens):
    """(path, config) pairs timed for a key: decode paths up to 64 tokens, prefill at every count."""
    rows, cols, v, m = problem_shape
    groups = -(-cols // m)
    found = []
    if tokens <= 64:
        found += [("decode", c) for c in tuning.candidates("decode", rows, cols, tokens, groups, v)]
        found += [("decode_split", c) for c in SPLIT_CONFIGS if c.kwargs["BLOCK_N"] <= v
                  and (c.kwargs["USE_DOT"] or c.kwargs["BLOCK_T"] == tuning.token_block(tokens))]
    found += [("prefill", c) for c in tuning.candidates("prefill", rows, cols, tokens, groups, v)]
    return found


# ------------------------------------------------------------------------------------------ precompile
def compile_job(job):
    rows, cols, v, m, dtype_name, tokens, path, record = job
    dtype = getattr(torch, dtype_name)
    weight = fake_weight(rows, cols, v, m, dtype)
    x = torch.randn(tokens, cols, device=DEVICE).to(dtype)
    pool = tuning.PREFILL_CONFIGS if path == "prefill" else tuning.DECODE_CONFIGS + SPLIT_CONFIGS
    config = next(c for c in pool if tuning.config_record(c) == record)
    try:
        if path == "prefill":
            launch_prefill(x, operands(weight, layout=prefill_layout(weight)), config)
        else:
            decode.launch_decode(decode.vnm_decode_kernel, x, operands(weight), split_k=decode_split_k(path),
                                 **tuning.config_record(config))
        torch.cuda.synchronize()
        return None
    except Exception as error:
        return f"{job}: {error!r}"[:400]


def compile_jobs(args, shapes, tokens_list, patterns, slug):
    """The kernels the sweep will run: every candidate (fp16) when tuning, else the tables' choices."""
    if args.tune:
        return [(r, c, v, m, "float16", t, path, tuning.config_record(cfg))
                for r, c in shapes for v, m in patterns for t in tokens_list
                for path, cfg in candidate_list((r, c, v, m), t)]
    table = tuning.load_table(slug)
    jobs = []
    for r, c in shapes:
        for v, m in patterns:
            for dtype in DTYPES:
                for t in tokens_list:
                    key = tuning.table_key(r, c, token_bucket(t), v, m, dtype)
                    entry = table["dispatch"].get(key)
                    record = entry and table["autotune"].get(f"{entry['path']} {key}")
                    if record:
                        jobs.append((r, c, v, m, str(dtype).replace("torch.", ""), t, entry["path"], record))
    return jobs


# ------------------------------------------------------------------------------------------ sweep
def measure_baselines(problem: Problem, tokens: int, x: torch.Tensor) -> dict:
    kc = 4 * problem.groups
    xc = torch.randn(tokens, kc, device=DEVICE, dtype=problem.dtype)
    wcs = [torch.randn(problem.rows, kc, device=DEVICE, dtype=problem.dtype) for _ in range(len(problem.layouts))]
    out = {"dense_us": bench_us([lambda d=d: F.linear(x, d) for d in problem.denses], tokens),
           "condensed_us": bench_us([lambda w=w: F.linear(xc, w) for w in wcs], tokens),
           "torch24_graph_us": None, "torch24_eager_us": None, "cslt_us": None, **problem.errors}
    try:
        if problem.torch24:  # torch's 2:4 (cuSPARSELt) on the magnitude 2:4 weight, every pattern
            out["torch24_graph_us"] = bench_us([lambda s=s: F.linear(x, s) for s in problem.torch24], tokens)
            out["torch24_eager_us"] = 1e3 * float(do_bench(lambda: F.linear(x, problem.torch24[0]), warmup=5,
                                                          rep=30, return_mode="median"))
    except RuntimeError as error:
        out["torch24_error"] = repr(error)[:200]
    try:
        if problem.cslt_operands:  # cuSPARSELt on the V:N:M weight itself, as the dispatcher runs it
            out["cslt_us"] = bench_us([lambda ops=ops: dispatch.kernel_linear(x, ops, path="cusparselt")
                                       for ops in problem.cslt_operands], tokens)
    except RuntimeError as error:
        out["cslt_error"] = repr(error)[:200]
    return out


def tune_sparse_mma(problem: Problem, tokens: int, x: torch.Tensor) -> tuple[float, str] | None:
    """The sparse tensor-core kernel's fastest config for this key and its time, as the dispatcher
    runs it (x as it comes: a row-major x is transposed by each call); None where it does not run."""
    if not problem.mmas:
        return None
    shared_limit = torch.cuda.get_device_properties(x.device).shared_memory_per_block_optin
    timed = {}
    for config in sparse_mma.candidates(tokens, problem.v, problem.m, shared_limit):
        try:
            timed[config.name] = bench_us([lambda mma=mma, config=config: sparse_mma.sparse_mma_linear(
                x, mma, config=config) for mma in problem.mmas], tokens)
        except Exception as error:
            log("  failed sparse_mma", config.name, repr(error)[:200])
    if not timed:
        return None
    name = min(timed, key=timed.get)
    error = check(problem, x, sparse_mma.sparse_mma_linear(x, problem.mmas[0], config=name))
    if error > MMA_TOLERANCE[problem.dtype]:
        log(f"  sparse_mma {name}: relative error {error:.1e}, not entered in the table")
        return None
    return timed[name], name


def tune_key(problem: Problem, tokens: int, x: torch.Tensor, only=None) -> dict:
    """Times the candidates (or only the given (path, config)s); best per path."""
    timed = {}
    for path, config in only or candidate_list((problem.rows, problem.cols, problem.v, problem.m), tokens):
        try:
            us = bench_us(problem.kernel_calls(path, config, x), tokens)
        except Exception as error:
            log("  failed", path, tuning.config_record(config), repr(error)[:200])
            continue
        if path not in timed or us < timed[path][0]:
            timed[path] = (us, config)
    return timed


def check(problem: Problem, x: torch.Tensor, y: torch.Tensor) -> float:
    rows = torch.randperm(x.shape[0], device=x.device)[:64]
    ref = x[rows].double() @ problem.dense.double().T
    return float((y[rows].double() - ref).norm() / ref.norm()) if torch.isfinite(y).all() else float("inf")


def run(args) -> None:
    start = time.time()
    device = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu smoke"
    slug = tuning.gpu_slug(device)
    results = {"device": device, "date": time.strftime("%Y-%m-%d %H:%M"), "torch": torch.__version__,
               "triton": triton.__version__,
               "sms": torch.cuda.get_device_properties(0).multi_processor_count if DEVICE == "cuda" else 0,
               "mode": "tune" if args.tune else "dispatch", "ceilings": ceilings(),
               "notes": [] if DEVICE == "cuda" else [CUDA_ONLY_NOTE], "cases": []}
    log(device, results["ceilings"], *results["notes"])
    shapes, tokens_list, patterns = SHAPES, TOKENS, PATTERNS
    if args.quick:
        shapes, tokens_list, patterns = SHAPES[:1], [1, 16, 2048], [(64, 8)]
    if args.smoke:
        shapes, tokens_list, patterns = [(100, 77), (64, 128)], [1, 3, 17, 70], [(16, 4), (16, 5), (32, 8)]
    if args.patterns:
        patterns = [tuple(int(n) for n in p.split(":2:")) for p in args.patterns.split(",")]
    if args.shapes:
        shapes = [tuple(int(n) for n in shape.split("x")) for shape in args.shapes.split(",")]
    if args.tokens:
        tokens_list = [int(t) for t in args.tokens.split(",")]
    table = {"device": device, "autotune": {}, "dispatch": {}}
    if args.sparse_mma_only:
        shared_limit = torch.cuda.get_device_properties(0).shared_memory_per_block_optin
        configs = {c for t in tokens_list for v, m in patterns for c in sparse_mma.candidates(t, v, m, shared_limit)}
        compile_sparse_mma([(c.name, m, v, dtype) for c in configs for v, m in patterns for dtype in DTYPES
                            if sparse_mma.fits(c, v, m, shared_limit)], torch.device("cuda", 0))
    elif not args.no_precompile and not args.smoke:
        precompile(compile_job, compile_jobs(args, shapes, tokens_list, patterns, slug))
    for rows, cols in shapes:
        for v, m in patterns:
            torch.manual_seed(rows + cols + m)
            base = VNMWeight.from_dense(torch.randn(rows, cols, device=DEVICE), v, m)
            for dtype in DTYPES:
                problem = Problem(rows, cols, v, m, dtype, base)
                for tokens in tokens_list:
                    if time.time() - start > args.time_budget:
                        log("time budget reached: stopping the sweep here")
                        return finish(args, results, table, slug)
                    results["cases"].append(measure(problem, tokens, args, table))
                del problem
            log(f"[{time.time() - start:.0f}s] {rows}x{cols} {v}:2:{m} done")
    finish(args, results, table, slug)


def measure(problem: Problem, tokens: int, args, table: dict) -> dict:
    x = problem.x(tokens)
    dtype_name = str(problem.dtype).replace("torch.", "")
    key = tuning.table_key(problem.rows, problem.cols, token_bucket(tokens), problem.v, problem.m, problem.dtype)
    case = {"rows": problem.rows, "cols": problem.cols, "tokens": tokens, "v": problem.v, "m": problem.m,
            "dtype": dtype_name, "compressed_bytes": problem.weight.nbytes,
            "expanded_bytes": problem.layout.expanded.nbytes, "dense_bytes": problem.dense.nbytes}
    if args.sparse_mma_only:
        entry = tuning.load_table(tuning.gpu_slug(problem.weight.device))["dispatch"].get(key)
        mma = tune_sparse_mma(problem, tokens, x) if entry is not None else None
        if mma is not None:
            case["mma_us"], case["mma_config"] = mma
            table["dispatch"][key] = {**entry, "mma_us": round(mma[0], 2), "mma_config": mma[1]}
            log(f"  {key:34s} sparse_mma {mma[0]:8.1f}us ({mma[1]}) {entry['path']} {entry['sparse_us']:.1f}us "
                f"dense {entry['dense_us']:.1f}us")
        return case
    case.update(measure_baselines(problem, tokens, x))
    if args.tune:
        fp16_key = key.replace(dtype_name, "float16")
        if problem.dtype == torch.float16:
            timed = tune_key(problem, tokens, x)
        else:  # bf16 reuses the configs fp16 chose for each path
            chosen = [(p.split(" ")[0], cfg) for p, cfg in args.fp16_choice.get(fp16_key, [])]
            timed = tune_key(problem, tokens, x, only=chosen)
        if not timed:
            return case
        if problem.dtype == torch.float16:
            args.fp16_choice[fp16_key] = [(path, cfg) for path, (_, cfg) in timed.items()]
        path, (sparse_us, config) = min(timed.items(), key=lambda kv: kv[1][0])
        for p, (_, cfg) in timed.items():
            table["autotune"][f"{p} {key}"] = tuning.config_record(cfg)
        table["dispatch"][key] = {"path": path, "sparse_us": round(sparse_us, 2),
                                  "dense_us": round(case["dense_us"], 2)}
        if case["cslt_us"] is not None:  # the dispatcher weighs it where the caller keeps a cuSPARSELt copy
            table["dispatch"][key]["cslt_us"] = round(case["cslt_us"], 2)
        mma = tune_sparse_mma(problem, tokens, x)
        if mma is not None:  # likewise where the caller keeps the sparse tensor-core layout
            case["mma_us"], case["mma_config"] = mma
            table["dispatch"][key].update(mma_us=round(mma[0], 2), mma_config=mma[1])
        case.update(path=path, sparse_us=sparse_us, config=tuning.config_record(config),
                    paths_us={p: t for p, (t, _) in timed.items()})
        y = problem.kernel_calls(path, config, x)[0]()
    else:  # the library entry, as shipped: with and without the dense weight
        dispatched = dispatch.choose_path(problem.rows, problem.cols, tokens, problem.v, problem.m, problem.dtype,
                                          x.device, has_dense=True)
        case["dispatched_path"] = dispatched
        if dispatched == "dense":  # timed next to the cuBLAS baseline: the card slows under load
            case["dispatch_us"] = bench_us([lambda ops=ops: dispatch.kernel_linear(x, ops)
                                            for ops in problem.dense_operands], tokens)
        path = dispatch.choose_path(problem.rows, problem.cols, tokens, problem.v, problem.m, problem.dtype,
                                    x.device, has_dense=False, has_mma=bool(problem.mmas))
        case["path"] = path
        case["sparse_us"] = bench_us([lambda ops=ops: dispatch.kernel_linear(x, ops)
                                      for ops in problem.sparse_operands], tokens)
        if dispatched != "dense":
            case["dispatch_us"] = case["sparse_us"]
        y = dispatch.kernel_linear(x, problem.sparse_operands[0])
    case["err"] = check(problem, x, y)
    flops = 2 * problem.rows * problem.cols * tokens
    case["sparse_TFLOPs"] = flops / case["sparse_us"] / 1e6
    case["sparse_GBps"] = problem.weight.nbytes / case["sparse_us"] / 1e3
    case["vs_dense"] = case["dense_us"] / case["sparse_us"]
    case["vs_bound"] = case["condensed_us"] / case["sparse_us"]
    torch24_us = case["torch24_graph_us"]
    case["vs_torch24"] = None if torch24_us is None else torch24_us / case["sparse_us"]
    if "dispatch_us" in case:
        case["dispatch_vs_dense"] = case["dense_us"] / case["dispatch_us"]
    log(f"  {key:34s} {case['path']:12s} sparse {case['sparse_us']:8.1f}us dense {case['dense_us']:8.1f}us "
        f"x{case['vs_dense']:.2f} (bound x{case['dense_us'] / case['condensed_us']:.2f}) "
        f"{case['sparse_GBps']:6.0f}GB/s err {case['err']:.1e}"
        + (f" dispatch x{case['dispatch_vs_dense']:.2f}" if "dispatch_vs_dense" in case else "")
        + (f" vs 2:4 x{case['vs_torch24']:.2f}" if torch24_us is not None else "")
        + (f" cslt {case['cslt_us']:.1f}us" if case["cslt_us"] is not None else ""))
    return case


def finish(args, results, table, slug):
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.tune:
        table["rules"] = derive_rules(results["cases"])
        if args.merge:  # a partial sweep updates its keys of the shipped table and keeps its rules
            shipped = json.loads((out_dir / f"{slug}.json").read_text())
            for section in ("autotune", "dispatch"):
                shipped[section].update(table[section])
            table = shipped
        (out_dir / f"{slug}.json").write_text(json.dumps(table, indent=1, sort_keys=True))
        (out_dir / f"tune-{slug}.json").write_text(json.dumps(results, indent=1))
        log(f"wrote {out_dir / (slug + '.json')}")
        return
    if args.merge:  # a partial sweep replaces its cases in the committed results and keeps the rest
        results = merge_cases(json.loads((out_dir / f"kernels-{slug}.json").read_text()), results)
    (out_dir / f"kernels-{slug}.json").write_text(json.dumps(results, indent=1))
    (out_dir / f"kernels-{slug}.md").write_text(markdown(results))
    log(f"wrote {out_dir / ('kernels-' + slug + '.json')} and .md")


def merge_cases(before: dict, after: dict) -> dict:
    """`after`'s cases in place of `before`'s with the same key; the run's header is `after`'s, and
    each case keeps the date of the run that measured it."""
    def key(case):
        return tuple(case[k] for k in ("rows", "cols", "tokens", "v", "m", "dtype"))

    for case in before["cases"]:
        case.setdefault("date", before["date"])
    for case in after["cases"]:
        case["date"] = after["date"]
    new = {key(c): c for c in after["cases"]}
    cases = [new.pop(key(c), c) for c in before["cases"]] + list(new.values())
    return {**after, "cases": cases}


def derive_rules(cases) -> dict:
    """Rules for shapes the table lacks: the largest token count at which a decode path beats the
    prefill kernel on most measured shapes, and the largest M at which dense cuBLAS (and the largest
    at which cuSPARSELt on the V:N:M weight) beats the sparse kernel on most measured shapes from 64
    tokens."""
    decode_max = DECODE_MAX_TOKENS
    for tokens in sorted({c["tokens"] for c in cases}):
        both = [c["paths_us"] for c in cases if c["tokens"] == tokens and "prefill" in c.get("paths_us", {})
                and ("decode" in c["paths_us"] or "decode_split" in c["paths_us"])]
        wins = sum(min(p.get("decode", 1e9), p.get("decode_split", 1e9)) < p["prefill"] for p in both)
        if both and wins > len(both) / 2:
            decode_max = max(decode_max, tokens)
    largest_m = {"dense_us": 0, "cslt_us": 0}
    for m in sorted({c["m"] for c in cases}):
        big = [c for c in cases if c["m"] == m and c["tokens"] >= 64 and "sparse_us" in c]
        for contender in largest_m:
            timed = [c for c in big if c.get(contender) is not None]
            if timed and sum(c[contender] < c["sparse_us"] for c in timed) > len(timed) / 2:
                largest_m[contender] = m
    return {"decode_max_tokens": decode_max, "dense_when_m_at_most": largest_m["dense_us"],
            "cusparselt_when_m_at_most": largest_m["cslt_us"]}


def markdown(results) -> str:
    lines = [f"# V:N:M kernels on {results['device']}", "",
             f"{results['date']}, torch {results['torch']}, triton {results['triton']}, {results['sms']} SMs. "
             f"Copy bandwidth {results['ceilings']['copy_GBps']:.0f} GB/s (read + write), cuBLAS fp16 "
             f"8192^3 {results['ceilings']['dense_fp16_TFLOPs']:.0f} TFLOP/s.", "",
             "Times in us (median of CUDA-graph replays of calls rotating over weight copies past L2). "
             "`sparse`: the library entry without the dense weight (dispatched sparse path); `dispatch`: with "
             "the dense weight kept (dense cuBLAS where the table says it is faster). `torch 2:4`: torch's "
             "semi-structured 2:4 (cuSPARSELt) on a magnitude 2:4 mask of the dense weight; `x dense` and "
             "`x 2:4`: cuBLAS's and torch 2:4's time over the sparse time. `cslt`: cuSPARSELt on the V:N:M "
             "weight over its full width (M a multiple of 4). `bound`: cuBLAS on the condensed K' = 4C/M. "
             "GB/s: compressed bytes / sparse time. TFLOP/s: dense-equivalent 2*R*C*T / sparse time. "
             "`2:4 eager`: torch 2:4 timed by do_bench (launch cost included).", ""]
    if results.get("notes"):
        lines += [*results["notes"], ""]
    dates = sorted({c.get("date", results["date"]) for c in results["cases"]})
    if len(dates) > 1:
        lines += [f"Rows from sweeps of {', '.join(dates)} (the header is the last one's); each row's times "
                  "come from one sweep.", ""]
    header = ("| weight | tokens | pattern | dtype | path | sparse | dense | x dense | torch 2:4 | x 2:4 | cslt | "
              "bound | x bound | dispatch x dense | TFLOP/s | GB/s | 2:4 eager |")
    lines += [header, "|" + "---|" * (header.count("|") - 1)]
    for c in results["cases"]:
        lines.append(
            f"| {c['rows']}x{c['cols']} | {c['tokens']} | {c['v']}:2:{c['m']} | {c['dtype']} | {c.get('path', '')} | "
            f"{cell(c, 'sparse_us', '.1f')} | {c['dense_us']:.1f} | {cell(c, 'vs_dense', '.2f')} | "
            f"{cell(c, 'torch24_graph_us', '.1f')} | {cell(c, 'vs_torch24', '.2f')} | {cell(c, 'cslt_us', '.1f')} | "
            f"{c['condensed_us']:.1f} | {cell(c, 'vs_bound', '.2f')} | {cell(c, 'dispatch_vs_dense', '.2f')} | "
            f"{c.get('sparse_TFLOPs', 0):.0f} | {c.get('sparse_GBps', 0):.0f} | {cell(c, 'torch24_eager_us', '.1f')} |")
    worst = min((c for c in results["cases"] if "dispatch_vs_dense" in c), key=lambda c: c["dispatch_vs_dense"],
                default=None)
    if worst is not None:
        lines += ["", f"Lowest ratio after dispatch (dense weight kept): {worst['dispatch_vs_dense']:.2f}x at "
                      f"{worst['rows']}x{worst['cols']}, {worst['tokens']} tokens, {worst['v']}:2:{worst['m']} "
                      f"{worst['dtype']}."]
    return "\n".join(lines) + "\n"


def cell(case: dict, key: str, spec: str) -> str:
    """case[key] formatted, or n/a where it was not measured (CPU, M not a multiple of 4, an error)."""
    value = case.get(key)
    return "n/a" if value is None else format(value, spec)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tune", action="store_true", help="time all candidates and write the tables")
    parser.add_argument("--quick", action="store_true", help="one shape, one pattern, three token counts")
    parser.add_argument("--no-precompile", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="CPU dry run (Triton interpreter, tiny shapes)")
    parser.add_argument("--time-budget", type=float, default=520, help="seconds; the sweep stops (and writes) after")
    parser.add_argument("--out-dir", default=None)
    parser.add_argument("--patterns", help="e.g. 32:2:8,64:2:8 (default: all)")
    parser.add_argument("--tokens", help="e.g. 1,16 (default: all)")
    parser.add_argument("--shapes", help="weights RxC, e.g. 12288x4096,22016x4096 (default: the sweep's)")
    parser.add_argument("--merge", action="store_true",
                        help="update only the swept keys of the shipped table (--tune) or of the results")
    parser.add_argument("--sparse-mma-only", action="store_true",
                        help="with --tune --merge: time only the sparse tensor-core kernel's configs and add them "
                             "to the shipped table's entries, whose Triton choices stay")
    args = parser.parse_args()
    if args.sparse_mma_only and not (args.tune and args.merge):
        parser.error("--sparse-mma-only updates the shipped table: it needs --tune --merge")
    args.out_dir = args.out_dir or str(tuning.TABLES if args.tune else ROOT / "results")
    args.fp16_choice = {}
    if not torch.cuda.is_available() and not args.smoke:
        sys.exit("benchmarks/kernels.py needs a CUDA GPU (or --smoke for a CPU dry run)")
    run(args)


if __name__ == "__main__":
    main()
