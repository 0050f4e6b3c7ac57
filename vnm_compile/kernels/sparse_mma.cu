// y = x @ W.T for a V:N:M weight W on the sparse tensor cores (mma.sp m16n8k32), one CTA per tile of
// BLOCK_ROWS weight rows x BLOCK_TOKENS tokens. Compiled at run time by NVRTC: sparse_mma.py puts the
// tile configuration (constexpr ints) and the index formulas (__device__ functions, the same formulas
// the host packing and the tests' emulation evaluate in Python) in front of this file. No headers are
// included: NVRTC on a user's machine may find none.
//
// What one mma.sp consumes. Over the condensed K (the 4 kept columns of each group of M input
// channels) a row of a V:N:M weight is 2:4 sparse, so one m16n8k32 multiplies 16 weight rows (A, the
// sparse operand: 2 stored values and a 4-bit index pair per row and group) by 8 groups = 32 kept
// channels x 8 tokens (B). Those 32 kept channels are 32 rows of a channel-major tile of x in shared
// memory, each row 8 consecutive tokens (16 bytes): ldmatrix.x4.trans with one row address a lane
// (lane l -> kept channel l of the k32 unit) gathers them straight into B's register layout. The row
// addresses depend on the row block (its kept columns), not on the rows inside it, so one x tile in
// shared memory serves every row block of the CTA: this is where x is reused across row blocks.
// X_ROW_MAJOR configs (few tokens) instead copy x as a row-major x lies, BLOCK_TOKENS token rows of
// X_ROWS channels, and each lane gathers its 8 B values with 2-byte loads (b_fragment_kept /
// b_fragment_token): 16 loads where ldmatrix takes one, but no transposing copy of x before the kernel.
//
// Pipeline. Per stage of STEP_K32 k32 units (8 * STEP_K32 groups, X_ROWS = 8 * STEP_K32 * M dense
// channels) the CTA copies with 16-byte cp.async, STAGES - 1 stages ahead:
//   x     X_ROWS channel rows x BLOCK_TOKENS tokens, rows X_ROW_PITCH bytes apart: an odd number of
//         16-byte chunks, so any 8 rows whose indices differ mod 8 fall in 8 different bank groups
//         (X_ROW_MAJOR: BLOCK_TOKENS token rows x X_ROWS channels, rows X_TOKEN_PITCH bytes apart),
//   A     the values of its rows, already in mma fragment order (16 bytes a lane per m16 x k32 tile),
//   E     the metadata words (16 a tile, lane -> metadata_word(lane)),
//   cols  the kept columns of its row blocks (32 bytes a row block and k32 unit, lane-indexed).
// Warps tile the CTA as WARPS_M x WARPS_N x WARPS_K: a warp owns WARP_M_TILES m16 tiles (inside one
// row block) x WARP_N_TILES n8 tiles and K32_PER_WARP of the stage's k32 units; warps along K add
// their partial sums through shared memory at the end. Epilogue: fp32 + bias, rounded to the output
// dtype, staged in shared memory and stored in 16-byte vectors where the output's strides allow.
//
// Split-K (SPLITS > 1): CTAs along blockIdx.z take consecutive runs of the stages, so that a weight of
// few row tiles still fills the GPU with CTAs, each streaming a share of it. Split z stores its fp32
// partial sums, without bias, in slice z of y read as float [SPLITS, tokens, rows]; vnm_split_sum (at the
// end of this file) then adds the slices and the bias.

typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned char u8;
struct __align__(16) u32x4 { u32 x, y, z, w; };

__device__ __forceinline__ u32 shared_address(const void* pointer) {
  u32 address;
  asm("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }" : "=r"(address) : "l"(pointer));
  return address;
}

// 16 bytes global -> shared; valid == false writes zeros and reads nothing.
__device__ __forceinline__ void copy_async(u32 destination, const void* source, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n"
               :: "r"(destination), "l"(source), "r"(valid ? 16 : 0) : "memory");
}
__device__ __forceinline__ void copy_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int PENDING> __device__ __forceinline__ void copy_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" :: "n"(PENDING) : "memory");
}

__device__ __forceinline__ void load_shared_16(u32 (&r)[4], u32 address) {
  asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(address));
}
__device__ __forceinline__ u32 load_shared_4(u32 address) {
  u32 r;
  asm volatile("ld.shared.u32 %0, [%1];\n" : "=r"(r) : "r"(address));
  return r;
}

