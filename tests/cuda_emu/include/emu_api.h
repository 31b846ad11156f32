// CUDA emulator: the interface between the kernel translation units (emu_device.h, mma.h) and the
// runtime (tests/cuda_emu/emu.cpp). Plain C++; no CUDA keywords.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

#include "cuda_runtime_api.h"

namespace emu {

// State of the running CUDA thread (a fiber); valid only inside a launch.
struct ThreadState {
  uint3 idx;        // threadIdx
  unsigned linear;  // x + y * blockDim.x + z * blockDim.x * blockDim.y
  unsigned lane;
  unsigned warp;
};

extern ThreadState* g_thread;
extern uint3 g_block_idx;
extern dim3 g_block_dim;
extern dim3 g_grid_dim;

// Aborts the running launch with `message` (reported through cudaGetLastError as
// cudaErrorLaunchFailure, with the message in cudaGetErrorString). Never returns.
[[noreturn]] void fail(const char* message);

void syncthreads(const char* file, int line);

// Warp rendezvous: every lane of the running thread's warp must call it with the same kind and
// mask. The last lane to arrive calls complete(lane_args, lanes) with each lane's `arg`; then all
// lanes continue. `arg` stays valid because each lane waits inside this call.
enum CollectiveKind : int {
  kShflXor = 1,
  kShflUp = 2,
  kShflDown = 3,
  kShflIdx = 4,
  kBallot = 5,
  kSyncwarp = 6,
  kWmmaLoad = 7,
  kWmmaStore = 8,
  kWmmaMma = 9,
};
const char* collective_name(int kind);
using CompleteFn = void (*)(void* const* lane_args, int lanes);
void warp_collective(int kind, unsigned mask, const char* file, int line, void* arg, CompleteFn complete);

struct ShflArg {
  std::uint64_t value;
  int param;  // laneMask / delta / srcLane
  int width;
  std::uint64_t result;
};
void complete_shfl_xor(void* const* args, int lanes);
void complete_shfl_up(void* const* args, int lanes);
void complete_shfl_down(void* const* args, int lanes);
void complete_shfl_idx(void* const* args, int lanes);
void complete_ballot(void* const* args, int lanes);
void complete_nothing(void* const* args, int lanes);

// Call site of an intrinsic, so that a barrier error can say where each thread waits.
struct Site {
  const char* file;
  int line;

  template <typename T>
  T shfl(int kind, CompleteFn complete, unsigned mask, T var, int param, int width) const {
    static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= 8, "shuffled values are at most 8 bytes");
    ShflArg a{};
    std::memcpy(&a.value, &var, sizeof(T));
    a.param = param;
    a.width = width;
    warp_collective(kind, mask, file, line, &a, complete);
    T out;
    std::memcpy(&out, &a.result, sizeof(T));
    return out;
  }
  template <typename T>
  T shfl_xor(unsigned mask, T var, int lane_mask, int width = 32) const {
    return shfl(kShflXor, &complete_shfl_xor, mask, var, lane_mask, width);
  }
  template <typename T>
  T shfl_up(unsigned mask, T var, unsigned delta, int width = 32) const {
    return shfl(kShflUp, &complete_shfl_up, mask, var, static_cast<int>(delta), width);
  }
  template <typename T>
  T shfl_down(unsigned mask, T var, unsigned delta, int width = 32) const {
    return shfl(kShflDown, &complete_shfl_down, mask, var, static_cast<int>(delta), width);
  }
  template <typename T>
  T shfl_idx(unsigned mask, T var, int src_lane, int width = 32) const {
    return shfl(kShflIdx, &complete_shfl_idx, mask, var, src_lane, width);
  }
  unsigned ballot(unsigned mask, int predicate) const {
    ShflArg a{};
    a.value = predicate != 0 ? 1u : 0u;
    a.width = 32;
    warp_collective(kBallot, mask, file, line, &a, &complete_ballot);
    return static_cast<unsigned>(a.result);
  }
  void syncwarp(unsigned mask = 0xffffffffu) const {
    warp_collective(kSyncwarp, mask, file, line, nullptr, &complete_nothing);
  }
};

