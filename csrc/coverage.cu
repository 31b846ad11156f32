// Max-similarity-to-a-selected-set kernel: the inner quantity of SCOPE's coverage objective
// (facility_location / theta_coverage in SPEC §1).
//
// Layout: one warp per token u, 8 warps per block. The warp streams x_u and each selected x_s
// through the lanes, so every D (up to 4096+) works without shared-memory staging and the
// reduction is a single butterfly. |x_s|^2 is accumulated in the same pass as <x_u, x_s>: it costs
// one extra FMA per element, while precomputing it would need a workspace this torch-free module
// cannot allocate. Blocks of the same image read the same x_s rows, which L1/L2 serve.

#include <algorithm>
#include <cmath>

#include "common.cuh"
#include "kernels.h"

namespace vtprune {
namespace {

constexpr int kTokensPerBlock = 8;  // = warps per block
constexpr int kThreadsPerBlock = kTokensPerBlock * kWarpSize;
constexpr float kNormEps = 1e-6f;   // SPEC §1 eps: a zero token has similarity 0 with everything
constexpr int64_t kMaxGridX = 2147483647;
constexpr int64_t kMaxGridY = 65535;

template <typename T>
__global__ void __launch_bounds__(kThreadsPerBlock)
coverage_max_sim_kernel(const T* __restrict__ tokens, int64_t B, int64_t N, int64_t D,
                        int64_t stride_b, int64_t stride_n, const int64_t* __restrict__ indices,
                        int64_t K, const int64_t* __restrict__ lengths, float* __restrict__ out) {
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int64_t num_tiles = (N + kTokensPerBlock - 1) / kTokensPerBlock;

  // Grid-stride loops on both axes: gridDim.y is capped at 65535, and B can exceed any grid limit.
  for (int64_t b = blockIdx.x; b < B; b += gridDim.x) {
    // Clamped so a bad length can never push reads past the N rows that exist.
    const int64_t len = min(max(lengths[b], int64_t{0}), N);
    const T* xb = tokens + b * stride_b;
    const int64_t* idx_b = indices + b * K;

    for (int64_t tile = blockIdx.y; tile < num_tiles; tile += gridDim.y) {
      // u is the same for the whole warp, so every branch below is warp-uniform and the full-mask
      // shuffles in warp_sum are always executed by all 32 lanes.
      const int64_t u = tile * kTokensPerBlock + warp;
      if (u >= N) continue;

      float result = 0.0f;  // padded positions (u >= len) report 0
      if (u < len) {
        const T* xu = xb + u * stride_n;
        float ssu = 0.0f;
        for (int64_t d = lane; d < D; d += kWarpSize) {
          const float v = to_float(xu[d]);
          ssu = fmaf(v, v, ssu);
        }
        const float norm_u = fmaxf(sqrtf(warp_sum(ssu)), kNormEps);

        float best = -INFINITY;
        for (int64_t j = 0; j < K; ++j) {
          const int64_t s = idx_b[j];
          // Indices are validated in Python, but the kernel must stay in bounds regardless.
          if (s < 0 || s >= len) continue;
          const T* xs = xb + s * stride_n;
          float dot = 0.0f;
          float sss = 0.0f;
#pragma unroll 4
          for (int64_t d = lane; d < D; d += kWarpSize) {
            const float a = to_float(xu[d]);
            const float c = to_float(xs[d]);
            dot = fmaf(a, c, dot);
            sss = fmaf(c, c, sss);
          }
          dot = warp_sum(dot);
          sss = warp_sum(sss);
          const float sim = dot / (norm_u * fmaxf(sqrtf(sss), kNormEps));
          // A NaN similarity (NaN/Inf input) makes the result NaN, as torch's max does in the
          // reference: a metric of bad input must not look like a plausible number. Once best is
          // NaN, `sim > best` is false for every later sim, so it stays NaN.
          if (sim > best || sim != sim) best = sim;
        }
        result = best;
      }
      if (lane == 0) out[b * N + u] = result;
    }
  }
}

}  // namespace

cudaError_t launch_coverage_max_sim(const void* tokens, int dtype, int64_t B, int64_t N, int64_t D,
                                    int64_t stride_b, int64_t stride_n, const int64_t* indices,
                                    int64_t K, const int64_t* lengths, float* out,
                                    cudaStream_t stream) {
  if (!is_valid_dtype(dtype) || B < 0 || N < 0 || D < 0 || K < 0 || stride_b < 0 || stride_n < 0) {
    return cudaErrorInvalidValue;
  }
  if (B == 0 || N == 0) return cudaSuccess;  // nothing to write; a 0-sized grid is a launch error
  if (out == nullptr || lengths == nullptr || (K > 0 && indices == nullptr) ||
      (D > 0 && tokens == nullptr)) {
    return cudaErrorInvalidValue;
  }

  DeviceGuard guard;
  VTPRUNE_CUDA_TRY(guard.set_from_pointer(out));

  const int64_t num_tiles = (N + kTokensPerBlock - 1) / kTokensPerBlock;
  const dim3 grid(static_cast<unsigned>(std::min(B, kMaxGridX)),
                  static_cast<unsigned>(std::min(num_tiles, kMaxGridY)));
  const dim3 block(kThreadsPerBlock);

  // Drop a stale, non-sticky error left by an earlier call so it is not reported as ours.
  (void)cudaGetLastError();
  return dispatch_dtype(dtype, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    coverage_max_sim_kernel<T><<<grid, block, 0, stream>>>(
        static_cast<const T*>(tokens), B, N, D, stride_b, stride_n, indices, K, lengths, out);
    return cudaGetLastError();
  });
}

}  // namespace vtprune
