// vtprune._cpu, HoloV part: the torch backend's holov_select (SPEC §2) for float32 tokens on the
// CPU in one call: crop statistics, budgets and the per-crop top-k.
//
// Why a C++ engine: at the paper's shape (N = 576, D = 4096, 16 crops of 36) the arithmetic is
// 16 small Gram matrices, and the torch path pays for a full Gram (both triangles) plus some sixty
// small tensor ops of 5-10 us each. Here:
//
// * Each crop's raw Gram G = x x^T is computed on its upper block triangle only (every unordered
//   pair once, about half the FLOPs of the product), in R x R register tiles that run over the
//   whole D: W-lane accumulators (GCC/Clang vector extensions), one load of each of the 2R rows
//   per W columns feeding R*R fused multiply-adds (tiles on the diagonal compute only their upper
//   triangle). A crop (36 x 4096 fp32 = 576 KiB) stays in L2.
//   The same code is compiled for AVX-512, AVX2 and the baseline ISA and picked at run time.
// * S = f f^T with f_i = x_i / (|x_i| + 1e-6) is G_ij / ((|x_i| + eps)(|x_j| + eps)), |x_i| =
//   sqrt(G_ii): the normalized copy is never written. Only a crop with a non-finite |x_i|^2 (an
//   Inf or NaN entry, or a norm that overflows float32 as the reference's does) is recomputed from
//   its normalized copy, so those rows behave exactly as the reference's x / (|x| + eps).
// * Every dot product is accumulated in the same order wherever its pair sits in the tiling
//   (lane l takes the columns d = l mod W, the lanes are then added pairwise, then the tail), so
//   results do not depend on the crop split, the thread count or the batch.
// * The O(M^2) statistics (mean, variance with S_ii = 0 in the sum, gamma, h, the crop score)
//   run in float64 on the float32 S; the token scores h are stored as float32.
// * Budgets are the reference's _budgets_one in float64 on the float32 weights, the top-k a
//   partial sort by (key descending, index ascending) with NaN keys as -inf.
// * Work: (crop, band of row blocks) items taken from an atomic counter by up to num_threads
//   threads (fewer when there is too little work to pay for starting them); whoever finishes a
//   crop's last band computes its statistics, whoever finishes an image's last crop its budgets
//   and picks. Images are processed in groups whose Gram buffers stay under kGroupGramFloats.
// * The threads are std::threads, or, given the address of GOMP_parallel of the OpenMP runtime
//   torch runs on, a team of that runtime: torch's workers spin for a few milliseconds after
//   each torch op, and would otherwise compete for the cores with threads of our own.
//
// Torch-free like the SCOPE engine: tensors come in as addresses (tensor.data_ptr()) with their
// sizes; the Python side (python/vtprune/torch_backend/holov.py) passes contiguous tensors.

#include "holov_cpu.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <exception>
#include <limits>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace py = pybind11;

// The vector types never cross a non-inlined call, so the ABI note GCC attaches to them is moot.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace {

#if defined(__GNUC__)
#define VTP_INLINE inline __attribute__((always_inline))
#define VTP_UNROLL _Pragma("GCC unroll 8")
template <int W>
struct Lanes {
  typedef float type __attribute__((vector_size(W * sizeof(float))));
};
#else
#define VTP_INLINE __forceinline
#define VTP_UNROLL
template <int W>
struct Lanes {
  struct type {
    float v[W];
    friend type operator*(const type& a, const type& b) {
      type r;
      for (int l = 0; l < W; ++l) r.v[l] = a.v[l] * b.v[l];
      return r;
    }
    friend type operator+(const type& a, const type& b) {
      type r;
      for (int l = 0; l < W; ++l) r.v[l] = a.v[l] + b.v[l];
      return r;
    }
    type& operator+=(const type& o) {
      for (int l = 0; l < W; ++l) v[l] += o.v[l];
      return *this;
    }
  };
};
#endif

