// vtprune._cpu: the CPU engine of the torch backend's SCOPE greedy loop (SPEC §1), in one call.
//
// Plain C++17 and pybind11, no torch headers: the similarity S, the weights, the lengths and the
// output come in as integer addresses (tensor.data_ptr()), as for vtprune._C, so one build works
// with every torch version. The semantics are those of _CpuGreedy in
// python/vtprune/torch_backend/scope.py (the NumPy engine, itself matched to the reference):
//
//   gain(v) = sum_{u valid} max(0, S[u, v])                       (float64)
//   each step: score(v) = gain(v) * w(v) ("mul") or gain(v) + w(v) ("add") over the valid
//     unselected v, a NaN score counting as -1 (below every real score, which is >= 0, but
//     above the excluded tokens); best = max score; the pick is the lowest index whose score
//     is >= best - tau * |best| (the tie band; with a non-finite best, >= best);
//   coverage: for the rows u with S[u, t] > c(u) (the "changed" rows):
//     gain(v) -= min(max(S[u, v] - c_old(u), 0), c_new(u) - c_old(u)),  c(u) = S[u, t].
//
// S must be bitwise symmetric, so that column t and the changed columns are read as contiguous
// rows. A gain that should be exactly 0 (a fully covered token) reaches 0 only up to the
// rounding of its accumulated updates; as in _CpuGreedy, gains under `tol` are recomputed
// exactly whenever the best score is low enough for them to matter (ties at 0 break by index).
//
// NaN propagates as in the NumPy engine: every clamp is written `x < 0 ? 0 : x` /
// `x > w ? w : x`, which keep a NaN x.

#include <pybind11/pybind11.h>

#include "holov_cpu.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <thread>
#include <vector>

namespace py = pybind11;

