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
//   gain      float [W], flags uint8 [W]   own columns only
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

namespace vtprune {
namespace {

namespace cg = cooperative_groups;

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / kWarpSize;
constexpr int kRowGroups = 8;  // = scope.cu's: the same summation order, hence the same bits
constexpr int kColThreads = kThreads / kRowGroups;  // 64 threads: two warps per row group
constexpr int kColsPerThread = 2;
constexpr int kTileCols = kColThreads * kColsPerThread;  // 128 columns per tile
constexpr int kMaxN = 4096;  // SCOPE_FP32_MAX_N: fp32 S only
constexpr int kMaxClusterSize = 16;
constexpr int64_t kMaxGridX = 2147483647;
constexpr int kMaxCachedDevices = 64;

static_assert(kWarps <= kWarpSize, "the block reduction combines one value per warp in one warp");
static_assert(kMaxClusterSize <= kWarpSize, "one lane per CTA reduces the cluster's picks");
static_assert(kThreads % kColThreads == 0 && kColThreads % kWarpSize == 0,
              "a row group must be whole warps");
static_assert(kTileCols <= kThreads, "one thread per column reduces a tile");

__host__ __device__ inline int64_t align16(int64_t bytes) { return (bytes + 15) / 16 * 16; }

// Byte offsets into a CTA's dynamic shared memory, from (n, width, list_cap, slice) only, so the
// host (launch size) and the device (carving) agree.
struct Layout {
  int64_t partial, list_u, list_lo, list_hi;
  int64_t red_val, red_idx, red_free, scan_count, scan_offset;
  int64_t pick_val, pick_idx, pick_free;  // [2] each: this CTA's triple, read by the cluster
  int64_t cov, gain, flags, slice;        // slice = -1 when S streams from global memory
  int64_t bytes;
};

__host__ __device__ inline Layout make_layout(int64_t n, int64_t width, int64_t list_cap, bool slice) {
  Layout l{};
  int64_t at = 0;
  auto take = [&at](int64_t bytes) {
    const int64_t here = at;
    at += align16(bytes);
    return here;
  };
  l.partial = take(int64_t{2} * kRowGroups * kTileCols * 4);
  l.list_u = take(list_cap * 4);
  l.list_lo = take(list_cap * 4);
  l.list_hi = take(list_cap * 4);
  l.red_val = take(kWarps * 4);
  l.red_idx = take(kWarps * 4);
  l.red_free = take(kWarps * 4);
  l.scan_count = take(kWarps * 4);
  l.scan_offset = take((kWarps + 1) * 4);
  l.pick_val = take(2 * 4);
  l.pick_idx = take(2 * 4);
  l.pick_free = take(2 * 4);
  l.cov = take(n * 4);
  l.gain = take(width * 4);
  l.flags = take(width);
  l.slice = slice ? take(n * width * 4) : -1;
  l.bytes = at;
  return l;
}

struct Smem {
  float* partial;
  int* list_u;
  float* list_lo;
  float* list_hi;
  float* red_val;
  int* red_idx;
  int* red_free;
  int* scan_count;
  int* scan_offset;
  float* pick_val;
  int* pick_idx;
  int* pick_free;
  float* cov;
  float* gain;
  unsigned char* flags;
  float* slice;  // nullptr when streaming
};

// The device code below exists only where the kernel does (sm_90 and newer device passes); an
// older target compiles the kernel to a trap and needs none of it.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900

constexpr int kNoIndex = INT_MAX;

// The formulas of scope.cu, repeated here because they are the contract of both kernels.
__device__ __forceinline__ float relu_keep_nan(float s) { return s < 0.0f ? 0.0f : s; }

__device__ __forceinline__ float coverage_drop(float s, float lo, float width) {
  return fminf(fmaxf(s - lo, 0.0f), width);
}

__device__ __forceinline__ void merge_best(float& val, int& idx, float other_val, int other_idx) {
  if (other_val > val || (other_val == val && other_idx < idx)) {
    val = other_val;
    idx = other_idx;
  }
}

__device__ __forceinline__ void warp_reduce_best(float& best, int& best_idx, int& first_free) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) {
    const float other_val = __shfl_xor_sync(kFullMask, best, offset);
    const int other_idx = __shfl_xor_sync(kFullMask, best_idx, offset);
    merge_best(best, best_idx, other_val, other_idx);
    first_free = min(first_free, __shfl_xor_sync(kFullMask, first_free, offset));
  }
}

