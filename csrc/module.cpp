// pybind11 bindings of vtprune._C. Bindings only: argument checks that need no device, conversion
// of integer addresses to pointers, and turning cudaError_t into Python exceptions. The kernels and
// their launchers live in the .cu files (see kernels.h).
//
// Addresses, sizes and the stream come in as Python ints (tensor.data_ptr(), .stride(),
// torch.cuda.current_stream().cuda_stream), so this module never includes torch headers and one
// build works with every torch version.

#include <pybind11/pybind11.h>

#include <cmath>
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

void check_workspace(std::uintptr_t workspace_ptr, int64_t workspace_bytes, int64_t need,
                     const char* sizer) {
  if (workspace_ptr == 0) throw py::value_error("workspace_ptr is null");
  if (workspace_bytes < need) {
    throw py::value_error("workspace_bytes must be >= " + std::string(sizer) + " = " +
                          std::to_string(need) + ", got " + std::to_string(workspace_bytes));
  }
}

void require_ptr(const char* name, std::uintptr_t ptr) {
  if (ptr == 0) throw py::value_error(std::string(name) + " is null");
}

// A dtype code of the token and weight arguments (vtprune::DType).
void check_dtype_code(const char* name, int dtype) {
  if (!vtprune::is_valid_dtype(dtype)) {
    throw py::value_error(std::string(name) + " must be 0 (float32), 1 (float16) or 2 (bfloat16), got " +
                          std::to_string(dtype));
  }
}

// Tokens [B, N, D] with element strides (stride_b, stride_n, 1), as the token kernels take them.
void check_token_layout(int64_t D, int64_t stride_b, int64_t stride_n) {
  check_nonnegative("D", D);
  check_nonnegative("stride_b", stride_b);
  check_nonnegative("stride_n", stride_n);
}

