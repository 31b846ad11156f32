// HoloV (SPEC §2) for a whole batch in two launches, plus its two building blocks on their own.
//
// Launch 1, holov_row_stats_kernel: one block per (image, crop, tile of 64 rows of the crop).
//   The block walks the crop's columns in tiles of 64 and, per column tile, the feature dim in
//   chunks: the raw Gram tile x_i . x_j is accumulated in fp32 (16-bit inputs on tensor cores via
//   WMMA 16x16x16, fp32 inputs with plain FMAs, never TF32), and the squared norms of the row and
//   column tokens are summed from the same shared-memory chunks, so every token is read once per
//   tile pair and no normalized copy is written. The epilogue scales the tile to
//   S_ij = x_i.x_j / ((|x_i| + 1e-6)(|x_j| + 1e-6)), zeroes the diagonal and folds the tile into
//   per-row running statistics. The variance must not come from sum(S^2) - n mean^2 (that cancels
//   when the similarities are large and alike), so each tile is reduced two-pass (tile mean, then
//   squared deviations from it) and tiles are merged with Chan's pairwise formula; SPEC's variance
//   (centred on sum/(M-1), not on the true mean, and summed over j = i where S_ii = 0) follows
//   exactly from the merged count, mean and M2. Output: var_i for every token of every crop with
//   M >= 2, in a [B, N] fp32 workspace.
// Launch 2, holov_finish_kernel: one block per image. Per crop (a warp each): gamma_c, h_i (written
//   over var_i) and score_c; the weights w_c; the budgets (crop_budgets below); the per-crop top-k
//   (crop_topk below). Everything after the Gram is O(N) or O(C^2 + sum_c M_c * q_c) per image,
//   small next to launch 1.
// crop_budgets_kernel and crop_topk_kernel run the two last stages alone for the public ops.
//
// Budgets follow the reference's loops exactly, in closed form: floors in double precision of the
// fp32 weights (NaN and negative weights count 0, a sum above 1 + 1e-6 is rescaled), the leftover
// handed +1 per present crop in descending weight (ties: lowest crop, NaN last), cycling; then the
// capacity cut, handed +1 per crop with room in the same order, cycling: t full rounds give each
// crop min(spare, t), t the largest with sum_c min(spare_c, t) <= surplus (a binary search of block
// reductions), and the rest goes +1 to the first crops in order that still have room.
//
// Top-k: a token's rank in its crop is the number of crop tokens before it in (key descending,
// index ascending) order, NaN keys counting as -inf; it is kept if rank < q_c. Unsorted output puts
// it at offset_c + rank (crops in order, descending key inside); sorted output compacts the kept
// tokens in index order with a block scan. The count stops at q_c, so a token that is not kept
// costs at most q_c comparisons past the ones before it.
//
// Nothing here allocates: the caller passes a workspace of *_workspace_bytes() bytes (a torch
// tensor), so every call can be captured in a CUDA graph. Invalid values that the Python side
// rejects in eager mode (lengths outside [0, N], budgets outside [0, size], sizes summing above N)
// are clamped so that nothing is read or written out of bounds; output slots that such input leaves
// unfilled are set to 0, as the torch backend does.

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>

#include "common.cuh"
#include "gram_tile.cuh"
#include "kernels.h"

