// Shared helpers for the vtprune CUDA kernels.
//
// This header is included both by .cu files (compiled by nvcc) and by module.cpp (compiled by the
// host C++ compiler, which never sees device code), so everything device-specific is guarded by
// __CUDACC__. No torch headers anywhere: Python hands us raw pointers, sizes and a stream, which
// keeps one binary usable with any torch version.
#pragma once

#include <cstdint>
#include <cuda_runtime_api.h>

#ifdef __CUDACC__
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

namespace vtprune {

// Dtype codes shared with python/vtprune/_cuda.py (keep both in sync).
enum class DType : int { Float32 = 0, Float16 = 1, BFloat16 = 2 };

inline bool is_valid_dtype(int code) { return code >= 0 && code <= 2; }

inline const char* dtype_name(int code) {
  switch (code) {
    case 0: return "float32";
    case 1: return "float16";
    case 2: return "bfloat16";
    default: return "unknown";
  }
}

// Early-return on the first CUDA error. Launchers return cudaError_t instead of throwing so that
// no C++ exception ever has to cross the nvcc/host-compiler object boundary.
#define VTPRUNE_CUDA_TRY(expr)                 \
  do {                                         \
    cudaError_t vtprune_err_ = (expr);         \
    if (vtprune_err_ != cudaSuccess) {         \
      return vtprune_err_;                     \
    }                                          \
  } while (0)

// Makes the device that owns `ptr` current for the lifetime of the guard. Our cudart is linked
// statically, so its notion of the "current device" is separate from torch's; pinning the device
// from the data pointer means a direct call into vtprune._C (without torch.cuda.device(...)) still
// launches on the device that owns the data and the stream.
class DeviceGuard {
 public:
  DeviceGuard() = default;
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

  cudaError_t set_from_pointer(const void* ptr) {
    if (ptr == nullptr) return cudaSuccess;
    cudaPointerAttributes attr{};
    VTPRUNE_CUDA_TRY(cudaPointerGetAttributes(&attr, ptr));
    if (attr.type != cudaMemoryTypeDevice && attr.type != cudaMemoryTypeManaged) {
      return cudaErrorInvalidValue;  // host pointer handed to a device kernel
    }
    return set(attr.device);
  }

  // As above, for a launcher that also needs to know which device that is.
  cudaError_t set_from_pointer(const void* ptr, int* device) {
    VTPRUNE_CUDA_TRY(set_from_pointer(ptr));
    return cudaGetDevice(device);
  }

  // Makes `device` current (for a launcher that is given the device rather than a pointer).
  cudaError_t set(int device) {
    int current = -1;
    VTPRUNE_CUDA_TRY(cudaGetDevice(&current));
    if (current != device) {
      VTPRUNE_CUDA_TRY(cudaSetDevice(device));
      previous_ = current;
    }
    return cudaSuccess;
  }

  ~DeviceGuard() {
    if (previous_ >= 0) cudaSetDevice(previous_);
  }

 private:
  int previous_ = -1;
};

#ifdef __CUDACC__

// All arithmetic is fp32 whatever the storage dtype (SPEC: "float32 (or better)").
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

// Calls fn(T{}) with T the storage type for `code`; returns cudaErrorInvalidValue for an unknown
// code rather than throwing (see VTPRUNE_CUDA_TRY).
template <typename Fn>
inline cudaError_t dispatch_dtype(int code, Fn&& fn) {
  switch (static_cast<DType>(code)) {
    case DType::Float32: return fn(float{});
    case DType::Float16: return fn(__half{});
    case DType::BFloat16: return fn(__nv_bfloat16{});
    default: return cudaErrorInvalidValue;
  }
}

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;

// Butterfly reduction: every lane ends up with the full sum, so no broadcast is needed after it.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) {
    v += __shfl_xor_sync(kFullMask, v, offset);
  }
  return v;
}

#endif  // __CUDACC__

}  // namespace vtprune
