"""The sparse-MMA kernel (vnm_compile/kernels/sparse_mma.py) on one GPU: compile, check, time.

    python3 -m benchmarks.sparse_mma_check             # < 5 minutes on an H100
    python3 -m benchmarks.sparse_mma_check --quick     # the target shape only
    ncu --profile-from-start off --clock-control none --set full -o sparse_mma \\
        python3 -m benchmarks.sparse_mma_check --ncu [TOKENS] [--config NAME]   # 4096^2 x TOKENS, 64:2:8

1. Compiles every (config, pattern, dtype) it will run, in threads (NVRTC releases the GIL).
2. Checks each against float64 on awkward shapes (rows not divisible by V, columns not divisible by
   M, tokens 1, 17, 129 and 2048) and prints PASS / FAIL; a failing config is not timed.
3. Times, with CUDA graphs (median of replays of one graph over weight copies, so weights stream
   from device memory): each sparse-MMA config (x channel-major, as the layout pass hands it, or
   row-major for the configs that read it so; the best config also with row-major x, any transpose
   counted), cuBLAS on the dense weight, torch 2:4
   (to_sparse_semi_structured on a magnitude-2:4 weight: cuSPARSELt), cuSPARSELt on the V:N:M
   weight itself over the full K (M % 4 == 0), and the Triton path (prefill layout kept; up to 64
   tokens also with x channel-major, which the decode kernels read in place). Beside the best
   config's time: the L2 bandwidth it would need if it moved what `modeled_l2_bytes` counts, against
   the ceilings (`benchmarks.tensor_core_peaks`: the L2's copy bandwidth, each tensor-core
   instruction's rate).
Errors never stop the run: a kernel that fails to compile or run is reported and skipped. Writes
JSON to $OUT (else benchmarks/results) and prints a table last.
"""

from __future__ import annotations

import argparse
import concurrent.futures as futures
import json
import os
import time
import traceback
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.tensor_core_peaks import instruction_peaks, l2_copy_GBps
from benchmarks.timing import ceilings, graph_us, log
from vnm_compile.format import VNMWeight
from vnm_compile.kernels import operands, prefill_layout, sparse_mma
from vnm_compile.kernels.dispatch import kernel_linear
from vnm_compile.kernels.operands import channel_major

warnings.filterwarnings("ignore", message="column_select='optimal'")
SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]
TOKENS = [1, 16, 2048, 8192]
PATTERNS = [(64, 8), (64, 16), (64, 5), (128, 8)]
CHECK_SHAPE = (1000, 520)  # 1000 = 15.6 x 64 rows, 520 = 104 x 5 = 65 x 8 = 32.5 x 16 columns
CHECK_TOKENS = (1, 17, 129, 2048)
ROTATE_BYTES = 160 << 20  # weight copies a timing rotates over: > 3x the H100's 50 MB L2
TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 1e-2}
TIME_BUDGET_S = 270
TARGETS = {  # (rows, cols, tokens, v, m): wanted speed-up over cuBLAS (issue 29)
    (4096, 4096, 8192, 64, 8): 2.0, (4096, 4096, 8192, 64, 16): 3.2, (11008, 4096, 2048, 64, 8): 1.7,
    (4096, 11008, 2048, 64, 8): 1.7, (4096, 4096, 2048, 64, 8): 1.7, (4096, 4096, 16, 64, 8): 2.0,
    (11008, 4096, 16, 64, 8): 2.0, (4096, 11008, 16, 64, 8): 2.0}


