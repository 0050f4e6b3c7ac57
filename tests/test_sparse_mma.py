"""The sparse-MMA kernel: its host packing proven on CPU by emulating the kernel, and the real kernel on GPU.

CPU: `run_kernel_model` replays the CUDA kernel's data movement with the same index formulas
(sparse_mma.INDEX_FORMULAS, which the CUDA source is generated from) and the same constants
(TileConfig.geometry): the cp.async copies of each stage into a model of shared memory (NaN where
nothing was written), the per-lane ldmatrix row addresses, the A fragment and metadata loads, and
the accumulator positions of the epilogue. The instructions themselves are modelled from the PTX
ISA's text alone (fragment layouts of mma.sp.m16n8k32 for .f16/.bf16, the metadata layout for
sparsity selector 0, ldmatrix .trans), independently of the packing's formulas. The output must
match `reference_linear` in float64.
GPU (`-m gpu`): the compiled kernel against float64 for every config.
"""

import math

import pytest
import torch

import vnm_compile as vnm
from vnm_compile.kernels import sparse_mma
from vnm_compile.kernels.reference import reference_linear
from vnm_compile.kernels.sparse_mma import CONFIGS, pack

# ------------------------------------------------------------------------------------------ PTX ISA model
# mma.sp.sync.aligned.m16n8k32.row.col.f32.{f16,bf16}: groupID = lane >> 2, threadID_in_group = lane % 4.


def ptx_a_position(lane: int, i: int) -> tuple[int, int, int]:
    """a_i of lane -> (row of A, 4-wide chunk of K, which of the chunk's 2 non-zeros)."""
    group_id, thread_in_group = lane >> 2, lane % 4
    row = group_id if (i < 2 or 4 <= i < 6) else group_id + 8
    first_col = thread_in_group * 4 if i < 4 else thread_in_group * 4 + 16
    return row, first_col // 4, i % 2


def ptx_b_position(lane: int, i: int) -> tuple[int, int]:
    """b_i of lane (register i // 2, half i % 2) -> (k, n): two m16n8k16 B fragments along K."""
    return (lane % 4) * 2 + (i & 1) + 8 * (i >> 1), lane >> 2


def ptx_c_position(lane: int, i: int) -> tuple[int, int]:
    """c_i of lane -> (row, n) of the 16 x 8 accumulator."""
    return (lane >> 2) + (8 if i >= 2 else 0), (lane % 4) * 2 + (i & 1)


def ptx_metadata_position(row: int, chunk: int) -> tuple[int, int]:
    """Which lane's metadata register holds the index pair of (row, chunk), and at which bit, for
    sparsity selector 0: lane 4 * (row % 8) + chunk // 4 (threads 0 and 1 of each quad), bits
    [0, 16) for rows 0-7 and [16, 32) for rows 8-15, 4 bits a chunk, the first index lowest."""
    return 4 * (row % 8) + chunk // 4, 16 * (row // 8) + 4 * (chunk % 4)


def _tables():
    a = torch.tensor([[ptx_a_position(lane, i) for i in range(8)] for lane in range(32)])
    meta = torch.tensor([[ptx_metadata_position(*ptx_a_position(lane, i)[:2]) for i in range(8)] for lane in range(32)])
    b = torch.tensor([[ptx_b_position(lane, i) for i in range(8)] for lane in range(32)])
    c = torch.tensor([[ptx_c_position(lane, i) for i in range(4)] for lane in range(32)])
    return a, meta, b, c


A_POS, META_POS, B_POS, C_POS = _tables()