namespace {

constexpr double kNanScore = -1.0;  // _NAN_SCORE in scope.py
constexpr double kInf = std::numeric_limits<double>::infinity();

// gain[v] += max(S[u, v], 0) over rows u (column sums, vectorizable over v).
template <typename T>
inline void add_relu_row(const T* __restrict row, double* __restrict gain, int64_t n) {
  for (int64_t v = 0; v < n; ++v) {
    const double d = static_cast<double>(row[v]);
    gain[v] += d < 0.0 ? 0.0 : d;
  }
}

inline double clamp_term(double s, double lo, double width) {
  double d = s - lo;
  d = d < 0.0 ? 0.0 : d;
  return d > width ? width : d;
}

// gain[v] -= sum over the m changed rows of min(max(S[u, v] - lo, 0), width), four rows per
// pass over gain so that its loads and stores are shared.
template <typename T>
inline void sub_changed_rows(const T* s, int64_t ld, const int64_t* rows, const double* lo,
                             const double* width, int64_t m, double* __restrict gain, int64_t n) {
  int64_t i = 0;
  for (; i + 4 <= m; i += 4) {
    const T* __restrict r0 = s + rows[i] * ld;
    const T* __restrict r1 = s + rows[i + 1] * ld;
    const T* __restrict r2 = s + rows[i + 2] * ld;
    const T* __restrict r3 = s + rows[i + 3] * ld;
    const double l0 = lo[i], l1 = lo[i + 1], l2 = lo[i + 2], l3 = lo[i + 3];
    const double w0 = width[i], w1 = width[i + 1], w2 = width[i + 2], w3 = width[i + 3];
    for (int64_t v = 0; v < n; ++v) {
      const double d0 = clamp_term(static_cast<double>(r0[v]), l0, w0);
      const double d1 = clamp_term(static_cast<double>(r1[v]), l1, w1);
      const double d2 = clamp_term(static_cast<double>(r2[v]), l2, w2);
      const double d3 = clamp_term(static_cast<double>(r3[v]), l3, w3);
      gain[v] -= (d0 + d1) + (d2 + d3);
    }
  }
  for (; i < m; ++i) {
    const T* __restrict r0 = s + rows[i] * ld;
    const double l0 = lo[i], w0 = width[i];
    for (int64_t v = 0; v < n; ++v) gain[v] -= clamp_term(static_cast<double>(r0[v]), l0, w0);
  }
}

// The dense kernels, compiled once per ISA level where GCC/Clang can dispatch at load time
// (ifunc): the portable baseline (SSE2 on x86-64) plus an AVX2 clone, chosen by the CPU that
// runs it. No -march, so the module runs on any x86-64 (or other) CPU.
#if defined(__x86_64__) && defined(__GNUC__) && defined(__linux__) && !defined(__clang__)
#define VTPRUNE_MULTIVERSION __attribute__((target_clones("avx2", "default")))
#else
#define VTPRUNE_MULTIVERSION
#endif

VTPRUNE_MULTIVERSION void relu_col_sums_f32(const float* s, int64_t ld, int64_t n, double* gain) {
  for (int64_t u = 0; u < n; ++u) add_relu_row(s + u * ld, gain, n);
}
VTPRUNE_MULTIVERSION void relu_col_sums_f64(const double* s, int64_t ld, int64_t n, double* gain) {
  for (int64_t u = 0; u < n; ++u) add_relu_row(s + u * ld, gain, n);
}
VTPRUNE_MULTIVERSION void sub_rows_f32(const float* s, int64_t ld, const int64_t* rows,
                                       const double* lo, const double* width, int64_t m,
                                       double* gain, int64_t n) {
  sub_changed_rows(s, ld, rows, lo, width, m, gain, n);
}
VTPRUNE_MULTIVERSION void sub_rows_f64(const double* s, int64_t ld, const int64_t* rows,
                                       const double* lo, const double* width, int64_t m,
                                       double* gain, int64_t n) {
  sub_changed_rows(s, ld, rows, lo, width, m, gain, n);
}

inline void relu_col_sums(const float* s, int64_t ld, int64_t n, double* gain) {
  relu_col_sums_f32(s, ld, n, gain);
}
inline void relu_col_sums(const double* s, int64_t ld, int64_t n, double* gain) {
  relu_col_sums_f64(s, ld, n, gain);
}
inline void sub_rows(const float* s, int64_t ld, const int64_t* rows, const double* lo,
                     const double* width, int64_t m, double* gain, int64_t n) {
  sub_rows_f32(s, ld, rows, lo, width, m, gain, n);
}
inline void sub_rows(const double* s, int64_t ld, const int64_t* rows, const double* lo,
                     const double* width, int64_t m, double* gain, int64_t n) {
  sub_rows_f64(s, ld, rows, lo, width, m, gain, n);
}

// The greedy loop of one image: S [N, N] (leading dimension N) of which the first n rows and
// columns are valid, weights w [n] (float64), k picks into out [k].
template <typename T>
void greedy_image(const T* s, int64_t N, int64_t n, const double* w, int64_t k, bool mul,
                  double tau, int64_t* out) {
  if (n <= 0) {
    std::fill(out, out + k, int64_t{0});
    return;
  }
  std::vector<double> gain(static_cast<size_t>(n), 0.0);
  std::vector<T> cover(static_cast<size_t>(n), T(0));
  std::vector<unsigned char> excluded(static_cast<size_t>(n), 0);
  std::vector<int64_t> changed(static_cast<size_t>(n));
  std::vector<double> lo(static_cast<size_t>(n)), width(static_cast<size_t>(n));
  relu_col_sums(s, N, n, gain.data());

  // _CpuGreedy's `tol` and `suspect`: a drifted gain g (|g| < tol) scores at most tol * w_max
  // ("mul") or w_max + tol ("add"); below twice that, the drift could decide the pick.
  const double tol = 8.0 * std::numeric_limits<T>::epsilon() * static_cast<double>(N);
  double w_max = 0.0;
  for (int64_t v = 0; v < n; ++v) {
    if (w[v] > w_max) w_max = w[v];  // NaN weights ignored
  }
  const double suspect =
      mul ? (std::isfinite(w_max) ? 2.0 * tol * w_max : kInf) : w_max + 2.0 * tol;

  auto score_of = [&](int64_t v) {
    const double sc = mul ? gain[v] * w[v] : gain[v] + w[v];
    return sc != sc ? kNanScore : sc;
  };
  // first maximal score over the candidates; -1 when there is none
  auto argmax = [&](double* best_out) {
    int64_t t = -1;
    double best = -kInf;
    for (int64_t v = 0; v < n; ++v) {
      if (excluded[v]) continue;
      const double sc = score_of(v);
      if (t < 0 || sc > best) {
        best = sc;
        t = v;
      }
    }
    *best_out = best;
    return t;
  };
  // recompute exactly the gains that drifted near 0 (_CpuGreedy._fix_low); true if any
  auto fix_low = [&]() {
    bool any = false;
    for (int64_t v = 0; v < n; ++v) {
      const double g = gain[v];
      if (excluded[v] || !(std::fabs(g) < tol) || g == 0.0) continue;
      const T* row = s + v * N;  // row v == column v
      double sum = 0.0;
      for (int64_t u = 0; u < n; ++u) {
        const T d = row[u] - cover[u];
        sum += d < T(0) ? 0.0 : static_cast<double>(d);
      }
      gain[v] = sum;
      any = true;
    }
    return any;
  };

  for (int64_t i = 0; i < k; ++i) {
    double best;
    int64_t t = argmax(&best);
    if (t < 0) {  // every valid token is picked: further picks are meaningless, callers drop them
      std::fill(out + i, out + k, int64_t{0});
      return;
    }
    if (best <= suspect && fix_low()) t = argmax(&best);
    if (t > 0 && std::isfinite(best)) {
      const double thr = best - tau * std::fabs(best);
      for (int64_t v = 0; v < t; ++v) {
        if (!excluded[v] && score_of(v) >= thr) {
          t = v;  // a lower index inside the tie band
          break;
        }
      }
    }
    out[i] = t;
    excluded[t] = 1;

    const T* col = s + t * N;  // row t == column t
    int64_t m = 0;
    for (int64_t u = 0; u < n; ++u) {
      const T hi = col[u];
      if (hi > cover[u]) {
        changed[m] = u;
        lo[m] = static_cast<double>(cover[u]);
        width[m] = static_cast<double>(hi) - static_cast<double>(cover[u]);
        cover[u] = hi;
        ++m;
      }
    }
    if (m > 0) sub_rows(s, N, changed.data(), lo.data(), width.data(), m, gain.data(), n);
  }
}

template <typename T>
void greedy_batch(std::uintptr_t s_ptr, std::uintptr_t w_ptr, std::uintptr_t lengths_ptr,
                  int64_t B, int64_t N, int64_t k, bool mul, double tau, std::uintptr_t out_ptr,
                  int64_t num_threads) {
  const T* s = reinterpret_cast<const T*>(s_ptr);
  const double* w = reinterpret_cast<const double*>(w_ptr);
  const int64_t* lengths = reinterpret_cast<const int64_t*>(lengths_ptr);
  int64_t* out = reinterpret_cast<int64_t*>(out_ptr);
  auto one = [&](int64_t b) {
    int64_t n = lengths ? lengths[b] : N;
    n = std::min(std::max(n, int64_t{0}), N);
    greedy_image<T>(s + b * N * N, N, n, w + b * N, k, mul, tau, out + b * k);
  };
  const int64_t threads = std::max<int64_t>(1, std::min(num_threads, B));
  if (threads <= 1) {
    for (int64_t b = 0; b < B; ++b) one(b);
    return;
  }
  // images are independent: a static round-robin over a few threads
  std::vector<std::thread> pool;
  pool.reserve(static_cast<size_t>(threads - 1));
  for (int64_t r = 1; r < threads; ++r) {
    pool.emplace_back([&, r]() {
      for (int64_t b = r; b < B; b += threads) one(b);
    });
  }
  for (int64_t b = 0; b < B; b += threads) one(b);
  for (auto& th : pool) th.join();
}

void check_args(std::uintptr_t s_ptr, std::uintptr_t w_ptr, int64_t B, int64_t N, int64_t k,
                std::uintptr_t out_ptr) {
  auto nonneg = [](const char* name, int64_t value) {
    if (value < 0) {
      throw py::value_error(std::string(name) + " must be >= 0, got " + std::to_string(value));
    }
  };
  nonneg("B", B);
  nonneg("N", N);
  nonneg("k", k);
  if (B > 0 && k > 0 && out_ptr == 0) throw py::value_error("out_ptr is null");
  if (B > 0 && N > 0 && k > 0) {
    if (s_ptr == 0) throw py::value_error("s_ptr is null");
    if (w_ptr == 0) throw py::value_error("w_ptr is null");
  }
}

template <typename T>
void scope_greedy(std::uintptr_t s_ptr, std::uintptr_t w_ptr, std::uintptr_t lengths_ptr,
                  int64_t B, int64_t N, int64_t k, bool mul, double tau, std::uintptr_t out_ptr,
                  int64_t num_threads) {
  check_args(s_ptr, w_ptr, B, N, k, out_ptr);
  if (B == 0 || k == 0) return;
  py::gil_scoped_release release;
  greedy_batch<T>(s_ptr, w_ptr, lengths_ptr, B, N, k, mul, tau, out_ptr, num_threads);
}

}  // namespace