def random_weight(rows: int, cols: int, v: int, m: int, dtype: torch.dtype, seed: int) -> VNMWeight:
    """A valid V:N:M weight with random kept columns, index pairs and values, made directly on the
    GPU (no mask search)."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    groups, blocks = -(-cols // m), -(-rows // v)
    columns = torch.rand(blocks, groups, m, generator=gen, device="cuda").argsort(-1)[..., :4].sort(-1).values
    pairs = torch.tensor([(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)], device="cuda")
    slots = pairs[torch.randint(0, 6, (rows, groups), generator=gen, device="cuda")]
    nibbles = F.pad((slots[..., 0] | (slots[..., 1] << 2)).to(torch.uint8), (0, groups % 2))
    values = torch.randn(rows, 2 * groups, generator=gen, device="cuda").to(dtype)
    return VNMWeight(values, columns.to(torch.uint8), nibbles[:, 0::2] | (nibbles[:, 1::2] << 4), v, m, cols)


def relative_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    if not torch.isfinite(y).all():
        return float("inf")
    return float((y.double() - ref).norm() / ref.norm())


# ------------------------------------------------------------------------------------------ phases
def precompile(jobs: list[tuple], device: torch.device) -> dict:
    """Compile (config name, m, v, dtype) jobs in threads (NVRTC releases the GIL), retrying any
    failure once on this thread; returns {job: error text} for those that failed twice."""
    def compile_one(job, in_worker=True):
        name, m, v, dtype = job
        try:
            if in_worker:  # a runtime call binds the device's context to this thread for the module load
                torch.cuda.set_device(device)
                torch.cuda.synchronize(device)
            sparse_mma.compiled_kernel(sparse_mma.CONFIGS[name], m, v, dtype, device)
            return None
        except Exception as error:
            return f"{error!r}"[:2000]

    start = time.time()
    with futures.ThreadPoolExecutor(max(1, min(16, os.cpu_count() or 1))) as pool:
        failed = [job for job, error in zip(jobs, pool.map(compile_one, jobs)) if error]
    errors = {job: error for job in failed if (error := compile_one(job, in_worker=False))}
    log(f"compiled {len(jobs) - len(errors)} of {len(jobs)} kernels in {time.time() - start:.0f}s "
        f"({len(failed)} retried on the main thread)")
    for job, error in errors.items():
        log("  COMPILE FAIL", job, error)
    return errors


def check_configs(jobs: list[tuple], compile_errors: dict) -> dict:
    """PASS / FAIL of each job on the awkward shapes; returns {job: passed}."""
    passed, rows, cols = {}, *CHECK_SHAPE
    for job in jobs:
        name, m, v, dtype = job
        if job in compile_errors:
            passed[job] = False
            continue
        weight = random_weight(rows, cols, v, m, dtype, seed=m + v)
        layout = sparse_mma.pack(weight)
        dense = weight.to_dense().double()
        bias = torch.randn(rows, device="cuda").to(dtype)
        worst, error_text = 0.0, ""
        for tokens in CHECK_TOKENS:
            x = torch.randn(tokens, cols, device="cuda").to(dtype)
            ref = x.double() @ dense.T + bias.double()
            for in_channel_major in (False, True):
                try:
                    xin = channel_major(x) if in_channel_major else x
                    y = sparse_mma.sparse_mma_linear(xin, layout, bias, config=name,
                                                     channel_major_out=in_channel_major)
                    torch.cuda.synchronize()
                    worst = max(worst, relative_error(y, ref))
                except Exception as error:
                    worst, error_text = float("inf"), repr(error)[:300]
        passed[job] = worst < TOLERANCE[dtype]
        log(f"  {'PASS' if passed[job] else 'FAIL'} {name:24s} {v}:2:{m:<3d} {str(dtype)[6:]:9s} "
            f"max rel err {worst:.2e} {error_text}")
    return passed


def copies(nbytes: int, tokens: int) -> int:
    """Weight copies a timing rotates over: enough to overflow L2 where the weight is what streams."""
    return 2 if tokens > 256 else min(32, max(2, -(-ROTATE_BYTES // nbytes)))


def modeled_l2_bytes(config: sparse_mma.TileConfig, layout: sparse_mma.SparseMMALayout, tokens: int) -> int:
    """Bytes a launch moves between L2 and the SMs: every row tile reads all of x (its tokens), every
    token tile all of the layout, y is written once, and split-K's fp32 partial sums go out and back."""
    row_tiles, token_tiles = sparse_mma.launch_grid(config, layout, tokens)[:2]
    partials = 2 * config.splits * tokens * layout.out_features * 4 if config.splits > 1 else 0
    return (row_tiles * tokens * layout.in_features * 2 + token_tiles * layout.nbytes
            + tokens * layout.out_features * 2 + partials)