// Sum of the W lanes of v, pairwise: lane l + lane l + W/2 for the lower half, recursively.
template <int W>
VTP_INLINE float reduce_lanes(const typename Lanes<W>::type& v) {
  if constexpr (W == 2) {
    float l[2];
    std::memcpy(l, &v, sizeof(l));
    return l[0] + l[1];
  } else {
    typename Lanes<W / 2>::type lo, hi;
    std::memcpy(&lo, &v, sizeof(lo));
    std::memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof(lo), sizeof(hi));
    return reduce_lanes<W / 2>(lo + hi);
  }
}

constexpr float kHolovEps = 1e-6f;               // HOLOV_EPS of similarity.py
constexpr int64_t kGroupGramFloats = int64_t{1} << 23;  // 32 MiB of Gram buffers per image group
// Multiply-adds of Gram tiles per thread below which another thread costs more (about 20 us to
// start and join) than it saves: 4M is about 0.1 ms of one core.
constexpr int64_t kMinFmaPerThread = int64_t{1} << 22;

// out[r * R + c] = a_r . b_c over D columns, for R rows a and R rows b. DIAG (b == a, a tile on
// the diagonal of the Gram) computes only c >= r: the other half are the same numbers.
template <int W, int R, bool DIAG>
VTP_INLINE void dot_tile(const float* const* a, const float* const* b, int64_t D, float* out) {
  using V = typename Lanes<W>::type;
  V acc[R][R];
  VTP_UNROLL for (int r = 0; r < R; ++r) {
    VTP_UNROLL for (int c = 0; c < R; ++c) acc[r][c] = V{};
  }
  const int64_t body = D - D % W;
  for (int64_t d = 0; d < body; d += W) {
    V va[R], vb[R];
    VTP_UNROLL for (int r = 0; r < R; ++r) std::memcpy(&va[r], a[r] + d, sizeof(V));
    if (!DIAG) {
      VTP_UNROLL for (int c = 0; c < R; ++c) std::memcpy(&vb[c], b[c] + d, sizeof(V));
    }
    VTP_UNROLL for (int r = 0; r < R; ++r) {
      VTP_UNROLL for (int c = DIAG ? r : 0; c < R; ++c) acc[r][c] += va[r] * (DIAG ? va[c] : vb[c]);
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int c = DIAG ? r : 0; c < R; ++c) {
      float s = reduce_lanes<W>(acc[r][c]);
      for (int64_t d = body; d < D; ++d) s += a[r][d] * b[c][d];
      out[r * R + c] = s;
    }
  }
}

// The Gram entries of the row blocks [I0, I1) (rows I*R .. I*R+R-1) of the M rows x (row stride
// ld, D columns) with every row of their block or a later one, written to G [M, M] at (i, j) and
// (j, i). A ragged last block repeats row M - 1; those dot products are dropped.
template <int W, int R>
VTP_INLINE void gram_blocks(const float* x, int64_t ld, int64_t M, int64_t D, int64_t I0, int64_t I1,
                            float* G) {
  const int64_t nb = (M + R - 1) / R;
  float t[R * R];
  for (int64_t I = I0; I < I1; ++I) {
    const float* a[R];
    for (int r = 0; r < R; ++r) a[r] = x + std::min<int64_t>(I * R + r, M - 1) * ld;
    for (int64_t J = I; J < nb; ++J) {
      const float* b[R];
      for (int c = 0; c < R; ++c) b[c] = x + std::min<int64_t>(J * R + c, M - 1) * ld;
      if (J == I) {
        dot_tile<W, R, true>(a, a, D, t);
      } else {
        dot_tile<W, R, false>(a, b, D, t);
      }
      for (int r = 0; r < R; ++r) {
        const int64_t i = I * R + r;
        if (i >= M) break;
        for (int c = 0; c < R; ++c) {
          const int64_t j = J * R + c;
          if (j >= M) break;
          if (j < i) continue;
          G[i * M + j] = t[r * R + c];
          G[j * M + i] = t[r * R + c];
        }
      }
    }
  }
}

using GramFn = void (*)(const float*, int64_t, int64_t, int64_t, int64_t, int64_t, float*);

struct Isa {
  const char* name;
  GramFn gram;
  int rows;  // R of its tiles
};

