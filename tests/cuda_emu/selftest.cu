// Kernels that test the CUDA emulator itself (tests/test_cuda_emu.py): planted bugs it must
// detect (a divergent __syncthreads, a divergent shuffle, a shared-memory race, an inter-block
// race, a read of unwritten shared memory, a misaligned WMMA pointer, launch configurations the
// runtime refuses, a missing or divergent cluster.sync) and intrinsics whose results it must get right. Each launcher is a C symbol
// for ctypes and returns the launch's cudaError_t.

#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <cuda_runtime_api.h>
#include <mma.h>

#include <cstdint>

#define EMU_EXPORT extern "C" __attribute__((visibility("default")))

namespace {

constexpr unsigned kFull = 0xffffffffu;

// Threads below `reach` wait at a barrier that the others never reach (they exit).
__global__ void partial_barrier_kernel(int* out, int reach) {
  if (static_cast<int>(threadIdx.x) < reach) __syncthreads();
  out[threadIdx.x] = 1;
}

// Every thread reaches a barrier, but even and odd threads reach different ones.
__global__ void split_barrier_kernel(int* out) {
  if (threadIdx.x % 2 == 0) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1;
}

// Half of each warp calls the full-mask shuffle.
__global__ void partial_shuffle_kernel(int* out) {
  int v = static_cast<int>(threadIdx.x);
  if (threadIdx.x % 32 < 16) v = __shfl_xor_sync(kFull, v, 1);
  out[threadIdx.x] = v;
}

// A partial mask, which vtprune never uses: refused rather than emulated approximately.
__global__ void partial_mask_kernel(int* out) {
  out[threadIdx.x] = __shfl_xor_sync(0x0000ffffu, static_cast<int>(threadIdx.x), 1);
}

// Each thread reads its neighbour's shared slot: a race unless the barrier separates the
// write from the read.
__global__ void neighbour_kernel(int* out, bool with_barrier) {
  __shared__ int slots[1024];
  slots[threadIdx.x] = static_cast<int>(threadIdx.x) * 3 + 1;
  if (with_barrier) __syncthreads();
  out[threadIdx.x] = slots[(threadIdx.x + 1) % blockDim.x];
}

// Two block-wide sums through one shared slot per warp. Without the barrier after the reads, a
// warp that finishes its reads, its next warp sum (five shuffles) and its next slot write before
// another warp has read the first sums corrupts them: only a warp-major schedule gets there.
__global__ void scratch_reuse_kernel(int* out, bool with_barrier) {
  __shared__ int slots[32];
  const unsigned lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  int total = 0;
  for (int round = 0; round < 2; ++round) {
    int v = static_cast<int>(threadIdx.x) + 1000 * round;
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(kFull, v, offset);
    if (lane == 0) slots[warp] = v;
    __syncthreads();
    int sum = 0;
    for (unsigned w = 0; w < warps; ++w) sum += slots[w];
    if (with_barrier) __syncthreads();
    total += sum;
  }
  out[threadIdx.x] = total;
}

// Every block writes the same word: the result depends on the block order.
__global__ void last_block_wins_kernel(int* out) {
  if (threadIdx.x == 0) out[0] = static_cast<int>(blockIdx.x);
}

// Reads shared memory nobody wrote: the poison pattern (or, on a GPU, garbage).
__global__ void unwritten_shared_kernel(float* out) {
  __shared__ float never_written[64];
  extern __shared__ float dynamic_never_written[];
  if (threadIdx.x == 0) {
    out[0] = never_written[3];
    out[1] = dynamic_never_written[0];
  }
}

// Shared memory is per block: block b writes b into its slots, then (after a barrier) reads them.
__global__ void per_block_shared_kernel(int* out) {
  __shared__ int mine[32];
  mine[threadIdx.x] = static_cast<int>(blockIdx.x) * 100 + static_cast<int>(threadIdx.x);
  __syncthreads();
  out[blockIdx.x * blockDim.x + threadIdx.x] = mine[blockDim.x - 1 - threadIdx.x];
}

__global__ void intrinsics_kernel(long long* out) {
  const unsigned lane = threadIdx.x % 32;
  const long long v = 1000 + static_cast<long long>(threadIdx.x);
  const unsigned ballot = __ballot_sync(kFull, lane % 3 == 0);
  long long* o = out + 5 * threadIdx.x;
  o[0] = __shfl_xor_sync(kFull, v, 5);
  o[1] = __shfl_up_sync(kFull, v, 3);
  o[2] = ballot;
  o[3] = __popc(ballot & ((1u << lane) - 1u));
  o[4] = __shfl_xor_sync(kFull, static_cast<float>(v) * 0.5f, 16) * 4.0f;
}

// Block, thread and grid coordinates of every thread, in a 3-D launch.
__global__ void index_kernel(int* out) {
  const unsigned threads = blockDim.x * blockDim.y * blockDim.z;
  const unsigned t = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  const unsigned b = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
  int* o = out + 6 * (static_cast<size_t>(b) * threads + t);
  o[0] = static_cast<int>(threadIdx.x);
  o[1] = static_cast<int>(threadIdx.y);
  o[2] = static_cast<int>(threadIdx.z);
  o[3] = static_cast<int>(blockIdx.x);
  o[4] = static_cast<int>(blockIdx.y);
  o[5] = static_cast<int>(blockIdx.z);
}

// Dynamic shared memory of `blockDim.x` ints: reversed through it.
__global__ void dynamic_smem_kernel(int* out) {
  extern __shared__ __align__(16) int dyn[];
  dyn[threadIdx.x] = static_cast<int>(threadIdx.x);
  __syncthreads();
  out[threadIdx.x] = dyn[blockDim.x - 1 - threadIdx.x];
}

// D = A B + C for one 16x16x16 tile; A row-major at a + a_offset, B column-major, C/D row-major.
template <typename T>
__global__ void wmma_kernel(const T* a, int a_offset, const T* b, const float* c, float* d) {
  using namespace nvcuda;
  wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
  wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
  wmma::fill_fragment(acc, 0.0f);
  wmma::load_matrix_sync(fa, a + a_offset, 16);
  wmma::load_matrix_sync(fb, b, 16);
  wmma::load_matrix_sync(acc, c, 16, wmma::mem_row_major);
  wmma::mma_sync(acc, fa, fb, acc);
  wmma::store_matrix_sync(d, acc, 16, wmma::mem_row_major);
}

// Out-of-bounds shared write (threads >= 32 of a 64-thread block): for the AddressSanitizer build.
__global__ void shared_overflow_kernel(int* out) {
  __shared__ int small[32];
  small[threadIdx.x] = 1;
  __syncthreads();
  out[threadIdx.x] = small[threadIdx.x % 32];
}

}  // namespace

