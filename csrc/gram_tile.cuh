// One 64 x 64 tile of a Gram matrix x_i . x_j, accumulated in fp32 over chunks of the feature dim,
// shared by the kernels that need pairwise token similarities (csrc/holov.cu's crop statistics and
// csrc/similarity.cu's SCOPE similarity).
//
// The pieces, all for blocks of kGramThreads = 256 threads:
// * ChunkStage: a 64 x kK chunk of token rows (any row stride, feature stride 1) fetched into
//   registers, so the next chunk's loads are in flight while the current one is multiplied, then
//   stored to shared memory. Rows and features out of range are stored as zeros, so partial tiles
//   need no masking in the product and add exact zeros to the norms.
// * chunk_sumsq / quad_sum: the squared norms of the chunk's rows, four threads per row, summed
//   from the same shared-memory chunk as the product (the tokens are read once).
// * TileAccumulator<T>::type: the tile itself. 16-bit inputs use tensor cores (WMMA 16x16x16,
//   products exact in fp32, fp32 accumulation) from sm_80 on; fp32 inputs (and 16-bit inputs below
//   sm_80, where bf16 WMMA does not exist) use plain fp32 FMAs, never TF32.
// * gram_begin / gram_chunk: the above put together, one tile's first loads and one chunk step
//   (double buffering, barriers, norms), so every kernel runs the same steps; what the tile and the
//   norms become is the kernel's.
//
// Device code only: include it from .cu files.
#pragma once

#include <mma.h>

#include <cstdint>

#include "common.cuh"

namespace vtprune {
namespace gram {

constexpr int kGramThreads = 256;
constexpr int kTile = 64;         // rows and columns of one Gram tile
constexpr int kCsLd = kTile + 4;  // fp32 tile row pitch: a multiple of 4 for WMMA stores

// Feature chunk per step and shared-memory row pitch (elements). 16-bit: the pitch is a multiple of
// 8 elements and every fragment start 32-byte aligned, as WMMA requires. fp32: the odd pitch makes
// the column reads of the FMA loop conflict-free.
template <typename T>
struct GramCfg {
  static constexpr int kK = 64;
  static constexpr int kLd = 72;
  static constexpr int kVec = 8;  // elements per 16-byte load
};
template <>
struct GramCfg<float> {
  static constexpr int kK = 32;
  static constexpr int kLd = 33;
  static constexpr int kVec = 4;
};

template <typename T>
__device__ __forceinline__ T zero_of() {
  return T(0.0f);
}

// One 64 x kK chunk of token rows, fetched from global memory into registers (so the next chunk's
// loads are in flight while the current one is multiplied) and then stored to shared memory.
// Rows at or past `rows` and features at or past D are zero, so partial tiles need no masking in
// the matrix product. kVec: 16-byte loads, chosen on the host when D, the strides and the base
// pointer allow them.
template <typename T, bool kVec>
struct ChunkStage {
  using Cfg = GramCfg<T>;
  static constexpr int kElems = kTile * Cfg::kK / kGramThreads;  // 16 (16-bit) or 8 (fp32)
  static constexpr int kVecs = kElems / Cfg::kVec;               // 2

  T elem[kVec ? 1 : kElems];
  uint4 vec[kVec ? kVecs : 1];

  // Where this thread's s-th vector (kVec) or element (otherwise) sits in the chunk: fetch and
  // store must agree on it, so both take it from here.
  struct Slot {
    int r;   // row
    int kk;  // first feature, relative to the chunk start
  };
  __device__ static __forceinline__ Slot slot(int s) {
    if constexpr (kVec) {
      constexpr int kVecsPerRow = Cfg::kK / Cfg::kVec;
      const int v = threadIdx.x + s * kGramThreads;
      return {v / kVecsPerRow, (v % kVecsPerRow) * Cfg::kVec};
    } else {
      const int e = threadIdx.x + s * kGramThreads;
      return {e / Cfg::kK, e % Cfg::kK};
    }
  }

  __device__ __forceinline__ void fetch(const T* __restrict__ rows_base, int rows, int64_t stride_n,
                                        int64_t d0, int64_t D) {
    if constexpr (kVec) {
#pragma unroll
      for (int s = 0; s < kVecs; ++s) {
        const Slot p = slot(s);
        const int64_t d = d0 + p.kk;
        // D is a multiple of kVec here, so a vector is either wholly inside [0, D) or wholly out.
        vec[s] = (p.r < rows && d < D)
                     ? *reinterpret_cast<const uint4*>(rows_base + p.r * stride_n + d)
                     : make_uint4(0u, 0u, 0u, 0u);
      }
    } else {
#pragma unroll
      for (int s = 0; s < kElems; ++s) {
        const Slot p = slot(s);
        const int64_t d = d0 + p.kk;
        elem[s] = (p.r < rows && d < D) ? rows_base[p.r * stride_n + d] : zero_of<T>();
      }
    }
  }