namespace vtprune {
namespace {

constexpr float kHolovEps = 1e-6f;  // SPEC §2: f = x / (|x| + 1e-6), gamma's 1e-6, w's 1e-6
constexpr int64_t kMaxGrid = 1 << 30;
constexpr int64_t kAlign = 256;  // byte alignment of every workspace section

// std::min/max are host-only constexpr functions; these work on both sides.
template <typename V>
__host__ __device__ __forceinline__ V vmin(V a, V b) {
  return b < a ? b : a;
}
template <typename V>
__host__ __device__ __forceinline__ V vmax(V a, V b) {
  return a < b ? b : a;
}

// ----------------------------------------------------------------------------- crop layout

// Crops of one image, shared by both launches so that they always agree: SPEC §2's default count
// min(n, max(1, 1024 n // (576 k))) unless num_crops > 0, clamped to max_crops (what the workspace
// was sized for).
__host__ __device__ inline int64_t default_crops(int64_t n, int64_t k) {
  const int64_t c = (1024 * n) / (576 * (k > 0 ? k : 1));
  return vmin(n, vmax<int64_t>(c, 1));
}

__host__ __device__ inline int64_t crop_count(int64_t nb, int64_t k, int64_t num_crops,
                                              int64_t max_crops) {
  const int64_t c = num_crops > 0 ? num_crops : default_crops(nb, k);
  return vmin(vmax<int64_t>(c, 0), max_crops);
}

struct CropSpan {
  int64_t start;
  int64_t size;
};

// n // C tokens per crop, the first n % C crops one larger.
__host__ __device__ inline CropSpan crop_span(int64_t nb, int64_t crops, int64_t c) {
  const int64_t base = nb / crops;
  const int64_t extra = nb % crops;
  return {c * base + vmin(c, extra), base + (c < extra ? 1 : 0)};
}

__device__ inline int64_t valid_length(const int64_t* lengths, int64_t b, int64_t N) {
  if (lengths == nullptr) return N;
  return vmin(vmax(lengths[b], int64_t{0}), N);
}

// Largest crop any image can have: sizes the row-tile axis of launch 1 without reading lengths.
// Without lengths, or with a fixed count, ceil(N / C) (crop sizes only grow with the length). With
// lengths and the default count: if floor(x) <= 1, x = 1024 nb / (576 k), the image is one crop of
// nb < 2 * 576 k / 1024 tokens; otherwise C = min(nb, floor(x)) with floor(x) > x - 1 >= x / 2, so
// nb / C <= 2 nb / x = 1152 k / 1024. Either way M <= ceil(1152 k / 1024) (+1 kept as a margin:
// an overestimate only adds blocks that exit at once).
int64_t max_crop_size(int64_t N, int64_t k, int64_t num_crops, bool has_lengths) {
  if (num_crops > 0 || !has_lengths) {
    const int64_t crops = num_crops > 0 ? num_crops : default_crops(N, k);
    return (N + crops - 1) / crops;
  }
  return std::min(N, (1152 * k + 1023) / 1024 + 1);
}

// ----------------------------------------------------------------------------- workspace

// Byte offsets of the workspace sections; the same function sizes the buffer and carves it.
struct HolovLayout {
  int64_t h, weight, start, size, pos, order, budget, total;
};

int64_t align_up(int64_t v) { return (v + kAlign - 1) / kAlign * kAlign; }

HolovLayout holov_layout(int64_t B, int64_t N, int64_t C) {
  HolovLayout l{};
  int64_t at = 0;
  auto take = [&](int64_t bytes) {
    const int64_t here = at;
    at += align_up(bytes);
    return here;
  };
  l.h = take(B * N * 4);
  l.weight = take(B * C * 4);
  l.start = take(B * C * 4);
  l.size = take(B * C * 4);
  l.pos = take(B * C * 4);
  l.order = take(B * C * 4);
  l.budget = take(B * C * 8);
  l.total = at;
  return l;
}

// crop_budgets needs pos and order; crop_topk start, size, pos and order ([B, C] int32 each).
// Never 0 bytes, so the caller's buffer always has a real address.
int64_t int32_sections_bytes(int64_t B, int64_t C, int sections) {
  return std::max(sections * align_up(B * C * 4), kAlign);
}

template <typename P>
P* section(void* base, int64_t offset) {
  return reinterpret_cast<P*>(static_cast<unsigned char*>(base) + offset);
}

// The i-th [B, C] int32 section of an int32_sections_bytes workspace.
int* int32_section(void* workspace, int64_t B, int64_t C, int i) {
  return section<int>(workspace, i * align_up(B * C * 4));
}

// ----------------------------------------------------------------------------- launch 1: Gram statistics

// The Gram tile (gram_begin, gram_chunk, quad_sum, kTile, ...) is csrc/gram_tile.cuh.
using namespace gram;

// Running count, mean and sum of squared deviations of one row's similarities, merged tile by tile
// (Chan et al.), which stays accurate where sum(S^2) - n mean^2 would cancel.
struct RowMoments {
  float n = 0.0f, mean = 0.0f, m2 = 0.0f;

  __device__ __forceinline__ void merge(float tn, float tmean, float tm2) {
    const float total = n + tn;
    const float delta = tmean - mean;
    mean += delta * (tn / total);
    m2 += tm2 + delta * delta * (n * tn / total);
    n = total;
  }