EMU_EXPORT int emu_test_partial_barrier(int* out, int threads, int reach) {
  partial_barrier_kernel<<<1, threads>>>(out, reach);
  return cudaGetLastError();
}

EMU_EXPORT int emu_test_split_barrier(int* out, int threads) {
  split_barrier_kernel<<<1, threads>>>(out);
  return cudaGetLastError();
}

EMU_EXPORT int emu_test_partial_shuffle(int* out, int threads) {
  partial_shuffle_kernel<<<1, threads>>>(out);
  return cudaGetLastError();
}

EMU_EXPORT int emu_test_partial_mask(int* out) {
  partial_mask_kernel<<<1, 32>>>(out);
  return cudaGetLastError();
}

EMU_EXPORT int emu_test_neighbour(int* out, int threads, int with_barrier) {
  neighbour_kernel<<<1, threads>>>(out, with_barrier != 0);
  return cudaGetLastError();
}

EMU_EXPORT int emu_test_scratch_reuse(int* out, int threads, int with_barrier) {
  scratch_reuse_kernel<<<1, threads>>>(out, with_barrier != 0);
  return cudaGetLastError();
}

EMU_EXPORT int emu_test_last_block_wins(int* out, int blocks) {
  last_block_wins_kernel<<<blocks, 32>>>(out);
  return cudaGetLastError();
}

