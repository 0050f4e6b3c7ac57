"""V:N:M linear on sparse tensor cores: a CUDA C++ kernel (inline PTX mma.sp) compiled at run time.

Over the condensed K of a row block (the 4 kept columns of each group of M input channels) a V:N:M
weight is exactly 2:4 sparse: row r keeps 2 of its group's 4 kept columns, `values[r, 2g:2g+2]` are
the kept values and the nibble `slot0 | slot1 << 2` is the 2:4 index pair. So one
`mma.sp.m16n8k32` multiplies 16 weight rows (the sparse A operand) by 8 groups = 32 kept channels of
x (B) for 8 tokens. The kernel (sparse_mma.cu, whose comments describe it) keeps a channel-major tile
of x in shared memory and gathers each row block's kept channels from it with `ldmatrix.trans`, so
one x tile serves all the row blocks of a CTA.

Host side, pure torch (CPU or GPU):
  pack(weight) -> SparseMMALayout: the weight's values and metadata reordered into mma fragment
      order (16 bytes a lane per 16-row x 8-group tile), the kept columns padded; about the
      compressed weight's bytes (`SparseMMALayout.nbytes`).
  sparse_mma_linear(x, layout, bias, config) -> y: compiles the kernel for the config through
      torch's NVRTC helper (once per process and config) and launches it.
The index formulas the kernel uses are written once (INDEX_FORMULAS): each becomes a Python function
here, used by `pack` and by the tests' emulation of the kernel, and a __device__ function of the
same name in the CUDA source.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..format import VNMWeight, unpack_slots

ROW_ALIGN = 256  # the packed rows are padded to this (the largest CTA tile divides it)
GROUP_ALIGN = 32  # the packed groups are padded to this (the largest pipeline stage)
PAD_NIBBLE = 0b0100  # slots (0, 1): a valid 2:4 index pair for padding rows and groups (zero values)
KERNEL_SOURCE = Path(__file__).with_name("sparse_mma.cu")

# name: (arguments, expression), valid Python and C alike (ints; no comparisons or ternaries).
INDEX_FORMULAS = {
    # Value `half` (0..7) of lane's A fragment: its row in the m16 tile, its group in the k32 unit (the
    # PTX ISA's 4-wide chunk: a0..a3 from chunk lane%4, a4..a7 from chunk lane%4 + 4; a2, a3, a6, a7
    # from row lane/4 + 8), and which of the row's 2 kept values it is (the lower index first).
    "a_fragment_row": ("lane, half", "(lane >> 2) + 8 * ((half >> 1) & 1)"),
    "a_fragment_group": ("lane, half", "(lane & 3) + 4 * (half >> 2)"),
    "a_fragment_kept": ("half", "half & 1"),
    # Metadata: word w of an m16 x k32 tile holds rows w/2 (bits 0-15) and w/2 + 8 (bits 16-31) of
    # groups 4 * (w % 2) .. +3, a nibble each; lane (g, t) = (lane / 4, lane % 4) reads word 2g + t % 2.
    "metadata_row": ("word, nibble", "(word >> 1) + 8 * (nibble >> 2)"),
    "metadata_group": ("word, nibble", "4 * (word & 1) + (nibble & 3)"),
    "metadata_word": ("lane", "(lane >> 2) * 2 + (lane & 1)"),
    # The row of the stage's x tile that lane points ldmatrix at: kept channel `lane` of k32 unit
    # `k32`, i.e. kept column `column` of group lane / 4.
    "x_chunk_row": ("k32, lane, column, m_group", "(k32 * 8 + (lane >> 2)) * m_group + column"),
    # Byte offset of 16-byte chunk `chunk` (8 tokens) of x tile row `row`; `pitch` / 16 is odd, so
    # 8 rows whose indices differ mod 8 lie in 8 different bank groups.
    "x_tile_offset": ("row, chunk, pitch", "row * pitch + 16 * chunk"),
    # A row-major x tile (configs with x_row_major): its rows are tokens, `pitch` bytes apart; lane
    # gathers value `half` (0..7) of its B fragment, kept channel b_fragment_kept of the k32 unit at
    # token b_fragment_token of the n8 tile, with a 2-byte load (the PTX ISA's B layout).
    "x_token_offset": ("token, channel, pitch", "token * pitch + 2 * channel"),
    "b_fragment_kept": ("lane, half", "2 * (lane & 3) + (half & 1) + 8 * (half >> 1)"),
    "b_fragment_token": ("lane", "lane >> 2"),
    # Accumulator c_i (i = 0..3) of lane in the m16 x n8 output tile.
    "accumulator_row": ("lane, i", "(lane >> 2) + 8 * (i >> 1)"),
    "accumulator_token": ("lane, i", "2 * (lane & 3) + (i & 1)"),
}


def _formula(name: str):
    """INDEX_FORMULAS[name] as a Python function (of ints or integer tensors)."""
    arguments, expression = INDEX_FORMULAS[name]
    function = eval(f"lambda {arguments}: {expression}")  # noqa: S307 -- a constant of this module
    function.__name__ = function.__qualname__ = name
    return function


a_fragment_row = _formula("a_fragment_row")
a_fragment_group = _formula("a_fragment_group")
a_fragment_kept = _formula("a_fragment_kept")
metadata_row = _formula("metadata_row")
metadata_group = _formula("metadata_group")
metadata_word = _formula("metadata_word")
x_chunk_row = _formula("x_chunk_row")
x_tile_offset = _formula("x_tile_offset")
x_token_offset = _formula("x_token_offset")
b_fragment_kept = _formula("b_fragment_kept")
b_fragment_token = _formula("b_fragment_token")
accumulator_row = _formula("accumulator_row")
accumulator_token = _formula("accumulator_token")


def _cuda_formulas() -> str:
    """INDEX_FORMULAS as __device__ functions of the same names."""
    return "".join(
        f"__device__ __forceinline__ int {name}({', '.join('int ' + a.strip() for a in arguments.split(','))}) "
        f"{{ return {expression}; }}\n" for name, (arguments, expression) in INDEX_FORMULAS.items())


# ------------------------------------------------------------------------------------------ packing
@dataclass(frozen=True)
class SparseMMALayout:
    """A V:N:M weight in the sparse-MMA kernel's order, built once per weight by `pack`.

    values   [R_pad/16, G_pad/8, 32, 8]  (weight dtype) lane l's A fragment of each m16 x k32 tile
    metadata [R_pad/16, G_pad/8, 16]     int32, the tile's metadata words
    columns  [ceil(R_pad/V), G_pad/8, 32] uint8, lane l: kept column l % 4 of group l / 4
    R_pad = R rounded up to ROW_ALIGN, G_pad = ceil(C/M) rounded up to GROUP_ALIGN; padding rows
    and groups hold zero values.
    """

    values: torch.Tensor
    metadata: torch.Tensor
    columns: torch.Tensor
    v: int
    m: int
    out_features: int
    in_features: int

    @property
    def k32_units(self) -> int:
        return self.values.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.values, self.metadata, self.columns))


def refusal(weight: VNMWeight) -> str | None:
    """Why the kernel cannot take `weight`, or None where it can (on a device where it is `available`)."""
    if weight.v % 16:
        return f"it needs v to be a multiple of 16 (an m16 tile inside one row block), got v={weight.v}"
    if weight.dtype not in (torch.float16, torch.bfloat16):
        return f"it takes float16 or bfloat16 weights, got {weight.dtype}"
    return None


def pack(weight: VNMWeight) -> SparseMMALayout:
    """The kernel's layout of `weight` (pure torch, on the weight's device)."""
    if not isinstance(weight, VNMWeight):
        raise TypeError(f"weight must be a VNMWeight, got {type(weight).__name__}")
    reason = refusal(weight)
    if reason is not None:
        raise ValueError(f"the sparse-MMA kernel cannot take {weight!r}: {reason}")
    rows, groups, device = weight.out_features, weight.groups, weight.device
    rows_pad, groups_pad = -(-rows // ROW_ALIGN) * ROW_ALIGN, -(-groups // GROUP_ALIGN) * GROUP_ALIGN
    m16, k32 = rows_pad // 16, groups_pad // 8

    values = torch.nn.functional.pad(weight.values, (0, 2 * (groups_pad - groups), 0, rows_pad - rows))
    by_tile = values.view(m16, 16, k32, 16).transpose(1, 2)  # [m16, k32, row, 2 * group + kept]
    lane, half = torch.arange(32, device=device)[:, None], torch.arange(8, device=device)[None, :]
    packed_values = by_tile[:, :, a_fragment_row(lane, half),
                            2 * a_fragment_group(lane, half) + a_fragment_kept(half)]

    slots = unpack_slots(weight.metadata, groups)
    nibbles = torch.full((rows_pad, groups_pad), PAD_NIBBLE, dtype=torch.int64, device=device)
    nibbles[:rows, :groups] = slots[..., 0] | (slots[..., 1] << 2)
    by_tile = nibbles.view(m16, 16, k32, 8).transpose(1, 2)  # [m16, k32, row, group]
    word, nibble = torch.arange(16, device=device)[:, None], torch.arange(8, device=device)[None, :]
    words = (by_tile[:, :, metadata_row(word, nibble), metadata_group(word, nibble)] << (4 * nibble)).sum(-1)
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)  # the same 32 bits

    blocks = -(-rows_pad // weight.v)
    columns = torch.arange(4, dtype=torch.uint8, device=device).repeat(blocks, groups_pad, 1)
    columns[: weight.columns.shape[0], :groups] = weight.columns
    return SparseMMALayout(packed_values.contiguous(), words.contiguous(), columns.view(blocks, k32, 32),
                           weight.v, weight.m, rows, weight.in_features)


# ------------------------------------------------------------------------------------------ configs
@dataclass(frozen=True)
class TileConfig:
    """A CTA of warps_m x warps_n x warps_k warps; a warp computes warp_m_tiles m16 tiles (weight
    rows, inside one row block) x warp_n_tiles n8 tiles (tokens) over k32_per_warp k32 units of each
    pipeline stage; `stages` stages in flight; `splits` CTAs split each tile's stages between them
    (their fp32 partial sums then added by vnm_split_sum). x_row_major: the CTA copies x's tiles as
    they lie in a row-major x [T, C] and gathers B with 2-byte shared loads, where the others copy a
    channel-major x [C, T] (made by a transposing copy unless x comes so) and gather with ldmatrix:
    no extra launch, more shared loads, for few tokens."""

    name: str
    warps_m: int
    warps_n: int
    warps_k: int
    warp_m_tiles: int
    warp_n_tiles: int
    k32_per_warp: int
    stages: int
    splits: int = 1
    x_row_major: bool = False

    @property
    def threads(self) -> int:
        return 32 * self.warps_m * self.warps_n * self.warps_k

    @property
    def block_rows(self) -> int:
        return 16 * self.warp_m_tiles * self.warps_m

    @property
    def block_tokens(self) -> int:
        return 8 * self.warp_n_tiles * self.warps_n

    @property
    def step_k32(self) -> int:
        return self.k32_per_warp * self.warps_k

    def geometry(self, m: int, v: int) -> dict[str, int]:
        """Every size the kernel derives from the config, for pattern (v, m): its constexprs."""
        chunks_per_row = self.block_tokens // 8
        x_rows = 8 * self.step_k32 * m
        m_tiles = self.block_rows // 16
        x_row_pitch = 16 * (chunks_per_row | 1)
        # row-major tile: 16 bytes past the channels, so 8 tokens' values of one channel sit in 8 banks
        x_token_pitch = 2 * x_rows + 16
        x_token_chunks = self.block_tokens * x_rows // 8
        x_bytes = self.block_tokens * x_token_pitch if self.x_row_major else x_rows * x_row_pitch
        a_bytes, e_bytes = m_tiles * self.step_k32 * 512, m_tiles * self.step_k32 * 64
        column_bytes = max(1, self.block_rows // v) * self.step_k32 * 32
        x_row_step = self.threads // chunks_per_row  # a thread's x rows in a stage are this far apart
        a_m16_step = self.threads // (self.step_k32 * 32)  # its m16 tiles likewise
        return {
            "M_GROUP": m, "V_ROWS": v, "WARPS_M": self.warps_m, "WARPS_N": self.warps_n, "WARPS_K": self.warps_k,
            "WARP_M_TILES": self.warp_m_tiles, "WARP_N_TILES": self.warp_n_tiles, "K32_PER_WARP": self.k32_per_warp,
            "STAGES": self.stages, "SPLITS": self.splits, "THREADS": self.threads, "BLOCK_ROWS": self.block_rows,
            "BLOCK_TOKENS": self.block_tokens, "STEP_K32": self.step_k32, "M_TILES": m_tiles, "X_ROWS": x_rows,
            "X_ROW_PITCH": x_row_pitch, "CHUNKS_PER_ROW": chunks_per_row,
            "ROW_BLOCKS": max(1, self.block_rows // v), "A_OFFSET": x_bytes, "E_OFFSET": x_bytes + a_bytes,
            "COLUMNS_OFFSET": x_bytes + a_bytes + e_bytes, "STAGE_BYTES": x_bytes + a_bytes + e_bytes + column_bytes,
            "X_ROW_STEP": x_row_step, "X_COPIES": -(-x_rows // x_row_step), "X_ROW_MAJOR": int(self.x_row_major),
            "X_TOKEN_PITCH": x_token_pitch, "X_TOKEN_CHUNKS": x_token_chunks,
            "X_TOKEN_COPIES": -(-x_token_chunks // self.threads),
            "A_M16_STEP": a_m16_step, "A_COPIES": -(-m_tiles // a_m16_step),
            "E_CHUNKS": e_bytes // 16, "COLUMN_CHUNKS": column_bytes // 16,
            "TILE_PITCH_ROWS": self.block_rows + 8, "TILE_PITCH_TOKENS": self.block_tokens + 8,
        }

    def shared_bytes(self, m: int, v: int) -> int:
        """Dynamic shared memory: the pipeline, or the epilogue's partial sums / output tile."""
        sizes = self.geometry(m, v)
        partials = (self.warps_k - 1) * self.warps_m * self.warps_n * 32 * self.warp_m_tiles * self.warp_n_tiles * 4 * 4
        output_tile = 2 * max(self.block_tokens * sizes["TILE_PITCH_ROWS"],
                              self.block_rows * sizes["TILE_PITCH_TOKENS"])
        return max(self.stages * sizes["STAGE_BYTES"], partials, output_tile)

    def check(self, v: int) -> None:
        """Raise ValueError unless this config can run a weight of row blocks of v rows."""
        if v % (16 * self.warp_m_tiles):
            raise ValueError(f"config {self.name}: a warp's {16 * self.warp_m_tiles} rows must lie inside one "
                             f"row block of v={v} rows")
        if ROW_ALIGN % self.block_rows or (GROUP_ALIGN // 8) % self.step_k32:
            raise ValueError(f"config {self.name}: its tile must divide the packing's {ROW_ALIGN} rows and "
                             f"{GROUP_ALIGN} groups")


CONFIGS = {c.name: c for c in (
    # many tokens: 8 warps of 64 rows x 64 tokens, 4 row blocks of 64 rows share each x tile
    TileConfig("rows256_tokens128", 4, 2, 1, 4, 8, 2, 3),
    TileConfig("rows256_tokens128_k8", 4, 2, 1, 4, 8, 1, 4),  # 8 groups a stage: fits M = 16
    TileConfig("rows128_tokens128", 2, 2, 1, 4, 8, 1, 4),  # 4 warps, two CTAs an SM
    TileConfig("rows128_tokens256", 2, 4, 1, 4, 8, 1, 4),  # half the weight traffic, twice the x
    TileConfig("rows256_tokens128_v128", 2, 4, 1, 8, 4, 2, 3),  # v >= 128: a B fragment serves 8 m16 tiles
    # few tokens: weights stream once; 8 warps, 2 or 4 of them along K (their partial sums added in
    # shared memory), one CTA per 32 rows, stages deep enough to keep ~25 KB of weights in flight
    TileConfig("rows64_tokens64", 2, 2, 2, 2, 4, 2, 3),
    TileConfig("rows32_tokens32", 2, 1, 4, 1, 4, 1, 4),
    TileConfig("rows32_tokens16", 2, 1, 4, 1, 2, 1, 6),
    TileConfig("rows32_tokens8", 2, 1, 4, 1, 1, 1, 6),
    # few tokens, fewer x tiles: each CTA reads all of x for its rows, so 32-row CTAs read x R/32 times
    # (at 4096 x 4096 x 16, more bytes than the weight). 64- and 128-row CTAs read it 2-4x fewer
    # times; split-K across CTAs keeps as many CTAs streaming the weight.
    TileConfig("rows64_tokens16_split2", 1, 1, 4, 4, 2, 1, 6, splits=2),
    TileConfig("rows128_tokens16_split4", 2, 1, 4, 4, 2, 1, 4, splits=4),
    TileConfig("rows128_tokens16_split2", 2, 1, 4, 4, 2, 1, 4, splits=2),
)}
# few tokens again, reading a row-major x in place (x_row_major): the same tiles, no transposing copy
CONFIGS.update({f"{name}_row_major_x": replace(CONFIGS[name], name=f"{name}_row_major_x", x_row_major=True)
                for name in ("rows32_tokens8", "rows32_tokens16", "rows128_tokens16_split2",
                             "rows128_tokens16_split4")})
# The configs worth timing (benchmarks/kernels.py tunes among them), up to FEW_TOKENS tokens and above.
FEW_TOKENS = 64
FEW_TOKEN_CONFIGS = ("rows32_tokens8", "rows32_tokens16", "rows32_tokens32", "rows64_tokens64",
                     "rows64_tokens16_split2", "rows128_tokens16_split2", "rows128_tokens16_split4",
                     "rows32_tokens8_row_major_x", "rows32_tokens16_row_major_x",
                     "rows128_tokens16_split2_row_major_x", "rows128_tokens16_split4_row_major_x")
MANY_TOKEN_CONFIGS = ("rows256_tokens128", "rows256_tokens128_k8", "rows128_tokens128", "rows128_tokens256",
                      "rows256_tokens128_v128", "rows64_tokens64")
_PREFERENCE = {  # by tokens, the configs to try first; then any other that fits
    8: ("rows32_tokens8",), 16: ("rows32_tokens16",), 32: ("rows32_tokens32", "rows32_tokens16"),
    64: ("rows64_tokens64", "rows32_tokens32"),
    None: ("rows256_tokens128_v128", "rows256_tokens128", "rows256_tokens128_k8", "rows128_tokens128",
           "rows64_tokens64", "rows32_tokens32"),
}


def default_config(tokens: int, v: int, m: int, device: torch.device | None = None,
                   shared_limit: int | None = None) -> TileConfig:
    """The config for `tokens` tokens of pattern v:2:m that fits `shared_limit` bytes of shared memory a
    block (default: `device`'s opt-in limit)."""
    if shared_limit is None:
        shared_limit = torch.cuda.get_device_properties(device).shared_memory_per_block_optin
    bucket = next((b for b in (8, 16, 32, 64) if tokens <= b), None)
    for name in (*_PREFERENCE[bucket], *CONFIGS):
        if fits(CONFIGS[name], v, m, shared_limit):
            return CONFIGS[name]
    raise ValueError(f"no sparse-MMA config fits v={v}, m={m} in {shared_limit} bytes of shared memory")


def fits(config: TileConfig, v: int, m: int, shared_limit: int) -> bool:
    """Whether `config` runs pattern v:2:m within `shared_limit` bytes of shared memory a block."""
    return v % (16 * config.warp_m_tiles) == 0 and config.shared_bytes(m, v) <= shared_limit


def candidates(tokens: int, v: int, m: int, shared_limit: int) -> list[TileConfig]:
    """The configs to time for `tokens` tokens of pattern v:2:m (few tokens: tiles of at most four times
    as many tokens)."""
    if tokens > FEW_TOKENS:
        return [CONFIGS[name] for name in MANY_TOKEN_CONFIGS if fits(CONFIGS[name], v, m, shared_limit)]
    return [CONFIGS[name] for name in FEW_TOKEN_CONFIGS if fits(CONFIGS[name], v, m, shared_limit)
            and CONFIGS[name].block_tokens <= max(8, 4 * tokens)]


# ------------------------------------------------------------------------------------------ compiling
def available(device: torch.device | str | None = None) -> bool:
    """Whether the kernel can run on `device`: an NVIDIA GPU of compute capability 8.0+ and torch's
    NVRTC helper with its library. (The helper also adds the CUDA toolkit's include directory to
    every compile, so it needs CUDA_HOME or a toolkit where torch looks for one, although this
    kernel includes no header.)"""
    if not torch.cuda.is_available() or torch.version.hip or not hasattr(torch.cuda, "_compile_kernel"):
        return False
    device = torch.device("cuda") if device is None else torch.device(device)
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 0):
        return False
    try:
        from torch.utils.cpp_extension import include_paths

        torch.cuda._utils._get_gpu_rtc_library()
        include_paths("cuda")
    except OSError:
        return False
    return True


