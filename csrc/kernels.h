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

// ---- SCOPE greedy selection (csrc/scope.cu)

// The weights w(v) of SPEC §1 as the greedy kernels read them: w = max(s, 0) of `data` (NaN kept),
// row b at element b * stride_b, dtype code 0/1/2 (fp32/fp16/bf16) — the saliency itself for
// alpha = 1, so the caller launches nothing for it; or 1 for every token when `unit` (alpha = 0,
// 0 ** 0 = 1; data unused). Any other alpha: the caller passes max(s, 0) ** alpha in fp32.
struct ScopeWeights {
  const void* data;
  int dtype;
  int64_t stride_b;
  bool unit;
};

// Largest N the SCOPE launcher accepts: keeps every in-image index far from int32 overflow (S
// itself would need 512 TiB in fp16 at this size).
constexpr int64_t kScopeMaxN = int64_t{1} << 24;

// Bytes of the global workspace launch_scope_greedy needs: gain and coverage (fp32), open-term
// counts (int32) and selected flags (uint8) per token, 13 * B * N (0 when B or N is 0).
// Host-only, touches no device.
int64_t scope_workspace_bytes(int64_t B, int64_t N);

// SCOPE greedy picks (SPEC §1) in pick order (or ascending, with `sorted`): out[b, i] for i < k_b,
// where len_b = clamp(lengths[b], 1, N) and k_b = clamp(k_per_image[b], 0, min(len_b, k_max));
// out[b, i] for i >= k_b is left untouched. One CTA per image runs every step.
//
// sim: [B, N, N] contiguous similarity, dtype code 0 (float32) or 1 (float16); only rows and
// columns < len_b are read. weights: w(v) (ScopeWeights; columns < len_b of each row). lengths,
// k_per_image: int64 [B]. mul: combine "mul" (true) or "add". workspace: device memory of at least
// scope_workspace_bytes(B, N) bytes, contents ignored (scratch for the per-image state when it
// does not fit in shared memory). out: int64 [B, k_max]. All pointers are device pointers on one
// device; `stream` belongs to that device. Allocates nothing, so it can be captured in a graph.
// force_global_state and max_list (> 0: cap the changed-row list, rounded down to whole chunks of
// 1024 rows) exist for tests; they change where the state lives and how often the list is
// applied, not the contract.
cudaError_t launch_scope_greedy(const void* sim, int sim_dtype, const ScopeWeights& weights,
                                const int64_t* lengths, const int64_t* k_per_image, int64_t B,
                                int64_t N, int64_t k_max, bool mul, void* workspace,
                                int64_t workspace_bytes, int64_t* out, cudaStream_t stream,
                                bool force_global_state, int64_t max_list, bool sorted);

// ---- SCOPE similarity (csrc/similarity.cu)

// SCOPE's similarity (SPEC §1) in one launch: out[b, i, j] = <x_i, x_j> / (max(|x_i|, 1e-6) *
// max(|x_j|, 1e-6)), products of the 16-bit inputs accumulated in fp32 (tensor cores from sm_80),
// norms from the same tiles; fp16 output is rounded once from fp32.
// tokens: [B, N, D] with element strides (stride_b, stride_n, 1), dtype code 1/2 = fp16/bf16 (fp32
// tokens are refused: they use the torch path). out: [B, N, N] contiguous, out_dtype code 0/1 =
// fp32/fp16. Needs N <= kScopeMaxN and B * N * N within int64. Device pointers on one device;
// `stream` belongs to it. Allocates nothing.
cudaError_t launch_scope_similarity(const void* tokens, int dtype, int64_t B, int64_t N, int64_t D,
                                    int64_t stride_b, int64_t stride_n, void* out, int out_dtype,
                                    cudaStream_t stream);

// ---- SCOPE greedy selection on a thread-block cluster per image (csrc/scope_cluster.cu, sm_90)

// Largest N the cluster kernel accepts: fp32 S only (SCOPE_FP32_MAX_N = 4096).
int64_t scope_cluster_max_n();

