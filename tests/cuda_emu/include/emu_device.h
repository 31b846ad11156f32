// CUDA emulator: the device-side language for kernel translation units (csrc/*.cu after
// tests/cuda_emu/rewrite.py), force-included with -D__CUDACC__. Every CUDA thread is a fiber
// on one OS thread (tests/cuda_emu/emu.cpp); the builtins below read the running fiber's state,
// and every synchronizing intrinsic (__syncthreads, shuffles, ballot, WMMA) is a rendezvous that
// the scheduler checks: all threads of the block (or lanes of the warp) must reach it.
#pragma once

#if !defined(__CUDACC__)
#error "emu_device.h is for kernel translation units (compiled with -D__CUDACC__)"
#endif

#include <math.h>  // libstdc++'s wrapper: isnan, fmaf, ... in the global namespace, as in CUDA

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>

#include "cuda_runtime_api.h"

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
// __shared__ declarations and <<<...>>> launches are rewritten by rewrite.py; one left over is a
// rewrite bug and must not compile.
#define __shared__ __shared___was_not_rewritten_by_tests_cuda_emu_rewrite_py

#include "emu_api.h"

#define threadIdx (static_cast<const uint3&>(::emu::g_thread->idx))
// References, not macros: cudaLaunchConfig_t has members named gridDim and blockDim.
inline const uint3& blockIdx = ::emu::g_block_idx;
inline const dim3& blockDim = ::emu::g_block_dim;
inline const dim3& gridDim = ::emu::g_grid_dim;
#define warpSize 32

#define __syncthreads() ::emu::syncthreads(__FILE__, __LINE__)
#define __syncwarp(...) (::emu::Site{__FILE__, __LINE__}.syncwarp(__VA_ARGS__))
#define __shfl_xor_sync(...) (::emu::Site{__FILE__, __LINE__}.shfl_xor(__VA_ARGS__))
#define __shfl_up_sync(...) (::emu::Site{__FILE__, __LINE__}.shfl_up(__VA_ARGS__))
#define __shfl_down_sync(...) (::emu::Site{__FILE__, __LINE__}.shfl_down(__VA_ARGS__))
#define __shfl_sync(...) (::emu::Site{__FILE__, __LINE__}.shfl_idx(__VA_ARGS__))
#define __ballot_sync(...) (::emu::Site{__FILE__, __LINE__}.ballot(__VA_ARGS__))

// Atomics: fibers switch only at synchronizing intrinsics, so a plain read-modify-write cannot be
// interleaved with another thread's. (Integer atomics only: their order cannot change a result.)
inline int atomicAdd(int* address, int value) {
  const int old = *address;
  *address = old + value;
  return old;
}

inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
// Explicitly rounded fp32 operations: kernels use them to forbid FMA contraction. The emulator is
// built with -ffp-contract=off, so plain operations are already rounded one by one.
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fdiv_rn(float a, float b) { return a / b; }

// min/max: the overload set of CUDA's math_functions.hpp (same parameter and result types), so
// mixed-type calls resolve (or fail to) as they do under nvcc.
// Mixed signed/unsigned pairs convert to the unsigned type, as the usual arithmetic conversions do.
#define EMU_MINMAX_OVERLOADS(NAME, OP, FNAME)                                                            \
  inline int NAME(int a, int b) { return a OP b ? a : b; }                                               \
  inline unsigned int NAME(unsigned int a, unsigned int b) { return a OP b ? a : b; }                    \
  inline unsigned int NAME(int a, unsigned int b) { return NAME(static_cast<unsigned int>(a), b); }     \
  inline unsigned int NAME(unsigned int a, int b) { return NAME(a, static_cast<unsigned int>(b)); }     \
  inline long int NAME(long int a, long int b) { return a OP b ? a : b; }                                \
  inline unsigned long int NAME(unsigned long int a, unsigned long int b) { return a OP b ? a : b; }     \
  inline unsigned long int NAME(long int a, unsigned long int b) {                                       \
    return NAME(static_cast<unsigned long int>(a), b);                                                   \
  }                                                                                                      \
  inline unsigned long int NAME(unsigned long int a, long int b) {                                       \
    return NAME(a, static_cast<unsigned long int>(b));                                                   \
  }                                                                                                      \
  inline long long int NAME(long long int a, long long int b) { return a OP b ? a : b; }                 \
  inline unsigned long long int NAME(unsigned long long int a, unsigned long long int b) {               \
    return a OP b ? a : b;                                                                               \
  }                                                                                                      \
  inline unsigned long long int NAME(long long int a, unsigned long long int b) {                        \
    return NAME(static_cast<unsigned long long int>(a), b);                                              \
  }                                                                                                      \
  inline unsigned long long int NAME(unsigned long long int a, long long int b) {                        \
    return NAME(a, static_cast<unsigned long long int>(b));                                              \
  }                                                                                                      \
  inline float NAME(float a, float b) { return FNAME##f(a, b); }                                         \
  inline double NAME(double a, double b) { return FNAME(a, b); }                                         \
  inline double NAME(float a, double b) { return FNAME(static_cast<double>(a), b); }                    \
  inline double NAME(double a, float b) { return FNAME(a, static_cast<double>(b)); }

EMU_MINMAX_OVERLOADS(min, <, fmin)
EMU_MINMAX_OVERLOADS(max, >, fmax)
#undef EMU_MINMAX_OVERLOADS