// 3 x 3 tiles of 4 lanes: 9 accumulators + 6 loads fit the 16 registers of SSE2 (and NEON).
void gram_baseline(const float* x, int64_t ld, int64_t M, int64_t D, int64_t I0, int64_t I1, float* G) {
  gram_blocks<4, 3>(x, ld, M, D, I0, I1, G);
}

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define VTP_X86_CLONES 1
// 3 x 3 tiles of 8 lanes in the 16 ymm registers.
__attribute__((target("avx2,fma"))) void gram_avx2(const float* x, int64_t ld, int64_t M, int64_t D,
                                                   int64_t I0, int64_t I1, float* G) {
  gram_blocks<8, 3>(x, ld, M, D, I0, I1, G);
}
// 4 x 4 tiles of 16 lanes: 16 accumulators + 8 loads of the 32 zmm registers.
__attribute__((target("avx512f,fma"))) void gram_avx512(const float* x, int64_t ld, int64_t M, int64_t D,
                                                        int64_t I0, int64_t I1, float* G) {
  gram_blocks<16, 4>(x, ld, M, D, I0, I1, G);
}
#endif

// The kernels this CPU runs, best first.
std::vector<Isa> available_isas() {
  std::vector<Isa> out;
#ifdef VTP_X86_CLONES
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma")) out.push_back({"avx512", gram_avx512, 4});
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) out.push_back({"avx2", gram_avx2, 3});
#endif
  out.push_back({"baseline", gram_baseline, 3});
  return out;
}

Isa pick_isa(const std::string& name) {
  const std::vector<Isa> isas = available_isas();
  if (name == "auto") return isas.front();
  std::string names;
  for (const Isa& isa : isas) {
    if (name == isa.name) return isa;
    names += (names.empty() ? "" : ", ") + std::string(isa.name);
  }
  throw py::value_error("isa must be 'auto' or one this CPU runs (" + names + "), got '" + name + "'");
}

// ----------------------------------------------------------------------------- budgets, top-k

// _budgets_one of reference.py: floors of the clamped (and, above 1, rescaled) weights, the
// leftover +1 per crop in descending weight (NaN last, ties to the lowest crop), cycling, then the
// cap at capacity with the cut handed out the same way to crops with room. If k exceeds the
// total capacity (only reachable without the Python-side checks) the budgets stop at capacity.
void crop_budgets_one(const float* w, const int64_t* cap, int64_t C, int64_t k, int64_t* q) {
  double total = 0.0;
  std::vector<double> pos(static_cast<size_t>(C));
  for (int64_t c = 0; c < C; ++c) {
    const double v = static_cast<double>(w[c]);
    pos[c] = std::isnan(v) ? 0.0 : std::max(v, 0.0);
    if (cap[c] > 0) total += pos[c];
  }
  const double scale = total > 1.0 + 1e-6 ? 1.0 / total : 1.0;
  int64_t given = 0;
  for (int64_t c = 0; c < C; ++c) {
    q[c] = 0;
    if (cap[c] <= 0) continue;
    const double f = std::floor(pos[c] * scale * static_cast<double>(k));
    q[c] = f >= 0.0 ? static_cast<int64_t>(std::min(f, static_cast<double>(k))) : 0;  // NaN: 0
    given += q[c];
  }
  std::vector<int64_t> order;
  order.reserve(static_cast<size_t>(C));
  for (int64_t c = 0; c < C; ++c) {
    if (cap[c] > 0) order.push_back(c);
  }
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
    const bool na = std::isnan(w[a]), nb = std::isnan(w[b]);
    if (na != nb) return nb;  // numbers before NaN
    return !na && w[a] > w[b];
  });
  auto hand_out = [&](int64_t amount, bool capped) {
    while (amount > 0) {
      bool gave = false;
      for (int64_t c : order) {
        if (amount == 0) break;
        if (capped && q[c] >= cap[c]) continue;
        ++q[c];
        --amount;
        gave = true;
      }
      if (!gave) return;
    }
  };
  hand_out(k - given, false);
  int64_t surplus = 0;
  for (int64_t c : order) {
    if (q[c] > cap[c]) {
      surplus += q[c] - cap[c];
      q[c] = cap[c];
    }
  }
  hand_out(surplus, true);
}