def kernel_source(config: TileConfig, m: int, v: int, dtype: torch.dtype, ordered_metadata: bool = False) -> str:
    """The CUDA source of one kernel: its constants, the index formulas, sparse_mma.cu.
    ordered_metadata: spell mma.sp as mma.sp::ordered_metadata (PTX 8.5), which ptxas advises for
    later architectures (the same bits here: every index pair is ascending); used from sm_100 on."""
    constants = {**config.geometry(m, v), "IS_BF16": int(dtype == torch.bfloat16)}
    opcode = "mma.sp::ordered_metadata.sync.aligned" if ordered_metadata else "mma.sp.sync.aligned"
    return ("".join(f"constexpr int {name} = {value};\n" for name, value in constants.items())
            + f'#define MMA_SP "{opcode}"\n' + _cuda_formulas() + KERNEL_SOURCE.read_text())


TRANSPOSE_SOURCE = r"""
// x [tokens, channels] (any strides) -> xt [channels, ld] contiguous, zeros in tokens [tokens, ld).
extern "C" __global__ void __launch_bounds__(256) vnm_transpose(
    const unsigned short* __restrict__ x, int tokens, int channels, int stride_t, int stride_c,
    unsigned short* __restrict__ xt, int ld) {
  __shared__ unsigned short tile[32][34];
  const int first_token = blockIdx.x * 32, first_channel = blockIdx.y * 32;
  const int lane = threadIdx.x & 31, row = threadIdx.x >> 5;
  for (int i = row; i < 32; i += 8) {  // read along channels
    const int t = first_token + i, c = first_channel + lane;
    tile[i][lane] = t < tokens && c < channels ? x[(long long)t * stride_t + (long long)c * stride_c] : 0;
  }
  __syncthreads();
  for (int i = row; i < 32; i += 8) {  // write along tokens
    const int c = first_channel + i, t = first_token + lane;
    if (c < channels && t < ld) xt[(long long)c * ld + t] = tile[lane][i];
  }
}
"""

