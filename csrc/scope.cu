// SCOPE saliency-coverage greedy selection (SPEC §1): all k greedy steps of every image in one
// persistent launch. Same contract and arithmetic as the Triton kernel (triton_kernels/scope.py).
//
// Input is the precomputed similarity S [B, N, N] (fp32 for N <= 4096, fp16 above, see
// vtprune.similarity.scope_similarity), the weights w = max(saliency, 0) ** alpha (ScopeWeights:
// read from the saliency itself for alpha = 1 and 0, precomputed in fp32 otherwise),
// lengths and per-image k. All math is fp32. One CTA of kThreads threads runs image b:
//
//   init     gain(v) = sum_u max(0, S[u, v]) over valid u (NaN stays NaN, as clamp_min(0))
//   repeat k times:
//     pick   t = lowest-index argmax over valid unselected v of max(gain, 0) * w (or + w); a NaN
//            score counts as -inf; if the best is -inf, the lowest unselected valid index
//     cover  read the COLUMN S[:, t] (no symmetry of S is assumed, as in the reference); the rows
//            u with S[u, t] > c(u) are compacted, in ascending order, into a list with their old
//            and new coverage lo_u / hi_u, and c(u) = hi_u
//     update gain(v) -= sum_{u listed} min(max(S[u, v] - lo_u, 0), hi_u - lo_u)
//            = max(0, S - lo) - max(0, S - hi), written so that a covered entry adds exactly 0.
//            A step costs |list| x N instead of the reference's N x N. An exact count of the
//            still-positive terms of each gain (open, see column_pass) makes a fully covered
//            token score exactly 0, as in the reference, whatever the rounding of the sums.
//   out      the picks in pick order, or (sorted) ascending: the selected flags compacted in
//            index order after the last step, so the op needs no separate sort launch.
//
// Column sums (init and update) walk the columns in tiles of kTileCols. Inside a tile, row group g
// (kColThreads consecutive threads, one row at a time, so every warp reads contiguous memory) sums
// rows j = g, g + kRowGroups, ... serially; the kRowGroups partial sums of a column are then added
// in group order. The order depends only on the image's own length and list, never on the thread
// timing, so the picks are deterministic; the incremental gains agree with the reference's
// recomputed sums to a few fp32 ulps of the initial gain (the picks are equal unless two scores
// are that close).
//
// Memory. The list (row, lo, hi: 12 bytes per entry) holds up to list_cap rows, list_cap =
// min(N rounded up to kThreads, kListMax), in shared memory; when more rows change in one step
// (only possible for N > kListMax), the rows are scanned in chunks of kThreads and the list is
// applied and emptied whenever one more chunk could overflow it. For N <= kListMax = 4096 (every
// fp32 S) there is exactly one update per step, the same arithmetic as an unbounded list.
// The per-image state, gain and coverage (fp32), open-term counts (int32) and selected flags
// (uint8), 13 N bytes, lives in dynamic shared memory when it fits the device's opt-in limit with
// the list and the tile buffers (N up to ~15K on H100, ~10K on A100), and otherwise in a global
// workspace (scope_workspace_bytes(B, N) = 13 B N bytes, allocated by the caller, so the launch allocates
// nothing and can be captured in a CUDA graph). The launcher never allocates: with fp16 S above
// 4096 tokens the op needs 2 N^2 bytes per image for S plus O(N D) for the normalized tokens and
// O(N) here.
//
// Synchronization: every phase that writes shared (or workspace) state ends with __syncthreads()
// before another thread reads it; the tile buffers are double-buffered so one barrier per tile
// suffices (see column_pass in scope_common.cuh). The grid-stride loop over images is
// block-uniform.
//
// Bounds: lengths are clamped to [1, N] and k to [0, min(length, K_MAX)] inside the kernel, and
// only rows and columns below the length are read, so no value of lengths / k reads or writes out
// of bounds. Offsets into S are int64 (B * N * N exceeds 2**31).

#include <algorithm>
#include <atomic>
#include <climits>
#include <initializer_list>
#include <cmath>

#include "common.cuh"
#include "kernels.h"
#include "scope_common.cuh"