// Four 8x8 b16 matrices, transposed: lanes 8i..8i+7 give the addresses of matrix i's rows; lane
// (g, t) = (lane / 4, lane % 4) receives matrix i's elements [2t][g] and [2t + 1][g] in b[i].
__device__ __forceinline__ void ldmatrix_x4_trans(u32 (&b)[4], u32 address) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(b[0]), "=r"(b[1]), "=r"(b[2]), "=r"(b[3]) : "r"(address));
}

// d += A (16 x 32, 2:4 sparse: a holds the kept values, e their indices) * B (32 x 8); sparsity
// selector 0: lanes with lane % 4 in {0, 1} supply the metadata (lanes 2 and 3 hold the same words).
__device__ __forceinline__ void mma_sp(float (&d)[4], const u32 (&a)[4], const u32 (&b)[4], u32 e) {
  if (IS_BF16) {
    asm volatile(MMA_SP ".m16n8k32.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
                 "{%8, %9, %10, %11}, {%0, %1, %2, %3}, %12, 0x0;\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]), "r"(e));
  } else {
    asm volatile(MMA_SP ".m16n8k32.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
                 "{%8, %9, %10, %11}, {%0, %1, %2, %3}, %12, 0x0;\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]), "r"(e));
  }
}

__device__ __forceinline__ float to_float(u16 bits) {
  float f;
  if (IS_BF16) {
    asm("mov.b32 %0, %1;" : "=f"(f) : "r"(((u32)bits) << 16));
  } else {
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(bits));
  }
  return f;
}

__device__ __forceinline__ u16 to_storage(float f) {  // round to nearest even, like a torch cast
  u32 pair;  // cvt ...x2 puts its first source in the upper half
  if (IS_BF16) {
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(pair) : "f"(0.0f), "f"(f));
  } else {
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(pair) : "f"(0.0f), "f"(f));
  }
  return (u16)(pair & 0xffffu);
}

