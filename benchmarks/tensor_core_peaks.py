"""What one GPU's tensor cores and L2 cache can do: the ceilings a sparse kernel is judged by.

    python3 -m benchmarks.tensor_core_peaks

Each matrix instruction a V:N:M kernel can be built on runs in a loop on registers only (no memory
traffic inside the loop; wgmma's B sits in shared memory, as it must), over the whole GPU, in TFLOP/s:

- mma.sync m16n8k16, dense, one warp (Ampere's instruction; what the sparse tensor-core kernel's
  siblings would use),
- mma.sp.sync m16n8k32, A 2:4 sparse, one warp (the sparse tensor-core kernel's instruction),
- wgmma m64n256k16, dense, a warpgroup, A from registers (Hopper's; sm_90 only),
- wgmma.sp m64n256k32, A 2:4 sparse, likewise.

Sparse rates count the products with A's zeros too (NVIDIA's convention), so a 2:4 instruction at full
speed shows twice its dense sibling's rate. Also the L2 cache's copy bandwidth: copies between two
16 MB buffers that stay in L2, bytes read plus written; `sparse_mma_check` sets each kernel's modeled
L2 traffic against it.
"""

from __future__ import annotations

import argparse
import functools

import torch

from benchmarks.timing import graph_us, log

ACCUMULATORS = 8  # independent mma.sync chains a warp keeps in flight
WGMMAS_PER_GROUP = 4  # wgmmas into one accumulator between commits

_A_OPERAND = "{%4, %5, %6, %7}"
_METADATA = "  const u32 metadata = 0x44444444u;  // every group of 4 keeps slots 0 and 1\n"
_MMA_BODY = {
    "mma": ("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, " + _A_OPERAND
            + ", {%8, %9}, {%0, %1, %2, %3};", 2, 2 * 16 * 8 * 16),
    "mma_sp": ("mma.sp.sync.aligned.m16n8k32.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, " + _A_OPERAND
               + ", {%8, %9, %10, %11}, {%0, %1, %2, %3}, %12, 0x0;", 4, 2 * 16 * 8 * 32),
}


def _mma_source(name: str) -> str:
    """A kernel of ACCUMULATORS chains of the warp instruction `name`, `iterations` rounds."""
    instruction, b_registers, _ = _MMA_BODY[name]
    b_inputs = ", ".join(f'"r"(b[{i}])' for i in range(b_registers))
    metadata = ', "r"(metadata)' if name == "mma_sp" else ""
    return f"""
typedef unsigned int u32;
extern "C" __global__ void __launch_bounds__(256) peak_{name}(int iterations, float* sink) {{
  u32 a[4], b[4];
  for (int i = 0; i < 4; ++i) {{  // small finite halves, different in every lane
    a[i] = 0x20002000u | ((threadIdx.x * 37u + i) & 0x3ffu) | (((threadIdx.x * 11u + i) & 0x3ffu) << 16);
    b[i] = a[i] ^ 0x00010001u;
  }}
{_METADATA if name == "mma_sp" else ""}  float d[{ACCUMULATORS}][4] = {{}};
  for (int round = 0; round < iterations; ++round) {{
#pragma unroll
    for (int j = 0; j < {ACCUMULATORS}; ++j)
      asm volatile("{instruction}\\n"
                   : "+f"(d[j][0]), "+f"(d[j][1]), "+f"(d[j][2]), "+f"(d[j][3])
                   : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), {b_inputs}{metadata});
  }}
  float total = 0.0f;
  for (int j = 0; j < {ACCUMULATORS}; ++j) total += d[j][0] + d[j][1] + d[j][2] + d[j][3];
  if (total == 1.2345f) sink[threadIdx.x] = total;  // keeps the loop from being removed
}}
"""


