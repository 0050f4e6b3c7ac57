"""Compile every sparse-MMA kernel variant with NVRTC on a machine without a GPU, through torch's own
NVRTC path (torch.cuda._utils._nvrtc_compile), to catch compile errors before a GPU run.

    pip install --target /tmp/nvrtc nvidia-cuda-nvrtc        # or nvidia-cuda-nvrtc-cu12
    PYTHONPATH=. python3 benchmarks/sparse_mma_compile.py /tmp/nvrtc/nvidia/cu13/lib/libnvrtc.so.13 [90|80]

A CPU build of torch finds neither an NVRTC library nor CUDA_HOME (torch's helper adds the toolkit's
include directory to every compile; the kernel includes no header): both are set here for this
process only.
"""

from __future__ import annotations

import ctypes
import itertools
import sys
import tempfile

import torch
import torch.cuda._utils as nvrtc_utils
import torch.utils.cpp_extension as cpp_extension

from vnm_compile.kernels import sparse_mma

PATTERNS = [(64, 5), (64, 8), (64, 16), (128, 8), (16, 4)]


def main() -> None:
    library = ctypes.CDLL(sys.argv[1])
    capability = sys.argv[2] if len(sys.argv) > 2 else "90"
    nvrtc_utils._get_gpu_rtc_library = lambda: library
    cpp_extension.CUDA_HOME = cpp_extension.CUDA_HOME or tempfile.mkdtemp()
    nvrtc_utils._nvrtc_compile(sparse_mma.TRANSPOSE_SOURCE, "vnm_transpose", capability)
    compiled = failed = 0
    for (name, config), (v, m), dtype, ordered in itertools.product(
            sparse_mma.CONFIGS.items(), PATTERNS, (torch.float16, torch.bfloat16), (False, True)):
        if v % (16 * config.warp_m_tiles) or (ordered and (dtype, m) != (torch.float16, 8)):
            continue
        try:
            nvrtc_utils._nvrtc_compile(sparse_mma.kernel_source(config, m, v, dtype, ordered), "vnm_sparse_mma",
                                       capability)
            compiled += 1
        except Exception as error:
            failed += 1
            print("FAIL", name, f"{v}:2:{m}", dtype, "ordered" if ordered else "", str(error)[:3000])
    print(f"sm_{capability}: {compiled} variants and the transpose compiled, {failed} failed")


if __name__ == "__main__":
    main()