// ----------------------------------------------------------------------------- the engine

// GOMP_parallel(fn, data, num_threads, flags) of libgomp (LLVM's and Intel's OpenMP runtimes
// export it too): runs fn(data) on a team of num_threads threads, the caller included.
using OmpParallelFn = void (*)(void (*)(void*), void*, unsigned, unsigned);

struct Params {
  const float* x = nullptr;        // [B, N, D]
  const float* attn = nullptr;     // [B, N]
  const int64_t* lengths = nullptr;  // [B] or null
  int64_t B = 0, N = 0, D = 0, k = 0, num_crops = 0;
  double alpha = 0.0;
  bool by_score = false, sorted = true;
  int64_t* out = nullptr;          // [B, k] picks, or null
  float* score_out = nullptr;      // [B, score_cols] crop scores, or null
  int64_t score_cols = 0;
  float* h_out = nullptr;          // [B, N] token scores h, or null
  Isa isa{};
  int64_t threads = 1;
  OmpParallelFn omp_parallel = nullptr;
};

struct Crop {
  int64_t img, start, size, g_off;
};

struct Item {
  int64_t crop, I0, I1;
};

class Group {
 public:
  Group(const Params& p, int64_t b0, int64_t b1) : p_(p), b0_(b0), images_(b1 - b0) {
    int64_t g_total = 0;
    img_crop_begin_.resize(static_cast<size_t>(images_ + 1));
    img_n_.resize(static_cast<size_t>(images_));
    for (int64_t i = 0; i < images_; ++i) {
      int64_t n = p.lengths ? p.lengths[b0 + i] : p.N;
      n = std::min(std::max<int64_t>(n, 0), p.N);
      img_n_[i] = n;
      img_crop_begin_[i] = static_cast<int64_t>(crops_.size());
      if (n == 0) continue;
      int64_t C = p.num_crops > 0 ? p.num_crops : std::max<int64_t>(1, (1024 * n) / (576 * p.k));
      C = std::min(C, n);
      const int64_t base = n / C, extra = n % C;
      int64_t start = 0;
      for (int64_t c = 0; c < C; ++c) {
        const int64_t size = base + (c < extra ? 1 : 0);
        crops_.push_back({i, start, size, g_total});
        if (size >= 2) g_total += size * size;
        start += size;
      }
    }
    img_crop_begin_[images_] = static_cast<int64_t>(crops_.size());
    gram_.resize(static_cast<size_t>(g_total));
    scores_.assign(crops_.size(), 0.0f);
    h_.assign(static_cast<size_t>(images_ * p.N), 0.0f);
    crop_left_.reset(new std::atomic<int64_t>[crops_.size()]);
    img_left_.reset(new std::atomic<int64_t>[static_cast<size_t>(images_)]);
  }