  // SPEC §2: var_i = sum_j (S_ij - mean_i)^2 / (M - 1) with mean_i = sum_j S_ij / (M - 1), the sum
  // over all M columns. With mu = sum/M (our mean): sum_j (S_ij - mean_i)^2 = M2 + M (mu - mean_i)^2
  // and mu - mean_i = -mu / (M - 1); both terms are >= 0, so nothing cancels.
  __device__ __forceinline__ float spec_variance(int64_t m) const {
    const float mf = static_cast<float>(m);
    const float shift = mean / (mf - 1.0f);
    return (m2 + mf * shift * shift) / (mf - 1.0f);
  }
};

template <typename T, bool kVec>
__global__ void __launch_bounds__(kGramThreads, 2)
holov_row_stats_kernel(const T* __restrict__ tokens, int64_t B, int64_t N, int64_t D, int64_t stride_b,
                       int64_t stride_n, const int64_t* __restrict__ lengths, int64_t k, int64_t num_crops,
                       int64_t max_crops, int64_t row_tiles, float* __restrict__ var_out) {
  using Cfg = GramCfg<T>;
  __shared__ __align__(128) T a_s[kTile][Cfg::kLd];
  __shared__ __align__(128) T b_s[kTile][Cfg::kLd];
  __shared__ __align__(128) float c_s[kTile][kCsLd];
  __shared__ float row_inv[kTile];
  __shared__ float col_inv[kTile];

  // Epilogue and norm layout: four adjacent threads per tile row (or column, for the norms).
  const int row = threadIdx.x / 4;
  const int quarter = threadIdx.x % 4;
  const int64_t per_image = max_crops * row_tiles;
  const int64_t items = B * per_image;

  // Everything that decides a `continue` or a loop bound below depends on the item only, so it is
  // uniform over the block and every thread reaches every __syncthreads.
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    const int64_t b = item / per_image;
    const int64_t c = (item % per_image) / row_tiles;
    const int64_t t = item % row_tiles;
    const int64_t nb = valid_length(lengths, b, N);
    const int64_t crops = crop_count(nb, k, num_crops, max_crops);
    if (c >= crops) continue;
    const CropSpan span = crop_span(nb, crops, c);
    const int64_t m = span.size;
    const int64_t row0 = t * kTile;
    if (m < 2 || row0 >= m) continue;  // one-token crops are finished in launch 2

    const int rows_valid = static_cast<int>(vmin<int64_t>(kTile, m - row0));
    const T* crop_base = tokens + b * stride_b + span.start * stride_n;
    const T* row_base = crop_base + row0 * stride_n;
    RowMoments moments;

    const int64_t col_tiles = (m + kTile - 1) / kTile;
    for (int64_t jt = 0; jt < col_tiles; ++jt) {
      const int64_t col0 = jt * kTile;
      const int cols_valid = static_cast<int>(vmin<int64_t>(kTile, m - col0));
      const T* col_base = crop_base + col0 * stride_n;
      // On the diagonal tile the column tokens are the row tokens: read them once.
      const bool same = jt == t;
      const bool first = jt == 0;  // the row norms are summed during the first column tile

      typename TileAccumulator<T>::type acc;
      TileSumsq ss;
      ChunkStage<T, kVec> stage_a, stage_b;
      gram_begin(acc, stage_a, stage_b, row_base, rows_valid, col_base, cols_valid, same, stride_n, D);
      for (int64_t d0 = 0; d0 < D; d0 += Cfg::kK) {
        gram_chunk(acc, ss, stage_a, stage_b, a_s, b_s, row_base, rows_valid, col_base, cols_valid, same, stride_n,
                   d0, D, row, quarter, /*row_norms=*/first);
      }
      acc.store(c_s);
      const float col_ss = quad_sum(ss.col);
      if (quarter == 0) col_inv[row] = 1.0f / (sqrtf(col_ss) + kHolovEps);
      if (first) {
        const float row_ss = quad_sum(ss.row);
        if (quarter == 0) row_inv[row] = 1.0f / (sqrtf(row_ss) + kHolovEps);
      }
      __syncthreads();

      // Tile epilogue: thread (row, quarter) takes columns quarter + 4u (conflict-free in c_s).
      const int64_t i = row0 + row;
      const float inv_i = row_inv[row];
      float s[kTile / 4];
      float tsum = 0.0f;
#pragma unroll
      for (int u = 0; u < kTile / 4; ++u) {
        const int jl = quarter + 4 * u;
        float v = 0.0f;
        if (jl < cols_valid && col0 + jl != i) v = c_s[row][jl] * inv_i * col_inv[jl];
        s[u] = v;
        tsum += v;  // invalid columns add an exact 0
      }
      const float tn = static_cast<float>(cols_valid);
      const float tmean = quad_sum(tsum) / tn;
      float tm2 = 0.0f;
#pragma unroll
      for (int u = 0; u < kTile / 4; ++u) {
        const float dev = s[u] - tmean;
        if (quarter + 4 * u < cols_valid) tm2 = fmaf(dev, dev, tm2);
      }
      moments.merge(tn, tmean, quad_sum(tm2));
      __syncthreads();  // c_s, col_inv are rewritten by the next column tile
    }
    if (quarter == 0 && row < rows_valid) {
      var_out[b * N + span.start + row0 + row] = moments.spec_variance(m);
    }
  }
}

// ----------------------------------------------------------------------------- block helpers (launch 2)

constexpr int kFinishThreads = 512;
constexpr int kFinishWarps = kFinishThreads / kWarpSize;

// Scratch for the block reductions: one 8-byte slot per warp.
struct BlockScratch {
  alignas(8) unsigned char raw[kFinishWarps * 8];
  template <typename V>
  __device__ __forceinline__ V* as() {
    return reinterpret_cast<V*>(raw);
  }
};

template <typename V>
__device__ __forceinline__ V warp_total(V v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

// Block-wide sum, returned to every thread; a fixed combination order, so it is deterministic.
template <typename V>
__device__ V block_sum(V v, BlockScratch& scratch) {
  V* slot = scratch.as<V>();
  v = warp_total(v);
  if (threadIdx.x % kWarpSize == 0) slot[threadIdx.x / kWarpSize] = v;
  __syncthreads();
  V total = V(0);
#pragma unroll
  for (int w = 0; w < kFinishWarps; ++w) total += slot[w];
  __syncthreads();  // the slots are free again
  return total;
}

__device__ long long block_max(long long v, BlockScratch& scratch) {
  long long* slot = scratch.as<long long>();
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) {
    v = vmax(v, __shfl_xor_sync(kFullMask, v, offset));
  }
  if (threadIdx.x % kWarpSize == 0) slot[threadIdx.x / kWarpSize] = v;
  __syncthreads();
  long long best = slot[0];
#pragma unroll
  for (int w = 1; w < kFinishWarps; ++w) best = vmax(best, slot[w]);
  __syncthreads();
  return best;
}

// Exclusive prefix sum over the block in thread order; *total gets the block's sum.
__device__ long long block_exclusive_scan(long long v, BlockScratch& scratch, long long* total) {
  long long* slot = scratch.as<long long>();
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  long long x = v;
#pragma unroll
  for (int offset = 1; offset < kWarpSize; offset <<= 1) {
    const long long y = __shfl_up_sync(kFullMask, x, offset);
    if (lane >= offset) x += y;
  }
  if (lane == kWarpSize - 1) slot[warp] = x;
  __syncthreads();
  long long before = 0, sum = 0;
#pragma unroll
  for (int w = 0; w < kFinishWarps; ++w) {
    const long long s = slot[w];
    before += w < warp ? s : 0;
    sum += s;
  }
  __syncthreads();
  *total = sum;
  return before + x - v;
}

// ----------------------------------------------------------------------------- budgets

// Hand-out order: descending weight, NaN after every number, ties to the lowest crop.
__device__ __forceinline__ bool hands_out_before(float w2, int c2, float w1, int c1) {
  const bool nan2 = isnan(w2), nan1 = isnan(w1);
  if (nan2 != nan1) return nan1;
  if (nan2) return c2 < c1;
  return w2 > w1 || (w2 == w1 && c2 < c1);
}

// The weight a floor is taken of: clamped at 0, NaN as 0 (in double, as the reference's floats).
__device__ __forceinline__ double floor_weight(float w) {
  return isnan(w) ? 0.0 : vmax(static_cast<double>(w), 0.0);
}

// Capacities are clamped to [0, k]: no crop ever receives more than k, so a larger capacity
// never binds, and everything stays far from overflow.
template <typename CapT>
__device__ __forceinline__ long long capacity_at(const CapT* cap, int c, long long k) {
  return vmin(vmax(static_cast<long long>(cap[c]), 0LL), k);
}

// Budgets of one image (SPEC §2 with the capacity rule, docs/semantics.md) into q[0, C). pos/order
// are int32 scratch of C entries. Ends with the block synchronized and q visible to every thread.
template <typename CapT>
__device__ void budgets_block(const float* w, const CapT* cap, int C, long long k, int64_t* q, int* pos,
                              int* order, BlockScratch& scratch) {
  // Hand-out position of every present crop (capacity > 0) among the present crops. Counting is
  // O(C^2 / threads): nothing for the usual tens of crops, and still small for C = N.
  long long present_here = 0;
  for (int c = threadIdx.x; c < C; c += blockDim.x) {
    int p = -1;
    if (capacity_at(cap, c, k) > 0) {
      const float wc = w[c];
      p = 0;
      for (int c2 = 0; c2 < C; ++c2) {
        p += (capacity_at(cap, c2, k) > 0 && hands_out_before(w[c2], c2, wc, c)) ? 1 : 0;
      }
      order[p] = c;
      ++present_here;
    }
    pos[c] = p;
  }
  const long long present = block_sum(present_here, scratch);

  // Floors of the clamped weights, rescaled when they sum above 1 (with the reference's slack).
  double wsum_here = 0.0;
  for (int c = threadIdx.x; c < C; c += blockDim.x) {
    if (pos[c] >= 0) wsum_here += floor_weight(w[c]);
  }
  const double wsum = block_sum(wsum_here, scratch);
  const double scale = wsum > 1.0 + 1e-6 ? 1.0 / wsum : 1.0;
  long long qsum_here = 0;
  for (int c = threadIdx.x; c < C; c += blockDim.x) {
    long long qc = 0;
    if (pos[c] >= 0) {
      const double x = floor(floor_weight(w[c]) * scale * static_cast<double>(k));
      qc = x >= 0.0 ? static_cast<long long>(vmin(x, static_cast<double>(k))) : 0;  // NaN: 0
    }
    q[c] = qc;
    qsum_here += qc;
  }
  const long long leftover = vmax(k - block_sum(qsum_here, scratch), 0LL);

  // The leftover, +1 per present crop in hand-out order, cycling; then the cap at capacity. Each
  // thread touches only its own crops here, so no barrier is needed until the next reduction.
  long long surplus_here = 0, spare_max_here = 0;
  for (int c = threadIdx.x; c < C; c += blockDim.x) {
    const int p = pos[c];
    if (p < 0) continue;
    long long qc = q[c];
    if (leftover > 0) qc += leftover / present + (p < leftover % present ? 1 : 0);
    const long long capc = capacity_at(cap, c, k);
    surplus_here += vmax(qc - capc, 0LL);
    qc = vmin(qc, capc);
    q[c] = qc;
    spare_max_here = vmax(spare_max_here, capc - qc);
  }
  const long long surplus = block_sum(surplus_here, scratch);
  if (surplus > 0) {  // uniform: a block-wide value
    // t full rounds of the capacity hand-out give each crop min(spare, t): the largest t with
    // sum_c min(spare_c, t) <= surplus.
    long long lo = 0, hi = block_max(spare_max_here, scratch);
    while (lo < hi) {
      const long long mid = lo + (hi - lo + 1) / 2;
      long long given_here = 0;
      for (int c = threadIdx.x; c < C; c += blockDim.x) {
        if (pos[c] >= 0) given_here += vmin(capacity_at(cap, c, k) - q[c], mid);
      }
      if (block_sum(given_here, scratch) <= surplus) {
        lo = mid;
      } else {
        hi = mid - 1;
      }
    }
    const long long rounds = lo;
    long long given_here = 0;
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
      if (pos[c] >= 0) given_here += vmin(capacity_at(cap, c, k) - q[c], rounds);
    }
    const long long rest = surplus - block_sum(given_here, scratch);
    // The rest, +1 to the first crops in hand-out order that still have room after those rounds.
    // Each present crop appears once in `order`, so the thread at its position alone updates it.
    long long seats = 0;
    for (long long base = 0; base < present; base += blockDim.x) {
      const long long p = base + threadIdx.x;
      const int c = p < present ? order[p] : -1;
      long long spare = 0;
      if (c >= 0) spare = capacity_at(cap, c, k) - q[c];
      const bool room = spare > rounds;
      long long chunk = 0;
      const long long seat = seats + block_exclusive_scan(room ? 1 : 0, scratch, &chunk);
      if (c >= 0) q[c] += vmin(spare, rounds) + ((room && seat < rest) ? 1 : 0);
      seats += chunk;
    }
  }
  __syncthreads();
}