EMU_EXPORT int emu_test_unwritten_shared(float* out) {
  unwritten_shared_kernel<<<1, 32, 64 * sizeof(float)>>>(out);
  return cudaGetLastError();
}

EMU_EXPORT int emu_test_per_block_shared(int* out, int blocks) {
  per_block_shared_kernel<<<blocks, 32>>>(out);
  return cudaGetLastError();
}

EMU_EXPORT int emu_test_intrinsics(long long* out, int threads) {
  intrinsics_kernel<<<1, threads>>>(out);
  return cudaGetLastError();
}

EMU_EXPORT int emu_test_index(int* out, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz) {
  index_kernel<<<dim3(gx, gy, gz), dim3(bx, by, bz)>>>(out);
  return cudaGetLastError();
}

// attr < 0: no cudaFuncSetAttribute call.
EMU_EXPORT int emu_test_dynamic_smem(int* out, int threads, long long smem, int attr) {
  if (attr >= 0) {
    const cudaError_t err = cudaFuncSetAttribute(dynamic_smem_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, attr);
    if (err != cudaSuccess) return err;
  }
  dynamic_smem_kernel<<<1, threads, static_cast<size_t>(smem)>>>(out);
  return cudaGetLastError();
}

// dtype 1: fp16, 2: bf16 (bit patterns in a and b).
EMU_EXPORT int emu_test_wmma(int dtype, const void* a, int a_offset, const void* b, const float* c, float* d) {
  if (dtype == 1) {
    wmma_kernel<__half><<<1, 32>>>(static_cast<const __half*>(a), a_offset, static_cast<const __half*>(b), c, d);
  } else {
    wmma_kernel<__nv_bfloat16><<<1, 32>>>(static_cast<const __nv_bfloat16*>(a), a_offset,
                                         static_cast<const __nv_bfloat16*>(b), c, d);
  }
  return cudaGetLastError();
}

EMU_EXPORT int emu_test_shared_overflow(int* out) {
  shared_overflow_kernel<<<1, 64>>>(out);
  return cudaGetLastError();
}

// ---- thread-block clusters

namespace {

namespace cg = cooperative_groups;

// Every thread publishes a value in its block's static and dynamic shared memory, then reads the
// slot of the same thread in the next block of the cluster through distributed shared memory.
// Without the first cluster.sync() the read races the neighbour's write (unwritten poison, or
// the value, depending on the schedule). out[block, thread] = 2 values + the cluster indices.
__global__ void cluster_exchange_kernel(int* out, bool with_sync) {
  __shared__ int statics[256];
  extern __shared__ int dynamic[];
  cg::cluster_group cluster = cg::this_cluster();
  const unsigned rank = cluster.block_rank();
  const unsigned t = threadIdx.x;
  statics[t] = static_cast<int>(1000 * rank + t);
  dynamic[t] = static_cast<int>(-1000 * static_cast<int>(rank) - static_cast<int>(t));
  if (with_sync) cluster.sync();
  const unsigned next = (rank + 1) % cluster.num_blocks();
  const int a = *cluster.map_shared_rank(&statics[t], next);
  const int b = *cluster.map_shared_rank(dynamic + t, next);
  cluster.sync();  // the neighbour's shared memory stays valid until every read is done
  int* o = out + (static_cast<size_t>(blockIdx.x) * blockDim.x + t) * 6;
  o[0] = a;
  o[1] = b;
  o[2] = static_cast<int>(rank);
  o[3] = static_cast<int>(cluster.num_blocks());
  o[4] = static_cast<int>(cluster.dim_blocks().x);
  o[5] = static_cast<int>(cluster.block_index().x);
}

// Block `skip` of every cluster leaves before the cluster barrier that the others wait at.
__global__ void cluster_divergent_kernel(int* out, unsigned skip) {
  cg::cluster_group cluster = cg::this_cluster();
  if (cluster.block_rank() != skip) cluster.sync();
  out[blockIdx.x * blockDim.x + threadIdx.x] = 1;
}

// Points the runtime at the emulated device that owns `out` (as DeviceGuard does in csrc).
cudaError_t use_device_of(const void* out) {
  cudaPointerAttributes attr{};
  const cudaError_t err = cudaPointerGetAttributes(&attr, out);
  return err != cudaSuccess ? err : cudaSetDevice(attr.device);
}

cudaLaunchConfig_t cluster_config(unsigned blocks, unsigned threads, unsigned cluster, size_t smem, cudaLaunchAttribute* attr) {
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = dim3(blocks);
  cfg.blockDim = dim3(threads);
  cfg.dynamicSmemBytes = smem;
  attr->id = cudaLaunchAttributeClusterDimension;
  attr->val.clusterDim.x = cluster;
  attr->val.clusterDim.y = 1;
  attr->val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  return cfg;
}

}  // namespace