// Column sums over `rows` rows for this CTA's columns [c0, c0 + ncols), as scope.cu's
// column_pass (same row groups, same order of adds):
//   kInit:  gain[v]  = sum_{u < rows} relu_keep_nan(S[u, c0 + v]); also fills the slice
//   else:   gain[v] -= sum_{j < rows} coverage_drop(S[list_u[j], c0 + v], lo_j, hi_j - lo_j)
// S[u, c0 + v] is slice[u * width + v] once the slice holds it, else read from global memory.
// Entered by the whole CTA after a barrier that published the list; ends with a barrier.
template <bool kInit>
__device__ void column_pass(const float* __restrict__ s_b, int64_t n, int c0, int ncols, int width,
                            int rows, const Smem& sh) {
  const int tid = threadIdx.x;
  const int ct = tid % kColThreads;
  const int rg = tid / kColThreads;  // uniform over each warp
  int parity = 0;
  for (int v0 = 0; v0 < ncols; v0 += kTileCols) {
    float acc[kColsPerThread];
#pragma unroll
    for (int c = 0; c < kColsPerThread; ++c) acc[c] = 0.0f;
#pragma unroll 4
    for (int j = rg; j < rows; j += kRowGroups) {
      int u;
      float lo = 0.0f;
      float width_j = 0.0f;
      if (kInit) {
        u = j;
      } else {
        u = sh.list_u[j];
        lo = sh.list_lo[j];
        width_j = sh.list_hi[j] - lo;
      }
      const float* row = s_b + static_cast<int64_t>(u) * n + c0;
      float* srow = sh.slice != nullptr ? sh.slice + static_cast<int64_t>(u) * width : nullptr;
#pragma unroll
      for (int c = 0; c < kColsPerThread; ++c) {
        const int v = v0 + ct + c * kColThreads;
        if (v < ncols) {
          float s;
          if (kInit) {
            s = row[v];
            if (srow != nullptr) srow[v] = s;  // read back only after this pass's last barrier
          } else {
            s = srow != nullptr ? srow[v] : row[v];
          }
          acc[c] += kInit ? relu_keep_nan(s) : coverage_drop(s, lo, width_j);
        }
      }
    }
    // Double buffer, as in scope.cu: one barrier per tile.
    float* part = sh.partial + parity * (kRowGroups * kTileCols);
#pragma unroll
    for (int c = 0; c < kColsPerThread; ++c) part[rg * kTileCols + ct + c * kColThreads] = acc[c];
    __syncthreads();
    if (tid < kTileCols) {
      const int v = v0 + tid;
      if (v < ncols) {
        float sum = part[tid];
#pragma unroll
        for (int g = 1; g < kRowGroups; ++g) sum += part[g * kTileCols + tid];
        sh.gain[v] = kInit ? sum : sh.gain[v] - sum;
      }
    }
    parity ^= 1;
  }
  __syncthreads();
}

// Exclusive prefix count of `flag` over the CTA in thread order (scope.cu's, for kWarps warps).
// Two barriers; its scratch is safe to reuse on the next call.
__device__ __forceinline__ int block_exclusive_count(bool flag, const Smem& sh, int& total) {
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const unsigned ballot = __ballot_sync(kFullMask, flag);
  if (lane == 0) sh.scan_count[warp] = __popc(ballot);
  __syncthreads();
  if (warp == 0) {
    const int mine = lane < kWarps ? sh.scan_count[lane] : 0;
    int inclusive = mine;
#pragma unroll
    for (int offset = 1; offset < kWarpSize; offset <<= 1) {
      const int up = __shfl_up_sync(kFullMask, inclusive, offset);
      if (lane >= offset) inclusive += up;
    }
    if (lane < kWarps) sh.scan_offset[lane] = inclusive - mine;
    if (lane == kWarps - 1) sh.scan_offset[kWarps] = inclusive;
  }
  __syncthreads();
  total = sh.scan_offset[kWarps];
  return sh.scan_offset[warp] + __popc(ballot & ((1u << lane) - 1u));
}

// This CTA's best (score, index) and lowest unselected index over its own columns, written by
// thread 0 into pick buffer `buf`. One barrier; the caller's cluster barrier publishes it.
__device__ void local_pick(const float* __restrict__ w_b, int c0, int ncols, bool mul, int buf,
                           const Smem& sh) {
  const int tid = threadIdx.x;
  const int lane = tid % kWarpSize;
  const int warp = tid / kWarpSize;
  float best = -INFINITY;
  int best_idx = kNoIndex;
  int first_free = kNoIndex;
  for (int v = tid; v < ncols; v += kThreads) {  // ascending per thread: '>' keeps the lowest
    if (sh.flags[v]) continue;
    if (first_free == kNoIndex) first_free = c0 + v;
    float g = sh.gain[v];
    g = g < 0.0f ? 0.0f : g;  // incremental drift below the exact >= 0; NaN stays NaN
    const float score = mul ? g * w_b[c0 + v] : g + w_b[c0 + v];
    if (score > best) {
      best = score;
      best_idx = c0 + v;
    }
  }
  warp_reduce_best(best, best_idx, first_free);
  if (lane == 0) {
    sh.red_val[warp] = best;
    sh.red_idx[warp] = best_idx;
    sh.red_free[warp] = first_free;
  }
  __syncthreads();
  if (warp == 0) {
    best = lane < kWarps ? sh.red_val[lane] : -INFINITY;
    best_idx = lane < kWarps ? sh.red_idx[lane] : kNoIndex;
    first_free = lane < kWarps ? sh.red_free[lane] : kNoIndex;
    warp_reduce_best(best, best_idx, first_free);
    if (lane == 0) {
      sh.pick_val[buf] = best;
      sh.pick_idx[buf] = best_idx;
      sh.pick_free[buf] = first_free;
    }
  }
}

