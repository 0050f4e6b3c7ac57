"""Runs the dispatched kernels of issue #3's target cases once each, between cudaProfilerStart and
Stop, beside cuBLAS on the same shapes, so that Nsight Compute profiles what the package ships:

    ncu --profile-from-start off --clock-control none --section SpeedOfLight \
        --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis --section Occupancy \
        --section SchedulerStats --section WarpStateStats --section LaunchStats \
        python3 benchmarks/ncu_targets.py

Each case runs once before the profiled range (compiles, table lookups, lazy init), on random
weights masked by magnitude (real kept columns, not all-zero indices) and random x.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vnm_compile.format import VNMWeight
from vnm_compile.kernels import prefill_layout, triton_vnm_linear

# (rows, cols, tokens, v, m): the shapes and patterns the targets of benchmarks/kernels.py name
CASES = [(4096, 4096, 8192, 64, 8), (4096, 4096, 8192, 64, 16), (4096, 4096, 8192, 64, 5),
         (11008, 4096, 2048, 64, 8), (4096, 11008, 2048, 64, 8),
         (4096, 4096, 1, 64, 8), (11008, 4096, 1, 64, 8), (4096, 4096, 16, 64, 8), (11008, 4096, 16, 64, 8)]


def case_calls(rows: int, cols: int, tokens: int, v: int, m: int) -> list:
    """The sparse call as the dispatcher runs it (no dense weight kept), then cuBLAS on the same x."""
    dense = torch.randn(rows, cols, device="cuda", dtype=torch.float16)
    weight = VNMWeight.from_dense(dense, v=v, m=m)
    layout = prefill_layout(weight)
    x = torch.randn(tokens, cols, device="cuda", dtype=torch.float16)
    return [lambda: triton_vnm_linear(x, weight, layout=layout), lambda: F.linear(x, dense)]


def main() -> None:
    calls = [call for case in CASES for call in case_calls(*case)]
    for call in calls:
        call()
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    for call in calls:
        call()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()
    print(torch.cuda.get_device_name(), torch.__version__, "cases (rows, cols, tokens, v, m):", CASES)


if __name__ == "__main__":
    main()
