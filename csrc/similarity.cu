// SCOPE's cosine similarity S [B, N, N] (SPEC §1) from 16-bit tokens in one launch:
//
//   S[b, i, j] = <x_i, x_j> / (max(|x_i|, 1e-6) * max(|x_j|, 1e-6))
//
// The torch path (vtprune.similarity.scope_similarity) needs an fp32 copy of the tokens, their
// norms, a division and an fp32 bmm, plus a loop of row chunks for fp16 storage. Here one block of
// kGramThreads threads owns one 64 x 64 tile (image b, row tile it, column tile jt) and runs the
// Gram tile of gram_tile.cuh over the feature dim: 16-bit products on tensor cores with fp32
// accumulation (plain fp32 FMAs below sm_80), and the squared norms of the tile's row and column
// tokens summed from the same shared-memory chunks, so the norms cost no extra pass over the tokens
// and no second launch. The epilogue divides by the clamped norms and writes fp32, or fp16 rounded
// once from fp32 (the storage of images above SCOPE_FP32_MAX_N tokens).
//
// Against the torch path the products are summed in another order and the division comes after the
// sum instead of before it, so entries differ by a few fp32 ulps, the precision of the reference
// itself (tests/test_cuda_similarity.py bounds the error against float64 by twice the torch path's).
// fp32 tokens are not handled here: they keep the torch path, whose S is bitwise the reference's.
//
// Token and column norms are computed by the same function on the same values whichever tile a
// token meets, so a token's norm is one number everywhere. Rows may be strided (stride_b, stride_n;
// the feature stride must be 1). Offsets are int64 throughout (B N^2 exceeds 2^31 at N = 46341 for
// one image). Nothing is allocated, so a launch can be captured in a CUDA graph.

#include <cstdint>

#include "common.cuh"
#include "gram_tile.cuh"
#include "kernels.h"