// ----------------------------------------------------------------------------- top-k in crops

__device__ __forceinline__ float rank_key(float v) { return isnan(v) ? -INFINITY : v; }

// Last crop whose start is <= i. Crops are contiguous from 0, so it is i's crop whenever
// i < start[C-1] + size[C-1] (a zero-size crop shares its start with the next one).
__device__ __forceinline__ int crop_of(const int* start, int C, int i) {
  int lo = 0, hi = C - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (start[mid] <= i) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

// Tokens of [s0, s0 + m) that come before token i (key descending, index ascending), counted up
// to `limit`: past it the exact rank does not matter.
__device__ __forceinline__ int rank_in_crop(const float* keys, int s0, int m, int i, int limit) {
  const float ki = rank_key(keys[i]);
  int r = 0;
  for (int j = s0; j < s0 + m; ++j) {
    const float kj = rank_key(keys[j]);
    r += (kj > ki || (kj == ki && j < i)) ? 1 : 0;
    if (r >= limit) break;
  }
  return r;
}

// Top q[c] tokens of each contiguous crop (start/size, C crops from token 0) by keys, into out[0, k).
// qeff/off are int32 scratch of C entries. Budgets are clamped to [0, size]; slots left empty by
// budgets that do not sum to k (rejected in eager mode) are 0.
__device__ void topk_block(const float* keys, const int* start, const int* size, const int64_t* q, int C,
                           long long k, bool sorted, int* qeff, int* off, int64_t* out,
                           BlockScratch& scratch) {
  long long placed = 0;
  for (long long base = 0; base < C; base += blockDim.x) {
    const long long c = base + threadIdx.x;
    long long qc = 0;
    if (c < C) qc = vmin(vmax(static_cast<long long>(q[c]), 0LL), static_cast<long long>(size[c]));
    long long chunk = 0;
    const long long before = placed + block_exclusive_scan(qc, scratch, &chunk);
    if (c < C) {
      qeff[c] = static_cast<int>(qc);
      off[c] = static_cast<int>(vmin(before, k));  // positions at or past k are dropped below
    }
    placed += chunk;
  }
  for (long long p = vmin(placed, k) + threadIdx.x; p < k; p += blockDim.x) out[p] = 0;
  __syncthreads();  // qeff/off visible to all

  const int n_end = C > 0 ? start[C - 1] + size[C - 1] : 0;
  long long kept = 0;
  for (int base = 0; base < n_end; base += blockDim.x) {  // uniform trip count
    const int i = base + static_cast<int>(threadIdx.x);
    bool keep = false;
    long long p = 0;
    if (i < n_end) {
      const int c = crop_of(start, C, i);
      const int qc = qeff[c];
      if (qc > 0) {
        const int r = rank_in_crop(keys, start[c], size[c], i, qc);
        keep = r < qc;
        p = static_cast<long long>(off[c]) + r;
      }
    }
    if (sorted) {  // kept tokens in index order: compact with a scan
      long long chunk = 0;
      p = kept + block_exclusive_scan(keep ? 1 : 0, scratch, &chunk);
      kept += chunk;
    }
    if (keep && p < k) out[p] = i;
  }
}

// ----------------------------------------------------------------------------- launch 2 and the two ops

__global__ void __launch_bounds__(kFinishThreads)
holov_finish_kernel(const float* __restrict__ attn, const int64_t* __restrict__ lengths, int64_t B, int64_t N,
                    int64_t k, int64_t num_crops, int64_t max_crops, float alpha, bool rank_by_score,
                    bool sorted, float* h_ws, float* weight_ws, int* start_ws, int* size_ws, int* pos_ws,
                    int* order_ws, int64_t* budget_ws, int64_t* out) {
  __shared__ BlockScratch scratch;
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  for (int64_t b = blockIdx.x; b < B; b += gridDim.x) {
    const int64_t nb = valid_length(lengths, b, N);
    const int C = static_cast<int>(crop_count(nb, k, num_crops, max_crops));
    const float* a = attn + b * N;
    float* h = h_ws + b * N;  // var_i from launch 1, overwritten with h_i
    float* w = weight_ws + b * max_crops;
    int* start = start_ws + b * max_crops;
    int* size = size_ws + b * max_crops;
    int* pos = pos_ws + b * max_crops;
    int* order = order_ws + b * max_crops;
    int64_t* q = budget_ws + b * max_crops;

    // Crop statistics, a warp per crop. The float operations mirror the reference's order
    // (a = 1000 attn; gamma = mean|a| / (mean|var| + 1e-6); h = a + (alpha gamma) var) with
    // explicit roundings so no FMA contraction changes h.
    for (int c = warp; c < C; c += kFinishWarps) {
      const CropSpan span = crop_span(nb, C, c);
      const int s0 = static_cast<int>(span.start);
      const int m = static_cast<int>(span.size);
      float score = 0.0f;  // a crop without tokens (only with num_crops > length) weighs nothing
      if (m == 1) {
        score = a[s0];  // SPEC §2: the mean attention, without the factor 1000
        if (lane == 0) h[s0] = __fmul_rn(1000.0f, a[s0]);
      } else if (m >= 2) {
        float sum_a = 0.0f, sum_var = 0.0f;
        for (int j = lane; j < m; j += kWarpSize) {
          sum_a += fabsf(__fmul_rn(1000.0f, a[s0 + j]));
          sum_var += fabsf(h[s0 + j]);
        }
        const float mf = static_cast<float>(m);
        const float gamma = (warp_total(sum_a) / mf) / (warp_total(sum_var) / mf + kHolovEps);
        const float alpha_gamma = __fmul_rn(alpha, gamma);
        float sum_h = 0.0f;
        for (int j = lane; j < m; j += kWarpSize) {  // the same lane read this var_i above
          const float hj = __fadd_rn(__fmul_rn(1000.0f, a[s0 + j]), __fmul_rn(alpha_gamma, h[s0 + j]));
          h[s0 + j] = hj;
          sum_h += hj;
        }
        score = warp_total(sum_h) / mf;
      }
      if (lane == 0) {
        start[c] = s0;
        size[c] = m;
        w[c] = score;
      }
    }
    __syncthreads();

    // w_c = score_c / (sum_c score_c + 1e-6)
    float total_here = 0.0f;
    for (int c = threadIdx.x; c < C; c += blockDim.x) total_here += w[c];
    const float denom = block_sum(total_here, scratch) + kHolovEps;
    for (int c = threadIdx.x; c < C; c += blockDim.x) w[c] = w[c] / denom;
    __syncthreads();

    budgets_block(w, size, C, k, q, pos, order, scratch);
    // pos/order are free again: reused as the top-k's offsets and clamped budgets.
    topk_block(rank_by_score ? h : a, start, size, q, C, k, sorted, order, pos, out + b * k, scratch);
    __syncthreads();  // before the next image reuses the scratch
  }
}

__global__ void __launch_bounds__(kFinishThreads)
crop_budgets_kernel(const float* __restrict__ weights, const int64_t* __restrict__ capacity, int64_t B,
                    int64_t C, int64_t k, int* pos_ws, int* order_ws, int64_t* out) {
  __shared__ BlockScratch scratch;
  for (int64_t b = blockIdx.x; b < B; b += gridDim.x) {
    budgets_block(weights + b * C, capacity + b * C, static_cast<int>(C), k, out + b * C, pos_ws + b * C,
                  order_ws + b * C, scratch);
  }
}

__global__ void __launch_bounds__(kFinishThreads)
crop_topk_kernel(const float* __restrict__ scores, int64_t B, int64_t N, const int64_t* __restrict__ sizes,
                 const int64_t* __restrict__ budgets, int64_t C, int64_t k, bool sorted, int* start_ws,
                 int* size_ws, int* qeff_ws, int* off_ws, int64_t* out) {
  __shared__ BlockScratch scratch;
  for (int64_t b = blockIdx.x; b < B; b += gridDim.x) {
    int* start = start_ws + b * C;
    int* size = size_ws + b * C;
    // Crop starts by a scan of the sizes, clamped into [0, N] so the crops stay contiguous and in
    // bounds whatever the sizes are.
    long long carry = 0;
    for (long long base = 0; base < C; base += blockDim.x) {
      const long long c = base + threadIdx.x;
      long long sz = 0;
      if (c < C) sz = vmin(vmax(static_cast<long long>(sizes[b * C + c]), 0LL), static_cast<long long>(N));
      long long chunk = 0;
      const long long before = carry + block_exclusive_scan(sz, scratch, &chunk);
      if (c < C) {
        const long long s = vmin(before, static_cast<long long>(N));
        start[c] = static_cast<int>(s);
        size[c] = static_cast<int>(vmin(sz, static_cast<long long>(N) - s));
      }
      carry = vmin(carry + chunk, static_cast<long long>(N));  // stays small; starts clamp at N anyway
    }
    __syncthreads();
    topk_block(scores + b * N, start, size, budgets + b * C, static_cast<int>(C), k, sorted, qeff_ws + b * C,
               off_ws + b * C, out + b * k, scratch);
    __syncthreads();
  }
}

template <typename T, bool kVec>
cudaError_t launch_row_stats(const void* tokens, int64_t B, int64_t N, int64_t D, int64_t stride_b,
                             int64_t stride_n, const int64_t* lengths, int64_t k, int64_t num_crops,
                             int64_t max_crops, int64_t row_tiles, float* var_out, cudaStream_t stream) {
  const int64_t items = B * max_crops * row_tiles;
  const dim3 grid(static_cast<unsigned>(vmin(items, kMaxGrid)));
  holov_row_stats_kernel<T, kVec><<<grid, kGramThreads, 0, stream>>>(
      static_cast<const T*>(tokens), B, N, D, stride_b, stride_n, lengths, k, num_crops, max_crops, row_tiles,
      var_out);
  return cudaGetLastError();
}

bool fits_int32(int64_t v) { return v >= 0 && v <= INT_MAX; }

// One block per image (the finish kernels stride over images past the grid).
dim3 image_grid(int64_t B) { return dim3(static_cast<unsigned>(std::min(B, kMaxGrid))); }

// Makes out's device current while `guard` lives, and drops a stale, non-sticky error left by an
// earlier call so that the launch's cudaGetLastError speaks of this launch only.
cudaError_t enter_device(DeviceGuard& guard, const void* out) {
  VTPRUNE_CUDA_TRY(guard.set_from_pointer(out));
  (void)cudaGetLastError();
  return cudaSuccess;
}

}  // namespace

