// SCOPE greedy device code shared by scope.cu (one CTA per image) and scope_cluster.cu (a cluster
// of CTAs per image). The cluster kernel must reproduce scope.cu's picks bit for bit (the tests
// compare them), so the formulas, the summation order of the column sums and the block reductions
// exist once, here, templated on the block shape where the two kernels differ.
//
// Included by .cu files only (nvcc, or the CPU emulator's g++ with its CUDA shims).
#pragma once

#include <climits>
#include <cmath>
#include <cstdint>

#include "common.cuh"
#include "kernels.h"

namespace vtprune {
namespace scope_common {

constexpr int kNoIndex = INT_MAX;

// Block shape: kThreads threads; a column tile is kColThreads threads x kColsPerThread columns, and
// kRowGroups groups of kColThreads consecutive threads split the rows. Equal kRowGroups is what
// makes two kernels' column sums add in the same order.
template <int kThreadsT, int kRowGroupsT, int kColsPerThreadT>
struct Tiling {
  static constexpr int kThreads = kThreadsT;
  static constexpr int kWarps = kThreads / kWarpSize;
  static constexpr int kRowGroups = kRowGroupsT;
  static constexpr int kColThreads = kThreads / kRowGroups;
  static constexpr int kColsPerThread = kColsPerThreadT;
  static constexpr int kTileCols = kColThreads * kColsPerThread;