void coverage_max_sim(std::uintptr_t tokens_ptr, int dtype, int64_t B, int64_t N, int64_t D,
                      int64_t stride_b, int64_t stride_n, std::uintptr_t indices_ptr, int64_t K,
                      std::uintptr_t lengths_ptr, std::uintptr_t out_ptr, std::uintptr_t stream) {
  check_dtype_code("dtype", dtype);
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

// ---- SCOPE greedy selection

// The storage dtypes of a similarity matrix S: fp32, or fp16 for large images.
void check_sim_dtype(const char* name, int dtype) {
  if (dtype != static_cast<int>(vtprune::DType::Float32) &&
      dtype != static_cast<int>(vtprune::DType::Float16)) {
    throw py::value_error(std::string(name) + " must be 0 (float32) or 1 (float16), got " +
                          std::to_string(dtype));
  }
}

// The arrays both greedy launchers (single CTA and cluster) read or write when there is a pick.
void require_greedy_ptrs(std::uintptr_t sim_ptr, std::uintptr_t weights_ptr, bool unit_weights,
                         std::uintptr_t lengths_ptr, std::uintptr_t k_per_image_ptr,
                         std::uintptr_t out_ptr) {
  require_ptr("sim_ptr", sim_ptr);
  if (!unit_weights) require_ptr("weights_ptr", weights_ptr);  // unit weights read nothing
  require_ptr("lengths_ptr", lengths_ptr);
  require_ptr("k_per_image_ptr", k_per_image_ptr);
  require_ptr("out_ptr", out_ptr);
}

// The greedy launchers' weights argument from the binding's (ptr, dtype, stride, unit); stride -1
// means N (contiguous rows).
vtprune::ScopeWeights scope_weights(std::uintptr_t weights_ptr, int weights_dtype,
                                    int64_t weights_stride, bool unit_weights, int64_t N) {
  check_dtype_code("weights_dtype", weights_dtype);
  if (weights_stride < -1) {
    throw py::value_error("weights_stride must be >= 0 (or -1 for N), got " + std::to_string(weights_stride));
  }
  return vtprune::ScopeWeights{as_ptr<const void>(weights_ptr), weights_dtype,
                               weights_stride == -1 ? N : weights_stride, unit_weights};
}

void check_scope_sizes(int64_t B, int64_t N) {
  check_nonnegative("B", B);
  check_nonnegative("N", N);
  if (N > vtprune::kScopeMaxN) {
    throw py::value_error("N must be <= " + std::to_string(vtprune::kScopeMaxN) + ", got " +
                          std::to_string(N));
  }
  if (N > 0 && B > INT64_MAX / N / N) {
    throw py::value_error("B * N * N overflows int64 (B = " + std::to_string(B) +
                          ", N = " + std::to_string(N) + ")");
  }
}

int64_t scope_workspace_bytes(int64_t B, int64_t N) {
  check_scope_sizes(B, N);
  return vtprune::scope_workspace_bytes(B, N);
}

void scope_greedy(std::uintptr_t sim_ptr, int sim_dtype, std::uintptr_t weights_ptr,
                  std::uintptr_t lengths_ptr, std::uintptr_t k_per_image_ptr, int64_t B, int64_t N,
                  int64_t k_max, bool mul, std::uintptr_t workspace_ptr, int64_t workspace_bytes,
                  std::uintptr_t out_ptr, std::uintptr_t stream, bool force_global_state,
                  int64_t max_list, bool sorted, int weights_dtype, int64_t weights_stride,
                  bool unit_weights) {
  check_sim_dtype("sim_dtype", sim_dtype);
  const vtprune::ScopeWeights weights =
      scope_weights(weights_ptr, weights_dtype, weights_stride, unit_weights, N);
  check_scope_sizes(B, N);
  check_nonnegative("k_max", k_max);
  check_nonnegative("workspace_bytes", workspace_bytes);
  check_nonnegative("max_list", max_list);
  if (B > 0 && N > 0 && k_max > 0) {
    require_greedy_ptrs(sim_ptr, weights_ptr, unit_weights, lengths_ptr, k_per_image_ptr, out_ptr);
    check_workspace(workspace_ptr, workspace_bytes, vtprune::scope_workspace_bytes(B, N),
                    "scope_workspace_bytes(B, N)");
  }
  const cudaError_t err = vtprune::launch_scope_greedy(
      as_ptr<const void>(sim_ptr), sim_dtype, weights,
      as_ptr<const int64_t>(lengths_ptr), as_ptr<const int64_t>(k_per_image_ptr), B, N, k_max, mul,
      as_ptr<void>(workspace_ptr), workspace_bytes, as_ptr<int64_t>(out_ptr),
      reinterpret_cast<cudaStream_t>(stream), force_global_state, max_list, sorted);
  if (err != cudaSuccess) {
    throw std::runtime_error("vtprune._C.scope_greedy: CUDA launch failed: " + describe(err));
  }
}

void check_cluster_size(int cluster_size) {
  if (cluster_size != 0 && cluster_size != 2 && cluster_size != 4 && cluster_size != 8 &&
      cluster_size != 16) {
    throw py::value_error("cluster_size must be 0 (choose), 2, 4, 8 or 16, got " +
                          std::to_string(cluster_size));
  }
}

// cudaErrorNotSupported from the cluster launchers means "no thread-block clusters here".
[[noreturn]] void throw_cluster_error(const char* what, cudaError_t err, const char* failed) {
  if (err == cudaErrorNotSupported) {
    throw std::runtime_error(std::string(what) +
                             ": thread-block clusters need a GPU of compute capability 9.0 or "
                             "newer (Hopper); this device is older: " + describe(err));
  }
  throw std::runtime_error(std::string(what) + ": " + failed + ": " + describe(err));
}

void scope_greedy_cluster(std::uintptr_t sim_ptr, int sim_dtype, std::uintptr_t weights_ptr,
                          std::uintptr_t lengths_ptr, std::uintptr_t k_per_image_ptr, int64_t B,
                          int64_t N, int64_t k_max, bool mul, std::uintptr_t workspace_ptr,
                          int64_t workspace_bytes, std::uintptr_t out_ptr, std::uintptr_t stream,
                          bool force_global_state, int64_t max_list, int cluster_size,
                          bool sorted, int weights_dtype, int64_t weights_stride,
                          bool unit_weights) {
  if (sim_dtype != static_cast<int>(vtprune::DType::Float32)) {
    throw py::value_error("sim_dtype must be 0 (float32) for the cluster kernel, got " +
                          std::to_string(sim_dtype));
  }
  check_scope_sizes(B, N);
  if (N > vtprune::scope_cluster_max_n()) {
    throw py::value_error("N must be <= " + std::to_string(vtprune::scope_cluster_max_n()) +
                          " for the cluster kernel (fp32 S only), got " + std::to_string(N));
  }
  check_nonnegative("k_max", k_max);
  check_nonnegative("workspace_bytes", workspace_bytes);
  if (max_list != 0) {
    throw py::value_error("max_list must be 0 for the cluster kernel (its list holds every row), got " +
                          std::to_string(max_list));
  }
  check_cluster_size(cluster_size);
  const vtprune::ScopeWeights weights =
      scope_weights(weights_ptr, weights_dtype, weights_stride, unit_weights, N);
  if (B > 0 && N > 0 && k_max > 0) {
    require_greedy_ptrs(sim_ptr, weights_ptr, unit_weights, lengths_ptr, k_per_image_ptr, out_ptr);
  }
  const cudaError_t err = vtprune::launch_scope_greedy_cluster(
      as_ptr<const void>(sim_ptr), sim_dtype, weights,
      as_ptr<const int64_t>(lengths_ptr), as_ptr<const int64_t>(k_per_image_ptr), B, N, k_max, mul,
      as_ptr<void>(workspace_ptr), workspace_bytes, as_ptr<int64_t>(out_ptr),
      reinterpret_cast<cudaStream_t>(stream), force_global_state, max_list, cluster_size, sorted);
  if (err != cudaSuccess) throw_cluster_error("vtprune._C.scope_greedy_cluster", err, "CUDA launch failed");
}

py::tuple scope_cluster_plan(int device, int64_t N, int cluster_size, bool force_global_state) {
  if (N < 1 || N > vtprune::scope_cluster_max_n()) {
    throw py::value_error("N must be in [1, " + std::to_string(vtprune::scope_cluster_max_n()) +
                          "], got " + std::to_string(N));
  }
  check_cluster_size(cluster_size);
  check_nonnegative("device", device);
  int size = 0;
  bool slice = false;
  int64_t bytes = 0;
  const cudaError_t err =
      vtprune::scope_cluster_plan(device, N, cluster_size, force_global_state, &size, &slice, &bytes);
  if (err != cudaSuccess) throw_cluster_error("vtprune._C.scope_cluster_plan", err, "CUDA error");
  return py::make_tuple(size, slice, bytes);
}

// ---- HoloV: crop statistics, budgets, per-crop top-k

void check_int32_range(const char* name, int64_t value) {
  if (value < 0 || value > INT32_MAX) {
    throw py::value_error(std::string(name) + " must be in [0, 2^31 - 1], got " +
                          std::to_string(value));
  }
}

void check_holov_sizes(int64_t B, int64_t N, int64_t k, int64_t num_crops) {
  check_nonnegative("B", B);
  check_int32_range("N", N);
  if (k < 1 || k > N) {
    throw py::value_error("k must satisfy 1 <= k <= N = " + std::to_string(N) + ", got " +
                          std::to_string(k));
  }
  if (num_crops < 0 || num_crops > N) {
    throw py::value_error("num_crops must satisfy 0 (default) <= num_crops <= N = " +
                          std::to_string(N) + ", got " + std::to_string(num_crops));
  }
  if (B > INT64_MAX / 16 / N) {
    throw py::value_error("B * N overflows the workspace size (B = " + std::to_string(B) +
                          ", N = " + std::to_string(N) + ")");
  }
}

void check_crop_sizes(int64_t B, int64_t C) {
  check_nonnegative("B", B);
  check_int32_range("C", C);
  if (C > 0 && B > INT64_MAX / 32 / C) {
    throw py::value_error("B * C overflows the workspace size (B = " + std::to_string(B) +
                          ", C = " + std::to_string(C) + ")");
  }
}

int64_t holov_select_workspace_bytes(int64_t B, int64_t N, int64_t k, int64_t num_crops) {
  check_holov_sizes(B, N, k, num_crops);
  return vtprune::holov_select_workspace_bytes(B, N, k, num_crops);
}

void holov_select(std::uintptr_t tokens_ptr, int dtype, int64_t B, int64_t N, int64_t D,
                  int64_t stride_b, int64_t stride_n, std::uintptr_t attn_ptr,
                  std::uintptr_t lengths_ptr, int64_t k, int64_t num_crops, double alpha,
                  bool rank_by_score, bool sorted, std::uintptr_t workspace_ptr,
                  int64_t workspace_bytes, std::uintptr_t out_ptr, std::uintptr_t stream) {
  check_dtype_code("dtype", dtype);
  check_holov_sizes(B, N, k, num_crops);
  check_token_layout(D, stride_b, stride_n);
  if (!std::isfinite(alpha)) {
    throw py::value_error("alpha must be finite, got " + std::to_string(alpha));
  }
  if (B > 0) {
    if (D > 0) require_ptr("tokens_ptr", tokens_ptr);
    require_ptr("attn_ptr", attn_ptr);
    require_ptr("out_ptr", out_ptr);
    check_workspace(workspace_ptr, workspace_bytes,
                    vtprune::holov_select_workspace_bytes(B, N, k, num_crops),
                    "holov_select_workspace_bytes(B, N, k, num_crops)");
  }
  const cudaError_t err = vtprune::launch_holov_select(
      as_ptr<const void>(tokens_ptr), dtype, B, N, D, stride_b, stride_n,
      as_ptr<const float>(attn_ptr), as_ptr<const int64_t>(lengths_ptr), k, num_crops,
      static_cast<float>(alpha), rank_by_score, sorted, as_ptr<void>(workspace_ptr),
      workspace_bytes, as_ptr<int64_t>(out_ptr), reinterpret_cast<cudaStream_t>(stream));
  if (err != cudaSuccess) {
    throw std::runtime_error("vtprune._C.holov_select: CUDA launch failed: " + describe(err));
  }
}

int64_t crop_budgets_workspace_bytes(int64_t B, int64_t C) {
  check_crop_sizes(B, C);
  return vtprune::crop_budgets_workspace_bytes(B, C);
}

void crop_budgets(std::uintptr_t weights_ptr, std::uintptr_t capacity_ptr, int64_t B, int64_t C,
                  int64_t k, std::uintptr_t workspace_ptr, int64_t workspace_bytes,
                  std::uintptr_t out_ptr, std::uintptr_t stream) {
  check_crop_sizes(B, C);
  if (k < 1) throw py::value_error("k must be >= 1, got " + std::to_string(k));
  if (B > 0 && C > 0) {
    require_ptr("weights_ptr", weights_ptr);
    require_ptr("capacity_ptr", capacity_ptr);
    require_ptr("out_ptr", out_ptr);
    check_workspace(workspace_ptr, workspace_bytes, vtprune::crop_budgets_workspace_bytes(B, C),
                    "crop_budgets_workspace_bytes(B, C)");
  }
  const cudaError_t err = vtprune::launch_crop_budgets(
      as_ptr<const float>(weights_ptr), as_ptr<const int64_t>(capacity_ptr), B, C, k,
      as_ptr<void>(workspace_ptr), workspace_bytes, as_ptr<int64_t>(out_ptr),
      reinterpret_cast<cudaStream_t>(stream));
  if (err != cudaSuccess) {
    throw std::runtime_error("vtprune._C.crop_budgets: CUDA launch failed: " + describe(err));
  }
}

int64_t crop_topk_workspace_bytes(int64_t B, int64_t C) {
  check_crop_sizes(B, C);
  return vtprune::crop_topk_workspace_bytes(B, C);
}

void crop_topk(std::uintptr_t scores_ptr, int64_t B, int64_t N, std::uintptr_t crop_sizes_ptr,
               std::uintptr_t budgets_ptr, int64_t C, int64_t k, bool sorted,
               std::uintptr_t workspace_ptr, int64_t workspace_bytes, std::uintptr_t out_ptr,
               std::uintptr_t stream) {
  check_crop_sizes(B, C);
  check_int32_range("N", N);
  if (k < 1 || k > INT32_MAX) {
    throw py::value_error("k must be in [1, 2^31 - 1], got " + std::to_string(k));
  }
  if (B > 0) {
    require_ptr("scores_ptr", scores_ptr);
    require_ptr("out_ptr", out_ptr);
    if (C > 0) {
      require_ptr("crop_sizes_ptr", crop_sizes_ptr);
      require_ptr("budgets_ptr", budgets_ptr);
    }
    check_workspace(workspace_ptr, workspace_bytes, vtprune::crop_topk_workspace_bytes(B, C),
                    "crop_topk_workspace_bytes(B, C)");
  }
  const cudaError_t err = vtprune::launch_crop_topk(
      as_ptr<const float>(scores_ptr), B, N, as_ptr<const int64_t>(crop_sizes_ptr),
      as_ptr<const int64_t>(budgets_ptr), C, k, sorted, as_ptr<void>(workspace_ptr),
      workspace_bytes, as_ptr<int64_t>(out_ptr), reinterpret_cast<cudaStream_t>(stream));
  if (err != cudaSuccess) {
    throw std::runtime_error("vtprune._C.crop_topk: CUDA launch failed: " + describe(err));
  }
}

// ---- SCOPE similarity

void scope_similarity(std::uintptr_t tokens_ptr, int dtype, int64_t B, int64_t N, int64_t D,
                      int64_t stride_b, int64_t stride_n, std::uintptr_t out_ptr, int out_dtype,
                      std::uintptr_t stream) {
  if (dtype != static_cast<int>(vtprune::DType::Float16) &&
      dtype != static_cast<int>(vtprune::DType::BFloat16)) {
    throw py::value_error(
        "dtype must be 1 (float16) or 2 (bfloat16) (float32 tokens use the torch path), got " +
        std::to_string(dtype));
  }
  check_sim_dtype("out_dtype", out_dtype);
  check_scope_sizes(B, N);
  check_token_layout(D, stride_b, stride_n);
  if (B > 0 && N > 0) {
    require_ptr("out_ptr", out_ptr);
    if (D > 0) require_ptr("tokens_ptr", tokens_ptr);
  }
  const cudaError_t err = vtprune::launch_scope_similarity(
      as_ptr<const void>(tokens_ptr), dtype, B, N, D, stride_b, stride_n, as_ptr<void>(out_ptr),
      out_dtype, reinterpret_cast<cudaStream_t>(stream));
  if (err != cudaSuccess) {
    throw std::runtime_error("vtprune._C.scope_similarity: CUDA launch failed: " + describe(err));
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

  m.def("scope_workspace_bytes", &scope_workspace_bytes, py::arg("B"), py::arg("N"),
        "Bytes of device workspace scope_greedy needs for B images of N tokens (13 * B * N).");
  m.def("scope_greedy", &scope_greedy, py::arg("sim_ptr"), py::arg("sim_dtype"),
        py::arg("weights_ptr"), py::arg("lengths_ptr"), py::arg("k_per_image_ptr"), py::arg("B"),
        py::arg("N"), py::arg("k_max"), py::arg("mul"), py::arg("workspace_ptr"),
        py::arg("workspace_bytes"), py::arg("out_ptr"), py::arg("stream"),
        py::arg("force_global_state") = false, py::arg("max_list") = 0, py::arg("sorted") = false,
        py::arg("weights_dtype") = 0, py::arg("weights_stride") = -1, py::arg("unit_weights") = false,
        "SCOPE greedy picks (SPEC §1) in pick order (ascending with sorted=True) into out int64 "
        "[B, k_max] (entries past image b's k are left untouched). sim: [B, N, N] similarity, "
        "dtype 0 (float32) or 1 (float16); weights [B, N] (row stride weights_stride, -1 = N) of "
        "dtype weights_dtype (0/1/2 = fp32/fp16/bf16), read as max(w, 0): the saliency itself for "
        "alpha = 1, its fp32 power otherwise; unit_weights: every weight is 1 (alpha = 0) and "
        "weights_ptr may be 0; lengths and k_per_image int64 [B] (clamped to [1, N] "
        "and [0, min(length, k_max)]); mul: combine 'mul' (True) or 'add'; workspace: at least "
        "scope_workspace_bytes(B, N) bytes. All device memory on one device, contiguous except "
        "the weights' rows; launches "
        "on `stream`. force_global_state / max_list are test knobs (state in the workspace even "
        "when shared memory suffices; a smaller changed-row list). Raises RuntimeError if the "
        "launch fails.");

  m.def("scope_cluster_max_n", &vtprune::scope_cluster_max_n,
        "Largest N scope_greedy_cluster accepts (fp32 S only).");
  m.def("scope_greedy_cluster", &scope_greedy_cluster, py::arg("sim_ptr"), py::arg("sim_dtype"),
        py::arg("weights_ptr"), py::arg("lengths_ptr"), py::arg("k_per_image_ptr"), py::arg("B"),
        py::arg("N"), py::arg("k_max"), py::arg("mul"), py::arg("workspace_ptr"),
        py::arg("workspace_bytes"), py::arg("out_ptr"), py::arg("stream"),
        py::arg("force_global_state") = false, py::arg("max_list") = 0, py::arg("cluster_size") = 0,
        py::arg("sorted") = false, py::arg("weights_dtype") = 0, py::arg("weights_stride") = -1,
        py::arg("unit_weights") = false,
        "scope_greedy's picks (bit for bit) on a thread-block cluster per image (compute "
        "capability >= 9.0): each CTA owns a slice of S's columns, kept in shared memory when it "
        "fits. sim: float32 [B, N, N] (sim_dtype 0), N <= scope_cluster_max_n(); the workspace "
        "is unused (may be 0); force_global_state streams the slices from global memory; "
        "max_list must be 0; cluster_size 2, 4, 8, 16 or 0 (choose). Raises RuntimeError naming "
        "compute capability 9.0 on older devices, or if the launch fails.");
  m.def("scope_cluster_plan", &scope_cluster_plan, py::arg("device"), py::arg("N"),
        py::arg("cluster_size") = 0, py::arg("force_global_state") = false,
        "(cluster_size, slices_in_shared_memory, shared_bytes_per_cta) that scope_greedy_cluster "
        "would use for N tokens on `device`.");

  // ---- HoloV
  m.def("scope_similarity", &scope_similarity, py::arg("tokens_ptr"), py::arg("dtype"),
        py::arg("B"), py::arg("N"), py::arg("D"), py::arg("stride_b"), py::arg("stride_n"),
        py::arg("out_ptr"), py::arg("out_dtype"), py::arg("stream"),
        "SCOPE similarity (SPEC §1) in one launch: out[b, i, j] = <x_i, x_j> / (max(|x_i|, 1e-6) "
        "* max(|x_j|, 1e-6)). tokens: fp16/bf16 (dtype 1/2) [B, N, D] with element strides "
        "(stride_b, stride_n, 1); out: [B, N, N] contiguous, float32 (out_dtype 0) or float16 "
        "(1). Device memory on one device; launches on `stream`. Raises RuntimeError if the "
        "launch fails.");
  m.def("holov_select_workspace_bytes", &holov_select_workspace_bytes, py::arg("B"), py::arg("N"),
        py::arg("k"), py::arg("num_crops"),
        "Bytes of device workspace holov_select needs (num_crops 0 = the per-image default).");
  m.def("holov_select", &holov_select, py::arg("tokens_ptr"), py::arg("dtype"), py::arg("B"),
        py::arg("N"), py::arg("D"), py::arg("stride_b"), py::arg("stride_n"), py::arg("attn_ptr"),
        py::arg("lengths_ptr"), py::arg("k"), py::arg("num_crops"), py::arg("alpha"),
        py::arg("rank_by_score"), py::arg("sorted"), py::arg("workspace_ptr"),
        py::arg("workspace_bytes"), py::arg("out_ptr"), py::arg("stream"),
        "HoloV selection (SPEC §2) into out int64 [B, k], two launches. tokens: fp32/fp16/bf16 "
        "[B, N, D] with element strides (stride_b, stride_n, 1); attn float32 [B, N]; lengths "
        "int64 [B] or 0 for none; num_crops 0 = default; rank_by_score: rank by h instead of attn; "
        "sorted: ascending indices, else crops in order with descending key inside; workspace: at "
        "least holov_select_workspace_bytes(B, N, k, num_crops) bytes. All contiguous device "
        "memory on one device; launches on `stream`. Raises RuntimeError if the launch fails.");
  m.def("crop_budgets_workspace_bytes", &crop_budgets_workspace_bytes, py::arg("B"), py::arg("C"),
        "Bytes of device workspace crop_budgets needs.");
  m.def("crop_budgets", &crop_budgets, py::arg("weights_ptr"), py::arg("capacity_ptr"),
        py::arg("B"), py::arg("C"), py::arg("k"), py::arg("workspace_ptr"),
        py::arg("workspace_bytes"), py::arg("out_ptr"), py::arg("stream"),
        "Per-crop budgets summing to k (SPEC §2 with the capacity rule) into out int64 [B, C]. "
        "weights float32 [B, C], capacity int64 [B, C] (0 = absent crop); workspace: at least "
        "crop_budgets_workspace_bytes(B, C) bytes. Contiguous device memory; launches on "
        "`stream`. Raises RuntimeError if the launch fails.");
  m.def("crop_topk_workspace_bytes", &crop_topk_workspace_bytes, py::arg("B"), py::arg("C"),
        "Bytes of device workspace crop_topk needs.");
  m.def("crop_topk", &crop_topk, py::arg("scores_ptr"), py::arg("B"), py::arg("N"),
        py::arg("crop_sizes_ptr"), py::arg("budgets_ptr"), py::arg("C"), py::arg("k"),
        py::arg("sorted"), py::arg("workspace_ptr"), py::arg("workspace_bytes"),
        py::arg("out_ptr"), py::arg("stream"),
        "Top budgets[b, c] tokens by score inside each contiguous crop into out int64 [B, k] "
        "(NaN last, ties to the lowest index). scores float32 [B, N]; crop_sizes, budgets int64 "
        "[B, C]; workspace: at least crop_topk_workspace_bytes(B, C) bytes. Contiguous device "
        "memory; launches on `stream`. Raises RuntimeError if the launch fails.");
}
