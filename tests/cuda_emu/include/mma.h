// CUDA emulator shim: nvcuda::wmma for 16x16x16 tiles of __half / __nv_bfloat16 with a float
// accumulator. The real fragments spread a tile over the 32 lanes in an unspecified layout; here
// every lane holds the whole tile (row-major), and load/store/mma are warp rendezvous whose last
// lane does the work once and broadcasts it, so the warp's lanes can never disagree. The product
// is exact (16-bit x 16-bit fits in fp32) and summed in fp32 in k order; real tensor cores use
// another (unspecified) summation order and rounding, so results may differ in the last bits.
#pragma once

#include "emu_device.h"

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

namespace detail {

template <typename Use, int M, int N, int K>
struct Shape;
template <int M, int N, int K>
struct Shape<matrix_a, M, N, K> {
  static constexpr int rows = M, cols = K;
};
template <int M, int N, int K>
struct Shape<matrix_b, M, N, K> {
  static constexpr int rows = K, cols = N;
};
template <int M, int N, int K>
struct Shape<accumulator, M, N, K> {
  static constexpr int rows = M, cols = N;
};

template <typename Layout>
constexpr bool is_col_major() {
  return std::is_same<Layout, col_major>::value;
}

}  // namespace detail

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
class fragment {
 public:
  static_assert(M == 16 && N == 16 && K == 16, "the emulator implements the 16x16x16 shape only");
  static constexpr int rows = detail::Shape<Use, M, N, K>::rows;
  static constexpr int cols = detail::Shape<Use, M, N, K>::cols;
  // The whole tile in every lane (the real num_elements is the per-lane share).
  static constexpr int num_elements = rows * cols;
  using element_type = T;
  using layout = Layout;
  T x[num_elements];
};

template <typename Use, int M, int N, int K, typename T, typename Layout>
inline void fill_fragment(fragment<Use, M, N, K, T, Layout>& f, const T& v) {
  for (int i = 0; i < f.num_elements; ++i) f.x[i] = v;  // per lane, no rendezvous (as in CUDA)
}

namespace detail {

struct MemArg {
  void* frag;
  const void* ptr;
  unsigned ldm;
  bool col_major;
};

// ldm and the pointer must be the same in every lane (the intrinsics are warp-wide), the pointer
// 256-bit aligned and ldm a multiple of 16 bytes (CUDA's wmma requirements).
inline void check_mem_args(void* const* args, int lanes, std::size_t elem, const char* what) {
  const MemArg* a0 = static_cast<const MemArg*>(args[0]);
  for (int l = 1; l < lanes; ++l) {
    const MemArg* a = static_cast<const MemArg*>(args[l]);
    if (a->ptr != a0->ptr || a->ldm != a0->ldm || a->col_major != a0->col_major) {
      ::emu::fail(what);  // message completed by the caller's name: lanes disagree
    }
  }
  if (reinterpret_cast<std::uintptr_t>(a0->ptr) % 32 != 0) ::emu::fail("wmma: pointer is not 256-bit aligned");
  if ((a0->ldm * elem) % 16 != 0) ::emu::fail("wmma: ldm is not a multiple of 16 bytes");
}

template <typename Frag>
void complete_load(void* const* args, int lanes) {
  using T = typename Frag::element_type;
  check_mem_args(args, lanes, sizeof(T), "wmma::load_matrix_sync: lanes passed different pointers or ldm");
  const MemArg* a0 = static_cast<const MemArg*>(args[0]);
  const T* src = static_cast<const T*>(a0->ptr);
  Frag* f0 = static_cast<Frag*>(a0->frag);
  for (int r = 0; r < Frag::rows; ++r) {
    for (int c = 0; c < Frag::cols; ++c) {
      f0->x[r * Frag::cols + c] = a0->col_major ? src[static_cast<std::size_t>(c) * a0->ldm + r]
                                                : src[static_cast<std::size_t>(r) * a0->ldm + c];
    }
  }
  for (int l = 1; l < lanes; ++l) *static_cast<Frag*>(static_cast<const MemArg*>(args[l])->frag) = *f0;
}

template <typename Frag>
void complete_store(void* const* args, int lanes) {
  using T = typename Frag::element_type;
  check_mem_args(args, lanes, sizeof(T), "wmma::store_matrix_sync: lanes passed different pointers or ldm");
  const MemArg* a0 = static_cast<const MemArg*>(args[0]);
  const Frag* f0 = static_cast<const Frag*>(a0->frag);
  for (int l = 1; l < lanes; ++l) {
    if (std::memcmp(static_cast<const MemArg*>(args[l])->frag, f0, sizeof(Frag)) != 0) {
      ::emu::fail("wmma::store_matrix_sync: the lanes' accumulator fragments differ");
    }
  }
  T* dst = static_cast<T*>(const_cast<void*>(a0->ptr));
  for (int r = 0; r < Frag::rows; ++r) {
    for (int c = 0; c < Frag::cols; ++c) {
      const std::size_t at = a0->col_major ? static_cast<std::size_t>(c) * a0->ldm + r : static_cast<std::size_t>(r) * a0->ldm + c;
      dst[at] = f0->x[r * Frag::cols + c];
    }
  }
}

template <typename FD, typename FA, typename FB, typename FC>
struct MmaArg {
  FD* d;
  const FA* a;
  const FB* b;
  const FC* c;
};

template <typename FD, typename FA, typename FB, typename FC>
void complete_mma(void* const* args, int lanes) {
  using Arg = MmaArg<FD, FA, FB, FC>;
  const Arg* a0 = static_cast<const Arg*>(args[0]);
  FD out;
  for (int i = 0; i < 16; ++i) {
    for (int j = 0; j < 16; ++j) {
      float acc = static_cast<float>(a0->c->x[i * 16 + j]);
      for (int k = 0; k < 16; ++k) {
        acc += static_cast<float>(a0->a->x[i * 16 + k]) * static_cast<float>(a0->b->x[k * 16 + j]);
      }
      out.x[i * 16 + j] = acc;
    }
  }
  for (int l = 0; l < lanes; ++l) *static_cast<const Arg*>(args[l])->d = out;
}

}  // namespace detail

