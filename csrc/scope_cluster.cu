// SCOPE greedy selection (SPEC §1) on a thread-block cluster per image (sm_90, opt-in).
//
// The same contract, formulas and summation order as csrc/scope.cu (read its header first): all k
// greedy steps of an image in one launch, over the precomputed fp32 similarity S [B, N, N]. What
// changes is who does the work. scope.cu runs an image on ONE CTA, which must move every byte of
// S it reads (init column sums N^2, then |changed rows| x N per step) through one SM; at
// N = 576, k = 64 that is ~6 MB and the 40 us target is out of reach (docs/performance.md).
// Here an image runs on a cluster of C CTAs (C in 2, 4, 8, 16; 16 is non-portable), and CTA r
// owns the contiguous column slice [r W, (r + 1) W) of S, W = ceil(N / C):
//
//   init     every CTA sums its own columns: gain(v) = sum_u max(0, S[u, v]) (NaN stays NaN).
//            When the slice S[:, slice] fits in shared memory (N = 576, C = 8: 576 x 72 x 4 =
//            166 KB), it is stored there while being summed and never read from L2 again;
//            otherwise every later read streams from global memory / L2, C SMs in parallel.
//   repeat k times:
//     pick   every CTA reduces its own columns to (best score, lowest index, lowest unselected
//            index) with scope.cu's tie rule (lowest index among equal scores; NaN counts as -inf;
//            if the best is -inf, the lowest unselected valid index) and publishes the triple in
//            its shared memory; one cluster barrier; then every warp of every CTA reads the C
//            triples through distributed shared memory (DSMEM) and reduces them. The reduction
//            is a maximum under a total order (score, then lower index), so every warp of every
//            CTA gets the same t without another barrier.
//     cover  every CTA builds the same list of changed rows (u, lo_u, hi_u), ascending in u,
//            redundantly, from the global column S[:, t] (N values from L2 per CTA and step; the
//            simplest correct choice, and a column of the owner's slice would be strided anyway)
//            and its own replica of the coverage c (N floats, identical in every CTA because
//            every CTA applies the same lists).
//     update every CTA subtracts sum_{u listed} max(0, S[u, v] - lo_u) - max(0, S[u, v] - hi_u)
//            from the gains of its own columns, reading S from its slice (shared) or from L2.
//   out      in pick order, written by CTA 0; or (sorted) ascending: every CTA compacts its own
//            selected flags to out[below], out[below + 1], ..., below = the picks left of its
//            slice, which every CTA counts on its own (every CTA sees every pick), so the ranges
//            are disjoint and no exchange is needed.
//
// Summation order. A column sum is split over kRowGroups = 8 row groups exactly as in scope.cu
// (group g adds rows j = g, g + 8, ... of the list or of the image in order, the eight partial
// sums are then added in group order), and the list holds all changed rows of a step (N <= 4096,
// so scope.cu applies its list once per step too). So the gains, hence the picks, are bit for
// bit those of scope.cu: only which SM adds which column differs. The tests rely on this.
//
// Memory (per CTA, dynamic shared memory; nothing in global memory besides S, the inputs and out):
//   partial   float [2][8][kTileCols]  double-buffered tile partial sums (8 KB)
//   list      (int, float, float) [list_cap], list_cap = N rounded up to kThreads (<= 48 KB)
//   block reduction scratch, the pick triple [2] (double-buffered, read by the other CTAs)
//   cov       float [N]     replicated coverage
//   gain      float [W], open int [W], flags uint8 [W]   own columns only
//   slice     float [N][W]  own columns of S (only when it fits the opt-in limit)
// fp32 S only: the cluster kernel takes N <= 4096 (SCOPE_FP32_MAX_N), so the list and the
// replicated coverage always fit. The launcher allocates no device memory (CUDA-graph
// capturable); the workspace arguments of launch_scope_greedy are accepted and unused.
//
// Synchronization. Inside a CTA, as scope.cu: every phase that writes shared state ends with
// __syncthreads() before another thread reads it. Across the cluster, one cluster.sync() per
// step: the pick triple of step i lives in buffer i % 2; it is written before the step's
// cluster barrier and read after it, and buffer i % 2 is written again only at step i + 2, after
// the barrier of step i + 1, which no CTA passes before it has read step i's triples. A last
// cluster.sync() keeps every CTA alive until nobody can read its shared memory any more. The
// loop over images is a grid-stride loop in whole clusters, and every branch around a barrier
// is uniform over the cluster (it depends on lengths[b], k_per_image[b] and the rank only).
//
// Bounds: lengths are clamped to [1, N] and k to [0, min(length, K_MAX)] as in scope.cu; a CTA
// touches only rows u < length and its columns below length (possibly none); S offsets are int64.
// Compiled for sm_90 and newer only: on an older target the kernel body is a trap, and the
// launcher refuses devices below compute capability 9.0 with cudaErrorNotSupported.