_KERNELS: dict[tuple, object] = {}


def _compiled(name: str, source: str, device: torch.device, shared_bytes: int = 0):
    """Kernel `name` of `source`, compiled by NVRTC for `device` and loaded there."""
    with torch.cuda.device(device):
        kernel = torch.cuda._compile_kernel(source, name)
        if shared_bytes:  # above 48 KB the kernel must opt in
            kernel.set_shared_memory_config(shared_bytes)
    return kernel


def _transpose_kernel(device: torch.device):
    key = ("transpose", device.index)
    if key not in _KERNELS:
        _KERNELS[key] = _compiled("vnm_transpose", TRANSPOSE_SOURCE, device)
    return _KERNELS[key]


def compiled_kernel(config: TileConfig, m: int, v: int, dtype: torch.dtype, device: torch.device,
                    name: str = "vnm_sparse_mma"):
    """Kernel `name` of one (config, pattern, dtype) on `device`: vnm_sparse_mma, or the split-K sum
    vnm_split_sum. Compiled on first use, then kept. NVRTC releases the GIL, so threads can compile
    several at once ahead of use."""
    if device.index is None:
        device = torch.device(device.type, torch.cuda.current_device())
    key = (config, m, v, dtype, device.index, name)
    if key not in _KERNELS:
        ordered = torch.cuda.get_device_capability(device) >= (10, 0)
        _KERNELS[key] = _compiled(name, kernel_source(config, m, v, dtype, ordered), device,
                                  config.shared_bytes(m, v) if name == "vnm_sparse_mma" else 0)
    return _KERNELS[key]