  static_assert(kThreads % kWarpSize == 0 && kWarps <= kWarpSize,
                "the block reductions combine one value per warp in one warp");
  static_assert(kThreads % kRowGroups == 0 && kColThreads % kWarpSize == 0,
                "a row group must be whole warps");
  static_assert(kTileCols <= kThreads, "one thread per column reduces a tile");
};

__host__ __device__ inline int64_t align16(int64_t bytes) { return (bytes + 15) / 16 * 16; }

// The per-block scratch both kernels place first in their dynamic shared memory.
struct BlockScratchLayout {
  int64_t partial;      // float [2][kRowGroups][kTileCols], double-buffered tile partial sums
  int64_t list_u;       // int   [list_cap]  changed rows
  int64_t list_lo;      // float [list_cap]  their old coverage
  int64_t list_hi;      // float [list_cap]  their new coverage
  int64_t red_val;      // float [kWarps]    per-warp best score
  int64_t red_idx;      // int   [kWarps]    per-warp best index
  int64_t red_free;     // int   [kWarps]    per-warp lowest unselected index
  int64_t scan_count;   // int   [kWarps]    per-warp count of changed rows
  int64_t scan_offset;  // int   [kWarps + 1] exclusive prefix of scan_count, then the total
};

struct BlockScratch {
  float* partial;
  int* list_u;
  float* list_lo;
  float* list_hi;
  float* red_val;
  int* red_idx;
  int* red_free;
  int* scan_count;
  int* scan_offset;
};

// Hands out consecutive 16-byte aligned byte offsets. A layout is computed by the host (launch
// size) and again by the device (carving), so both must take the same sizes in the same order.
struct SmemCursor {
  int64_t end = 0;
  __host__ __device__ int64_t take(int64_t bytes) {
    const int64_t here = end;
    end += align16(bytes);
    return here;
  }
};

template <class Tile>
__host__ __device__ inline void take_block_scratch(SmemCursor& at, int64_t list_cap,
                                                   BlockScratchLayout& l) {
  l.partial = at.take(int64_t{2} * Tile::kRowGroups * Tile::kTileCols * 4);
  l.list_u = at.take(list_cap * 4);
  l.list_lo = at.take(list_cap * 4);
  l.list_hi = at.take(list_cap * 4);
  l.red_val = at.take(Tile::kWarps * 4);
  l.red_idx = at.take(Tile::kWarps * 4);
  l.red_free = at.take(Tile::kWarps * 4);
  l.scan_count = at.take(Tile::kWarps * 4);
  l.scan_offset = at.take((Tile::kWarps + 1) * 4);
}

__device__ __forceinline__ void carve_block_scratch(unsigned char* smem,
                                                    const BlockScratchLayout& l, BlockScratch& sh) {
  sh.partial = reinterpret_cast<float*>(smem + l.partial);
  sh.list_u = reinterpret_cast<int*>(smem + l.list_u);
  sh.list_lo = reinterpret_cast<float*>(smem + l.list_lo);
  sh.list_hi = reinterpret_cast<float*>(smem + l.list_hi);
  sh.red_val = reinterpret_cast<float*>(smem + l.red_val);
  sh.red_idx = reinterpret_cast<int*>(smem + l.red_idx);
  sh.red_free = reinterpret_cast<int*>(smem + l.red_free);
  sh.scan_count = reinterpret_cast<int*>(smem + l.scan_count);
  sh.scan_offset = reinterpret_cast<int*>(smem + l.scan_offset);
}

// max(0, s) that keeps NaN (torch's clamp_min(0) does; fmaxf would drop it).
__device__ __forceinline__ float relu_keep_nan(float s) { return s < 0.0f ? 0.0f : s; }

// Whether the launchers can read `w` (ScopeWeights): unit, or data of a known dtype, stride >= 0.
inline bool scope_weights_ok(const ScopeWeights& w) {
  return w.unit || (w.data != nullptr && is_valid_dtype(w.dtype) && w.stride_b >= 0);
}

// Image b's weights w(v) (ScopeWeights): max(s, 0) of its saliency row in the stored dtype, or 1.
struct WeightRow {
  const void* row;
  int dtype;
  bool unit;
  __device__ __forceinline__ float operator()(int v) const {
    if (unit) return 1.0f;
    float s;
    switch (static_cast<DType>(dtype)) {
      case DType::Float16: s = to_float(static_cast<const __half*>(row)[v]); break;
      case DType::BFloat16: s = to_float(static_cast<const __nv_bfloat16*>(row)[v]); break;
      default: s = static_cast<const float*>(row)[v]; break;
    }
    return relu_keep_nan(s);
  }
};

__device__ __forceinline__ WeightRow weight_row(const ScopeWeights& w, int64_t b) {
  if (w.unit) return WeightRow{nullptr, w.dtype, true};  // data may be null: no offset into it
  const int64_t bytes = w.dtype == static_cast<int>(DType::Float32) ? 4 : 2;
  return WeightRow{static_cast<const unsigned char*>(w.data) + b * w.stride_b * bytes, w.dtype, false};
}

// max(0, s - lo) - max(0, s - hi) as min(max(s - lo, 0), hi - lo): exactly 0 when s <= lo.
// A NaN s contributes 0 (fmaxf), as in the Triton kernel.
__device__ __forceinline__ float coverage_drop(float s, float lo, float width) {
  return fminf(fmaxf(s - lo, 0.0f), width);
}

// (score, index) pairs ordered by score, then by the lower index; never holds a NaN score.
__device__ __forceinline__ void merge_best(float& val, int& idx, float other_val, int other_idx) {
  if (other_val > val || (other_val == val && other_idx < idx)) {
    val = other_val;
    idx = other_idx;
  }
}

// Butterfly over the warp: every lane ends with the warp's best (score, index) and lowest free
// index.
__device__ __forceinline__ void warp_reduce_best(float& best, int& best_idx, int& first_free) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) {
    const float other_val = __shfl_xor_sync(kFullMask, best, offset);
    const int other_idx = __shfl_xor_sync(kFullMask, best_idx, offset);
    merge_best(best, best_idx, other_val, other_idx);
    first_free = min(first_free, __shfl_xor_sync(kFullMask, first_free, offset));
  }
}