int64_t holov_max_crops(int64_t N, int64_t k, int64_t num_crops) {
  return num_crops > 0 ? num_crops : default_crops(N, k);
}

int64_t holov_select_workspace_bytes(int64_t B, int64_t N, int64_t k, int64_t num_crops) {
  if (B < 0 || N < 0) return -1;
  return holov_layout(B, N, holov_max_crops(N, k, num_crops)).total;
}

int64_t crop_budgets_workspace_bytes(int64_t B, int64_t C) {
  if (B < 0 || C < 0) return -1;
  return int32_sections_bytes(B, C, 2);
}

int64_t crop_topk_workspace_bytes(int64_t B, int64_t C) {
  if (B < 0 || C < 0) return -1;
  return int32_sections_bytes(B, C, 4);
}

cudaError_t launch_holov_select(const void* tokens, int dtype, int64_t B, int64_t N, int64_t D, int64_t stride_b,
                                int64_t stride_n, const float* attn, const int64_t* lengths, int64_t k,
                                int64_t num_crops, float alpha, bool rank_by_score, bool sorted, void* workspace,
                                int64_t workspace_bytes, int64_t* out, cudaStream_t stream) {
  if (!is_valid_dtype(dtype) || B < 0 || !fits_int32(N) || D < 0 || stride_b < 0 || stride_n < 0 || k < 1 ||
      k > N || num_crops < 0 || num_crops > N) {
    return cudaErrorInvalidValue;
  }
  if (B == 0) return cudaSuccess;
  const int64_t max_crops = holov_max_crops(N, k, num_crops);
  const HolovLayout layout = holov_layout(B, N, max_crops);
  if ((D > 0 && tokens == nullptr) || attn == nullptr || out == nullptr || workspace == nullptr ||
      workspace_bytes < layout.total) {
    return cudaErrorInvalidValue;
  }

  DeviceGuard guard;
  VTPRUNE_CUDA_TRY(enter_device(guard, out));

  float* h = section<float>(workspace, layout.h);
  const int64_t row_tiles = (max_crop_size(N, k, num_crops, lengths != nullptr) + kTile - 1) / kTile;
  if (row_tiles > 0) {
    const cudaError_t err = dispatch_dtype(dtype, [&](auto tag) -> cudaError_t {
      using T = decltype(tag);
      constexpr int vec = GramCfg<T>::kVec;
      const bool aligned = D % vec == 0 && stride_n % vec == 0 && stride_b % vec == 0 &&
                           reinterpret_cast<std::uintptr_t>(tokens) % 16 == 0;
      return aligned ? launch_row_stats<T, true>(tokens, B, N, D, stride_b, stride_n, lengths, k, num_crops,
                                                 max_crops, row_tiles, h, stream)
                     : launch_row_stats<T, false>(tokens, B, N, D, stride_b, stride_n, lengths, k, num_crops,
                                                  max_crops, row_tiles, h, stream);
    });
    VTPRUNE_CUDA_TRY(err);
  }
  holov_finish_kernel<<<image_grid(B), kFinishThreads, 0, stream>>>(
      attn, lengths, B, N, k, num_crops, max_crops, alpha, rank_by_score, sorted, h,
      section<float>(workspace, layout.weight), section<int>(workspace, layout.start),
      section<int>(workspace, layout.size), section<int>(workspace, layout.pos),
      section<int>(workspace, layout.order), section<int64_t>(workspace, layout.budget), out);
  return cudaGetLastError();
}

