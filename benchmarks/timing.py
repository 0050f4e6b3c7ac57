"""What the benchmark scripts share: CUDA-graph timing, the device's ceilings, parallel precompiles, and
the record (device, date, versions, commit) every result file starts with."""

from __future__ import annotations

import concurrent.futures as futures
import datetime
import json
import multiprocessing
import os
import platform
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from vnm_compile.format import VNMWeight

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def log(*args) -> None:
    print(*args, flush=True)


def graph_us(calls: Sequence[Callable[[], object]], replays: int = 9, capture_error_mode: str = "global") -> float:
    """Median microseconds of one call among `calls`, all replayed in one CUDA graph: kernel time
    without Python's launch cost (which do_bench counts, and which dominates kernels of a few
    microseconds). Give calls on different weight copies to make the weights stream from device
    memory, as they do in a model. capture_error_mode "thread_local" lets other threads (NCCL's
    watchdog) query CUDA during the capture. On CPU (smoke runs) the first call runs once and 1.0 comes back."""
    if DEVICE == "cpu":
        calls[0]()
        return 1.0
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up (autotuning, lazy init) outside the capture
        for call in calls:
            call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode=capture_error_mode):
        for call in calls:
            call()
    graph.replay()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(1e3 * start.elapsed_time(end) / len(calls))
    return sorted(times)[len(times) // 2]


def ceilings(n: int = 1 << 30, side: int = 8192) -> dict:
    """The device's copy bandwidth (n bytes read and written) and dense fp16 matmul rate."""
    if DEVICE == "cpu":
        return {"copy_GBps": 0.0, "dense_fp16_TFLOPs": 0.0}
    a = torch.randn(n // 2, dtype=torch.float16, device=DEVICE)
    b = torch.empty_like(a)
    copy_ms = do_bench(lambda: b.copy_(a), warmup=10, rep=50, return_mode="median")
    x = torch.randn(side, side, dtype=torch.float16, device=DEVICE)
    w = torch.randn(side, side, dtype=torch.float16, device=DEVICE)
    dense_ms = do_bench(lambda: F.linear(x, w), warmup=50, rep=100, return_mode="median")
    return {"copy_GBps": 2 * n / copy_ms / 1e6, "dense_fp16_TFLOPs": 2 * side**3 / dense_ms / 1e9}


def fake_weight(rows: int, cols: int, v: int, m: int, dtype: torch.dtype = torch.float16) -> VNMWeight:
    """A weight of the right layout with random values and all-zero indices: enough to compile and
    run kernels, not to check them."""
    groups = -(-cols // m)
    return VNMWeight(torch.randn(rows, 2 * groups, device=DEVICE).to(dtype),
                     torch.zeros(-(-rows // v), groups, 4, dtype=torch.uint8, device=DEVICE),
                     torch.zeros(rows, -(-groups // 2), dtype=torch.uint8, device=DEVICE), v, m, cols)


def precompile(compile_job: Callable, jobs: list, workers: int = 14) -> None:
    """Run `compile_job` (a module-level function returning None or an error text) over `jobs` in
    worker processes, filling Triton's on-disk cache so that timing runs do not compile."""
    start = time.time()
    try:
        with futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            errors = [error for error in pool.map(compile_job, jobs, chunksize=4) if error]
    except Exception as error:  # a broken pool is not fatal: kernels then compile on first use
        log("precompile failed, compiling on first use:", repr(error)[:300])
        return
    log(f"precompiled {len(jobs)} kernels in {time.time() - start:.0f}s, {len(errors)} errors")
    for error in errors[:5]:
        log("  ", error)


def git_commit() -> str:
    """The short commit of this tree; BENCH_COMMIT where set: the commit of a copied tree whose .git does
    not follow it (a lent GPU machine's copy)."""
    try:
        return os.environ.get("BENCH_COMMIT") or subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent,
            check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def device_record(device: str) -> dict:
    """Where and with what a result was measured."""
    import triton

    from vnm_compile.kernels.tuning import gpu_slug

    name = torch.cuda.get_device_name() if device == "cuda" else f"cpu ({platform.processor() or 'cpu'})"
    return {"device": name, "slug": gpu_slug(name) if device == "cuda" else "cpu",
            "date": datetime.datetime.now().isoformat(timespec="seconds"), "torch": torch.__version__,
            "triton": triton.__version__, "commit": git_commit()}


def write_results(stem: Path, result: dict, markdown: str) -> None:
    """<stem>.json and <stem>.md."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1))
    stem.with_suffix(".md").write_text(markdown)