PYBIND11_MODULE(_cpu, m) {
  m.doc() =
      "vtprune CPU engine: the SCOPE greedy loop and the whole HoloV selection of the torch "
      "backend, each in one call (torch-free bindings: raw host pointers and sizes)";
  const char* doc =
      "SCOPE greedy picks (SPEC §1) from a precomputed similarity, written to out [B, k] int64 in "
      "pick order. s: [B, N, N] contiguous and bitwise symmetric; w: float64 [B, N] weights; "
      "lengths: int64 [B] valid tokens per image (clamped to [0, N]) or 0 for all N; mul: "
      "score = gain * w (else gain + w); tau: relative tie band (the lowest index within "
      "[best - tau*|best|, best] is picked). Picks past an image's last valid token are 0. "
      "Runs without the GIL; num_threads > 1 spreads the images over that many threads.";
  m.def("scope_greedy_f32", &scope_greedy<float>, py::arg("s_ptr"), py::arg("w_ptr"),
        py::arg("lengths_ptr"), py::arg("B"), py::arg("N"), py::arg("k"), py::arg("mul"),
        py::arg("tau"), py::arg("out_ptr"), py::arg("num_threads") = 1, doc);
  m.def("scope_greedy_f64", &scope_greedy<double>, py::arg("s_ptr"), py::arg("w_ptr"),
        py::arg("lengths_ptr"), py::arg("B"), py::arg("N"), py::arg("k"), py::arg("mul"),
        py::arg("tau"), py::arg("out_ptr"), py::arg("num_threads") = 1,
        "As scope_greedy_f32 with a float64 similarity s.");
  vtprune_cpu::register_holov(m);  // holov_cpu.cpp
}
