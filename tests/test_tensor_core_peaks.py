"""benchmarks/tensor_core_peaks.py and the L2 traffic model of benchmarks/sparse_mma_check.py.

CPU: the traffic model counts what each tile of a launch reads. GPU (`-m gpu`): every instruction's loop
compiles and runs (its rate is reported, never asserted)."""

import pytest
import torch

from benchmarks.sparse_mma_check import modeled_l2_bytes
from benchmarks.tensor_core_peaks import instruction_peaks, l2_copy_GBps
from vnm_compile.format import VNMWeight
from vnm_compile.kernels import sparse_mma


def test_l2_model_counts_x_per_row_tile_and_the_layout_per_token_tile():
    weight = VNMWeight.from_dense(torch.randn(300, 200, dtype=torch.float16), v=64, m=8)
    layout = sparse_mma.pack(weight)  # 300 rows padded to 512, layout.nbytes read by every token tile
    config = sparse_mma.CONFIGS["rows256_tokens128"]
    tokens = 300  # 3 token tiles of 128
    expected = 2 * tokens * 200 * 2 + 3 * layout.nbytes + tokens * 300 * 2
    assert modeled_l2_bytes(config, layout, tokens) == expected
    split = sparse_mma.CONFIGS["rows128_tokens16_split4"]  # 4 row tiles, 1 token tile, fp32 partials out and back
    assert modeled_l2_bytes(split, layout, 16) == 4 * 16 * 200 * 2 + layout.nbytes + 16 * 300 * 2 + 2 * 4 * 16 * 300 * 4


@pytest.mark.gpu
def test_every_instruction_loop_runs():
    if not sparse_mma.available("cuda"):
        pytest.skip("no sm_80+ GPU with NVRTC")
    peaks = instruction_peaks()
    expected = {"mma", "mma_sp"} | ({"wgmma", "wgmma_sp"} if torch.cuda.get_device_capability() == (9, 0) else set())
    assert set(peaks) == expected
    assert all(isinstance(rate, float) and rate > 0 for rate in peaks.values()), peaks
    assert l2_copy_GBps() > 0