  // Gram bands, statistics, budgets and picks of every image of the group.
  void run() {
    const int64_t R = p_.isa.rows;
    int64_t work_crops = 0, fmas = 0;
    for (const Crop& c : crops_) {
      if (c.size < 2) continue;
      const int64_t nb = (c.size + R - 1) / R;
      ++work_crops;
      fmas += nb * (nb + 1) / 2 * R * R * p_.D;
    }
    const int64_t threads = std::max<int64_t>(1, std::min(p_.threads, fmas / kMinFmaPerThread));
    // with few crops per thread, each crop is cut into bands of equal tile counts so that the
    // threads finish together; with many, whole crops keep each crop in one core's L2
    int64_t bands_per_crop = 1;
    if (threads > 1 && work_crops > 0) {
      bands_per_crop = std::max<int64_t>(1, (4 * threads + work_crops - 1) / work_crops);
    }
    std::vector<Item> items;
    for (size_t ci = 0; ci < crops_.size(); ++ci) {
      const Crop& c = crops_[ci];
      if (c.size < 2) {
        crop_left_[ci].store(0);
        continue;
      }
      const int64_t nb = (c.size + R - 1) / R;
      const int64_t bands = std::min(bands_per_crop, nb);
      const int64_t tiles = nb * (nb + 1) / 2;
      int64_t I0 = 0, done = 0, pushed = 0;
      for (int64_t s = 1; s <= bands; ++s) {
        const int64_t goal = tiles * s / bands;
        int64_t I1 = I0;
        while (I1 < nb && (done < goal || I1 == I0)) done += nb - I1++;
        if (s == bands) I1 = nb;
        if (I1 > I0) {
          items.push_back({static_cast<int64_t>(ci), I0, I1});
          ++pushed;
        }
        I0 = I1;
      }
      crop_left_[ci].store(pushed);
    }
    for (int64_t i = 0; i < images_; ++i) {
      int64_t left = 0;
      for (int64_t ci = img_crop_begin_[i]; ci < img_crop_begin_[i + 1]; ++ci) {
        if (crops_[ci].size >= 2) {
          ++left;
        } else {
          finish_small_crop(ci);
        }
      }
      img_left_[i].store(left);
      if (left == 0) finish_image(i);
    }

    std::atomic<size_t> next{0};
    std::exception_ptr error;
    std::mutex error_mutex;
    auto worker = [&]() {
      try {
        size_t i;
        while ((i = next.fetch_add(1, std::memory_order_relaxed)) < items.size()) do_item(items[i]);
      } catch (...) {
        std::lock_guard<std::mutex> lock(error_mutex);
        if (!error) error = std::current_exception();
        next.store(items.size());
      }
    };
    const int64_t team = std::min<int64_t>(threads, static_cast<int64_t>(items.size()));
    if (team > 1 && p_.omp_parallel) {
      // worker never throws (it stores the exception), so nothing unwinds through the runtime
      auto trampoline = [](void* w) { (*static_cast<decltype(worker)*>(w))(); };
      p_.omp_parallel(trampoline, &worker, static_cast<unsigned>(team), 0u);
    } else {
      std::vector<std::thread> pool;
      for (int64_t t = 1; t < team; ++t) pool.emplace_back(worker);
      worker();
      for (std::thread& th : pool) th.join();
    }
    if (error) std::rethrow_exception(error);
  }

 private:
  const float* crop_rows(const Crop& c) const { return p_.x + ((b0_ + c.img) * p_.N + c.start) * p_.D; }
  const float* crop_attn(const Crop& c) const { return p_.attn + (b0_ + c.img) * p_.N + c.start; }

  void do_item(const Item& it) {
    const Crop& c = crops_[it.crop];
    p_.isa.gram(crop_rows(c), p_.D, c.size, p_.D, it.I0, it.I1, gram_.data() + c.g_off);
    if (crop_left_[it.crop].fetch_sub(1, std::memory_order_acq_rel) == 1) {
      finish_crop(it.crop);
      if (img_left_[c.img].fetch_sub(1, std::memory_order_acq_rel) == 1) finish_image(c.img);
    }
  }

  // SPEC §2 for a crop of one token: score = attn, h = 1000 * attn.
  void finish_small_crop(int64_t ci) {
    const Crop& c = crops_[ci];
    const float a = crop_attn(c)[0];
    scores_[ci] = a;
    h_[c.img * p_.N + c.start] = 1000.0f * a;
  }