def _wgmma_source(sparse: bool) -> str:
    """A kernel whose warpgroups issue WGMMAS_PER_GROUP wgmmas (m64n256, A from registers) a round."""
    k = 32 if sparse else 16
    name = "wgmma_sp" if sparse else "wgmma"
    opcode = (f"wgmma.mma_async.sp.sync.aligned.m64n256k{k}.f32.f16.f16" if sparse
              else f"wgmma.mma_async.sync.aligned.m64n256k{k}.f32.f16.f16")
    d_list = ", ".join(f"%{i}" for i in range(128))
    tail = "%133, 0, p, 1, 1, 0" if sparse else "p, 1, 1, 0"  # [metadata, selector,] scale-d, scales, B not transposed
    scale_d = "%134" if sparse else "%133"  # 1: d += A B
    outputs = ", ".join(f'"+f"(d[{i}])' for i in range(128))
    metadata = ', "r"(metadata)' if sparse else ""
    # B: k x 256 halves, K-major, no swizzle: 8 x 16-byte core matrices, K-adjacent ones 128 bytes
    # apart (leading offset), 8-row groups k * 16 bytes apart (stride offset)
    return f"""
typedef unsigned int u32;
typedef unsigned long long u64;
extern "C" __global__ void __launch_bounds__(256, 1) peak_{name}(int iterations, float* sink) {{
  __shared__ __align__(1024) unsigned short b_tile[256 * {k}];
  for (int i = threadIdx.x; i < 256 * {k}; i += blockDim.x) b_tile[i] = 0x2000u | ((i * 37u) & 0x3ffu);
  asm volatile("fence.proxy.async.shared::cta;\\n" ::: "memory");  // wgmma reads what threads wrote
  __syncthreads();
  u32 address;
  asm("{{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }}" : "=r"(address) : "l"(b_tile));
  const u64 descriptor = (u64)((address & 0x3ffff) >> 4) | ((u64)(128 >> 4) << 16) | ((u64)({k} * 16 >> 4) << 32);
  u32 a[4];
  for (int i = 0; i < 4; ++i)
    a[i] = 0x20002000u | ((threadIdx.x * 37u + i) & 0x3ffu) | (((threadIdx.x * 11u + i) & 0x3ffu) << 16);
{_METADATA if sparse else ""}  float d[128];
  for (int i = 0; i < 128; ++i) d[i] = 0.0f;
  for (int round = 0; round < iterations; ++round) {{
    asm volatile("wgmma.fence.sync.aligned;\\n" ::: "memory");
#pragma unroll
    for (int j = 0; j < {WGMMAS_PER_GROUP}; ++j)
      asm volatile("{{\\n .reg .pred p;\\n setp.ne.b32 p, {scale_d}, 0;\\n"
                   "{opcode} {{{d_list}}}, {{%128, %129, %130, %131}}, %132, {tail};\\n}}\\n"
                   : {outputs}
                   : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(descriptor){metadata}, "r"(1));
    asm volatile("wgmma.commit_group.sync.aligned;\\n" ::: "memory");
    asm volatile("wgmma.wait_group.sync.aligned 1;\\n" ::: "memory");
  }}
  asm volatile("wgmma.wait_group.sync.aligned 0;\\n" ::: "memory");
  float total = 0.0f;
  for (int i = 0; i < 128; ++i) total += d[i];
  if (total == 1.2345f) sink[threadIdx.x] = total;
}}
"""


def sources() -> dict[str, tuple[str, str | None]]:
    """{instruction: (CUDA source, compute capability to compile for: None = the device's)}."""
    return {"mma": (_mma_source("mma"), None), "mma_sp": (_mma_source("mma_sp"), None),
            "wgmma": (_wgmma_source(False), "90a"), "wgmma_sp": (_wgmma_source(True), "90a")}


def _flops_per_launch(name: str, iterations: int, blocks: int) -> float:
    if name in _MMA_BODY:
        return _MMA_BODY[name][2] * ACCUMULATORS * iterations * blocks * 8  # 8 warps a block
    k = 32 if name == "wgmma_sp" else 16
    return 2 * 64 * 256 * k * WGMMAS_PER_GROUP * iterations * blocks * 2  # 2 warpgroups a block


def instruction_peaks(device: torch.device | None = None) -> dict[str, float | str]:
    """TFLOP/s of each instruction over the whole GPU (wgmma only on compute capability 9.0); an
    instruction that fails to compile or run gives its error text instead."""
    device = torch.device("cuda", torch.cuda.current_device()) if device is None else device
    capability = torch.cuda.get_device_capability(device)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    sink = torch.empty(256, device=device)
    peaks: dict[str, float | str] = {}
    for name, (source, architecture) in sources().items():
        if architecture == "90a" and capability != (9, 0):
            continue
        wgmma = architecture == "90a"
        blocks, iterations = (sms, 4000) if wgmma else (4 * sms, 8000)
        try:
            with torch.cuda.device(device):
                kernel = torch.cuda._compile_kernel(source, f"peak_{name}", compute_capability=architecture)
            launch = functools.partial(kernel, grid=(blocks, 1, 1), block=(256, 1, 1), args=[iterations, sink])
            us = graph_us([launch], replays=5)
            peaks[name] = round(_flops_per_launch(name, iterations, blocks) / us / 1e6, 1)
        except Exception as error:
            peaks[name] = f"failed: {error!r}"[:300]
    return peaks


def l2_copy_GBps(megabytes: int = 16) -> float:
    """Bandwidth of copies between two buffers that stay in L2: bytes read plus written a second."""
    a = torch.randn(megabytes << 19, dtype=torch.float16, device="cuda")
    b = torch.empty_like(a)
    us = graph_us([lambda: b.copy_(a)] * 20)
    return round(2 * a.nbytes / us / 1e3, 1)


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    if not torch.cuda.is_available():
        log("no CUDA device: nothing to measure")
        return
    log(torch.cuda.get_device_name(), "TFLOP/s (sparse: counting A's zeros):", instruction_peaks())
    log("L2 copy GB/s (read + write):", l2_copy_GBps())


if __name__ == "__main__":
    main()