#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cmath>
#include <initializer_list>
#include <map>
#include <mutex>
#include <tuple>

#include "common.cuh"
#include "kernels.h"
#include "scope_common.cuh"

namespace vtprune {
namespace {

namespace cg = cooperative_groups;

using namespace scope_common;

constexpr int kThreads = 512;
// The same 8 row groups as scope.cu: the same summation order, hence the same bits. Column tile:
// 64 threads (two warps per row group) x 2 columns.
using Tile = Tiling<kThreads, /*kRowGroups=*/8, /*kColsPerThread=*/2>;
constexpr int kMaxN = 4096;  // SCOPE_FP32_MAX_N: fp32 S only
constexpr int kMaxClusterSize = 16;
constexpr int64_t kMaxGridX = 2147483647;
constexpr int kMaxCachedDevices = 64;

static_assert(kMaxClusterSize <= kWarpSize, "one lane per CTA reduces the cluster's picks");

// Byte offsets into a CTA's dynamic shared memory, from (n, width, list_cap, slice) only, so the
// host (launch size) and the device (carving) agree.
struct Layout : BlockScratchLayout {
  int64_t pick_val, pick_idx, pick_free;  // [2] each: this CTA's triple, read by the cluster
  int64_t cov, gain, open, flags, slice;  // slice = -1 when S streams from global memory
  int64_t bytes;
};

__host__ __device__ inline Layout make_layout(int64_t n, int64_t width, int64_t list_cap, bool slice) {
  Layout l{};
  SmemCursor at;
  take_block_scratch<Tile>(at, list_cap, l);
  l.pick_val = at.take(2 * 4);
  l.pick_idx = at.take(2 * 4);
  l.pick_free = at.take(2 * 4);
  l.cov = at.take(n * 4);
  l.gain = at.take(width * 4);
  l.open = at.take(width * 4);
  l.flags = at.take(width);
  l.slice = slice ? at.take(n * width * 4) : -1;
  l.bytes = at.end;
  return l;
}

struct Smem : BlockScratch {
  float* pick_val;
  int* pick_idx;
  int* pick_free;
  float* cov;
  float* gain;
  int* open;
  unsigned char* flags;
  float* slice;  // nullptr when streaming
};

// The device code below exists only where the kernel does (sm_90 and newer device passes); an
// older target compiles the kernel to a trap and needs none of it.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900

// Rows of S restricted to this CTA's columns [c0, c0 + width), for column_pass. S[u, c0 + v] is
// slice[u * width + v] once the slice holds it (the init pass stores it there while summing),
// else read from global memory.
template <bool kInit>
struct SliceRows {
  struct Row {
    const float* global;
    float* slice;  // nullptr when streaming
    __device__ __forceinline__ float operator()(int v) const {
      if (kInit) {
        const float s = global[v];
        if (slice != nullptr) slice[v] = s;  // read back only after this pass's last barrier
        return s;
      }
      return slice != nullptr ? slice[v] : global[v];
    }
  };
  const float* s_b;
  int64_t n;
  int c0;
  int width;
  float* slice;
  __device__ __forceinline__ Row operator()(int u) const {
    return Row{s_b + static_cast<int64_t>(u) * n + c0,
               slice != nullptr ? slice + static_cast<int64_t>(u) * width : nullptr};
  }
};

// This CTA's best (score, index) and lowest unselected index over its own columns, written by
// thread 0 into pick buffer `buf`. One barrier; the caller's cluster barrier publishes it.
__device__ void local_pick(const WeightRow& w_b, int c0, int ncols, bool mul, int buf,
                           const Smem& sh) {
  float best;
  int best_idx;
  int first_free;
  block_best<Tile>(w_b, sh.gain, sh.open, sh.flags, c0, ncols, mul, sh, best, best_idx, first_free);
  if (threadIdx.x == 0) {
    sh.pick_val[buf] = best;
    sh.pick_idx[buf] = best_idx;
    sh.pick_free[buf] = first_free;
  }
}

// Coverage update for pick t (rows u < length, every CTA the same list) and the gain update of
// this CTA's columns. Ends with a barrier.
__device__ void cover_and_update(const float* __restrict__ s_b, int64_t n, int length, int t, int c0,
                                 int ncols, int width, const Smem& sh) {
  int count = 0;  // CTA-uniform (built from scan totals)
  // count < length <= list_cap: the list holds every row of the image, so it is applied once.
  for (int u0 = 0; u0 < length; u0 += kThreads) {
    count += list_raised_rows<Tile>(s_b, n, length, t, u0, count, sh.cov, sh);
  }
  if (count > 0) {
    __syncthreads();  // publish the list
    column_pass<Tile, false>(ncols, count, SliceRows<false>{s_b, n, c0, width, sh.slice}, sh,
                             sh.gain, sh.open);
  }
  __syncthreads();  // coverage and gains of this step are visible to the next one
}

// The cluster's pick from the C published triples, computed by every warp on its own (lane r
// reads rank r over DSMEM); the same value in every thread of the cluster.
__device__ int cluster_pick(const cg::cluster_group& cluster, int csize, int buf, int length,
                            const Smem& sh) {
  const int lane = threadIdx.x % kWarpSize;
  float best = -INFINITY;
  int best_idx = kNoIndex;
  int first_free = kNoIndex;
  if (lane < csize) {
    best = *cluster.map_shared_rank(sh.pick_val + buf, lane);
    best_idx = *cluster.map_shared_rank(sh.pick_idx + buf, lane);
    first_free = *cluster.map_shared_rank(sh.pick_free + buf, lane);
  }
  warp_reduce_best(best, best_idx, first_free);
  const int t = best > -INFINITY ? best_idx : first_free;
  // Unreachable guard: fewer than `length` picks so far, so an unselected index exists.
  return min(t, length - 1);
}
#endif

template <bool kSlice>
__global__ void __launch_bounds__(kThreads, 1)
scope_cluster_kernel(const float* __restrict__ sim, const ScopeWeights weights,
                     const int64_t* __restrict__ lengths, const int64_t* __restrict__ k_per_image,
                     int64_t B, int64_t n, int64_t k_max, bool mul, bool sorted, int width,
                     int list_cap, int64_t* __restrict__ out) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  extern __shared__ __align__(16) unsigned char smem[];
  const Layout lay = make_layout(n, width, list_cap, kSlice);
  Smem sh;
  carve_block_scratch(smem, lay, sh);
  sh.pick_val = reinterpret_cast<float*>(smem + lay.pick_val);
  sh.pick_idx = reinterpret_cast<int*>(smem + lay.pick_idx);
  sh.pick_free = reinterpret_cast<int*>(smem + lay.pick_free);
  sh.cov = reinterpret_cast<float*>(smem + lay.cov);
  sh.gain = reinterpret_cast<float*>(smem + lay.gain);
  sh.open = reinterpret_cast<int*>(smem + lay.open);
  sh.flags = smem + lay.flags;
  sh.slice = kSlice ? reinterpret_cast<float*>(smem + lay.slice) : nullptr;