  // The statistics of a crop whose Gram is complete.
  void finish_crop(int64_t ci) {
    const Crop& c = crops_[ci];
    const int64_t M = c.size, D = p_.D;
    float* G = gram_.data() + c.g_off;
    std::vector<double> inv(static_cast<size_t>(M));
    bool rescue = false;
    for (int64_t i = 0; i < M; ++i) rescue = rescue || !std::isfinite(G[i * M + i]);
    if (rescue) {
      // x^T x is not finite for some row: do what the reference does, normalize first
      // (x / (|x| + eps) with the overflowing |x| = inf, so finite entries become 0)
      const float* x = crop_rows(c);
      std::vector<float> f(static_cast<size_t>(M * D));
      for (int64_t i = 0; i < M; ++i) {
        const float den = std::sqrt(G[i * M + i]) + kHolovEps;
        for (int64_t d = 0; d < D; ++d) f[i * D + d] = x[i * D + d] / den;
      }
      p_.isa.gram(f.data(), D, M, D, 0, (M + p_.isa.rows - 1) / p_.isa.rows, G);
      std::fill(inv.begin(), inv.end(), 1.0);
    } else {
      for (int64_t i = 0; i < M; ++i) inv[i] = 1.0 / static_cast<double>(std::sqrt(G[i * M + i]) + kHolovEps);
    }

    const float* attn = crop_attn(c);
    float* h = h_.data() + c.img * p_.N + c.start;
    const double m1 = static_cast<double>(M - 1);
    std::vector<double> srow(static_cast<size_t>(M)), var(static_cast<size_t>(M));
    double sum_abs_a = 0.0, sum_abs_var = 0.0;
    for (int64_t i = 0; i < M; ++i) {
      const float* g = G + i * M;
      double sum = 0.0;
      for (int64_t j = 0; j < M; ++j) {
        srow[j] = j == i ? 0.0 : static_cast<double>(g[j]) * inv[i] * inv[j];
        sum += srow[j];
      }
      const double mean = sum / m1;
      double sq = 0.0;
      for (int64_t j = 0; j < M; ++j) {
        const double dev = srow[j] - mean;  // j == i: S_ii = 0 counts, as in the official code
        sq += dev * dev;
      }
      var[i] = sq / m1;
      sum_abs_var += std::fabs(var[i]);
      sum_abs_a += std::fabs(static_cast<double>(1000.0f * attn[i]));
    }
    const double gamma = (sum_abs_a / M) / (sum_abs_var / M + 1e-6);
    const double coef = p_.alpha * gamma;
    double sum_h = 0.0;
    for (int64_t i = 0; i < M; ++i) {
      const double hi = static_cast<double>(1000.0f * attn[i]) + coef * var[i];
      h[i] = static_cast<float>(hi);
      sum_h += hi;
    }
    scores_[ci] = static_cast<float>(sum_h / M);
  }

  // Budgets from the crop scores, then the per-crop top-k, for one image.
  void finish_image(int64_t i) {
    const int64_t b = b0_ + i, n = img_n_[i], N = p_.N, k = p_.k;
    const int64_t cb = img_crop_begin_[i], C = img_crop_begin_[i + 1] - cb;
    const float* h = h_.data() + i * N;
    if (p_.score_out) {
      float* row = p_.score_out + b * p_.score_cols;
      std::fill(row, row + p_.score_cols, 0.0f);
      for (int64_t c = 0; c < std::min(C, p_.score_cols); ++c) row[c] = scores_[cb + c];
    }
    if (p_.h_out) std::copy(h, h + N, p_.h_out + b * N);
    if (!p_.out) return;
    int64_t* out = p_.out + b * k;
    int64_t filled = 0;
    if (C > 0) {
      double total = 0.0;
      for (int64_t c = 0; c < C; ++c) total += scores_[cb + c];
      const float den = static_cast<float>(total) + 1e-6f;
      std::vector<float> w(static_cast<size_t>(C));
      std::vector<int64_t> cap(static_cast<size_t>(C)), q(static_cast<size_t>(C));
      for (int64_t c = 0; c < C; ++c) {
        w[c] = scores_[cb + c] / den;
        cap[c] = crops_[cb + c].size;
      }
      crop_budgets_one(w.data(), cap.data(), C, k, q.data());

      const float* src = p_.by_score ? h : p_.attn + b * N;
      std::vector<float> key(src, src + n);
      for (float& v : key) {
        if (std::isnan(v)) v = -std::numeric_limits<float>::infinity();
      }
      auto before = [&](int64_t u, int64_t v) { return key[u] > key[v] || (key[u] == key[v] && u < v); };
      std::vector<int64_t> idx;
      for (int64_t c = 0; c < C && filled < k; ++c) {
        const Crop& cr = crops_[cb + c];
        const int64_t take = std::min({q[c], cr.size, k - filled});
        if (take <= 0) continue;
        idx.resize(static_cast<size_t>(cr.size));
        for (int64_t j = 0; j < cr.size; ++j) idx[j] = cr.start + j;
        std::partial_sort(idx.begin(), idx.begin() + take, idx.end(), before);
        if (p_.sorted) std::sort(idx.begin(), idx.begin() + take);
        std::copy(idx.begin(), idx.begin() + take, out + filled);
        filled += take;
      }
    }
    std::fill(out + filled, out + k, int64_t{0});  // only when k exceeds the valid tokens
  }