// Column sums over `rows` rows for the block's columns [0, ncols), one tile at a time:
//   kInit:  gain[v]  = sum_{u < rows} relu_keep_nan(S[u, v]),  open[v] += #{u : S[u, v] > 0}
//   else:   gain[v] -= sum_{j < rows} coverage_drop(S[list_u[j], v], list_lo[j], width_j),
//           open[v] -= #{j : lo_j < S[list_u[j], v] <= hi_j}
// open[v] counts the terms max(0, S[u, v] - c(u)) of gain(v) that are still positive: a row's
// term closes exactly when its coverage rises to S[u, v] or above. The float gain drifts from
// the exact sum by rounding, but open[v] is exact, so a token whose gain is exactly 0 in the
// reference (fully covered: duplicates of picked tokens) is known to be 0 here too, and ties
// at 0 go to the lowest index as SPEC §1 says instead of to rounding residue. The counts are
// added with shared/global atomics after the tile's barrier (integer sums: order-free), so
// open[v] must be zeroed, by any thread, before the pass that starts it (kInit).
// row_of(u) returns row u of S restricted to the block's columns, as a callable v -> float; the
// kernels differ only in where that row lives (global memory, or a slice in shared memory).
// Row group g adds rows j = g, g + kRowGroups, ... in order, then the kRowGroups partial sums of a
// column are added in group order: the order the kernels' bit-for-bit agreement rests on.
// Must be entered by the whole block (after a barrier that published the list); ends with a
// barrier, after which gain is visible to every thread.
template <class Tile, bool kInit, class RowOf>
__device__ void column_pass(int ncols, int rows, const RowOf& row_of, const BlockScratch& sh,
                            float* gain, int* open) {
  constexpr int kColThreads = Tile::kColThreads;
  constexpr int kColsPerThread = Tile::kColsPerThread;
  constexpr int kTileCols = Tile::kTileCols;
  constexpr int kRowGroups = Tile::kRowGroups;
  const int tid = threadIdx.x;
  const int ct = tid % kColThreads;  // column thread inside the tile
  const int rg = tid / kColThreads;  // row group, uniform over each warp
  int parity = 0;
  for (int v0 = 0; v0 < ncols; v0 += kTileCols) {
    float acc[kColsPerThread];
    int delta[kColsPerThread];  // terms opened (kInit) or closed
#pragma unroll
    for (int c = 0; c < kColsPerThread; ++c) {
      acc[c] = 0.0f;
      delta[c] = 0;
    }
    // Loads of consecutive rows are independent; only the adds are ordered.
#pragma unroll 4
    for (int j = rg; j < rows; j += kRowGroups) {
      int u;
      float lo = 0.0f;
      float hi = 0.0f;
      if (kInit) {
        u = j;
      } else {
        u = sh.list_u[j];
        lo = sh.list_lo[j];
        hi = sh.list_hi[j];
      }
      const float width = hi - lo;
      const auto row = row_of(u);
#pragma unroll
      for (int c = 0; c < kColsPerThread; ++c) {
        const int v = v0 + ct + c * kColThreads;
        if (v < ncols) {
          const float s = row(v);
          acc[c] += kInit ? relu_keep_nan(s) : coverage_drop(s, lo, width);
          delta[c] += kInit ? (s > 0.0f) : (s > lo && s <= hi);  // NaN: never open
        }
      }
    }
    // Double buffer: the tile after next rewrites this buffer only after passing the next tile's
    // barrier, which every reader of this buffer reaches after its reads.
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
        gain[v] = kInit ? sum : gain[v] - sum;
      }
    }
    // After the barrier, so that the zeroing of open[] before a kInit pass is done everywhere.
#pragma unroll
    for (int c = 0; c < kColsPerThread; ++c) {
      if (delta[c] != 0) atomicAdd(open + v0 + ct + c * kColThreads, kInit ? delta[c] : -delta[c]);
    }
    parity ^= 1;
  }
  __syncthreads();
}