  cg::cluster_group cluster = cg::this_cluster();
  const int csize = static_cast<int>(cluster.num_blocks());
  const int rank = static_cast<int>(cluster.block_rank());
  const int tid = threadIdx.x;
  const int64_t nclusters = gridDim.x / csize;
  const int c0 = rank * width;  // first column this CTA owns
  int buf = 0;                  // pick buffer of the next step (see the header comment)

  // Grid-stride over images in whole clusters; every branch below is cluster-uniform.
  for (int64_t b = blockIdx.x / csize; b < B; b += nclusters) {
    const int length = static_cast<int>(min(max(lengths[b], int64_t{1}), n));
    const int kb = static_cast<int>(min(max(k_per_image[b], int64_t{0}), min(int64_t{length}, k_max)));
    if (kb == 0) continue;
    const int ncols = max(0, min(width, length - c0));  // own valid columns, possibly none
    const float* s_b = sim + b * n * n;
    const WeightRow w_b = weight_row(weights, b);
    int64_t* out_b = out + b * k_max;

    // The previous image ended with a barrier, so its state is no longer read in this CTA (the
    // other CTAs read only the pick buffers).
    for (int u = tid; u < length; u += kThreads) sh.cov[u] = 0.0f;
    for (int v = tid; v < ncols; v += kThreads) {
      sh.flags[v] = 0;
      sh.open[v] = 0;
    }
    column_pass<Tile, true>(ncols, length, SliceRows<true>{s_b, n, c0, width, sh.slice}, sh,
                            sh.gain, sh.open);  // ends with a barrier

    int below = 0;  // picks left of this CTA's columns (the same in every thread)
    for (int i = 0; i < kb; ++i) {
      local_pick(w_b, c0, ncols, mul, buf, sh);
      cluster.sync();  // publishes every CTA's triple (and orders this CTA's shared memory)
      const int t = cluster_pick(cluster, csize, buf, length, sh);
      buf ^= 1;
      below += t < c0;
      if (tid == 0) {
        if (rank == 0 && !sorted) out_b[i] = t;
        // next read by local_pick, after the barriers of cover_and_update
        if (t >= c0 && t < c0 + ncols) sh.flags[t - c0] = 1;
      }
      cover_and_update(s_b, n, length, t, c0, ncols, width, sh);
    }
    if (sorted) write_selected_ascending<Tile>(sh.flags, ncols, c0, below, out_b, sh);
  }
  cluster.sync();  // no CTA exits while another may still read its pick buffers
#else
  // Built for an architecture without clusters; the launcher never launches this.
  __trap();
#endif
}

// Per-device caches (0 = not queried yet).
std::atomic<int> g_optin_smem[kMaxCachedDevices];
std::atomic<int> g_cc_major[kMaxCachedDevices];

cudaError_t cached_attribute(std::atomic<int>* cache, cudaDeviceAttr attr, int device, int* value) {
  const bool cacheable = device >= 0 && device < kMaxCachedDevices;
  if (cacheable) {
    const int cached = cache[device].load(std::memory_order_relaxed);
    if (cached > 0) {
      *value = cached;
      return cudaSuccess;
    }
  }
  int v = 0;
  VTPRUNE_CUDA_TRY(cudaDeviceGetAttribute(&v, attr, device));
  if (cacheable) cache[device].store(v, std::memory_order_relaxed);
  *value = v;
  return cudaSuccess;
}

// Function attributes, once per device and instantiation, always the same values (so concurrent
// launches never undo each other): the opt-in shared memory maximum and non-portable clusters.
template <bool kSlice>
cudaError_t prepare_kernel(int device, int optin) {
  static std::atomic<bool> done[kMaxCachedDevices];
  const bool cacheable = device >= 0 && device < kMaxCachedDevices;
  if (cacheable && done[device].load(std::memory_order_acquire)) return cudaSuccess;
  VTPRUNE_CUDA_TRY(cudaFuncSetAttribute(scope_cluster_kernel<kSlice>,
                                        cudaFuncAttributeMaxDynamicSharedMemorySize, optin));
  VTPRUNE_CUDA_TRY(cudaFuncSetAttribute(scope_cluster_kernel<kSlice>,
                                        cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
  if (cacheable) done[device].store(true, std::memory_order_release);
  return cudaSuccess;
}

struct Plan {
  int cluster_size;
  bool slice;
  int width;
  int list_cap;
  int64_t smem_bytes;
};

cudaLaunchConfig_t launch_config(const Plan& p, int64_t B, cudaStream_t stream,
                                 cudaLaunchAttribute* attr) {
  const int64_t clusters = std::min<int64_t>(B, kMaxGridX / p.cluster_size);
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = dim3(static_cast<unsigned>(clusters * p.cluster_size));
  cfg.blockDim = dim3(kThreads);
  cfg.dynamicSmemBytes = static_cast<size_t>(p.smem_bytes);
  cfg.stream = stream;
  attr->id = cudaLaunchAttributeClusterDimension;
  attr->val.clusterDim.x = static_cast<unsigned>(p.cluster_size);
  attr->val.clusterDim.y = 1;
  attr->val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  return cfg;
}

// Whether clusters of this plan can be resident at all (16 CTAs of ~200 KB may not be). The
// occupancy query is a driver call; its answer per (device, kernel, cluster size, shared memory)
// is remembered so that repeated launches of the same shape do not pay for it again.
template <bool kSlice>
bool cluster_fits(const Plan& p, int device, int optin) {
  static std::mutex mutex;
  static std::map<std::tuple<int, int, int64_t>, bool> known;
  const auto key = std::make_tuple(device, p.cluster_size, p.smem_bytes);
  {
    std::lock_guard<std::mutex> lock(mutex);
    const auto it = known.find(key);
    if (it != known.end()) return it->second;
  }
  bool fits = false;
  if (prepare_kernel<kSlice>(device, optin) == cudaSuccess) {
    cudaLaunchAttribute attr{};
    const cudaLaunchConfig_t cfg = launch_config(p, 1, nullptr, &attr);
    int clusters = 0;
    fits = cudaOccupancyMaxActiveClusters(&clusters, scope_cluster_kernel<kSlice>, &cfg) == cudaSuccess &&
           clusters > 0;
  }
  if (!fits) {
    (void)cudaGetLastError();  // a refused size is an answer, not this launch's error
  }
  std::lock_guard<std::mutex> lock(mutex);
  known[key] = fits;
  return fits;
}

Plan make_plan(int64_t n, int cluster_size, bool slice, int64_t list_cap) {
  const int width = static_cast<int>((n + cluster_size - 1) / cluster_size);
  return Plan{cluster_size, slice, width, static_cast<int>(list_cap),
              make_layout(n, width, list_cap, slice).bytes};
}

bool choose_plan(int64_t n, int requested, bool force_stream, int device, int optin, Plan* out) {
  const int64_t list_cap = (n + kThreads - 1) / kThreads * kThreads;
  auto fits = [&](const Plan& p) {
    return p.smem_bytes <= optin &&
           (p.slice ? cluster_fits<true>(p, device, optin) : cluster_fits<false>(p, device, optin));
  };
  if (requested > 0) {
    for (const bool slice : {true, false}) {
      if (slice && force_stream) continue;
      const Plan p = make_plan(n, requested, slice, list_cap);
      if (fits(p)) {
        *out = p;
        return true;
      }
    }
    return false;
  }
  // Auto: the smallest cluster whose slices stay in shared memory (fewest SMs per image), else
  // the largest cluster that can run, streaming S over as many SMs as possible.
  if (!force_stream) {
    for (const int c : {2, 4, 8, 16}) {
      const Plan p = make_plan(n, c, true, list_cap);
      if (fits(p)) {
        *out = p;
        return true;
      }
    }
  }
  for (const int c : {16, 8, 4, 2}) {
    const Plan p = make_plan(n, c, false, list_cap);
    if (fits(p)) {
      *out = p;
      return true;
    }
  }
  return false;
}

template <bool kSlice>
cudaError_t launch_typed(const Plan& p, const float* sim, const ScopeWeights& weights, const int64_t* lengths,
                         const int64_t* k_per_image, int64_t B, int64_t N, int64_t k_max, bool mul,
                         bool sorted, int64_t* out, cudaStream_t stream, int device, int optin) {
  VTPRUNE_CUDA_TRY(prepare_kernel<kSlice>(device, optin));
  cudaLaunchAttribute attr{};
  const cudaLaunchConfig_t cfg = launch_config(p, B, stream, &attr);
  VTPRUNE_CUDA_TRY(cudaLaunchKernelEx(&cfg, scope_cluster_kernel<kSlice>, sim, weights, lengths,
                                      k_per_image, B, N, k_max, mul, sorted, p.width, p.list_cap,
                                      out));
  return cudaGetLastError();
}

// The plan for `device`, which must be current (the function attributes and the occupancy query
// act on the current device); `optin` gets its opt-in shared memory limit.
cudaError_t plan_on_device(int device, int64_t N, int cluster_size, bool force_stream, int* optin,
                           Plan* plan) {
  int major = 0;
  VTPRUNE_CUDA_TRY(cached_attribute(g_cc_major, cudaDevAttrComputeCapabilityMajor, device, &major));
  if (major < 9) return cudaErrorNotSupported;  // thread-block clusters need sm_90
  VTPRUNE_CUDA_TRY(cached_attribute(g_optin_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, device, optin));
  // Drop a stale, non-sticky error left by an earlier call so it is not reported as ours.
  (void)cudaGetLastError();
  if (!choose_plan(N, cluster_size, force_stream, device, *optin, plan)) {
    return cudaErrorInvalidConfiguration;
  }
  return cudaSuccess;
}

}  // namespace

int64_t scope_cluster_max_n() { return kMaxN; }

cudaError_t scope_cluster_plan(int device, int64_t N, int cluster_size, bool force_global_state,
                               int* chosen_size, bool* slice_in_smem, int64_t* smem_bytes) {
  const bool size_ok = cluster_size == 0 || cluster_size == 2 || cluster_size == 4 ||
                       cluster_size == 8 || cluster_size == kMaxClusterSize;
  if (N < 1 || N > kMaxN || !size_ok || chosen_size == nullptr || slice_in_smem == nullptr ||
      smem_bytes == nullptr) {
    return cudaErrorInvalidValue;
  }
  DeviceGuard guard;
  VTPRUNE_CUDA_TRY(guard.set(device));
  int optin = 0;
  Plan plan{};
  VTPRUNE_CUDA_TRY(plan_on_device(device, N, cluster_size, force_global_state, &optin, &plan));
  *chosen_size = plan.cluster_size;
  *slice_in_smem = plan.slice;
  *smem_bytes = plan.smem_bytes;
  return cudaSuccess;
}

cudaError_t launch_scope_greedy_cluster(const void* sim, int sim_dtype, const ScopeWeights& weights,
                                        const int64_t* lengths, const int64_t* k_per_image,
                                        int64_t B, int64_t N, int64_t k_max, bool mul,
                                        void* workspace, int64_t workspace_bytes, int64_t* out,
                                        cudaStream_t stream, bool force_global_state,
                                        int64_t max_list, int cluster_size, bool sorted) {
  (void)workspace;  // the per-image state always fits in shared memory (N <= kMaxN)
  const bool size_ok = cluster_size == 0 || cluster_size == 2 || cluster_size == 4 ||
                       cluster_size == 8 || cluster_size == kMaxClusterSize;
  if (sim_dtype != static_cast<int>(DType::Float32) || B < 0 || N < 0 || N > kMaxN || k_max < 0 ||
      workspace_bytes < 0 || max_list != 0 || !size_ok) {
    return cudaErrorInvalidValue;
  }
  if (B == 0 || N == 0 || k_max == 0) return cudaSuccess;  // nothing to write
  if (!scope_weights_ok(weights)) return cudaErrorInvalidValue;
  if (sim == nullptr || lengths == nullptr || k_per_image == nullptr ||
      out == nullptr) {
    return cudaErrorInvalidValue;
  }

  DeviceGuard guard;
  int device = 0;
  VTPRUNE_CUDA_TRY(guard.set_from_pointer(out, &device));
  int optin = 0;
  Plan plan{};
  VTPRUNE_CUDA_TRY(plan_on_device(device, N, cluster_size, force_global_state, &optin, &plan));
  const float* s = static_cast<const float*>(sim);
  return plan.slice ? launch_typed<true>(plan, s, weights, lengths, k_per_image, B, N, k_max, mul,
                                         sorted, out, stream, device, optin)
                    : launch_typed<false>(plan, s, weights, lengths, k_per_image, B, N, k_max,
                                          mul, sorted, out, stream, device, optin);
}

}  // namespace vtprune