  const Params& p_;
  int64_t b0_, images_;
  std::vector<Crop> crops_;
  std::vector<int64_t> img_crop_begin_, img_n_;
  std::vector<float> gram_, scores_, h_;
  std::unique_ptr<std::atomic<int64_t>[]> crop_left_, img_left_;
};

void run_engine(const Params& p) {
  int64_t b0 = 0;
  while (b0 < p.B) {
    // images whose Gram buffers together stay under kGroupGramFloats (at least one)
    int64_t b1 = b0, floats = 0;
    while (b1 < p.B) {
      const int64_t n = std::min(std::max<int64_t>(p.lengths ? p.lengths[b1] : p.N, 0), p.N);
      const int64_t C = std::max<int64_t>(1, std::min(n, p.num_crops > 0 ? p.num_crops : (1024 * n) / (576 * p.k)));
      const int64_t m = (n + C - 1) / C;
      const int64_t need = n * m;  // >= the sum of the crops' M^2
      if (b1 > b0 && floats + need > kGroupGramFloats) break;
      floats += need;
      ++b1;
    }
    Group(p, b0, b1).run();
    b0 = b1;
  }
}

void check_common(std::uintptr_t x_ptr, std::uintptr_t attn_ptr, int64_t B, int64_t N, int64_t D, int64_t k,
                  int64_t num_crops) {
  auto nonneg = [](const char* name, int64_t value) {
    if (value < 0) throw py::value_error(std::string(name) + " must be >= 0, got " + std::to_string(value));
  };
  nonneg("B", B);
  nonneg("N", N);
  nonneg("D", D);
  nonneg("num_crops", num_crops);
  if (k < 1) throw py::value_error("k must be >= 1, got " + std::to_string(k));
  if (B > 0 && N > 0) {
    if (attn_ptr == 0) throw py::value_error("attn_ptr is null");
    if (D > 0 && x_ptr == 0) throw py::value_error("x_ptr is null");
  }
}

Params make_params(std::uintptr_t x_ptr, std::uintptr_t attn_ptr, std::uintptr_t lengths_ptr, int64_t B, int64_t N,
                   int64_t D, int64_t k, int64_t num_crops, double alpha, int64_t num_threads,
                   const std::string& isa, std::uintptr_t omp_parallel_ptr) {
  check_common(x_ptr, attn_ptr, B, N, D, k, num_crops);
  Params p;
  p.x = reinterpret_cast<const float*>(x_ptr);
  p.attn = reinterpret_cast<const float*>(attn_ptr);
  p.lengths = reinterpret_cast<const int64_t*>(lengths_ptr);
  p.B = B;
  p.N = N;
  p.D = D;
  p.k = k;
  p.num_crops = num_crops;
  p.alpha = alpha;
  p.isa = pick_isa(isa);
  p.threads = std::max<int64_t>(1, num_threads);
  p.omp_parallel = reinterpret_cast<OmpParallelFn>(omp_parallel_ptr);
  return p;
}

void holov_select_f32(std::uintptr_t x_ptr, std::uintptr_t attn_ptr, std::uintptr_t lengths_ptr, int64_t B,
                      int64_t N, int64_t D, int64_t k, int64_t num_crops, double alpha, bool rank_by_score,
                      bool sorted, std::uintptr_t out_ptr, int64_t num_threads, const std::string& isa,
                      std::uintptr_t omp_parallel_ptr) {
  Params p = make_params(x_ptr, attn_ptr, lengths_ptr, B, N, D, k, num_crops, alpha, num_threads, isa,
                         omp_parallel_ptr);
  if (B > 0 && out_ptr == 0) throw py::value_error("out_ptr is null");
  p.by_score = rank_by_score;
  p.sorted = sorted;
  p.out = reinterpret_cast<int64_t*>(out_ptr);
  py::gil_scoped_release release;
  run_engine(p);
}

