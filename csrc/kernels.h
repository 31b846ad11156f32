// Host-side entry points of the CUDA kernels, one per op.
//
// Plain C++ declarations only (no CUDA device code, no pybind11, no torch) so that module.cpp can be
// compiled by the host compiler and each .cu file by nvcc, with this header as the only contract
// between them. Every launcher reports failure through its cudaError_t return value: exceptions are
// raised on the pybind11 side only.
#pragma once

#include <cstdint>
#include <cuda_runtime_api.h>

namespace vtprune {

// out[b, u] = max_{j < K, 0 <= indices[b, j] < len_b} sim(u, indices[b, j]) for u < len_b, and 0 for
// len_b <= u < N, where len_b = clamp(lengths[b], 0, N) and
// sim(u, v) = <x_u, x_v> / (max(|x_u|, 1e-6) * max(|x_v|, 1e-6)) in fp32 (SPEC §1).
// A token with no valid selected index (K == 0, or all skipped) gets -inf, the max of an empty set;
// NaN similarities are skipped the same way.
//
// tokens: [B, N, D] with element strides (stride_b, stride_n, 1), dtype code 0/1/2 = fp32/fp16/bf16.
// indices: int64 [B, K] contiguous. lengths: int64 [B] contiguous. out: float32 [B, N] contiguous.
// All pointers are device pointers on the same device; `stream` belongs to that device.
cudaError_t launch_coverage_max_sim(const void* tokens, int dtype, int64_t B, int64_t N, int64_t D,
                                    int64_t stride_b, int64_t stride_n, const int64_t* indices,
                                    int64_t K, const int64_t* lengths, float* out,
                                    cudaStream_t stream);

}  // namespace vtprune