// Coverage update for pick t (rows u < length, every CTA the same list) and the gain update of
// this CTA's columns. Ends with a barrier.
__device__ void cover_and_update(const float* __restrict__ s_b, int64_t n, int length, int t, int c0,
                                 int ncols, int width, const Smem& sh) {
  const int tid = threadIdx.x;
  int count = 0;  // CTA-uniform (built from scan totals)
  for (int c = 0; c < length; c += kThreads) {
    const int u = c + tid;
    float col = 0.0f;
    float lo = 0.0f;
    bool changed = false;
    if (u < length) {
      col = s_b[static_cast<int64_t>(u) * n + t];  // S[u, t]: the column
      lo = sh.cov[u];
      changed = col > lo;  // NaN never raises the coverage
    }
    int total = 0;
    const int pos = count + block_exclusive_count(changed, sh, total);
    if (changed) {  // pos < length <= list_cap: the list holds every row of the image
      sh.list_u[pos] = u;
      sh.list_lo[pos] = lo;
      sh.list_hi[pos] = col;
      sh.cov[u] = col;  // row u is read and written by this thread only in this phase
    }
    count += total;
  }
  if (count > 0) {
    __syncthreads();  // publish the list
    column_pass<false>(s_b, n, c0, ncols, width, count, sh);
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
scope_cluster_kernel(const float* __restrict__ sim, const float* __restrict__ weights,
                     const int64_t* __restrict__ lengths, const int64_t* __restrict__ k_per_image,
                     int64_t B, int64_t n, int64_t k_max, bool mul, int width, int list_cap,
                     int64_t* __restrict__ out) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  extern __shared__ __align__(16) unsigned char smem[];
  const Layout lay = make_layout(n, width, list_cap, kSlice);
  Smem sh;
  sh.partial = reinterpret_cast<float*>(smem + lay.partial);
  sh.list_u = reinterpret_cast<int*>(smem + lay.list_u);
  sh.list_lo = reinterpret_cast<float*>(smem + lay.list_lo);
  sh.list_hi = reinterpret_cast<float*>(smem + lay.list_hi);
  sh.red_val = reinterpret_cast<float*>(smem + lay.red_val);
  sh.red_idx = reinterpret_cast<int*>(smem + lay.red_idx);
  sh.red_free = reinterpret_cast<int*>(smem + lay.red_free);
  sh.scan_count = reinterpret_cast<int*>(smem + lay.scan_count);
  sh.scan_offset = reinterpret_cast<int*>(smem + lay.scan_offset);
  sh.pick_val = reinterpret_cast<float*>(smem + lay.pick_val);
  sh.pick_idx = reinterpret_cast<int*>(smem + lay.pick_idx);
  sh.pick_free = reinterpret_cast<int*>(smem + lay.pick_free);
  sh.cov = reinterpret_cast<float*>(smem + lay.cov);
  sh.gain = reinterpret_cast<float*>(smem + lay.gain);
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
    const float* w_b = weights + b * n;
    int64_t* out_b = out + b * k_max;

    // The previous image ended with a barrier, so its state is no longer read in this CTA (the
    // other CTAs read only the pick buffers).
    for (int u = tid; u < length; u += kThreads) sh.cov[u] = 0.0f;
    for (int v = tid; v < ncols; v += kThreads) sh.flags[v] = 0;
    column_pass<true>(s_b, n, c0, ncols, width, length, sh);  // ends with a barrier

    for (int i = 0; i < kb; ++i) {
      local_pick(w_b, c0, ncols, mul, buf, sh);
      cluster.sync();  // publishes every CTA's triple (and orders this CTA's shared memory)
      const int t = cluster_pick(cluster, csize, buf, length, sh);
      buf ^= 1;
      if (tid == 0) {
        if (rank == 0) out_b[i] = t;
        // next read by local_pick, after the barriers of cover_and_update
        if (t >= c0 && t < c0 + ncols) sh.flags[t - c0] = 1;
      }
      cover_and_update(s_b, n, length, t, c0, ncols, width, sh);
    }
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
cudaError_t launch_typed(const Plan& p, const float* sim, const float* weights, const int64_t* lengths,
                         const int64_t* k_per_image, int64_t B, int64_t N, int64_t k_max, bool mul,
                         int64_t* out, cudaStream_t stream, int device, int optin) {
  VTPRUNE_CUDA_TRY(prepare_kernel<kSlice>(device, optin));
  cudaLaunchAttribute attr{};
  const cudaLaunchConfig_t cfg = launch_config(p, B, stream, &attr);
  VTPRUNE_CUDA_TRY(cudaLaunchKernelEx(&cfg, scope_cluster_kernel<kSlice>, sim, weights, lengths,
                                      k_per_image, B, N, k_max, mul, p.width, p.list_cap, out));
  return cudaGetLastError();
}

// Makes `device` current for the guard's lifetime (the function attributes and the occupancy
// query act on the current device).
class CurrentDevice {
 public:
  cudaError_t set(int device) {
    int current = -1;
    VTPRUNE_CUDA_TRY(cudaGetDevice(&current));
    if (current != device) {
      VTPRUNE_CUDA_TRY(cudaSetDevice(device));
      previous_ = current;
    }
    return cudaSuccess;
  }
  ~CurrentDevice() {
    if (previous_ >= 0) cudaSetDevice(previous_);
  }

 private:
  int previous_ = -1;
};

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
  CurrentDevice guard;
  VTPRUNE_CUDA_TRY(guard.set(device));
  int major = 0;
  VTPRUNE_CUDA_TRY(cached_attribute(g_cc_major, cudaDevAttrComputeCapabilityMajor, device, &major));
  if (major < 9) return cudaErrorNotSupported;
  int optin = 0;
  VTPRUNE_CUDA_TRY(cached_attribute(g_optin_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, device, &optin));
  (void)cudaGetLastError();
  Plan plan{};
  if (!choose_plan(N, cluster_size, force_global_state, device, optin, &plan)) {
    return cudaErrorInvalidConfiguration;
  }
  *chosen_size = plan.cluster_size;
  *slice_in_smem = plan.slice;
  *smem_bytes = plan.smem_bytes;
  return cudaSuccess;
}

cudaError_t launch_scope_greedy_cluster(const void* sim, int sim_dtype, const float* weights,
                                        const int64_t* lengths, const int64_t* k_per_image,
                                        int64_t B, int64_t N, int64_t k_max, bool mul,
                                        void* workspace, int64_t workspace_bytes, int64_t* out,
                                        cudaStream_t stream, bool force_global_state,
                                        int64_t max_list, int cluster_size) {
  (void)workspace;  // the per-image state always fits in shared memory (N <= kMaxN)
  const bool size_ok = cluster_size == 0 || cluster_size == 2 || cluster_size == 4 ||
                       cluster_size == 8 || cluster_size == kMaxClusterSize;
  if (sim_dtype != static_cast<int>(DType::Float32) || B < 0 || N < 0 || N > kMaxN || k_max < 0 ||
      workspace_bytes < 0 || max_list != 0 || !size_ok) {
    return cudaErrorInvalidValue;
  }
  if (B == 0 || N == 0 || k_max == 0) return cudaSuccess;  // nothing to write
  if (sim == nullptr || weights == nullptr || lengths == nullptr || k_per_image == nullptr ||
      out == nullptr) {
    return cudaErrorInvalidValue;
  }

  DeviceGuard guard;
  VTPRUNE_CUDA_TRY(guard.set_from_pointer(out));
  int device = 0;
  VTPRUNE_CUDA_TRY(cudaGetDevice(&device));
  int major = 0;
  VTPRUNE_CUDA_TRY(cached_attribute(g_cc_major, cudaDevAttrComputeCapabilityMajor, device, &major));
  if (major < 9) return cudaErrorNotSupported;  // thread-block clusters need sm_90
  int optin = 0;
  VTPRUNE_CUDA_TRY(cached_attribute(g_optin_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, device, &optin));

  // Drop a stale, non-sticky error left by an earlier call so it is not reported as ours.
  (void)cudaGetLastError();
  Plan plan{};
  if (!choose_plan(N, cluster_size, force_global_state, device, optin, &plan)) {
    return cudaErrorInvalidConfiguration;
  }
  const float* s = static_cast<const float*>(sim);
  return plan.slice ? launch_typed<true>(plan, s, weights, lengths, k_per_image, B, N, k_max, mul,
                                         out, stream, device, optin)
                    : launch_typed<false>(plan, s, weights, lengths, k_per_image, B, N, k_max,
                                          mul, out, stream, device, optin);
}

}  // namespace vtprune