def channel_major_input(x: torch.Tensor) -> torch.Tensor:
    """x [T, C] as the kernel reads it: x.T [C, ld] with ld % 8 == 0 and 16-byte rows. A view when x
    is already laid out so (written channel-major by its producer), else one transposing copy."""
    tokens, channels = x.shape
    if x.stride(0) == 1 and x.stride(1) % 8 == 0 and x.stride(1) >= tokens and x.data_ptr() % 16 == 0:
        return x.t()
    ld = -(-tokens // 8) * 8
    xt = torch.empty(channels, ld, dtype=x.dtype, device=x.device)
    _transpose_kernel(x.device)(grid=(-(-ld // 32), -(-channels // 32), 1), block=(256, 1, 1),
           args=[x, tokens, channels, x.stride(0), x.stride(1), xt, ld])
    return xt


def row_major_input(x: torch.Tensor) -> torch.Tensor:
    """x [T, C] as an x_row_major config reads it: rows of a multiple of 8 channels, 16-byte aligned,
    channels contiguous. x itself where it is laid out so, else one copy (zero channels added)."""
    tokens, channels = x.shape
    if channels % 8 == 0 and x.stride(1) == 1 and x.stride(0) % 8 == 0 and x.data_ptr() % 16 == 0:
        return x
    padded = x.new_empty(tokens, -(-channels // 8) * 8)
    padded[:, channels:].zero_()
    padded[:, :channels].copy_(x)
    return padded


def launch_grid(config: TileConfig, layout: SparseMMALayout, tokens: int) -> tuple[int, int, int]:
    """CTAs along the packed rows, the tokens and the splits."""
    return layout.values.shape[0] * 16 // config.block_rows, -(-tokens // config.block_tokens), config.splits


def sparse_mma_linear(
    x: torch.Tensor,
    layout: SparseMMALayout,
    bias: torch.Tensor | None = None,
    config: TileConfig | str | None = None,
    channel_major_out: bool = False,
) -> torch.Tensor:
    """y = x @ W.T + bias, x [T, C] (any layout; read in place where it lies as the config reads it:
    channel-major, or row-major for x_row_major configs), y [T, R]
    row-major, or channel-major (a view of a contiguous [R, T]) with channel_major_out. config: a
    TileConfig, a name in CONFIGS, or None for `default_config`."""
    if not isinstance(layout, SparseMMALayout):
        raise TypeError(f"layout must be a SparseMMALayout (pack(weight)), got {type(layout).__name__}")
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[1] != layout.in_features:
        raise ValueError(f"x must be [tokens, {layout.in_features}], got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if x.dtype != layout.dtype or x.device != layout.device or x.device.type != "cuda":
        raise ValueError(f"x must be a CUDA {layout.dtype} tensor on {layout.device}, got {x.dtype} on {x.device}")
    if bias is not None and (bias.shape != (layout.out_features,) or bias.dtype != x.dtype or bias.device != x.device):
        raise ValueError(f"bias must be a [{layout.out_features}] {x.dtype} tensor on {x.device}")
    tokens, rows = x.shape[0], layout.out_features
    y = (torch.empty(rows, tokens, dtype=x.dtype, device=x.device).t() if channel_major_out
         else torch.empty(tokens, rows, dtype=x.dtype, device=x.device))
    if tokens == 0:
        return y
    if config is None:
        config = default_config(tokens, layout.v, layout.m, layout.device)
    elif isinstance(config, str):
        if config not in CONFIGS:
            raise ValueError(f"config must be one of {sorted(CONFIGS)}, got {config!r}")
        config = CONFIGS[config]
    config.check(layout.v)
    kernel = compiled_kernel(config, layout.m, layout.v, x.dtype, x.device)
    if config.x_row_major:  # x [T, C] read by its rows: pointer, row stride, channels (zeros past C)
        x_read = row_major_input(x)
        x_arguments = [x_read, x_read.stride(0), x_read.shape[1]]
    else:  # x.T [C, T] read by its rows
        x_read = channel_major_input(x)
        x_arguments = [x_read, x_read.stride(0), layout.in_features]
    grid = launch_grid(config, layout, tokens)
    # split-K: every split stores its partial sums (each element written), then vnm_split_sum adds them
    out = y if config.splits == 1 else torch.empty(config.splits, tokens, rows, dtype=torch.float32, device=x.device)
    kernel(grid=grid, block=(config.threads, 1, 1), shared_mem=config.shared_bytes(layout.m, layout.v),
           args=[*x_arguments, tokens, layout.values, layout.metadata, layout.columns,
                 layout.k32_units, bias if bias is not None else y, int(bias is not None), out, rows,
                 y.stride(0), y.stride(1)])
    if config.splits > 1:
        count = tokens * rows
        split_sum = compiled_kernel(config, layout.m, layout.v, x.dtype, x.device, "vnm_split_sum")
        split_sum(grid=(min(-(-count // 256), 4096), 1, 1), block=(256, 1, 1),
                  args=[out, tokens, rows, bias if bias is not None else y, int(bias is not None), y,
                        y.stride(0), y.stride(1)])
    return y