def ptx_mma_sp(a: torch.Tensor, b: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """D = A B for batches: a [..., 32, 8] and b [..., 32, 8] values by lane and element, e [..., 32]
    metadata words (int64), broadcast against each other; returns d [..., 32, 4]."""
    batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2], e.shape[:-1])
    a, b, e = a.expand(*batch, 32, 8), b.expand(*batch, 32, 8), e.expand(*batch, 32)
    words = e.gather(-1, META_POS[..., 0].reshape(-1).expand(*batch, -1)).view(*batch, 32, 8)
    index = (words >> (META_POS[..., 1] + 2 * A_POS[..., 2])) & 3
    pair = index.view(*batch, 32, 4, 2)  # the two non-zeros of one (row, chunk) sit in one register
    assert bool((pair[..., 0] < pair[..., 1]).all()), "metadata index pair not ascending (invalid for mma.sp)"
    k = 4 * A_POS[..., 1] + index
    dense_a = torch.zeros(*batch, 16 * 32, dtype=torch.float64)
    dense_a.scatter_add_(-1, (32 * A_POS[..., 0] + k).reshape(*batch, -1), a.reshape(*batch, -1))
    dense_b = torch.zeros(*batch, 32 * 8, dtype=torch.float64)
    dense_b.scatter_(-1, (8 * B_POS[..., 0] + B_POS[..., 1]).reshape(-1).expand(*batch, -1), b.reshape(*batch, -1))
    d = dense_a.view(*batch, 16, 32) @ dense_b.view(*batch, 32, 8)
    return d.view(*batch, 128)[..., (8 * C_POS[..., 0] + C_POS[..., 1]).reshape(-1)].view(*batch, 32, 4)