template <typename Use, int M, int N, int K, typename T, typename Layout>
inline void load_matrix_sync_at(const char* file, int line, fragment<Use, M, N, K, T, Layout>& f, const T* p, unsigned ldm) {
  static_assert(!std::is_same<Use, accumulator>::value, "accumulator loads need a layout_t");
  detail::MemArg arg{&f, p, ldm, detail::is_col_major<Layout>()};
  ::emu::warp_collective(::emu::kWmmaLoad, 0xffffffffu, file, line, &arg, &detail::complete_load<fragment<Use, M, N, K, T, Layout>>);
}

template <int M, int N, int K, typename T>
inline void load_matrix_sync_at(const char* file, int line, fragment<accumulator, M, N, K, T>& f, const T* p, unsigned ldm,
                                layout_t layout) {
  detail::MemArg arg{&f, p, ldm, layout == mem_col_major};
  ::emu::warp_collective(::emu::kWmmaLoad, 0xffffffffu, file, line, &arg, &detail::complete_load<fragment<accumulator, M, N, K, T>>);
}

template <int M, int N, int K, typename T>
inline void store_matrix_sync_at(const char* file, int line, T* p, const fragment<accumulator, M, N, K, T>& f, unsigned ldm,
                                 layout_t layout) {
  detail::MemArg arg{const_cast<void*>(static_cast<const void*>(&f)), p, ldm, layout == mem_col_major};
  ::emu::warp_collective(::emu::kWmmaStore, 0xffffffffu, file, line, &arg, &detail::complete_store<fragment<accumulator, M, N, K, T>>);
}

template <int M, int N, int K, typename TA, typename LA, typename TB, typename LB, typename TC>
inline void mma_sync_at(const char* file, int line, fragment<accumulator, M, N, K, TC>& d, const fragment<matrix_a, M, N, K, TA, LA>& a,
                        const fragment<matrix_b, M, N, K, TB, LB>& b, const fragment<accumulator, M, N, K, TC>& c) {
  using FD = fragment<accumulator, M, N, K, TC>;
  using FA = fragment<matrix_a, M, N, K, TA, LA>;
  using FB = fragment<matrix_b, M, N, K, TB, LB>;
  detail::MmaArg<FD, FA, FB, FD> arg{&d, &a, &b, &c};
  ::emu::warp_collective(::emu::kWmmaMma, 0xffffffffu, file, line, &arg, &detail::complete_mma<FD, FA, FB, FD>);
}

}  // namespace wmma
}  // namespace nvcuda

// Call sites recorded for barrier diagnostics, as for the shuffles.
#define load_matrix_sync(...) load_matrix_sync_at(__FILE__, __LINE__, __VA_ARGS__)
#define store_matrix_sync(...) store_matrix_sync_at(__FILE__, __LINE__, __VA_ARGS__)
#define mma_sync(...) mma_sync_at(__FILE__, __LINE__, __VA_ARGS__)