  __device__ __forceinline__ void store(T (*smem)[Cfg::kLd]) const {
    if constexpr (kVec) {
#pragma unroll
      for (int s = 0; s < kVecs; ++s) {
        const Slot p = slot(s);
        if constexpr (sizeof(T) == 2) {
          // 16-bit pitch 144 bytes and kk a multiple of 8: the 16-byte store is aligned.
          *reinterpret_cast<uint4*>(&smem[p.r][p.kk]) = vec[s];
        } else {
          // fp32 pitch 33 floats is not 16-byte aligned: store the four lanes one by one.
          const float* f = reinterpret_cast<const float*>(&vec[s]);
#pragma unroll
          for (int u = 0; u < 4; ++u) smem[p.r][p.kk + u] = f[u];
        }
      }
    } else {
#pragma unroll
      for (int s = 0; s < kElems; ++s) {
        const Slot p = slot(s);
        smem[p.r][p.kk] = elem[s];
      }
    }
  }
};

// Partial squared norm of row `row` of a chunk: the four threads of a row take interleaved
// features; the caller sums the four partials with quad_sum.
template <typename T>
__device__ __forceinline__ float chunk_sumsq(const T (*smem)[GramCfg<T>::kLd], int row, int quarter) {
  float ss = 0.0f;
#pragma unroll
  for (int u = 0; u < GramCfg<T>::kK / 4; ++u) {
    const float v = to_float(smem[row][quarter + 4 * u]);
    ss = fmaf(v, v, ss);
  }
  return ss;
}

// Sum over the four adjacent lanes 4r..4r+3 (the threads that share one tile row).
__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(kFullMask, v, 1);
  v += __shfl_xor_sync(kFullMask, v, 2);
  return v;
}

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#define VTPRUNE_GRAM_TENSOR_CORES 0
#else
#define VTPRUNE_GRAM_TENSOR_CORES 1
#endif

// fp32 accumulator of one 64 x 64 Gram tile with plain FMAs: thread (ty, tx) owns rows ty + 16 r and
// columns tx + 16 c. Used for fp32 inputs (exact fp32 products, no TF32) and, below sm_80, for
// 16-bit inputs too.
template <typename T>
struct FmaTile {
  using Cfg = GramCfg<T>;
  float acc[4][4];

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int r = 0; r < 4; ++r)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[r][c] = 0.0f;
  }

  __device__ __forceinline__ void accumulate(const T (*a)[Cfg::kLd], const T (*b)[Cfg::kLd], int, int) {
    const int ty = threadIdx.x / 16;
    const int tx = threadIdx.x % 16;
#pragma unroll 8
    for (int kk = 0; kk < Cfg::kK; ++kk) {
      float av[4], bv[4];
#pragma unroll
      for (int r = 0; r < 4; ++r) av[r] = to_float(a[ty + 16 * r][kk]);
#pragma unroll
      for (int c = 0; c < 4; ++c) bv[c] = to_float(b[tx + 16 * c][kk]);
#pragma unroll
      for (int r = 0; r < 4; ++r)
#pragma unroll
        for (int c = 0; c < 4; ++c) acc[r][c] = fmaf(av[r], bv[c], acc[r][c]);
    }
  }

  __device__ __forceinline__ void store(float (*cs)[kCsLd]) const {
    const int ty = threadIdx.x / 16;
    const int tx = threadIdx.x % 16;
#pragma unroll
    for (int r = 0; r < 4; ++r)
#pragma unroll
      for (int c = 0; c < 4; ++c) cs[ty + 16 * r][tx + 16 * c] = acc[r][c];
  }
};

#if VTPRUNE_GRAM_TENSOR_CORES
// Tensor-core accumulator for 16-bit inputs: warp w computes rows 16 (w / 2) .. +16 and columns
// 32 (w % 2) .. +32 as two 16x16 fp32 fragments. Fragments wholly outside the valid rows/columns
// are skipped (warp-uniform) and stay zero.
template <typename T>
struct WmmaTile {
  using Cfg = GramCfg<T>;
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> acc[2];

  __device__ __forceinline__ void zero() {
    nvcuda::wmma::fill_fragment(acc[0], 0.0f);
    nvcuda::wmma::fill_fragment(acc[1], 0.0f);
  }

  __device__ __forceinline__ void accumulate(const T (*a)[Cfg::kLd], const T (*b)[Cfg::kLd],
                                             int rows_valid, int cols_valid) {
    using namespace nvcuda;
    const int warp = threadIdx.x / kWarpSize;
    const int r0 = 16 * (warp / 2);
    const int c0 = 32 * (warp % 2);
    if (r0 >= rows_valid) return;
#pragma unroll
    for (int kk = 0; kk < Cfg::kK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
      wmma::load_matrix_sync(fa, &a[r0][kk], Cfg::kLd);
#pragma unroll
      for (int f = 0; f < 2; ++f) {
        if (c0 + 16 * f >= cols_valid) continue;
        // b holds token j's features in row j: column-major K x N, as matrix_b wants it.
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb;
        wmma::load_matrix_sync(fb, &b[c0 + 16 * f][kk], Cfg::kLd);
        wmma::mma_sync(acc[f], fa, fb, acc[f]);
      }
    }
  }