// nonportable: set cudaFuncAttributeNonPortableClusterSizeAllowed first. Returns the launch's
// own error, else cudaGetLastError().
EMU_EXPORT int emu_test_cluster_exchange(int* out, unsigned blocks, unsigned threads, unsigned cluster, int with_sync,
                                         int nonportable) {
  (void)cudaGetLastError();  // an earlier test's error is not this launch's
  cudaError_t err = use_device_of(out);
  if (err == cudaSuccess && nonportable) {
    err = cudaFuncSetAttribute(cluster_exchange_kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1);
  }
  if (err == cudaSuccess) {
    cudaLaunchAttribute attr{};
    const cudaLaunchConfig_t cfg = cluster_config(blocks, threads, cluster, threads * sizeof(int), &attr);
    err = cudaLaunchKernelEx(&cfg, cluster_exchange_kernel, out, with_sync != 0);
    if (err == cudaSuccess) err = cudaGetLastError();
  }
  cudaSetDevice(0);
  return err;
}

EMU_EXPORT int emu_test_cluster_divergent(int* out, unsigned blocks, unsigned threads, unsigned cluster, unsigned skip) {
  (void)cudaGetLastError();
  cudaLaunchAttribute attr{};
  const cudaLaunchConfig_t cfg = cluster_config(blocks, threads, cluster, 0, &attr);
  const cudaError_t err = cudaLaunchKernelEx(&cfg, cluster_divergent_kernel, out, skip);
  return err != cudaSuccess ? err : cudaGetLastError();
}

// cudaOccupancyMaxActiveClusters for the exchange kernel (-1 on error).
EMU_EXPORT int emu_test_max_active_clusters(unsigned threads, unsigned cluster) {
  cudaLaunchAttribute attr{};
  const cudaLaunchConfig_t cfg = cluster_config(cluster, threads, cluster, threads * sizeof(int), &attr);
  int count = -1;
  if (cudaOccupancyMaxActiveClusters(&count, cluster_exchange_kernel, &cfg) != cudaSuccess) {
    (void)cudaGetLastError();
    return -1;
  }
  return count;
}

EMU_EXPORT const char* emu_error_string(int err) { return cudaGetErrorString(static_cast<cudaError_t>(err)); }

// Conversions, for exhaustive comparison with torch's.
EMU_EXPORT void emu_test_half_to_float(const uint16_t* in, float* out, long long n) {
  for (long long i = 0; i < n; ++i) out[i] = __half2float(__ushort_as_half(in[i]));
}
EMU_EXPORT void emu_test_float_to_half(const float* in, uint16_t* out, long long n) {
  for (long long i = 0; i < n; ++i) out[i] = __half_as_ushort(__float2half_rn(in[i]));
}
EMU_EXPORT void emu_test_bf16_to_float(const uint16_t* in, float* out, long long n) {
  for (long long i = 0; i < n; ++i) {
    __nv_bfloat16 h;
    h.__x = in[i];
    out[i] = __bfloat162float(h);
  }
}
EMU_EXPORT void emu_test_float_to_bf16(const float* in, uint16_t* out, long long n) {
  for (long long i = 0; i < n; ++i) out[i] = __float2bfloat16_rn(in[i]).__x;
}