void holov_crop_stats_f32(std::uintptr_t x_ptr, std::uintptr_t attn_ptr, std::uintptr_t lengths_ptr, int64_t B,
                          int64_t N, int64_t D, int64_t k, int64_t num_crops, double alpha, std::uintptr_t score_ptr,
                          int64_t score_cols, std::uintptr_t h_ptr, int64_t num_threads, const std::string& isa,
                          std::uintptr_t omp_parallel_ptr) {
  Params p = make_params(x_ptr, attn_ptr, lengths_ptr, B, N, D, k, num_crops, alpha, num_threads, isa,
                         omp_parallel_ptr);
  if (score_cols < 0) throw py::value_error("score_cols must be >= 0, got " + std::to_string(score_cols));
  if (B > 0 && score_cols > 0 && score_ptr == 0) throw py::value_error("score_ptr is null");
  if (B > 0 && N > 0 && h_ptr == 0) throw py::value_error("h_ptr is null");
  p.score_out = reinterpret_cast<float*>(score_ptr);
  p.score_cols = score_cols;
  p.h_out = reinterpret_cast<float*>(h_ptr);
  py::gil_scoped_release release;
  run_engine(p);
}

}  // namespace

namespace vtprune_cpu {

void register_holov(py::module_& m) {
  m.def("holov_select_f32", &holov_select_f32, py::arg("x_ptr"), py::arg("attn_ptr"), py::arg("lengths_ptr"),
        py::arg("B"), py::arg("N"), py::arg("D"), py::arg("k"), py::arg("num_crops"), py::arg("alpha"),
        py::arg("rank_by_score"), py::arg("sorted"), py::arg("out_ptr"), py::arg("num_threads") = 1,
        py::arg("isa") = "auto", py::arg("omp_parallel_ptr") = 0,
        "HoloV picks (SPEC §2) written to out [B, k] int64. x: float32 [B, N, D] and attn: float32 [B, N], "
        "contiguous; lengths: int64 [B] valid tokens per image (clamped to [0, N]) or 0 for all N; "
        "num_crops: crops per image (clamped to the valid tokens) or 0 for the default; rank_by_score: rank "
        "inside a crop by h (else by attn); sorted: ascending indices (else crops in order, descending key). "
        "Slots past an image's valid tokens (k > lengths[b], which the Python checks reject) are 0. Runs "
        "without the GIL on up to num_threads threads; isa: 'auto' or a name from holov_isas(); "
        "omp_parallel_ptr: address of GOMP_parallel of an OpenMP runtime loaded in the process, whose "
        "threads then run the work, or 0 for std::threads.");
  m.def("holov_crop_stats_f32", &holov_crop_stats_f32, py::arg("x_ptr"), py::arg("attn_ptr"),
        py::arg("lengths_ptr"), py::arg("B"), py::arg("N"), py::arg("D"), py::arg("k"), py::arg("num_crops"),
        py::arg("alpha"), py::arg("score_ptr"), py::arg("score_cols"), py::arg("h_ptr"),
        py::arg("num_threads") = 1, py::arg("isa") = "auto", py::arg("omp_parallel_ptr") = 0,
        "The crop statistics behind holov_select_f32: crop scores to score [B, score_cols] float32 (crop c "
        "of image b at [b, c], 0 past its crops) and token scores h to h [B, N] float32 (0 past lengths[b]). "
        "Same arguments otherwise (k only sets the default crop count).");
  m.def(
      "holov_isas",
      []() {
        py::list names;
        for (const Isa& isa : available_isas()) names.append(isa.name);
        return names;
      },
      "The Gram kernels of the HoloV engine this CPU runs, best first ('auto' takes the first).");
}

}  // namespace vtprune_cpu