  __device__ __forceinline__ void store(float (*cs)[kCsLd]) const {
    const int warp = threadIdx.x / kWarpSize;
    const int r0 = 16 * (warp / 2);
    const int c0 = 32 * (warp % 2);
#pragma unroll
    for (int f = 0; f < 2; ++f) {
      nvcuda::wmma::store_matrix_sync(&cs[r0][c0 + 16 * f], acc[f], kCsLd, nvcuda::wmma::mem_row_major);
    }
  }
};

template <typename T>
struct TileAccumulator {
  using type = WmmaTile<T>;
};
template <>
struct TileAccumulator<float> {
  using type = FmaTile<float>;
};
#else
template <typename T>
struct TileAccumulator {
  using type = FmaTile<T>;
};
#endif

// Partial squared norms of one thread's tile row and tile column, as gram_chunk leaves them: still to
// be summed over the row's four threads with quad_sum.
struct TileSumsq {
  float row = 0.0f;
  float col = 0.0f;
};

// One 64 x 64 Gram tile, rows [row_base, + rows_valid) against columns [col_base, + cols_valid),
// both with row stride stride_n, over D features, is run by the kernel as
//
//   typename TileAccumulator<T>::type acc;
//   TileSumsq ss;
//   ChunkStage<T, kVec> stage_a, stage_b;
//   gram_begin(acc, stage_a, stage_b, row_base, rows_valid, col_base, cols_valid, same, stride_n, D);
//   for (int64_t d0 = 0; d0 < D; d0 += GramCfg<T>::kK) {
//     gram_chunk(acc, ss, stage_a, stage_b, a_s, b_s, ..., d0, D, token, quarter, row_norms);
//   }
//   acc.store(cs);
//
// The loop stays in the kernel, and the state in separate locals: with the loop inside one helper,
// or the state in one struct, nvcc schedules the tile differently (it hoists the per-thread row
// offsets out of the loop) and ptxas -v reports more spills for the 16-bit kernels of holov.cu and
// similarity.cu on sm_80 and sm_90.
// same: the columns are the rows (a diagonal tile), read once into a_s; b_s is then untouched.
// gram_chunk has __syncthreads: D, same, row_norms, rows_valid and cols_valid must be uniform over
// the block, and after the last chunk a_s/b_s are free again.

// Zeroes the tile and starts the first chunk's loads.
template <typename T, bool kVec, typename Acc>
__device__ __forceinline__ void gram_begin(Acc& acc, ChunkStage<T, kVec>& stage_a, ChunkStage<T, kVec>& stage_b,
                                           const T* row_base, int rows_valid, const T* col_base, int cols_valid,
                                           bool same, int64_t stride_n, int64_t D) {
  acc.zero();
  if (D > 0) {
    stage_a.fetch(row_base, rows_valid, stride_n, 0, D);
    if (!same) stage_b.fetch(col_base, cols_valid, stride_n, 0, D);
  }
}

// Chunk d0: stage it in shared memory, start the next chunk's loads (in flight during this chunk's
// math), then add this chunk to the tile and to the squared norms: thread 4 token + quarter sums its
// part of row token `token` (only when row_norms) and of column token `token`.
template <typename T, bool kVec, typename Acc>
__device__ __forceinline__ void gram_chunk(Acc& acc, TileSumsq& ss, ChunkStage<T, kVec>& stage_a,
                                           ChunkStage<T, kVec>& stage_b, T (*a_s)[GramCfg<T>::kLd],
                                           T (*b_s)[GramCfg<T>::kLd], const T* row_base, int rows_valid,
                                           const T* col_base, int cols_valid, bool same, int64_t stride_n,
                                           int64_t d0, int64_t D, int token, int quarter, bool row_norms) {
  using Cfg = GramCfg<T>;
  const T(*b_tile)[Cfg::kLd] = same ? a_s : b_s;
  stage_a.store(a_s);
  if (!same) stage_b.store(b_s);
  __syncthreads();
  if (d0 + Cfg::kK < D) {
    stage_a.fetch(row_base, rows_valid, stride_n, d0 + Cfg::kK, D);
    if (!same) stage_b.fetch(col_base, cols_valid, stride_n, d0 + Cfg::kK, D);
  }
  if (row_norms) ss.row += chunk_sumsq<T>(a_s, token, quarter);
  ss.col += chunk_sumsq<T>(b_tile, token, quarter);
  acc.accumulate(a_s, b_tile, rows_valid, cols_valid);
  __syncthreads();  // a_s/b_s are overwritten by the next chunk
}

}  // namespace gram
}  // namespace vtprune