namespace vtprune {
namespace {

using namespace scope_common;

constexpr int kThreads = 1024;
// Column tile (Tile::kTileCols): 128 threads x 2 columns = 256, like the Triton BLOCK_V. The 8 row
// groups are scope_cluster.cu's too: the same summation order, hence the same picks.
using Tile = Tiling<kThreads, /*kRowGroups=*/8, /*kColsPerThread=*/2>;
constexpr int kListMax = 4096;  // = SCOPE_FP32_MAX_N: one update per step for every fp32 S
constexpr int64_t kMaxGridX = 2147483647;
constexpr int64_t kDefaultSmem = 48 * 1024;  // above this, dynamic smem needs an opt-in
constexpr int kMaxCachedDevices = 64;

static_assert(kListMax % kThreads == 0, "the list holds whole chunks of rows");

// Byte offsets into dynamic shared memory. Computed the same way on the host (launch size) and on
// the device (carving), from (list_cap, n, state_in_smem) only.
struct SmemLayout : BlockScratchLayout {
  int64_t pick;   // int   [1]  the step's pick, broadcast
  int64_t gain;   // float [n]  (state_in_smem only)
  int64_t cov;    // float [n]  (state_in_smem only)
  int64_t open;   // int   [n]  (state_in_smem only)
  int64_t flags;  // uint8 [n]  (state_in_smem only)
  int64_t bytes;  // total
};

__host__ __device__ inline SmemLayout make_layout(int64_t list_cap, int64_t n, bool state_in_smem) {
  SmemLayout l{};
  SmemCursor at;
  take_block_scratch<Tile>(at, list_cap, l);
  l.pick = at.take(4);
  l.gain = l.cov = l.open = l.flags = -1;
  if (state_in_smem) {
    l.gain = at.take(n * 4);
    l.cov = at.take(n * 4);
    l.open = at.take(n * 4);
    l.flags = at.take(n);
  }
  l.bytes = at.end;
  return l;
}

// Workspace layout (global state): gain [B, N] fp32, coverage [B, N] fp32, open [B, N] int32,
// flags [B, N] uint8.
constexpr int64_t kWorkspaceBytesPerToken = 4 + 4 + 4 + 1;

struct Scratch : BlockScratch {
  int* pick;
};

struct State {
  float* gain;
  float* cov;
  int* open;
  unsigned char* flags;
};

// Rows of S [n, n] in global memory, for column_pass.
template <typename T>
struct GlobalRows {
  struct Row {
    const T* p;
    __device__ __forceinline__ float operator()(int v) const { return to_float(p[v]); }
  };
  const T* s_b;
  int64_t n;
  __device__ __forceinline__ Row operator()(int u) const {
    return Row{s_b + static_cast<int64_t>(u) * n};
  }
};

// The step's pick (SPEC §1), the same value in every thread. Contains two barriers.
__device__ int pick_next(const WeightRow& w_b, const State& st, int length, bool mul,
                         const Scratch& sh) {
  float best;
  int best_idx;
  int first_free;
  block_best<Tile>(w_b, st.gain, st.open, st.flags, 0, length, mul, sh, best, best_idx, first_free);
  if (threadIdx.x == 0) {
    int t = best > -INFINITY ? best_idx : first_free;
    // Unreachable guard: fewer than `length` picks so far, so an unselected index exists.
    *sh.pick = min(t, length - 1);
  }
  __syncthreads();
  return *sh.pick;
}

// Coverage update for pick t and the incremental gain update. Ends with a barrier.
template <typename T>
__device__ void cover_and_update(const T* __restrict__ s_b, int64_t n, int length, int t,
                                 int list_cap, const State& st, const Scratch& sh) {
  int count = 0;  // listed rows not yet applied; block-uniform (built from scan totals)
  for (int c0 = 0; c0 < length; c0 += kThreads) {
    count += list_raised_rows<Tile>(s_b, n, length, t, c0, count, st.cov, sh);
    const bool last_chunk = c0 + kThreads >= length;
    // Apply the list at the end, or before the next chunk (up to kThreads rows) could overflow it.
    if (count > 0 && (last_chunk || count > list_cap - kThreads)) {
      __syncthreads();  // publish the list entries
      column_pass<Tile, false>(length, count, GlobalRows<T>{s_b, n}, sh, st.gain, st.open);
      count = 0;
    }
  }
  __syncthreads();  // coverage (and gains) of this step are visible to the next one
}

template <typename T, bool kStateInSmem>
__global__ void __launch_bounds__(kThreads, 1)
scope_greedy_kernel(const T* __restrict__ sim, const ScopeWeights weights,
                    const int64_t* __restrict__ lengths, const int64_t* __restrict__ k_per_image,
                    int64_t B, int64_t n, int64_t k_max, bool mul, bool sorted, int list_cap,
                    unsigned char* __restrict__ workspace, int64_t* __restrict__ out) {
  extern __shared__ __align__(16) unsigned char smem[];
  const SmemLayout lay = make_layout(list_cap, n, kStateInSmem);
  Scratch sh;
  carve_block_scratch(smem, lay, sh);
  sh.pick = reinterpret_cast<int*>(smem + lay.pick);

  const int tid = threadIdx.x;
  // Grid-stride over images: B can exceed the grid limit. Every branch below is block-uniform.
  for (int64_t b = blockIdx.x; b < B; b += gridDim.x) {
    // Clamped so that no value of lengths / k can push a read or write out of bounds.
    const int length = static_cast<int>(min(max(lengths[b], int64_t{1}), n));
    const int kb = static_cast<int>(min(max(k_per_image[b], int64_t{0}), min(int64_t{length}, k_max)));
    if (kb == 0) continue;

    State st;
    if (kStateInSmem) {
      st.gain = reinterpret_cast<float*>(smem + lay.gain);
      st.cov = reinterpret_cast<float*>(smem + lay.cov);
      st.open = reinterpret_cast<int*>(smem + lay.open);
      st.flags = smem + lay.flags;
    } else {
      float* ws = reinterpret_cast<float*>(workspace);
      st.gain = ws + b * n;
      st.cov = ws + B * n + b * n;
      st.open = reinterpret_cast<int*>(ws + 2 * B * n) + b * n;
      st.flags = workspace + int64_t{12} * B * n + b * n;
    }
    const T* s_b = sim + b * n * n;
    const WeightRow w_b = weight_row(weights, b);
    int64_t* out_b = out + b * k_max;

    // The previous image (if any) ended with a barrier, so its state is no longer read.
    for (int v = tid; v < length; v += kThreads) {
      st.cov[v] = 0.0f;
      st.open[v] = 0;
      st.flags[v] = 0;
    }
    // Ends with a barrier.
    column_pass<Tile, true>(length, length, GlobalRows<T>{s_b, n}, sh, st.gain, st.open);

    for (int i = 0; i < kb; ++i) {
      const int t = pick_next(w_b, st, length, mul, sh);
      if (tid == 0) {
        if (!sorted) out_b[i] = t;
        st.flags[t] = 1;  // next read by pick_next, after the barriers of cover_and_update
      }
      cover_and_update<T>(s_b, n, length, t, list_cap, st, sh);
    }
    if (sorted) write_selected_ascending<Tile>(st.flags, length, 0, 0, out_b, sh);
  }
}

// Per-device cache of cudaDevAttrMaxSharedMemoryPerBlockOptin (0 = not queried yet).
std::atomic<int> g_optin_smem[kMaxCachedDevices];

cudaError_t optin_smem(int device, int* bytes) {
  if (device >= 0 && device < kMaxCachedDevices) {
    const int cached = g_optin_smem[device].load(std::memory_order_relaxed);
    if (cached > 0) {
      *bytes = cached;
      return cudaSuccess;
    }
  }
  int value = 0;
  VTPRUNE_CUDA_TRY(cudaDeviceGetAttribute(&value, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  if (device >= 0 && device < kMaxCachedDevices) {
    g_optin_smem[device].store(value, std::memory_order_relaxed);
  }
  *bytes = value;
  return cudaSuccess;
}

// Raises the kernel's dynamic shared memory limit to the device's opt-in maximum, once per device
// and instantiation (always the same value, so concurrent launches with different sizes never
// undo each other). Not a stream operation: also fine while a stream is being captured.
template <typename T, bool kStateInSmem>
cudaError_t allow_optin_smem(int device, int optin) {
  static std::atomic<bool> done[kMaxCachedDevices];
  const bool cacheable = device >= 0 && device < kMaxCachedDevices;
  if (cacheable && done[device].load(std::memory_order_acquire)) return cudaSuccess;
  VTPRUNE_CUDA_TRY(cudaFuncSetAttribute(scope_greedy_kernel<T, kStateInSmem>,
                                        cudaFuncAttributeMaxDynamicSharedMemorySize, optin));
  if (cacheable) done[device].store(true, std::memory_order_release);
  return cudaSuccess;
}

template <typename T, bool kStateInSmem>
cudaError_t launch_typed(const void* sim, const ScopeWeights& weights, const int64_t* lengths,
                         const int64_t* k_per_image, int64_t B, int64_t N, int64_t k_max, bool mul,
                         bool sorted, int list_cap, int64_t smem_bytes, int device, int optin,
                         unsigned char* workspace, int64_t* out, cudaStream_t stream) {
  if (smem_bytes > kDefaultSmem) VTPRUNE_CUDA_TRY((allow_optin_smem<T, kStateInSmem>(device, optin)));
  const dim3 grid(static_cast<unsigned>(std::min(B, kMaxGridX)));
  scope_greedy_kernel<T, kStateInSmem><<<grid, kThreads, static_cast<size_t>(smem_bytes), stream>>>(
      static_cast<const T*>(sim), weights, lengths, k_per_image, B, N, k_max, mul, sorted, list_cap,
      workspace, out);
  return cudaGetLastError();
}

struct LaunchPlan {
  bool state_in_smem;
  int64_t list_cap;
  int64_t smem_bytes;
};

// State in shared memory if it fits (with the full list, else with the smallest one), otherwise in
// the workspace. A smaller list changes only how often it is applied, never which rows are summed.
bool plan_launch(int64_t n, int64_t list_cap, int64_t optin, bool force_global_state,
                 LaunchPlan* plan) {
  for (const bool in_smem : {true, false}) {
    if (in_smem && force_global_state) continue;
    for (const int64_t cap : {list_cap, int64_t{kThreads}}) {
      const int64_t bytes = make_layout(cap, n, in_smem).bytes;
      if (bytes <= optin) {
        *plan = LaunchPlan{in_smem, cap, bytes};
        return true;
      }
    }
  }
  return false;  // not even the tile buffers and the smallest list fit
}

}  // namespace

int64_t scope_workspace_bytes(int64_t B, int64_t N) {
  if (B <= 0 || N <= 0) return 0;
  return kWorkspaceBytesPerToken * B * N;
}

cudaError_t launch_scope_greedy(const void* sim, int sim_dtype, const ScopeWeights& weights,
                                const int64_t* lengths, const int64_t* k_per_image, int64_t B,
                                int64_t N, int64_t k_max, bool mul, void* workspace,
                                int64_t workspace_bytes, int64_t* out, cudaStream_t stream,
                                bool force_global_state, int64_t max_list, bool sorted) {
  if ((sim_dtype != static_cast<int>(DType::Float32) &&
       sim_dtype != static_cast<int>(DType::Float16)) ||
      B < 0 || N < 0 || N > kScopeMaxN || k_max < 0 || workspace_bytes < 0 || max_list < 0) {
    return cudaErrorInvalidValue;
  }
  if (B == 0 || N == 0 || k_max == 0) return cudaSuccess;  // nothing to write
  if (B > INT64_MAX / N / N) return cudaErrorInvalidValue;   // S offsets must fit in int64
  if (!scope_weights_ok(weights)) return cudaErrorInvalidValue;
  if (sim == nullptr || lengths == nullptr || k_per_image == nullptr ||
      out == nullptr || workspace == nullptr || workspace_bytes < scope_workspace_bytes(B, N)) {
    return cudaErrorInvalidValue;
  }

  DeviceGuard guard;
  int device = 0;
  VTPRUNE_CUDA_TRY(guard.set_from_pointer(out, &device));
  int optin = 0;
  VTPRUNE_CUDA_TRY(optin_smem(device, &optin));

  // List capacity: whole chunks of kThreads rows, no more than N needs (rounded up), at most
  // kListMax, or max_list when the caller (tests) asks for less.
  int64_t list_cap = std::min<int64_t>((N + kThreads - 1) / kThreads * kThreads, kListMax);
  if (max_list > 0) list_cap = std::min(list_cap, std::max<int64_t>(max_list / kThreads, 1) * kThreads);
  LaunchPlan plan{};
  if (!plan_launch(N, list_cap, optin, force_global_state, &plan)) {
    return cudaErrorInvalidConfiguration;
  }

  auto* ws = static_cast<unsigned char*>(workspace);
  const int cap = static_cast<int>(plan.list_cap);
  const int64_t bytes = plan.smem_bytes;
  // Drop a stale, non-sticky error left by an earlier call so it is not reported as ours.
  (void)cudaGetLastError();
  if (sim_dtype == static_cast<int>(DType::Float32)) {
    return plan.state_in_smem
               ? launch_typed<float, true>(sim, weights, lengths, k_per_image, B, N, k_max, mul,
                                           sorted, cap, bytes, device, optin, ws, out, stream)
               : launch_typed<float, false>(sim, weights, lengths, k_per_image, B, N, k_max, mul,
                                            sorted, cap, bytes, device, optin, ws, out, stream);
  }
  return plan.state_in_smem
             ? launch_typed<__half, true>(sim, weights, lengths, k_per_image, B, N, k_max, mul, sorted,
                                          cap, bytes, device, optin, ws, out, stream)
             : launch_typed<__half, false>(sim, weights, lengths, k_per_image, B, N, k_max, mul,
                                           sorted, cap, bytes, device, optin, ws, out, stream);
}

}  // namespace vtprune