// The same picks as launch_scope_greedy (bit for bit: same formulas and summation order), with
// image b run by a cluster of CTAs that each own a slice of S's columns. Arguments as
// launch_scope_greedy, except: sim_dtype must be 0 (float32) and N <= scope_cluster_max_n();
// workspace / workspace_bytes are unused (may be null / 0); force_global_state streams the column
// slices from global memory even where they fit in shared memory; max_list must be 0;
// cluster_size is 2, 4, 8 or 16 CTAs per image, or 0 to choose (the smallest size whose slices
// fit in shared memory, else the largest size that can run). Returns cudaErrorNotSupported on a
// device below compute capability 9.0, cudaErrorInvalidConfiguration when no plan fits.
cudaError_t launch_scope_greedy_cluster(const void* sim, int sim_dtype, const ScopeWeights& weights,
                                        const int64_t* lengths, const int64_t* k_per_image,
                                        int64_t B, int64_t N, int64_t k_max, bool mul,
                                        void* workspace, int64_t workspace_bytes, int64_t* out,
                                        cudaStream_t stream, bool force_global_state,
                                        int64_t max_list, int cluster_size, bool sorted);

// The launch plan launch_scope_greedy_cluster would use on `device` for N tokens: the cluster
// size, whether the column slices stay in shared memory, and the dynamic shared memory per CTA.
// Same error codes as the launcher; touches no memory.
cudaError_t scope_cluster_plan(int device, int64_t N, int cluster_size, bool force_global_state,
                               int* chosen_size, bool* slice_in_smem, int64_t* smem_bytes);

// ---- HoloV: crop statistics, budgets and per-crop top-k (csrc/holov.cu)

// Crops the workspace is sized for: num_crops if > 0, else SPEC §2's default for N tokens,
// min(N, max(1, 1024 N // (576 k))) (an image's own default never exceeds it).
int64_t holov_max_crops(int64_t N, int64_t k, int64_t num_crops);

// Bytes of device workspace each launcher below needs (contents ignored; host-only, touches no
// device; -1 for negative sizes). Never 0.
int64_t holov_select_workspace_bytes(int64_t B, int64_t N, int64_t k, int64_t num_crops);
int64_t crop_budgets_workspace_bytes(int64_t B, int64_t C);
int64_t crop_topk_workspace_bytes(int64_t B, int64_t C);

// HoloV selection (SPEC §2, docs/semantics.md) in two launches: out[b, :k] for every image.
// tokens: [B, N, D] with element strides (stride_b, stride_n, 1), dtype code 0/1/2 = fp32/fp16/bf16.
// attn: float32 [B, N] contiguous. lengths: int64 [B] (clamped to [0, N]) or null for all N.
// num_crops: crops per image, 0 for the per-image default. rank_by_score: rank inside a crop by
// h (true) or attn (false). sorted: ascending indices, or crops in order with descending key inside.
// Needs 1 <= k <= N < 2^31 and 0 <= num_crops <= N. out: int64 [B, k] contiguous.
cudaError_t launch_holov_select(const void* tokens, int dtype, int64_t B, int64_t N, int64_t D,
                                int64_t stride_b, int64_t stride_n, const float* attn,
                                const int64_t* lengths, int64_t k, int64_t num_crops, float alpha,
                                bool rank_by_score, bool sorted, void* workspace,
                                int64_t workspace_bytes, int64_t* out, cudaStream_t stream);

// Per-crop budgets summing to k (SPEC §2 with the capacity rule): weights float32 [B, C],
// capacity int64 [B, C] (0 = absent crop), out int64 [B, C], all contiguous. Needs k >= 1 and
// C < 2^31; a row whose capacity is below k gets less than k (rejected before, in Python).
cudaError_t launch_crop_budgets(const float* weights, const int64_t* capacity, int64_t B,
                                int64_t C, int64_t k, void* workspace, int64_t workspace_bytes,
                                int64_t* out, cudaStream_t stream);

// Top budgets[b, c] tokens by scores inside each contiguous crop (sizes crop_sizes[b, :], from
// token 0): scores float32 [B, N], crop_sizes and budgets int64 [B, C], out int64 [B, k], all
// contiguous. NaN ranks last, ties to the lowest index. Sizes are clamped so the crops stay within
// N and budgets into [0, size]; output slots such clamping leaves empty are 0.
cudaError_t launch_crop_topk(const float* scores, int64_t B, int64_t N, const int64_t* crop_sizes,
                             const int64_t* budgets, int64_t C, int64_t k, bool sorted,
                             void* workspace, int64_t workspace_bytes, int64_t* out,
                             cudaStream_t stream);

}  // namespace vtprune