namespace vtprune {
namespace {

using namespace gram;

constexpr float kScopeEps = 1e-6f;    // SPEC §1's norm floor (vtprune.similarity.SCOPE_EPS)
constexpr int64_t kMaxGrid = 1 << 30;  // blocks beyond it stride over the remaining tiles

__device__ __forceinline__ void store_sim(float* dst, float v) { *dst = v; }
__device__ __forceinline__ void store_sim(__half* dst, float v) { *dst = __float2half_rn(v); }

// max(sqrt(ss), eps) as torch's clamp_min: a NaN norm stays NaN (fmaxf would drop it).
__device__ __forceinline__ float clamped_norm(float ss) {
  const float n = sqrtf(ss);
  return n < kScopeEps ? kScopeEps : n;
}

template <typename T, typename OutT, bool kVec>
__global__ void __launch_bounds__(kGramThreads, 2)
scope_similarity_kernel(const T* __restrict__ tokens, int64_t B, int64_t N, int64_t D, int64_t stride_b,
                        int64_t stride_n, OutT* __restrict__ out) {
  using Cfg = GramCfg<T>;
  __shared__ __align__(128) T a_s[kTile][Cfg::kLd];
  __shared__ __align__(128) T b_s[kTile][Cfg::kLd];
  __shared__ __align__(128) float c_s[kTile][kCsLd];
  __shared__ float row_norm[kTile];
  __shared__ float col_norm[kTile];

  // Norm layout of gram_tile.cuh: four adjacent threads per token.
  const int token = threadIdx.x / 4;
  const int quarter = threadIdx.x % 4;
  const int64_t tiles = (N + kTile - 1) / kTile;
  const int64_t per_image = tiles * tiles;
  const int64_t items = B * per_image;

  // Every bound and branch below depends on the item only, so it is uniform over the block and
  // every thread reaches every __syncthreads.
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    const int64_t b = item / per_image;
    const int64_t it = (item % per_image) / tiles;
    const int64_t jt = item % tiles;
    const int64_t row0 = it * kTile;
    const int64_t col0 = jt * kTile;
    const int rows_valid = static_cast<int>(N - row0 < kTile ? N - row0 : kTile);
    const int cols_valid = static_cast<int>(N - col0 < kTile ? N - col0 : kTile);
    const T* image = tokens + b * stride_b;
    const T* row_base = image + row0 * stride_n;
    const T* col_base = image + col0 * stride_n;
    // On a diagonal tile the column tokens are the row tokens: read them once.
    const bool same = it == jt;

    typename TileAccumulator<T>::type acc;
    TileSumsq ss;
    ChunkStage<T, kVec> stage_a, stage_b;
    gram_begin(acc, stage_a, stage_b, row_base, rows_valid, col_base, cols_valid, same, stride_n, D);
    for (int64_t d0 = 0; d0 < D; d0 += Cfg::kK) {
      gram_chunk(acc, ss, stage_a, stage_b, a_s, b_s, row_base, rows_valid, col_base, cols_valid, same, stride_n,
                 d0, D, token, quarter, /*row_norms=*/true);
    }
    acc.store(c_s);
    const float row_ss = quad_sum(ss.row);
    const float col_ss = quad_sum(ss.col);
    if (quarter == 0) {
      row_norm[token] = clamped_norm(row_ss);
      col_norm[token] = clamped_norm(col_ss);
    }
    __syncthreads();

    // Epilogue: thread t takes column t % 64 of every fourth row, so each warp reads a c_s row
    // without bank conflicts and writes 32 consecutive entries of an S row.
    const int jl = threadIdx.x % kTile;
    if (jl < cols_valid) {
      const float cn = col_norm[jl];
      OutT* dst = out + (b * N + row0) * N + col0 + jl;
      for (int il = threadIdx.x / kTile; il < rows_valid; il += kGramThreads / kTile) {
        store_sim(dst + il * N, c_s[il][jl] / row_norm[il] / cn);
      }
    }
    __syncthreads();  // c_s and the norms are rewritten by the next item
  }
}

template <typename T, typename OutT>
cudaError_t launch_typed(const void* tokens, int64_t B, int64_t N, int64_t D, int64_t stride_b,
                         int64_t stride_n, void* out, cudaStream_t stream) {
  const int64_t tiles = (N + kTile - 1) / kTile;
  const int64_t items = B * tiles * tiles;
  const dim3 grid(static_cast<unsigned>(items < kMaxGrid ? items : kMaxGrid));
  const T* x = static_cast<const T*>(tokens);
  OutT* s = static_cast<OutT*>(out);
  // 16-byte loads when every row start is 16-byte aligned and D is whole vectors.
  constexpr int vec = GramCfg<T>::kVec;
  const bool aligned = D % vec == 0 && stride_n % vec == 0 && stride_b % vec == 0 &&
                       reinterpret_cast<std::uintptr_t>(tokens) % 16 == 0;
  if (aligned) {
    scope_similarity_kernel<T, OutT, true><<<grid, kGramThreads, 0, stream>>>(x, B, N, D, stride_b, stride_n, s);
  } else {
    scope_similarity_kernel<T, OutT, false><<<grid, kGramThreads, 0, stream>>>(x, B, N, D, stride_b, stride_n, s);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_for_output(int out_dtype, const void* tokens, int64_t B, int64_t N, int64_t D,
                              int64_t stride_b, int64_t stride_n, void* out, cudaStream_t stream) {
  if (out_dtype == static_cast<int>(DType::Float32)) {
    return launch_typed<T, float>(tokens, B, N, D, stride_b, stride_n, out, stream);
  }
  return launch_typed<T, __half>(tokens, B, N, D, stride_b, stride_n, out, stream);
}

}  // namespace

cudaError_t launch_scope_similarity(const void* tokens, int dtype, int64_t B, int64_t N, int64_t D,
                                    int64_t stride_b, int64_t stride_n, void* out, int out_dtype,
                                    cudaStream_t stream) {
  const bool token_ok = dtype == static_cast<int>(DType::Float16) || dtype == static_cast<int>(DType::BFloat16);
  const bool out_ok = out_dtype == static_cast<int>(DType::Float32) || out_dtype == static_cast<int>(DType::Float16);
  if (!token_ok || !out_ok || B < 0 || N < 0 || N > kScopeMaxN || D < 0 || stride_b < 0 || stride_n < 0 ||
      (N > 0 && B > INT64_MAX / N / N)) {
    return cudaErrorInvalidValue;
  }
  if (B == 0 || N == 0) return cudaSuccess;
  if (out == nullptr || (D > 0 && tokens == nullptr)) return cudaErrorInvalidValue;

  DeviceGuard guard;
  VTPRUNE_CUDA_TRY(guard.set_from_pointer(out));
  (void)cudaGetLastError();  // a stale, non-sticky error of an earlier call is not this launch's
  if (dtype == static_cast<int>(DType::Float16)) {
    return launch_for_output<__half>(out_dtype, tokens, B, N, D, stride_b, stride_n, out, stream);
  }
  return launch_for_output<__nv_bfloat16>(out_dtype, tokens, B, N, D, stride_b, stride_n, out, stream);
}

}  // namespace vtprune