// Exclusive prefix count of `flag` over the block in thread order; `total` gets the block's count.
// Contains two barriers; the scratch it uses is safe to reuse on the next call (each array is
// written only after a barrier that all its readers of the previous call have passed).
template <class Tile>
__device__ __forceinline__ int block_exclusive_count(bool flag, const BlockScratch& sh,
                                                     int& total) {
  constexpr int kWarps = Tile::kWarps;
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

// The selected columns v < ncols (flags[v] set) in ascending order, as image indices c0 + v,
// written to out[base], out[base + 1], ...: the sorted output without a sort (the flags already
// hold the selection). Entered by the whole block after a barrier that published the flags; two
// barriers per chunk of kThreads columns, and one at the end.
template <class Tile>
__device__ void write_selected_ascending(const unsigned char* flags, int ncols, int c0, int base,
                                         int64_t* __restrict__ out, const BlockScratch& sh) {
  for (int v0 = 0; v0 < ncols; v0 += Tile::kThreads) {
    const int v = v0 + static_cast<int>(threadIdx.x);
    const bool selected = v < ncols && flags[v] != 0;
    int total = 0;
    const int pos = base + block_exclusive_count<Tile>(selected, sh, total);
    if (selected) out[pos] = c0 + v;
    base += total;
  }
  __syncthreads();  // the flags may be rewritten (next image) by other threads only after this
}

// The block's best score gain * w (or + w), gain = max(gain, 0) or 0 without open terms, its
// lowest index and the lowest unselected index, over the unselected columns [0, ncols) whose
// image index is c0 + v (SPEC §1's tie rule; a NaN score never wins). Afterwards thread 0 holds
// the block's triple. One barrier.
template <class Tile>
__device__ __forceinline__ void block_best(const WeightRow& w_b, const float* gain, const int* open,
                                           const unsigned char* flags, int c0, int ncols, bool mul,
                                           const BlockScratch& sh, float& best, int& best_idx,
                                           int& first_free) {
  constexpr int kWarps = Tile::kWarps;
  const int tid = threadIdx.x;
  const int lane = tid % kWarpSize;
  const int warp = tid / kWarpSize;
  best = -INFINITY;
  best_idx = kNoIndex;
  first_free = kNoIndex;
  // v ascends per thread: a strict '>' keeps the lowest index among equal scores.
  for (int v = tid; v < ncols; v += Tile::kThreads) {
    if (flags[v]) continue;
    if (first_free == kNoIndex) first_free = c0 + v;
    float g = gain[v];
    // The exact gain is >= 0, and exactly 0 when no term is open (column_pass); the drift of the
    // incremental sums must change neither. NaN stays NaN and then never wins the '>'.
    if (g < 0.0f || (open[v] == 0 && g == g)) g = 0.0f;
    const float w = w_b(c0 + v);
    const float score = mul ? g * w : g + w;
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
  }
}

// One chunk of the coverage update for pick t: the rows u = u0 + threadIdx.x < length with
// S[u, t] > cov[u] are appended to the list in ascending order from position `count` with their
// old and new coverage, and cov[u] is raised. Returns how many were appended (block-uniform).
// Two barriers (block_exclusive_count).
template <class Tile, typename T>
__device__ __forceinline__ int list_raised_rows(const T* __restrict__ s_b, int64_t n, int length,
                                                int t, int u0, int count, float* cov,
                                                const BlockScratch& sh) {
  const int u = u0 + threadIdx.x;
  float col = 0.0f;
  float lo = 0.0f;
  bool changed = false;
  if (u < length) {
    col = to_float(s_b[static_cast<int64_t>(u) * n + t]);  // S[u, t]: the column
    lo = cov[u];
    changed = col > lo;  // NaN never raises the coverage
  }
  int total = 0;
  const int pos = count + block_exclusive_count<Tile>(changed, sh, total);
  if (changed) {
    sh.list_u[pos] = u;
    sh.list_lo[pos] = lo;
    sh.list_hi[pos] = col;
    cov[u] = col;  // row u is read and written by this thread only in this phase
  }
  return total;
}

}  // namespace scope_common
}  // namespace vtprune