def timed(label: str, calls: list, record: dict, key: str) -> None:
    """record[key] = microseconds a call (CUDA graph median), or the error."""
    try:
        record[key] = round(graph_us(calls, replays=9), 2)
    except Exception as error:
        record[key] = None
        record.setdefault("errors", {})[key] = repr(error)[:300]
        log(f"    {label}: {key} failed: {error!r}"[:400])


def time_case(rows, cols, tokens, v, m, good_configs, shared_limit, torch24: dict, deadline: float) -> dict:
    dtype = torch.float16
    record = {"rows": rows, "cols": cols, "tokens": tokens, "v": v, "m": m}
    label = f"{rows}x{cols} x{tokens} {v}:2:{m}"
    weight = random_weight(rows, cols, v, m, dtype, seed=rows + m)
    dense = weight.to_dense().contiguous()
    layout = sparse_mma.pack(weight)
    record["layout_bytes"], record["dense_bytes"] = layout.nbytes, dense.nbytes
    x = torch.randn(tokens, cols, device="cuda", dtype=dtype)
    x_channel_major = channel_major(x)
    layouts = [layout] + [sparse_mma.SparseMMALayout(layout.values.clone(), layout.metadata.clone(),
                                                     layout.columns.clone(), v, m, rows, cols)
                          for _ in range(copies(layout.nbytes, tokens) - 1)]
    record["sparse_mma_us"] = {}
    ref = x[:64].double() @ dense.double().T
    for config in sparse_mma.candidates(tokens, v, m, shared_limit):
        name, x_read = config.name, x if config.x_row_major else x_channel_major  # x as the config reads it
        if not good_configs.get((name, m, v, dtype), False):
            continue
        try:  # the same check on the timed shape, 64 tokens of it
            y = sparse_mma.sparse_mma_linear(x_read, layout, config=name)
            error = relative_error(y[:64], ref)
            if error > TOLERANCE[dtype]:
                log(f"    {label}: {name} FAIL on this shape (rel err {error:.2e}): not timed")
                continue
        except Exception as error:
            log(f"    {label}: {name} failed: {error!r}"[:400])
            continue
        timed(label, [lambda lt=lt, name=name, x_read=x_read: sparse_mma.sparse_mma_linear(x_read, lt, config=name)
                      for lt in layouts], record["sparse_mma_us"], name)
    measured = {k: t for k, t in record["sparse_mma_us"].items() if t}
    if measured:
        best = min(measured, key=measured.get)
        record["best_config"], record["best_us"] = best, measured[best]
        record["best_l2_GBps"] = round(modeled_l2_bytes(sparse_mma.CONFIGS[best], layout, tokens)
                                       / measured[best] / 1e3, 1)
        timed(label, [lambda lt=lt: sparse_mma.sparse_mma_linear(x, lt, config=best) for lt in layouts],
              record, "best_with_transpose_us")
    denses = [dense] + [dense.clone() for _ in range(copies(dense.nbytes, tokens) - 1)]
    timed(label, [lambda d=d: F.linear(x, d) for d in denses], record, "cublas_us")
    record["torch24_us"] = torch24.get((rows, cols, tokens))
    if m % 4 == 0:
        try:
            compressed = torch._cslt_compress(dense)
            out = torch._cslt_sparse_mm(compressed, x.t())
            y = out.t() if out.shape == (rows, tokens) else out
            record["cslt_vnm_rel_err"] = relative_error(y[:64], ref)
            compresseds = [compressed] + [compressed.clone() for _ in range(copies(compressed.nbytes, tokens) - 1)]
            timed(label, [lambda c=c: torch._cslt_sparse_mm(c, x.t()) for c in compresseds], record, "cslt_vnm_us")
        except Exception as error:
            record["cslt_vnm_us"] = None
            log(f"    {label}: cuSPARSELt on the V:N:M weight failed: {error!r}"[:300])
    if time.time() < deadline and (v, m) in ((64, 8), (64, 16)):
        triton_layout = prefill_layout(weight)
        path = "prefill" if tokens > 64 else None  # few tokens: the dispatcher's sparse choice
        triton_operands = operands(weight, layout=triton_layout)
        timed(label, [lambda: kernel_linear(x, triton_operands, path=path)], record, "triton_us")
        if path is None:  # the decode kernels also read a channel-major x (a channel's tokens side by side)
            timed(label, [lambda: kernel_linear(x_channel_major, triton_operands)], record, "triton_channel_major_us")
    base = record.get("cublas_us")
    if base and record.get("best_us"):
        record["x_cublas"] = round(base / record["best_us"], 3)
        if record.get("torch24_us"):
            record["x_torch24"] = round(record["torch24_us"] / record["best_us"], 3)
    log(f"  {label}: best {record.get('best_config')} {record.get('best_us')} us "
        f"(+T {record.get('best_with_transpose_us')}), cuBLAS {record.get('cublas_us')}, torch 2:4 "
        f"{record.get('torch24_us')}, cslt V:N:M {record.get('cslt_vnm_us')}, triton {record.get('triton_us')}; "
        f"all {record['sparse_mma_us']}")
    return record