cudaError_t launch_crop_budgets(const float* weights, const int64_t* capacity, int64_t B, int64_t C, int64_t k,
                                void* workspace, int64_t workspace_bytes, int64_t* out, cudaStream_t stream) {
  if (B < 0 || !fits_int32(C) || k < 1) return cudaErrorInvalidValue;
  if (B == 0 || C == 0) return cudaSuccess;
  if (weights == nullptr || capacity == nullptr || out == nullptr || workspace == nullptr ||
      workspace_bytes < crop_budgets_workspace_bytes(B, C)) {
    return cudaErrorInvalidValue;
  }
  DeviceGuard guard;
  VTPRUNE_CUDA_TRY(enter_device(guard, out));
  crop_budgets_kernel<<<image_grid(B), kFinishThreads, 0, stream>>>(
      weights, capacity, B, C, k, int32_section(workspace, B, C, 0), int32_section(workspace, B, C, 1), out);
  return cudaGetLastError();
}

cudaError_t launch_crop_topk(const float* scores, int64_t B, int64_t N, const int64_t* crop_sizes,
                             const int64_t* budgets, int64_t C, int64_t k, bool sorted, void* workspace,
                             int64_t workspace_bytes, int64_t* out, cudaStream_t stream) {
  if (B < 0 || !fits_int32(N) || !fits_int32(C) || k < 1 || !fits_int32(k)) return cudaErrorInvalidValue;
  if (B == 0) return cudaSuccess;
  if (scores == nullptr || out == nullptr || (C > 0 && (crop_sizes == nullptr || budgets == nullptr)) ||
      workspace == nullptr || workspace_bytes < crop_topk_workspace_bytes(B, C)) {
    return cudaErrorInvalidValue;
  }
  DeviceGuard guard;
  VTPRUNE_CUDA_TRY(enter_device(guard, out));
  crop_topk_kernel<<<image_grid(B), kFinishThreads, 0, stream>>>(
      scores, B, N, crop_sizes, budgets, C, k, sorted, int32_section(workspace, B, C, 0),
      int32_section(workspace, B, C, 1), int32_section(workspace, B, C, 2), int32_section(workspace, B, C, 3), out);
  return cudaGetLastError();
}

}  // namespace vtprune