def ptx_ldmatrix_x4_trans(memory: torch.Tensor, addresses: torch.Tensor) -> torch.Tensor:
    """ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16: memory holds b16 values by byte address / 2;
    lanes 8i..8i+7 give the byte addresses of matrix i's rows; lane t receives [2(t%4)][t/4] and
    [2(t%4)+1][t/4] of matrix i as elements 2i, 2i+1. Returns [..., 32, 8]."""
    assert bool((addresses % 16 == 0).all()), "ldmatrix rows must be 16-byte aligned"
    rows = memory[(addresses // 2)[..., None] + torch.arange(8)]  # [..., 32 (matrix, row), 8]
    matrices = rows.view(*addresses.shape[:-1], 4, 8, 8)
    lane = torch.arange(32)
    out = torch.stack([matrices[..., i, 2 * (lane % 4) + h, lane // 4] for i in range(4) for h in range(2)], -1)
    return out


# ------------------------------------------------------------------------------------------ kernel model
def run_kernel_model(x: torch.Tensor, layout, bias, config) -> torch.Tensor:
    """y [T, R] in float64, computed the way sparse_mma.cu computes it (see the module docstring)."""
    f = sparse_mma
    g = config.geometry(layout.m, layout.v)
    tokens, channels = x.shape
    ld = -(-tokens // 8) * 8
    xt = torch.zeros(channels, ld, dtype=torch.float64)  # channel_major_input: x.T, zero padded
    xt[:, :tokens] = x.double().t()
    x_padded = torch.zeros(tokens, -(-channels // 8) * 8, dtype=torch.float64)  # row_major_input
    x_padded[:, :channels] = x.double()
    values = layout.values.double().reshape(-1)
    words = layout.metadata.long().reshape(-1) & 0xFFFFFFFF
    columns = layout.columns.long().reshape(-1)
    k32_units, rows = layout.k32_units, layout.out_features
    rows_pad = layout.values.shape[0] * 16
    y = torch.full((tokens, rows), float("nan"), dtype=torch.float64)
    tid = torch.arange(g["THREADS"])
    lane = torch.arange(32)
    for tile_m in range(rows_pad // g["BLOCK_ROWS"]):
        first_m16, first_row = tile_m * g["M_TILES"], tile_m * g["BLOCK_ROWS"]
        first_block = first_row // g["V_ROWS"]
        for tile_t in range(-(-tokens // g["BLOCK_TOKENS"])):
            first_token = tile_t * g["BLOCK_TOKENS"]
            warps = g["WARPS_M"] * g["WARPS_N"] * g["WARPS_K"]
            # split-K: split z accumulates its own run of steps, the caller adds the splits' sums
            steps = k32_units // g["STEP_K32"]
            steps_per_split = -(-steps // g["SPLITS"])
            acc = torch.zeros(g["SPLITS"], warps, g["WARP_M_TILES"], g["WARP_N_TILES"], 32, 4, dtype=torch.float64)
            for step in range(steps):
                # ---- load_stage: shared memory regions, NaN / -1 where no copy wrote
                x_smem = torch.full((g["A_OFFSET"] // 2,), float("nan"), dtype=torch.float64)
                a_smem = torch.full(((g["E_OFFSET"] - g["A_OFFSET"]) // 2,), float("nan"), dtype=torch.float64)
                e_smem = torch.full(((g["COLUMNS_OFFSET"] - g["E_OFFSET"]) // 4,), -1, dtype=torch.long)
                c_smem = torch.full((g["STAGE_BYTES"] - g["COLUMNS_OFFSET"],), -1, dtype=torch.long)
                if config.x_row_major:
                    q = tid + torch.arange(g["X_TOKEN_COPIES"])[:, None] * g["THREADS"]  # [copies, threads]
                    token, channel = q // (g["X_ROWS"] // 8), 8 * (q % (g["X_ROWS"] // 8))
                    destination = f.x_token_offset(token, channel, g["X_TOKEN_PITCH"]) // 2
                    valid = (first_token + token < tokens) & (step * g["X_ROWS"] + channel < x_padded.shape[1])
                    chunk = x_padded[(first_token + token).clamp(max=tokens - 1)[..., None],
                                     (step * g["X_ROWS"] + channel).clamp(max=x_padded.shape[1] - 8)[..., None]
                                     + torch.arange(8)]
                    written = q < g["X_TOKEN_CHUNKS"]
                else:
                    x_chunk, x_row = tid % g["CHUNKS_PER_ROW"], tid // g["CHUNKS_PER_ROW"]  # [threads]
                    copy = torch.arange(g["X_COPIES"])[:, None]  # [copies, 1]
                    row = x_row + copy * g["X_ROW_STEP"]
                    channel, token = step * g["X_ROWS"] + row, (first_token + 8 * x_chunk).expand_as(row)
                    destination = (f.x_tile_offset(x_row, x_chunk, g["X_ROW_PITCH"])
                                   + copy * g["X_ROW_STEP"] * g["X_ROW_PITCH"]) // 2
                    valid = (channel < channels) & (token < ld)
                    chunk = xt[channel.clamp(max=channels - 1)[..., None],
                               token.clamp(max=ld - 8)[..., None] + torch.arange(8)]
                    written = row < g["X_ROWS"]  # the copy's guard
                x_smem[destination[written][:, None] + torch.arange(8)] = (chunk * valid[..., None])[written]
                a_rest, a_m16 = tid % (g["STEP_K32"] * 32), tid // (g["STEP_K32"] * 32)
                m16 = a_m16 + torch.arange(g["A_COPIES"])[:, None] * g["A_M16_STEP"]
                written = m16 < g["M_TILES"]
                source = ((first_m16 + m16) * k32_units * 512 + step * g["STEP_K32"] * 512 + a_rest * 16) // 2
                destination = (m16 * g["STEP_K32"] * 512 + a_rest * 16) // 2
                a_chunk = values[source[written][:, None] + torch.arange(8)]
                a_smem[destination[written][:, None] + torch.arange(8)] = a_chunk
                for q in range(g["E_CHUNKS"]):
                    m16, rest = q // (g["STEP_K32"] * 4), q % (g["STEP_K32"] * 4)
                    unit = (first_m16 + m16) * k32_units + step * g["STEP_K32"]
                    e_smem[4 * q:4 * q + 4] = words[(unit * 64 + rest * 16) // 4:(unit * 64 + rest * 16) // 4 + 4]
                for q in range(g["COLUMN_CHUNKS"]):
                    block, rest = q // (g["STEP_K32"] * 2), q % (g["STEP_K32"] * 2)
                    unit = (first_block + block) * k32_units + step * g["STEP_K32"]
                    c_smem[16 * q:16 * q + 16] = columns[unit * 32 + rest * 16:unit * 32 + rest * 16 + 16]
                # ---- compute_stage, for every warp (dim 0) and k32 unit of the warp (dim 1) at once
                warp, sub = torch.arange(warps)[:, None], torch.arange(g["K32_PER_WARP"])[None, :]
                warp_k = warp % g["WARPS_K"]
                warp_n = (warp // g["WARPS_K"]) % g["WARPS_N"]
                warp_m = warp // (g["WARPS_K"] * g["WARPS_N"])
                warp_first_m16 = warp_m * g["WARP_M_TILES"]
                warp_block = warp_first_m16 * 16 // g["V_ROWS"]
                warp_first_chunk = warp_n * g["WARP_N_TILES"]
                k32 = warp_k * g["K32_PER_WARP"] + sub  # [warps, k32s]
                unit_columns = ((warp_block * g["STEP_K32"] + k32) * 32)[..., None]  # [w, k, 1]
                tiles = (warp_first_m16[..., None] + torch.arange(g["WARP_M_TILES"])) * g["STEP_K32"] + k32[..., None]
                a = a_smem[((tiles[..., None, None] * 512 + lane[:, None] * 16) // 2) + torch.arange(8)]
                e = e_smem[(tiles[..., None] * 64 + f.metadata_word(lane) * 4) // 4]  # [w, k, m16s, 32]
                n_tiles = torch.arange(g["WARP_N_TILES"])
                if config.x_row_major:  # value h of lane's B: kept channel b_fragment_kept of one token
                    kept = f.b_fragment_kept(lane[:, None], torch.arange(8))  # [32, 8]
                    column = c_smem[unit_columns[..., None] + kept]  # [w, k, 32, 8]
                    first_tokens = ((warp_first_chunk[..., None] + n_tiles) * 8)[..., None, None]  # [w, 1, n8s, 1, 1]
                    token = first_tokens + f.b_fragment_token(lane)[:, None]
                    channel = f.x_chunk_row(k32[..., None, None], kept, column, g["M_GROUP"])  # [w, k, 32, 8]
                    offset = f.x_token_offset(token, channel[:, :, None], g["X_TOKEN_PITCH"])  # [w, k, n8s, 32, 8]
                    b = x_smem[offset // 2]
                else:  # lane's kept channel is a row of the x tile, gathered by ldmatrix
                    column = c_smem[unit_columns + lane]
                    row = f.x_chunk_row(k32[..., None], lane, column, g["M_GROUP"])
                    row_address = f.x_tile_offset(row, warp_first_chunk[..., None], g["X_ROW_PITCH"])  # [w, k, 32]
                    b = ptx_ldmatrix_x4_trans(x_smem, row_address[..., None, :] + 16 * n_tiles[:, None])
                assert bool((column >= 0).all())
                acc[step // steps_per_split] += ptx_mma_sp(a[:, :, :, None], b[:, :, None], e[:, :, :, None]).sum(1)
            # ---- epilogue: partial sums of warps along K and of splits, then bias, at the accumulators'
            # positions
            acc = acc.sum(0).view(g["WARPS_M"], g["WARPS_N"], g["WARPS_K"], *acc.shape[2:]).sum(2)
            i = torch.arange(4)
            for warp_m in range(g["WARPS_M"]):
                for warp_n in range(g["WARPS_N"]):
                    for mi in range(g["WARP_M_TILES"]):
                        for ni in range(g["WARP_N_TILES"]):
                            row = (first_row + (warp_m * g["WARP_M_TILES"] + mi) * 16
                                   + f.accumulator_row(lane[:, None], i))
                            token = (first_token + (warp_n * g["WARP_N_TILES"] + ni) * 8
                                     + f.accumulator_token(lane[:, None], i))
                            value = acc[warp_m, warp_n, mi, ni]
                            if bias is not None:
                                value = value + bias.double()[row.clamp(max=rows - 1)]
                            keep = (row < rows) & (token < tokens)
                            y[token[keep], row[keep]] = value[keep]
    return y


# ------------------------------------------------------------------------------------------ CPU tests
def make_case(rows, cols, v, m, tokens, seed, dtype=torch.float16):
    gen = torch.Generator().manual_seed(seed)
    weight = vnm.VNMWeight.from_dense(torch.randn(rows, cols, generator=gen).to(dtype), v, m)
    x = torch.randn(tokens, cols, generator=gen).to(dtype)
    bias = torch.randn(rows, generator=gen).to(dtype)
    ref = reference_linear(x.double(), vnm.kernels.Operands(weight.values.double(), weight.columns, weight.metadata,
                                                            v, m, cols, bias.double()))
    return weight, x, bias, ref


def check_model(rows, cols, v, m, tokens, config, seed=0, with_bias=True):
    weight, x, bias, ref = make_case(rows, cols, v, m, tokens, seed)
    y = run_kernel_model(x, pack(weight), bias if with_bias else None, config)
    if not with_bias:
        ref = ref - bias.double()
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("tokens", [1, 3, 17, 129])
@pytest.mark.parametrize("v, m", [(64, 5), (64, 8), (64, 16), (128, 8)])
def test_packing_matches_reference_under_the_kernel_model(tokens, v, m):
    """Rows not divisible by V (200), columns not divisible by M (136 = 17 x 8, 27.2 x 5, 8.5 x 16)."""
    config = CONFIGS["rows32_tokens16" if tokens <= 16 else "rows256_tokens128"]
    check_model(200, 136, v, m, tokens, config, seed=tokens + m)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_config_under_the_kernel_model(name):
    config = CONFIGS[name]
    v = 128 if config.warp_m_tiles == 8 else 64
    check_model(200, 264, v, 8, 17, config, seed=1)


def test_small_blocks_and_plain_two_four():
    check_model(40, 72, 16, 4, 9, CONFIGS["rows32_tokens16"], seed=2)  # 16:2:4, m16 tiles = row blocks
    check_model(70, 40, 32, 6, 5, CONFIGS["rows64_tokens64"], seed=3, with_bias=False)


def test_row_major_x_with_channels_not_a_multiple_of_eight():
    """An x_row_major config on 43 channels: row_major_input adds 5 zero channels, the tile's last chunk."""
    check_model(70, 43, 32, 6, 5, CONFIGS["rows32_tokens16_row_major_x"], seed=5)
    x = torch.randn(5, 43, dtype=torch.float16)
    padded = sparse_mma.row_major_input(x)
    assert padded.shape == (5, 48) and bool((padded[:, 43:] == 0).all()) and torch.equal(padded[:, :43], x)
    aligned = torch.randn(5, 48, dtype=torch.float16)
    assert sparse_mma.row_major_input(aligned) is aligned
    transposed = aligned.t().contiguous().t()  # channel-major: copied into rows
    assert sparse_mma.row_major_input(transposed).stride() == (48, 1)


def test_b_fragment_formulas_follow_the_ptx_layout():
    for lane in range(32):
        for half in range(8):
            assert (sparse_mma.b_fragment_kept(lane, half), sparse_mma.b_fragment_token(lane)) == \
                ptx_b_position(lane, half)


def test_packed_layout_sizes_and_padding():
    weight, *_ = make_case(200, 136, 64, 8, 1, seed=4)
    layout = pack(weight)
    assert layout.values.shape == (256 // 16, 32 // 8, 32, 8) and layout.values.dtype == torch.float16
    assert layout.metadata.shape == (16, 4, 16) and layout.metadata.dtype == torch.int32
    assert layout.columns.shape == (4, 4, 32) and layout.columns.dtype == torch.uint8
    assert layout.nbytes == layout.values.nbytes + layout.metadata.nbytes + layout.columns.nbytes
    # every metadata nibble is a valid ascending pair, padding included
    nibbles = (layout.metadata.long()[..., None] >> (4 * torch.arange(8))) & 0xF
    assert bool(((nibbles & 3) < (nibbles >> 2)).all())
    # padding rows and groups hold zeros
    assert bool((layout.values[200 // 16 + 1:] == 0).all())


def test_index_formulas_are_cuda_functions():
    source = sparse_mma.kernel_source(CONFIGS["rows32_tokens8"], 8, 64, torch.float16)
    for name, (_, expression) in sparse_mma.INDEX_FORMULAS.items():
        assert f"int {name}(" in source and f"return {expression};" in source


def test_bad_input_is_refused():
    weight, *_ = make_case(64, 64, 64, 8, 1, seed=5)
    with pytest.raises(TypeError, match="VNMWeight"):
        pack(weight.values)
    with pytest.raises(ValueError, match="multiple of 16"):
        pack(vnm.VNMWeight.from_dense(torch.randn(16, 16).half(), 8, 8))
    with pytest.raises(ValueError, match="float16 or bfloat16"):
        pack(weight.to(torch.float32))
    with pytest.raises(ValueError, match="inside one row block"):
        CONFIGS["rows256_tokens128_v128"].check(64)
    with pytest.raises(TypeError, match="SparseMMALayout"):
        sparse_mma.sparse_mma_linear(torch.zeros(1, 64), weight)
    assert not sparse_mma.available("cpu")


def test_default_config_fits_shared_memory():
    weight, *_ = make_case(128, 256, 64, 16, 1, seed=6)
    layout = pack(weight)
    for tokens in (1, 8, 9, 16, 17, 33, 64, 65, 8192):
        config = sparse_mma.default_config(tokens, layout.v, layout.m, shared_limit=227 * 1024)
        assert config.shared_bytes(layout.m, layout.v) <= 227 * 1024


# ------------------------------------------------------------------------------------------ GPU tests
TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 1e-2}


def relative_error(out, ref):
    if not torch.isfinite(out).all():
        return math.inf
    return float((out.double() - ref).norm() / ref.norm())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("v, m", [(64, 5), (64, 8), (64, 16), (128, 8)])
@pytest.mark.parametrize("tokens", [1, 3, 17, 129, 2048])
def test_kernel_matches_float64(tokens, v, m, dtype):
    if not sparse_mma.available("cuda"):
        pytest.skip("no sparse-MMA support (sm_80+ and NVRTC)")
    weight, x, bias, ref = make_case(200, 136 if m != 16 else 264, v, m, tokens, seed=tokens + m, dtype=dtype)
    layout = pack(weight.to("cuda"))
    y = sparse_mma.sparse_mma_linear(x.cuda(), layout, bias.cuda())
    assert y.shape == (tokens, 200) and y.dtype == dtype
    assert relative_error(y.cpu(), ref) < TOLERANCE[dtype]


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("channel_major", [False, True])
def test_every_config_on_gpu(name, channel_major):
    if not sparse_mma.available("cuda"):
        pytest.skip("no sparse-MMA support (sm_80+ and NVRTC)")
    config = CONFIGS[name]
    v = 128 if config.warp_m_tiles == 8 else 64
    weight, x, bias, ref = make_case(1000, 520, v, 8, 80 if channel_major else 77, seed=7)
    layout = pack(weight.to("cuda"))
    if config.shared_bytes(8, v) > torch.cuda.get_device_properties(0).shared_memory_per_block_optin:
        pytest.skip("config does not fit this GPU's shared memory")
    x = x.cuda()
    if channel_major:  # x as its producer writes it for a sparse consumer: read in place
        x = x.t().contiguous().t()
        bias, ref = None, ref - bias.double()  # and no bias
    y = sparse_mma.sparse_mma_linear(x, layout, bias.cuda() if bias is not None else None, config=name,
                                     channel_major_out=channel_major)
    assert y.is_contiguous() != channel_major
    assert relative_error(y.cpu(), ref) < TOLERANCE[torch.float16]


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(name for name, config in CONFIGS.items() if config.x_row_major))
@pytest.mark.parametrize("tokens", [1, 3, 17])
def test_row_major_x_configs_on_channels_not_a_multiple_of_eight(name, tokens):
    if not sparse_mma.available("cuda"):
        pytest.skip("no sparse-MMA support (sm_80+ and NVRTC)")
    weight, x, bias, ref = make_case(300, 523, 64, 5, tokens, seed=tokens, dtype=torch.bfloat16)
    y = sparse_mma.sparse_mma_linear(x.cuda(), pack(weight.to("cuda")), bias.cuda(), config=name)
    assert relative_error(y.cpu(), ref) < TOLERANCE[torch.bfloat16]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 3, 17, 129])
@pytest.mark.parametrize("channel_major_out", [False, True])
def test_dispatcher_path_matches_float64(tokens, dtype, channel_major_out):
    """The dispatcher's sparse_mma path (the operator vnm.linear's traced body calls), on dims that V and
    M do not divide."""
    if not sparse_mma.available("cuda"):
        pytest.skip("no sparse-MMA support (sm_80+ and NVRTC)")
    from vnm_compile.kernels import dispatch

    weight, x, bias, ref = make_case(1000, 520, 64, 8, tokens, seed=tokens, dtype=dtype)
    weight = weight.to("cuda")
    operands = vnm.kernels.operands(weight, bias.cuda(), mma=pack(weight))
    y = dispatch.kernel_linear(x.cuda(), operands, path="sparse_mma", channel_major_out=channel_major_out)
    assert y.shape == (tokens, 1000) and (y.t().is_contiguous() if channel_major_out else y.is_contiguous())
    assert relative_error(y.cpu(), ref) < TOLERANCE[dtype]


class _MeasuredFastest(dict):
    """A dispatch table in which the sparse tensor-core kernel measured fastest for every key."""

    def get(self, key, default=None):
        return {"path": "decode", "sparse_us": 10.0, "dense_us": 20.0, "mma_us": 5.0}


@pytest.mark.gpu
def test_compiled_graph_calls_the_operator_and_plans_it_per_call(monkeypatch):
    """Where the dispatcher takes the kernel, a static graph calls vnm.sparse_mma (an extern kernel for
    Inductor, no graph break) and a dynamic one plans it per token bucket; both match float64."""
    if not sparse_mma.available("cuda"):
        pytest.skip("no sparse-MMA support (sm_80+ and NVRTC)")
    from torch._inductor.utils import run_and_get_code

    from vnm_compile.kernels import dispatch

    monkeypatch.setattr(dispatch, "load_table", lambda slug: {"dispatch": _MeasuredFastest(), "rules": {}})
    launches = []
    compiled_kernel = sparse_mma.compiled_kernel
    monkeypatch.setattr(sparse_mma, "compiled_kernel",
                        lambda *args, **kwargs: launches.append(args[0]) or compiled_kernel(*args, **kwargs))
    weight, x, bias, ref = make_case(1000, 520, 64, 8, 17, seed=9)
    weight, x, bias = weight.to("cuda"), x.cuda(), bias.cuda()
    mma = pack(weight)
    torch._dynamo.reset()
    static = torch.compile(lambda x: vnm.kernels.vnm_linear(x, weight, bias, mma=mma), fullgraph=True, dynamic=False)
    y, code = run_and_get_code(static, x)
    assert "vnm.sparse_mma" in "".join(code) and launches
    assert relative_error(y.cpu(), ref) < TOLERANCE[torch.float16]
    dynamic = torch.compile(lambda x: vnm.kernels.vnm_linear(x, weight, bias, mma=mma), fullgraph=True, dynamic=True)
    for tokens in (3, 9, 17):
        launches.clear()
        y = dynamic(x[:tokens])
        assert launches and relative_error(y.cpu(), ref[:tokens]) < TOLERANCE[torch.float16]