def time_torch24(rows: int, cols: int, tokens: int) -> float | None:
    """torch's 2:4 (to_sparse_semi_structured, cuSPARSELt) on a magnitude-2:4 weight, over copies."""
    from torch.sparse import to_sparse_semi_structured

    w = torch.randn(rows, cols, device="cuda", dtype=torch.float16)
    keep = w.abs().view(rows, -1, 4).topk(2, dim=-1).indices
    mask = torch.zeros(rows, cols // 4, 4, device="cuda", dtype=torch.bool).scatter_(-1, keep, True).view(rows, cols)
    record = {}
    try:
        sparses = [to_sparse_semi_structured(w * mask) for _ in range(copies(rows * cols, tokens))]
        x = torch.randn(tokens, cols, device="cuda", dtype=torch.float16)
        timed("torch 2:4", [lambda s=s: F.linear(x, s) for s in sparses], record, "us")
    except Exception as error:
        log(f"  torch 2:4 {rows}x{cols} x{tokens} failed: {error!r}"[:300])
    return record.get("us")


# ------------------------------------------------------------------------------------------ main
def run(args) -> dict:
    start = time.time()
    # indexed, like tensors' devices (the kernel cache's key)
    device = torch.device("cuda", torch.cuda.current_device())
    props = torch.cuda.get_device_properties(device)
    shared_limit = props.shared_memory_per_block_optin
    results = {"device": props.name, "capability": list(torch.cuda.get_device_capability()), "torch": torch.__version__,
               "cuda": torch.version.cuda, "date": time.strftime("%Y-%m-%d %H:%M"), "available": sparse_mma.available()}
    log(results)
    if not results["available"]:
        log("sparse_mma.available() is False: no sm_80+ GPU, NVRTC library or CUDA_HOME")
        return results
    shapes, tokens_list, patterns = SHAPES, TOKENS, PATTERNS
    if args.quick:
        shapes, tokens_list, patterns = SHAPES[:1], [16, 8192], [(64, 8), (64, 16)]
    names = sorted(set(sparse_mma.FEW_TOKEN_CONFIGS + sparse_mma.MANY_TOKEN_CONFIGS))
    jobs = [(name, m, v, dtype) for dtype in (torch.float16, torch.bfloat16) for v, m in patterns for name in names
            if sparse_mma.fits(sparse_mma.CONFIGS[name], v, m, shared_limit)]
    compile_errors = precompile(jobs, device)
    results["compile_errors"] = {str(k): e for k, e in compile_errors.items()}
    log("correctness against float64, shapes", CHECK_SHAPE, "tokens", CHECK_TOKENS, "(row- and channel-major x and y):")
    passed = check_configs(jobs, compile_errors)
    results["checks"] = [{"config": n, "v": v, "m": m, "dtype": str(d)[6:], "passed": ok}
                         for (n, m, v, d), ok in passed.items()]
    log(f"[{time.time() - start:.0f}s] {sum(passed.values())} of {len(passed)} configs passed")
    results["ceilings"] = {**ceilings(), "l2_copy_GBps": l2_copy_GBps(), "instruction_TFLOPs": instruction_peaks()}
    log("ceilings", results["ceilings"])
    torch24 = {}
    for rows, cols in shapes:
        for tokens in tokens_list:
            torch24[(rows, cols, tokens)] = time_torch24(rows, cols, tokens)
    results["cases"] = []
    deadline = start + TIME_BUDGET_S - 60  # the Triton path compiles kernels: it goes first when short of time
    for rows, cols in shapes:
        for v, m in patterns:
            for tokens in tokens_list:
                if time.time() > start + TIME_BUDGET_S:
                    log("time budget reached: the remaining cases are not timed")
                    return results
                try:
                    results["cases"].append(time_case(rows, cols, tokens, v, m, passed, shared_limit, torch24,
                                                      deadline))
                except Exception:
                    log(f"  {rows}x{cols} x{tokens} {v}:2:{m} failed:\n{traceback.format_exc()[-1500:]}")
                torch.cuda.empty_cache()
    return results


def table(results: dict) -> str:
    head = ("| weight x tokens | pattern | best config | us | its L2 GB/s (model) | +T us | cuBLAS us | x cuBLAS | "
            "torch 2:4 us | x torch 2:4 | cslt V:N:M us | triton us | triton, x channel-major us | target |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for c in results.get("cases", []):
        target = TARGETS.get((c["rows"], c["cols"], c["tokens"], c["v"], c["m"]))
        lines.append(f"| {c['rows']}x{c['cols']} x {c['tokens']} | {c['v']}:2:{c['m']} | {c.get('best_config')} | "
                     f"{c.get('best_us')} | {c.get('best_l2_GBps')} | {c.get('best_with_transpose_us')} | "
                     f"{c.get('cublas_us')} | {c.get('x_cublas')} | {c.get('torch24_us')} | {c.get('x_torch24')} | "
                     f"{c.get('cslt_vnm_us')} | "
                     f"{c.get('triton_us')} | {c.get('triton_channel_major_us', '')} | "
                     f"{'' if target is None else f'>= {target}x'} |")
    return "\n".join(lines)


def ncu_mode(tokens: int, config_name: str | None) -> None:
    """4096^2 x `tokens` at 64:2:8: 3 calls of the config (default: the kernel's default for the
    token count) and of cuBLAS, inside a profiler range."""
    rows, cols, v, m = 4096, 4096, 64, 8
    weight = random_weight(rows, cols, v, m, torch.float16, seed=0)
    layout, dense = sparse_mma.pack(weight), weight.to_dense()
    x = channel_major(torch.randn(tokens, cols, device="cuda", dtype=torch.float16))
    config = (sparse_mma.CONFIGS[config_name] if config_name
              else sparse_mma.default_config(tokens, layout.v, layout.m, layout.device))
    sparse_mma.sparse_mma_linear(x, layout, config=config)
    F.linear(x, dense)
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    with torch.cuda.nvtx.range(f"sparse_mma {config.name} {rows}x{cols} x{tokens} {v}:2:{m}"):
        for _ in range(3):
            sparse_mma.sparse_mma_linear(x, layout, config=config)
        for _ in range(3):
            F.linear(x, dense)
        torch.cuda.synchronize()
    torch.cuda.profiler.stop()
    log(torch.cuda.get_device_name(), "profiled", config.name, "and cuBLAS on", (rows, cols, tokens, v, m))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="4096x4096, 16 and 8192 tokens, 64:2:8 and 64:2:16")
    parser.add_argument("--ncu", type=int, nargs="?", const=8192, metavar="TOKENS",
                        help="only 4096^2 x TOKENS (default 8192) at 64:2:8, for Nsight Compute")
    parser.add_argument("--config", choices=sorted(sparse_mma.CONFIGS), help="with --ncu: the config to profile")
    args = parser.parse_args()
    if args.config and args.ncu is None:
        parser.error("--config goes with --ncu")
    if args.ncu is not None:
        return ncu_mode(args.ncu, args.config)
    results = run(args)
    out_dir = Path(os.environ.get("OUT") or Path(__file__).resolve().parent / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    slug = results["device"].lower().replace(" ", "-")
    path = out_dir / f"sparse_mma_check-{slug}.json"
    path.write_text(json.dumps(results, indent=1, default=str))
    log(f"wrote {path}")
    log(table(results))


if __name__ == "__main__":
    main()