extern "C" __global__ void __launch_bounds__(THREADS, 1) vnm_sparse_mma(
    const u16* __restrict__ x,             // by rows of ld_x elements, 16-byte aligned: x.T [channels, ld_x]
                                           // (ld_x % 8 == 0), or with X_ROW_MAJOR x [tokens, ld_x] (channels % 8 == 0)
    int ld_x, int channels, int tokens,
    const u8* __restrict__ a_packed,       // [R_pad / 16, k32_units, 32 lanes, 8 values]
    const u8* __restrict__ e_packed,       // [R_pad / 16, k32_units, 16 words]
    const u8* __restrict__ columns,        // [row blocks, k32_units, 32 lanes]
    int k32_units,
    const u16* __restrict__ bias, int has_bias,
    u16* __restrict__ y, int rows, int y_stride_t, int y_stride_r) {  // SPLITS > 1: float partial sums
  extern __shared__ __align__(16) u8 smem[];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int warp_k = warp % WARPS_K, warp_n = (warp / WARPS_K) % WARPS_N, warp_m = warp / (WARPS_K * WARPS_N);
  const int first_m16 = blockIdx.x * M_TILES;
  const int first_row = blockIdx.x * BLOCK_ROWS;
  const int first_block = first_row / V_ROWS;
  const int first_token = blockIdx.y * BLOCK_TOKENS;
  const int all_steps = k32_units / STEP_K32;
  const int steps_per_split = (all_steps + SPLITS - 1) / SPLITS;
  const int first_step = blockIdx.z * steps_per_split;  // this CTA's stages: first_step + [0, steps)
  const int steps = first_step + steps_per_split < all_steps ? steps_per_split
                    : (first_step < all_steps ? all_steps - first_step : 0);
  const u32 smem_base = shared_address(smem);

  // ---------------------------------------------------------------- one stage: global -> shared
  // Each thread copies fixed chunks of every stage: its addresses are set up once here, and a stage
  // only moves them along K. x: the thread's chunk (8 tokens) is fixed, its rows step by X_ROW_STEP.
  static_assert(THREADS % CHUNKS_PER_ROW == 0, "x copy layout");
  static_assert(THREADS % (STEP_K32 * 32) == 0, "A copy layout");
  static_assert(E_CHUNKS <= THREADS && COLUMN_CHUNKS <= THREADS, "one metadata and column copy a thread");
  const int x_chunk = tid % CHUNKS_PER_ROW, x_row = tid / CHUNKS_PER_ROW;
  const int x_token = first_token + 8 * x_chunk;
  const u32 x_offset = x_tile_offset(x_row, x_chunk, X_ROW_PITCH);
  const long long x_row_stride = (long long)X_ROW_STEP * ld_x;  // elements between a thread's rows
  const u16* x_source = x + (long long)x_row * ld_x + (x_token < ld_x ? x_token : 0);
  const int x_rows_valid = x_token < ld_x ? channels - x_row : 0;  // rows past it are zeros
  // A: the thread's lane-chunk `a_rest` of m16 tiles a_m16, a_m16 + A_M16_STEP, ...
  const int a_rest = tid % (STEP_K32 * 32), a_m16 = tid / (STEP_K32 * 32);
  const long long a_m16_stride = (long long)A_M16_STEP * k32_units * 512;
  const u8* a_source = a_packed + (long long)(first_m16 + a_m16) * k32_units * 512 + a_rest * 16;

  auto load_stage = [&](int step, int slot) {
    const u32 stage = smem_base + slot * STAGE_BYTES;
    const int first_channel = step * X_ROWS;
    if (X_ROW_MAJOR) {  // chunk q: 8 channels of token q / (X_ROWS / 8), zeros past the tokens and channels
#pragma unroll
      for (int i = 0; i < X_TOKEN_COPIES; ++i) {
        const int q = tid + i * THREADS;
        if (X_TOKEN_CHUNKS % THREADS == 0 || q < X_TOKEN_CHUNKS) {
          const int token = q / (X_ROWS / 8), channel = 8 * (q % (X_ROWS / 8));  // inside the tile
          const bool valid = first_token + token < tokens && first_channel + channel < channels;
          copy_async(stage + x_token_offset(token, channel, X_TOKEN_PITCH),
                     valid ? x + (long long)(first_token + token) * ld_x + first_channel + channel : x, valid);
        }
      }
    } else {
      const u16* x_step = x_source + (long long)first_channel * ld_x;
#pragma unroll
      for (int i = 0; i < X_COPIES; ++i) {
        if (X_ROWS % X_ROW_STEP == 0 || x_row + i * X_ROW_STEP < X_ROWS) {
          const bool valid = first_channel + i * X_ROW_STEP < x_rows_valid;  // else zeros (0 * padding weights)
          copy_async(stage + x_offset + i * X_ROW_STEP * X_ROW_PITCH, valid ? x_step + i * x_row_stride : x, valid);
        }
      }
    }
    const u8* a_step = a_source + step * (STEP_K32 * 512);
#pragma unroll
    for (int i = 0; i < A_COPIES; ++i) {
      if ((M_TILES * STEP_K32 * 32) % THREADS == 0 || a_m16 + i * A_M16_STEP < M_TILES) {
        copy_async(stage + A_OFFSET + (a_m16 + i * A_M16_STEP) * (STEP_K32 * 512) + a_rest * 16,
                   a_step + i * a_m16_stride, true);
      }
    }
    if (tid < E_CHUNKS) {  // metadata: 64 bytes an m16 x k32 tile
      const int q = tid, m16 = q / (STEP_K32 * 4), rest = q % (STEP_K32 * 4);
      const long long unit = (long long)(first_m16 + m16) * k32_units + step * STEP_K32;
      copy_async(stage + E_OFFSET + q * 16, e_packed + unit * 64 + rest * 16, true);
    }
    if (tid < COLUMN_CHUNKS) {  // kept columns: 32 bytes a row block and k32
      const int q = tid, block = q / (STEP_K32 * 2), rest = q % (STEP_K32 * 2);
      const long long unit = (long long)(first_block + block) * k32_units + step * STEP_K32;
      copy_async(stage + COLUMNS_OFFSET + q * 16, columns + unit * 32 + rest * 16, true);
    }
  };

  // ---------------------------------------------------------------- one stage: shared -> tensor cores
  float acc[WARP_M_TILES][WARP_N_TILES][4];
#pragma unroll
  for (int mi = 0; mi < WARP_M_TILES; ++mi)
#pragma unroll
    for (int ni = 0; ni < WARP_N_TILES; ++ni)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[mi][ni][c] = 0.0f;

  const int warp_first_m16 = warp_m * WARP_M_TILES;             // inside the CTA
  const int warp_block = warp_first_m16 * 16 / V_ROWS;          // its row block, inside the CTA
  const int warp_first_chunk = warp_n * WARP_N_TILES;           // its first n8 tile = x chunk
  auto compute_stage = [&](int slot) {
    const u32 x_stage = smem_base + slot * STAGE_BYTES;
    const u8* stage_columns = smem + slot * STAGE_BYTES + COLUMNS_OFFSET;
#pragma unroll
    for (int s = 0; s < K32_PER_WARP; ++s) {
      const int k32 = warp_k * K32_PER_WARP + s;  // inside the stage
      const u8* unit_columns = stage_columns + (warp_block * STEP_K32 + k32) * 32;  // kept column l % 4 of group l / 4
      u32 a[WARP_M_TILES][4], e[WARP_M_TILES];
#pragma unroll
      for (int mi = 0; mi < WARP_M_TILES; ++mi) {
        const int tile = (warp_first_m16 + mi) * STEP_K32 + k32;
        load_shared_16(a[mi], x_stage + A_OFFSET + tile * 512 + lane * 16);
        e[mi] = load_shared_4(x_stage + E_OFFSET + tile * 64 + metadata_word(lane) * 4);
      }
      if (X_ROW_MAJOR) {  // B value h of this lane: one kept channel of one token, a 2-byte load
        const u16* x_tile = reinterpret_cast<const u16*>(smem + slot * STAGE_BYTES);
        int b_offset[8];
#pragma unroll
        for (int h = 0; h < 8; ++h) {
          const int kept = b_fragment_kept(lane, h);
          b_offset[h] = x_token_offset(warp_first_chunk * 8 + b_fragment_token(lane),
                                       x_chunk_row(k32, kept, unit_columns[kept], M_GROUP), X_TOKEN_PITCH) / 2;
        }
#pragma unroll
        for (int ni = 0; ni < WARP_N_TILES; ++ni) {
          u32 b[4];
#pragma unroll
          for (int r = 0; r < 4; ++r)
            b[r] = (u32)x_tile[ni * 4 * X_TOKEN_PITCH + b_offset[2 * r]]
                   | ((u32)x_tile[ni * 4 * X_TOKEN_PITCH + b_offset[2 * r + 1]] << 16);
#pragma unroll
          for (int mi = 0; mi < WARP_M_TILES; ++mi) mma_sp(acc[mi][ni], a[mi], b, e[mi]);
        }
      } else {  // this lane's kept channel is a row of the x tile: ldmatrix gathers the 8 tokens of each
        const int row = x_chunk_row(k32, lane, unit_columns[lane], M_GROUP);
        const u32 row_address = x_stage + x_tile_offset(row, warp_first_chunk, X_ROW_PITCH);
#pragma unroll
        for (int ni = 0; ni < WARP_N_TILES; ++ni) {
          u32 b[4];
          ldmatrix_x4_trans(b, row_address + ni * 16);
#pragma unroll
          for (int mi = 0; mi < WARP_M_TILES; ++mi) mma_sp(acc[mi][ni], a[mi], b, e[mi]);
        }
      }
    }
  };

  // ---------------------------------------------------------------- main loop: STAGES - 1 stages ahead
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < steps) load_stage(first_step + s, s);
    copy_async_commit();  // empty groups keep the count uniform
  }
  for (int step = 0; step < steps; ++step) {
    copy_async_wait<STAGES - 2>();  // this step's stage has landed ...
    __syncthreads();                // ... for every thread, and the previous slot is free
    const int next = step + STAGES - 1;
    if (next < steps) load_stage(first_step + next, next % STAGES);
    copy_async_commit();
    compute_stage(step % STAGES);
  }
  copy_async_wait<0>();
  __syncthreads();  // shared memory is free for the epilogue

  // ---------------------------------------------------------------- epilogue
  if (WARPS_K > 1) {  // warps along K: partial sums through shared memory, warp_k == 0 keeps the total
    float* partial = reinterpret_cast<float*>(smem);
    const int warp_mn = warp / WARPS_K;
    constexpr int ACC = WARP_M_TILES * WARP_N_TILES * 4;
    if (warp_k > 0) {
#pragma unroll
      for (int mi = 0; mi < WARP_M_TILES; ++mi)
#pragma unroll
        for (int ni = 0; ni < WARP_N_TILES; ++ni)
#pragma unroll
          for (int c = 0; c < 4; ++c)
            partial[(((warp_k - 1) * WARPS_M * WARPS_N + warp_mn) * ACC + (mi * WARP_N_TILES + ni) * 4 + c) * 32 + lane] =
                acc[mi][ni][c];
    }
    __syncthreads();
    if (warp_k == 0) {
      for (int k = 1; k < WARPS_K; ++k)
#pragma unroll
        for (int mi = 0; mi < WARP_M_TILES; ++mi)
#pragma unroll
          for (int ni = 0; ni < WARP_N_TILES; ++ni)
#pragma unroll
            for (int c = 0; c < 4; ++c)
              acc[mi][ni][c] += partial[(((k - 1) * WARPS_M * WARPS_N + warp_mn) * ACC + (mi * WARP_N_TILES + ni) * 4 + c) * 32 + lane];
    }
    __syncthreads();
  }

  if (SPLITS > 1) {  // this split's partial sums, straight from the accumulators
    if (warp_k == 0) {
      float* partial = reinterpret_cast<float*>(y) + (long long)blockIdx.z * tokens * rows;
#pragma unroll
      for (int mi = 0; mi < WARP_M_TILES; ++mi)
#pragma unroll
        for (int ni = 0; ni < WARP_N_TILES; ++ni)
#pragma unroll
          for (int c = 0; c < 4; ++c) {
            const int row = first_row + (warp_first_m16 + mi) * 16 + accumulator_row(lane, c);
            const int token = first_token + (warp_first_chunk + ni) * 8 + accumulator_token(lane, c);
            if (row < rows && token < tokens) partial[(long long)token * rows + row] = acc[mi][ni][c];
          }
    }
    return;
  }

  // The output tile in shared memory, laid out like y: [token][row] when y's rows are contiguous
  // (row-major y [T, R]), else [row][token] (channel-major y); rows padded by 16 bytes.
  const bool rows_contiguous = y_stride_r == 1;
  u16* tile = reinterpret_cast<u16*>(smem);
  if (warp_k == 0) {
#pragma unroll
    for (int mi = 0; mi < WARP_M_TILES; ++mi) {
#pragma unroll
      for (int c = 0; c < 4; c += 2) {  // c and c + 1 share a row
        const int row = (warp_first_m16 + mi) * 16 + accumulator_row(lane, c);
        const float row_bias = has_bias && first_row + row < rows ? to_float(bias[first_row + row]) : 0.0f;
#pragma unroll
        for (int ni = 0; ni < WARP_N_TILES; ++ni)
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const int token = (warp_first_chunk + ni) * 8 + accumulator_token(lane, c + h);
            const u16 value = to_storage(acc[mi][ni][c + h] + row_bias);
            if (rows_contiguous) tile[token * TILE_PITCH_ROWS + row] = value;
            else tile[row * TILE_PITCH_TOKENS + token] = value;
          }
      }
    }
  }
  __syncthreads();

  // 8 outputs a thread and pass, along y's contiguous dimension; 16-byte stores where aligned.
  const int inner = rows_contiguous ? BLOCK_ROWS : BLOCK_TOKENS;    // along y's contiguous dim
  const int inner_limit = rows_contiguous ? rows - first_row : tokens - first_token;
  const int outer_limit = rows_contiguous ? tokens - first_token : rows - first_row;
  const int outer_stride = rows_contiguous ? y_stride_t : y_stride_r;
  const int pitch = rows_contiguous ? TILE_PITCH_ROWS : TILE_PITCH_TOKENS;
  const bool vector_ok = outer_stride % 8 == 0;
  u16* y_tile = y + (long long)first_token * y_stride_t + (long long)first_row * y_stride_r;
  for (int q = tid; q < BLOCK_ROWS * BLOCK_TOKENS / 8; q += THREADS) {
    const int outer = q / (inner / 8), inner_first = (q % (inner / 8)) * 8;
    if (outer >= outer_limit || inner_first >= inner_limit) continue;
    const u16* source = tile + outer * pitch + inner_first;
    u16* destination = y_tile + (long long)outer * outer_stride + inner_first;
    if (vector_ok && inner_first + 8 <= inner_limit) {
      *reinterpret_cast<u32x4*>(destination) = *reinterpret_cast<const u32x4*>(source);
    } else {
      for (int j = 0; j < 8 && inner_first + j < inner_limit; ++j) destination[j] = source[j];
    }
  }
}

// Split-K's sum: y = the SPLITS slices of partial [SPLITS, tokens, rows] added in order, plus the bias,
// rounded once to the output dtype; y by its strides (row- or channel-major).
extern "C" __global__ void __launch_bounds__(256) vnm_split_sum(
    const float* __restrict__ partial, int tokens, int rows, const u16* __restrict__ bias, int has_bias,
    u16* __restrict__ y, int y_stride_t, int y_stride_r) {
  const long long count = (long long)tokens * rows;
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < count;
       i += (long long)gridDim.x * blockDim.x) {
    const int token = (int)(i / rows), row = (int)(i % rows);
    float sum = 0.0f;
#pragma unroll
    for (int z = 0; z < SPLITS; ++z) sum += partial[z * count + i];
    if (has_bias) sum += to_float(bias[row]);
    y[(long long)token * y_stride_t + (long long)row * y_stride_r] = to_storage(sum);
  }
}