// ---- launches (the target of rewrite.py's <<<...>>> rewrite)

struct LaunchConfig {
  dim3 grid;
  dim3 block;
  std::size_t smem;
  cudaStream_t stream;
  dim3 cluster;  // blocks per thread-block cluster (1,1,1: no cluster)
  LaunchConfig(dim3 g, dim3 b, std::size_t s = 0, cudaStream_t st = nullptr, dim3 c = dim3(1, 1, 1))
      : grid(g), block(b), smem(s), stream(st), cluster(c) {}
};

using Thunk = void (*)(const void* kernel, void* params);
// Runs the whole grid before returning. A configuration the runtime refuses is returned (and
// recorded for cudaGetLastError); a failure while running goes to cudaGetLastError only, as a
// launch's asynchronous errors do.
cudaError_t run_launch(const char* name, const void* kernel, const LaunchConfig& config, void* params, Thunk thunk);

template <typename... P, typename... A>
cudaError_t launch(const char* name, void (*kernel)(P...), const LaunchConfig& config, A&&... args) {
  static_assert(sizeof...(P) == sizeof...(A), "kernel launched with the wrong number of arguments");
  // Converted to the parameter types once, at the launch, as CUDA copies them to parameter space.
  using Params = std::tuple<std::decay_t<P>...>;
  Params params(std::forward<A>(args)...);
  return run_launch(name, reinterpret_cast<const void*>(kernel), config, &params, [](const void* k, void* p) {
    std::apply(reinterpret_cast<void (*)(P...)>(const_cast<void*>(k)), *static_cast<Params*>(p));
  });
}

// The launch attributes of cudaLaunchKernelEx the emulator understands (the cluster dimension);
// any other attribute is refused (cudaErrorInvalidValue) rather than ignored.
cudaError_t launch_config_from(const cudaLaunchConfig_t* config, LaunchConfig* out);

// ---- thread-block clusters (cooperative_groups::this_cluster(), see cooperative_groups.h)

// Rendezvous of every thread of every block of the running cluster (barrier.cluster).
void cluster_sync(const char* file, int line);
unsigned cluster_block_rank();
unsigned cluster_num_blocks();
dim3 cluster_dim_blocks();
uint3 cluster_block_index();
// The address of the same shared-memory object in the block of rank `rank` of the cluster
// (distributed shared memory). `addr` must point into the running block's shared memory.
void* cluster_map_shared_rank(const void* addr, unsigned rank);

// ---- shared memory (the targets of rewrite.py's __shared__ rewrite)

// Storage of one static __shared__ variable for the running block: allocated (and poisoned) by
// the first thread of the block that reaches the declaration, keyed by `key` (a static unique to
// the declaration and template instantiation), freed when the block ends.
void* block_shared_raw(const void* key, std::size_t bytes, std::size_t align, const char* name);
template <typename T>
T* block_shared(const void* key, std::size_t align, const char* name) {
  return static_cast<T*>(block_shared_raw(key, sizeof(T), align > alignof(T) ? align : alignof(T), name));
}
// The launch's dynamic shared memory of the running block (exactly the launch's size, poisoned).
void* dynamic_shared();

}  // namespace emu

// cuda_runtime.h's C++ cudaLaunchKernelEx: the kernel's arguments converted as for <<<...>>>.
template <typename... P, typename... A>
inline cudaError_t cudaLaunchKernelEx(const cudaLaunchConfig_t* config, void (*kernel)(P...), A&&... args) {
  ::emu::LaunchConfig c{dim3(), dim3()};
  const cudaError_t err = ::emu::launch_config_from(config, &c);
  if (err != cudaSuccess) return err;
  return ::emu::launch("cudaLaunchKernelEx", kernel, c, std::forward<A>(args)...);
}
