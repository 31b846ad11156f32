// CUDA emulator shim: the part of <cooperative_groups.h> that vtprune's kernels use, the block
// and the thread-block cluster (sm_90). cluster.sync() is a rendezvous of every thread of every
// block of the cluster, checked like __syncthreads (tests/cuda_emu/emu.cpp); map_shared_rank
// translates a shared-memory address into the same object of another block of the cluster.
#pragma once

#if !defined(__CUDACC__)
#error "cooperative_groups.h is for kernel translation units"
#endif

#include "emu_api.h"

namespace cooperative_groups {

class thread_block {
 public:
  // The call site is the caller's (GCC builtins as default arguments), so barrier errors name it.
  void sync(const char* file = __builtin_FILE(), int line = __builtin_LINE()) const { ::emu::syncthreads(file, line); }
  unsigned thread_rank() const { return ::emu::g_thread->linear; }
  unsigned size() const { return ::emu::g_block_dim.x * ::emu::g_block_dim.y * ::emu::g_block_dim.z; }
  unsigned num_threads() const { return size(); }
  dim3 group_dim() const { return ::emu::g_block_dim; }
  uint3 group_index() const { return ::emu::g_block_idx; }
  uint3 thread_index() const { return ::emu::g_thread->idx; }
};

inline thread_block this_thread_block() { return thread_block(); }

class cluster_group {
 public:
  void sync(const char* file = __builtin_FILE(), int line = __builtin_LINE()) const { ::emu::cluster_sync(file, line); }
  unsigned block_rank() const { return ::emu::cluster_block_rank(); }
  unsigned num_blocks() const { return ::emu::cluster_num_blocks(); }
  dim3 dim_blocks() const { return ::emu::cluster_dim_blocks(); }
  uint3 block_index() const { return ::emu::cluster_block_index(); }
  unsigned thread_rank() const { return block_rank() * thread_block().size() + ::emu::g_thread->linear; }
  unsigned num_threads() const { return num_blocks() * thread_block().size(); }
  template <typename T>
  T* map_shared_rank(T* addr, unsigned rank) const {
    return static_cast<T*>(::emu::cluster_map_shared_rank(addr, rank));
  }
};

inline cluster_group this_cluster() { return cluster_group(); }

}  // namespace cooperative_groups
