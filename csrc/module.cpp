// pybind11 bindings of vtprune._C. Bindings only: argument checks that need no device, conversion
// of integer addresses to pointers, and turning cudaError_t into Python exceptions. The kernels and
// their launchers live in the .cu files (see kernels.h).
//
// Addresses, sizes and the stream come in as Python ints (tensor.data_ptr(), .stride(),
// torch.cuda.current_stream().cuda_stream), so this module never includes torch headers and one
// build works with every torch version.

#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "common.cuh"
#include "kernels.h"

#ifndef VTPRUNE_CUDA_ARCHS
#define VTPRUNE_CUDA_ARCHS "unknown"
#endif

namespace py = pybind11;

namespace {

std::string describe(cudaError_t err) {
  return std::string(cudaGetErrorString(err)) + " (" + cudaGetErrorName(err) + ")";
}

int device_count() {
  int count = 0;
  // No driver or no GPU is an ordinary situation for a CPU-only box: report 0, and let
  // cuda_status() say why, instead of raising.
  if (cudaGetDeviceCount(&count) != cudaSuccess) return 0;
  return count;
}

std::string cuda_status() {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    // With a static cudart, a machine with no driver at all reports "driver version is
    // insufficient", which sends people looking for a driver upgrade; say what actually happened.
    int driver = 0;
    if (err == cudaErrorInsufficientDriver && cudaDriverGetVersion(&driver) == cudaSuccess &&
        driver == 0) {
      return "no NVIDIA driver found (libcuda.so could not be loaded); CUDA runtime reports: " +
             describe(err);
    }
    return describe(err);
  }
  if (count == 0) return "no CUDA-capable device is detected";
  return "ok: " + std::to_string(count) + " CUDA device(s)";
}

int cuda_runtime_version() {
  int version = 0;
  if (cudaRuntimeGetVersion(&version) != cudaSuccess) return 0;
  return version;
}

int cuda_driver_version() {
  int version = 0;  // stays 0 when no driver is installed
  if (cudaDriverGetVersion(&version) != cudaSuccess) return 0;
  return version;
}

template <typename T>
T* as_ptr(std::uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

void check_nonnegative(const char* name, int64_t value) {
  if (value < 0) {
    throw py::value_error(std::string(name) + " must be >= 0, got " + std::to_string(value));
  }
}

void coverage_max_sim(std::uintptr_t tokens_ptr, int dtype, int64_t B, int64_t N, int64_t D,
                      int64_t stride_b, int64_t stride_n, std::uintptr_t indices_ptr, int64_t K,
                      std::uintptr_t lengths_ptr, std::uintptr_t out_ptr, std::uintptr_t stream) {
  if (!vtprune::is_valid_dtype(dtype)) {
    throw py::value_error("dtype must be 0 (float32), 1 (float16) or 2 (bfloat16), got " +
                          std::to_string(dtype));
  }
  check_nonnegative("B", B);
  check_nonnegative("N", N);
  check_nonnegative("D", D);
  check_nonnegative("K", K);
  check_nonnegative("stride_b", stride_b);
  check_nonnegative("stride_n", stride_n);
  if (B > 0 && N > 0) {
    if (out_ptr == 0) throw py::value_error("out_ptr is null");
    if (lengths_ptr == 0) throw py::value_error("lengths_ptr is null");
    if (K > 0 && indices_ptr == 0) throw py::value_error("indices_ptr is null while K > 0");
    if (D > 0 && tokens_ptr == 0) throw py::value_error("tokens_ptr is null while D > 0");
  }
  const cudaError_t err = vtprune::launch_coverage_max_sim(
      as_ptr<const void>(tokens_ptr), dtype, B, N, D, stride_b, stride_n,
      as_ptr<const int64_t>(indices_ptr), K, as_ptr<const int64_t>(lengths_ptr),
      as_ptr<float>(out_ptr), reinterpret_cast<cudaStream_t>(stream));
  if (err != cudaSuccess) {
    throw std::runtime_error("vtprune._C.coverage_max_sim: CUDA launch failed: " + describe(err));
  }
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "vtprune CUDA kernels (torch-free bindings: raw device pointers, sizes and a stream)";

  m.def("device_count", &device_count,
        "Number of CUDA devices visible to vtprune's (static) CUDA runtime; 0 when there is no "
        "driver or no GPU (see cuda_status()).");
  m.def("cuda_status", &cuda_status,
        "Why CUDA is (un)usable: the CUDA error string of cudaGetDeviceCount, or 'ok: ...'.");
  m.def("cuda_runtime_version", &cuda_runtime_version,
        "CUDA runtime version this module was linked with (e.g. 13000), 0 on error.");
  m.def("cuda_driver_version", &cuda_driver_version,
        "Latest CUDA version the installed driver supports (e.g. 13000), 0 without a driver.");
  m.def("compiled_archs", []() { return std::string(VTPRUNE_CUDA_ARCHS); },
        "The CMAKE_CUDA_ARCHITECTURES list this module was built for, e.g. '80;90'.");

  m.def("coverage_max_sim", &coverage_max_sim, py::arg("tokens_ptr"), py::arg("dtype"),
        py::arg("B"), py::arg("N"), py::arg("D"), py::arg("stride_b"), py::arg("stride_n"),
        py::arg("indices_ptr"), py::arg("K"), py::arg("lengths_ptr"), py::arg("out_ptr"),
        py::arg("stream"),
        "out[b, u] = max over valid s in indices[b, :] of sim(u, s) for u < lengths[b], 0 for "
        "padded u (SPEC §1 similarity, fp32 math). tokens: fp32/fp16/bf16 [B, N, D] with element "
        "strides (stride_b, stride_n, 1); indices int64 [B, K], lengths int64 [B], out float32 "
        "[B, N], all contiguous device memory. Indices outside [0, lengths[b]) are skipped; a "
        "token with no valid index gets -inf. Raises RuntimeError if the launch fails.");
}
