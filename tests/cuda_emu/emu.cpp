// CUDA emulator runtime: runs the grid of a launch on the calling CPU thread, block after block
// (cluster after cluster: the blocks of a thread-block cluster run together, see "Clusters"); the
// threads are fibers switched cooperatively, so every run is deterministic.
//
// Scheduling. A block's fibers run in sweeps over an order (forward, reverse or a seeded random
// permutation, redrawn after every __syncthreads): the next fiber to run is the first runnable one
// after the current position, wrapping around, and it runs until it reaches a rendezvous
// (__syncthreads, a warp intrinsic) or exits; then it switches straight to the next one. After a
// __syncthreads the sweep restarts at the top of the order. Two granularities: thread-major (the
// sweep moves on after every rendezvous, so all warps advance together, one intrinsic at a time)
// and warp-major (the order keeps each warp's lanes together, and a warp whose intrinsic completes
// runs again at once, so it races ahead to the next __syncthreads before the next warp starts).
// A correct kernel gives the same bits under every schedule: a thread that reads shared or
// global memory another thread writes in the same barrier interval sees a value that depends on
// the schedule, so comparing runs under two schedules exposes the race. (Thread-major alone
// hides a read by one warp racing a write that another warp makes only after a few shuffles;
// warp-major exposes it.) Blocks run in the same order (reversed, shuffled), which exposes
// inter-block races on global memory the same way.
//
// Checks. A rendezvous completes only when every thread of the block (every lane of the warp) is
// at it; when no fiber can run and some wait, the launch is aborted with the list of who waits
// where and who exited (what compute-sanitizer's synccheck reports as a barrier error, and what a
// GPU shows as a hang). __syncthreads reached at different source lines is an error too, as are
// partial warp masks (not used by vtprune; the emulator refuses them rather than guess).
// Launch configurations are validated like the CUDA runtime does (block size, grid limits,
// dynamic shared memory against the kernel's cudaFuncSetAttribute limit and the device's
// opt-in maximum). Shared memory is allocated per block at its exact size and filled with a
// poison pattern (NaN for fp32/fp16/bf16, huge for integers), so a read of unwritten shared
// memory shows up in the results, and out-of-bounds accesses are visible to AddressSanitizer.
//
// Clusters (cudaLaunchKernelEx with cudaLaunchAttributeClusterDimension, sm_90). The blocks of a
// cluster are one set of fibers under one scheduler, ordered block after block (blocks in the
// schedule's order, reversed or shuffled); __syncthreads and warp intrinsics stay per block, and
// cluster.sync() is a rendezvous of every thread of every block of the cluster, checked like
// __syncthreads (the same source line, nobody exited). Each block's shared memory lives until the
// whole cluster ends, and cooperative_groups' map_shared_rank maps an address into the same
// object of another block (distributed shared memory). The launch is refused below compute
// capability 9.0 (cudaErrorNotSupported), for a cluster that does not divide the grid, or for
// more than 8 blocks (16 with cudaFuncAttributeNonPortableClusterSizeAllowed)
// (cudaErrorInvalidClusterSize). When every thread of a block has exited, its shared memory is
// poisoned again (it stays allocated until the cluster ends), so a block that still reads it over
// DSMEM, a missing final cluster.sync(), sees a schedule-dependent value.
//
// Not modelled: timing, the weak memory model (fibers see each other's writes at once),
// intra-warp lockstep (a kernel relying on implicit warp synchronicity is racy on Volta+ anyway),
// atomics beyond integer adds (plain read-modify-writes: fibers never interleave inside one),
// and the FMA contraction nvcc applies to plain a * b + c (see build.py).

#include <pthread.h>
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <random>
#include <string>
#include <utility>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define EMU_ASAN 1
#else
#define EMU_ASAN 0
#endif

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

#include "emu_api.h"

namespace emu {
ThreadState* g_thread = nullptr;
uint3 g_block_idx{0, 0, 0};
dim3 g_block_dim;
dim3 g_grid_dim;
}  // namespace emu

// ----------------------------------------------------------------------------- context switch

#if defined(__x86_64__)
// emu_switch(save, to): saves the callee-saved registers on the current stack, stores the stack
// pointer in *save and continues on the stack `to` (which holds the same frame). MXCSR and the x87
// control word are not switched: every fiber runs with the launching thread's (kernels cannot
// change rounding modes), and saving them tripled the cost of a switch. ucontext's swapcontext
// makes a sigprocmask system call per switch.
extern "C" void emu_switch(void** save, void* to);
extern "C" void emu_fiber_start();
asm(R"(
  .text
  .globl emu_switch
  .hidden emu_switch
  .type emu_switch, @function
emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size emu_switch, .-emu_switch

  .globl emu_fiber_start
  .hidden emu_fiber_start
  .type emu_fiber_start, @function
emu_fiber_start:
  movq %r12, %rdi
  callq *%r13
  ud2
  .size emu_fiber_start, .-emu_fiber_start
)");
#endif

namespace emu {
namespace {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kMaxThreads = 1024;
constexpr std::size_t kStaticSmemLimit = 48 * 1024;
constexpr std::size_t kDefaultDynamicSmem = 48 * 1024;
constexpr int kDefaultOptin = 232448;  // H100's cudaDevAttrMaxSharedMemoryPerBlockOptin
constexpr int kMaxDevices = 64;

constexpr int kMaxClusterBlocks = 16;  // non-portable maximum (8 without the attribute)
constexpr int kDefaultSms = 132;       // H100 SXM

enum class St : unsigned char { Runnable, AtBarrier, AtWarp, AtCluster, Exited };

struct Fiber : ThreadState {
  St st = St::Exited;
  int block = 0;  // rank of its block in the running cluster
  int gid = 0;    // index in Launch::fibers: block * nthreads + linear
  void* sp = nullptr;
#if !defined(__x86_64__)
  ucontext_t uc;
#endif
  // where the fiber waits (diagnostics) and what it brought to a warp rendezvous
  const char* file = nullptr;
  int line = 0;
  int kind = 0;
  unsigned mask = 0;
  void* arg = nullptr;
  CompleteFn complete = nullptr;
  char* stack_lo = nullptr;
};

struct Warp {
  int lanes = 0;
  int arrived = 0;
  int first_pos = 0;  // warp-major schedules: position of the warp's first lane in the order
};

struct SharedVar {
  const void* key;
  void* ptr;
  std::size_t bytes;
  const char* name;
};

enum class Order { Forward = 0, Reverse = 1, Random = 2 };

// ---- configuration and runtime-API state (guarded by g_mutex)

std::mutex g_mutex;
Order g_order = Order::Forward;
bool g_warp_major = false;
std::uint64_t g_seed = 0;
std::uint32_t g_poison = 0x7fff7fffu;  // NaN as fp32, fp16 and bf16; ~2^31 as int32
std::size_t g_stack_bytes = EMU_ASAN ? (512u << 10) : (128u << 10);
// An emulated device: opt-in shared memory per block, compute capability, SM count.
struct Device {
  int optin;
  int cc_major;
  int cc_minor;
  int sms;
};
std::vector<Device> g_devices{Device{kDefaultOptin, 9, 0, kDefaultSms}};
int g_current_device = 0;
int g_pointer_device = 0;
std::map<std::pair<int, const void*>, int> g_max_dynamic_smem;  // (device, kernel) -> bytes
std::map<std::pair<int, const void*>, int> g_nonportable_cluster;  // (device, kernel) -> 0/1
cudaError_t g_last_error = cudaSuccess;
cudaError_t g_detail_code = cudaSuccess;
std::string g_detail;
std::string g_error_string;  // storage for cudaGetErrorString's composed message
std::uint64_t g_launches = 0;
std::uint64_t g_switches = 0;

void set_error(cudaError_t code, std::string detail) {
  if (g_last_error == cudaSuccess) g_last_error = code;
  g_detail_code = code;
  g_detail = std::move(detail);
}

std::string format(const char* fmt, ...) {
  char buf[1024];
  va_list ap;
  va_start(ap, fmt);
  std::vsnprintf(buf, sizeof(buf), fmt, ap);
  va_end(ap);
  return buf;
}

// ---- the running launch

struct Launch {
  const char* name = nullptr;
  const void* kernel = nullptr;
  void* params = nullptr;
  Thunk thunk = nullptr;
  std::size_t dynamic_bytes = 0;
  std::size_t smem_limit = 0;  // static + dynamic allowed per block (device opt-in maximum)

  int nthreads = 0;  // per block
  int nblocks = 0;   // per cluster (1 without clusters): run together, as one set of fibers
  dim3 cluster_dim;
  std::vector<Fiber> fibers;  // the cluster's threads, block after block
  std::vector<Warp> warps;    // block * warps_per_block + warp
  int warps_per_block = 0;
  std::vector<int> order;   // position -> fiber
  std::vector<int> pos_of;  // fiber -> position
  std::vector<std::uint64_t> runnable;  // bit per position
  int cursor = -1;          // position of the fiber that runs (or ran last)
  std::mt19937_64 rng;
  int n_exited = 0;      // in the cluster
  int n_at_cluster = 0;  // at cluster.sync()
  bool failed = false;

  void* sched_sp = nullptr;
#if !defined(__x86_64__)
  ucontext_t sched_uc;
#endif
  Fiber* current = nullptr;

  // Per block of the running cluster, by rank.
  struct Block {
    uint3 idx{0, 0, 0};
    void* dynamic = nullptr;
    std::vector<SharedVar> statics;
    std::size_t static_bytes = 0;
    int n_at_barrier = 0;
    int n_exited = 0;
  };
  std::vector<Block> blocks;
};

Launch* g_launch = nullptr;  // non-null while a grid runs

// Fiber stacks: one mapping, each stack with a PROT_NONE guard page below it, reused by every block.
struct StackPool {
  char* base = nullptr;
  std::size_t stride = 0;
  int count = 0;

  char* stack(int i) { return base + static_cast<std::size_t>(i) * stride + page(); }
  static std::size_t page() { return static_cast<std::size_t>(sysconf(_SC_PAGESIZE)); }

  bool reserve(int n) {
    if (n <= count) return true;
    if (base != nullptr) munmap(base, stride * count);
    stride = g_stack_bytes + page();
    void* p = mmap(nullptr, stride * n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) {
      base = nullptr;
      count = 0;
      return false;
    }
    base = static_cast<char*>(p);
    count = n;
    for (int i = 0; i < n; ++i) mprotect(base + static_cast<std::size_t>(i) * stride, page(), PROT_NONE);
    return true;
  }
} g_stacks;

void poison(void* p, std::size_t bytes) {
  unsigned char* b = static_cast<unsigned char*>(p);
  for (std::size_t i = 0; i < bytes; ++i) b[i] = static_cast<unsigned char>(g_poison >> (8 * (i % 4)));
}

void* alloc_shared(std::size_t bytes, std::size_t align) {
  if (align < 16) align = 16;
  void* p = nullptr;
  // The exact size (at least 1 byte for a zero-size request), so ASan sees the real end.
  if (posix_memalign(&p, align, bytes > 0 ? bytes : 1) != 0) return nullptr;
  poison(p, bytes);
  return p;
}

// ---- run queue

void set_runnable(Launch& L, Fiber& f) {
  f.st = St::Runnable;
  const int p = L.pos_of[f.gid];
  L.runnable[p >> 6] |= std::uint64_t{1} << (p & 63);
}

int first_runnable_from(const Launch& L, int p) {
  const int words = static_cast<int>(L.runnable.size());
  for (int w = p >> 6; w < words; ++w) {
    std::uint64_t bits = L.runnable[w];
    if (w == (p >> 6)) bits &= ~std::uint64_t{0} << (p & 63);
    if (bits != 0) return (w << 6) + __builtin_ctzll(bits);
  }
  return -1;
}

// The next fiber of the sweep (the first runnable after the cursor, else a new sweep from the
// top), taken off the run queue; nullptr when none can run.
Fiber* take_next(Launch& L) {
  int p = first_runnable_from(L, L.cursor + 1);
  if (p < 0) p = first_runnable_from(L, 0);
  if (p < 0) return nullptr;
  L.runnable[p >> 6] &= ~(std::uint64_t{1} << (p & 63));
  L.cursor = p;
  return &L.fibers[L.order[p]];
}

// The order of the cluster's fibers: its blocks in the configured order, and inside each block
// the threads (or warps, then lanes) as in a launch without clusters.
void make_order(Launch& L) {
  const int n = L.nthreads;
  const int total = n * L.nblocks;
  L.order.resize(total);
  std::vector<int> block_seq(L.nblocks);
  for (int b = 0; b < L.nblocks; ++b) block_seq[b] = g_order == Order::Reverse ? L.nblocks - 1 - b : b;
  if (g_order == Order::Random) std::shuffle(block_seq.begin(), block_seq.end(), L.rng);
  int at = 0;
  for (const int b : block_seq) {
    const int base = b * n;
    if (g_warp_major) {
      // Warps in the order, each warp's lanes together (in the same order).
      const int nw = L.warps_per_block;
      std::vector<int> warps(nw), lanes(32);
      for (int w = 0; w < nw; ++w) warps[w] = g_order == Order::Reverse ? nw - 1 - w : w;
      if (g_order == Order::Random) std::shuffle(warps.begin(), warps.end(), L.rng);
      for (int w : warps) {
        Warp& warp = L.warps[b * nw + w];
        const int count = warp.lanes;
        for (int l = 0; l < count; ++l) lanes[l] = g_order == Order::Reverse ? count - 1 - l : l;
        if (g_order == Order::Random) std::shuffle(lanes.begin(), lanes.begin() + count, L.rng);
        warp.first_pos = at;
        for (int l = 0; l < count; ++l) L.order[at++] = base + w * 32 + lanes[l];
      }
    } else {
      const int start = at;
      for (int i = 0; i < n; ++i) L.order[at++] = base + (g_order == Order::Reverse ? n - 1 - i : i);
      if (g_order == Order::Random) std::shuffle(L.order.begin() + start, L.order.begin() + at, L.rng);
    }
  }
  L.pos_of.resize(total);
  for (int i = 0; i < total; ++i) L.pos_of[L.order[i]] = i;
}

// After a new order: the run queue again holds exactly the runnable fibers, at their new positions.
void rebuild_runnable(Launch& L) {
  L.runnable.assign((L.fibers.size() + 63) / 64, 0);
  for (Fiber& f : L.fibers) {
    if (f.st == St::Runnable) set_runnable(L, f);
  }
}

// ---- switching

#if EMU_ASAN
// AddressSanitizer must be told about every stack switch (fake stacks and stack bounds).
const void* g_main_bottom = nullptr;
std::size_t g_main_size = 0;
#endif

extern "C" void emu_fiber_main(Fiber* f);

// Continues on `to` (nullptr: the scheduler on the launching thread's stack), saving the running
// context in `from` (nullptr: the scheduler). Returns when something switches back to `from`.
void transfer(Launch& L, Fiber* from, Fiber* to) {
  ++g_switches;
  L.current = to;
  g_thread = to;
  if (to != nullptr) g_block_idx = L.blocks[to->block].idx;
#if EMU_ASAN
  void* fake = nullptr;
  // A fiber that will never run again (exited, or its launch aborted) passes nullptr, so ASan
  // releases its fake stack.
  const bool leaving_for_good = from != nullptr && (from->st == St::Exited || L.failed);
  __sanitizer_start_switch_fiber(leaving_for_good ? nullptr : &fake, to ? to->stack_lo : g_main_bottom,
                                 to ? g_stack_bytes : g_main_size);
#endif
#if defined(__x86_64__)
  emu_switch(from ? &from->sp : &L.sched_sp, to ? to->sp : L.sched_sp);
#else
  swapcontext(from ? &from->uc : &L.sched_uc, to ? &to->uc : &L.sched_uc);
#endif
#if EMU_ASAN
  __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
}

// From the running fiber, which has just blocked, exited or (re)joined the run queue: run the next
// fiber of the sweep, or go back to the scheduler when none can run. Returns when this fiber is
// resumed (at once if it is itself the next one).
void switch_away(Launch& L) {
  Fiber* self = L.current;
  Fiber* next = L.failed ? nullptr : take_next(L);
  if (next == self) return;
  transfer(L, self, next);
}

void init_fiber_stack(Fiber* f) {
  char* top = f->stack_lo + g_stack_bytes;
#if EMU_ASAN
  // An aborted fiber leaves its frames' redzones poisoned on the reused stack.
  __asan_unpoison_memory_region(f->stack_lo, g_stack_bytes);
#endif
#if defined(__x86_64__)
  // Frame popped by emu_switch: r15, r14, r13, r12, rbx, rbp, return address. emu_fiber_start
  // is entered by that `ret` with rsp = end (16-byte aligned), so its call keeps the ABI alignment.
  // Stacks are a page multiple apart, so their tops would all compete for the same cache sets;
  // staggering them by cache lines spreads a block's hot frames over the sets.
  const std::uintptr_t color = (static_cast<std::uintptr_t>(f->gid) * 64 * 7) % 8192;
  std::uintptr_t end = ((reinterpret_cast<std::uintptr_t>(top) - color) & ~std::uintptr_t{15}) - 16;
  auto* slot = reinterpret_cast<std::uint64_t*>(end - 7 * 8);
  slot[0] = 0;                                                 // r15
  slot[1] = 0;                                                 // r14
  slot[2] = reinterpret_cast<std::uint64_t>(&emu_fiber_main);  // r13: called by emu_fiber_start
  slot[3] = reinterpret_cast<std::uint64_t>(f);                // r12: its argument
  slot[4] = 0;                                                 // rbx
  slot[5] = 0;                                                 // rbp
  slot[6] = reinterpret_cast<std::uint64_t>(&emu_fiber_start);
  f->sp = slot;
#else
  getcontext(&f->uc);
  f->uc.uc_stack.ss_sp = f->stack_lo;
  f->uc.uc_stack.ss_size = g_stack_bytes;
  f->uc.uc_link = nullptr;
  makecontext(&f->uc, reinterpret_cast<void (*)()>(&emu_fiber_main), 1, f);  // pointer fits one int arg on LP64 glibc
  (void)top;
#endif
}

// ---- diagnostics

// "0-15,32-47" or "0,2,4,...,62" (an arithmetic progression) for a sorted list of thread ids.
std::string ranges(const std::vector<int>& ids) {
  if (ids.size() > 3) {
    const int step = ids[1] - ids[0];
    bool progression = step > 1;
    for (std::size_t i = 2; i < ids.size() && progression; ++i) progression = ids[i] - ids[i - 1] == step;
    if (progression) return format("%d,%d,...,%d", ids[0], ids[1], ids.back());
  }
  std::string out;
  for (std::size_t i = 0; i < ids.size();) {
    std::size_t j = i;
    while (j + 1 < ids.size() && ids[j + 1] == ids[j] + 1) ++j;
    if (!out.empty()) out += ",";
    out += ids[i] == ids[j] ? std::to_string(ids[i]) : std::to_string(ids[i]) + "-" + std::to_string(ids[j]);
    i = j + 1;
  }
  return out;
}

const char* kind_name(int kind);

std::string block_label(const Launch& L) {
  return format("%s, block (%u,%u,%u)", L.name, g_block_idx.x, g_block_idx.y, g_block_idx.z);
}

std::string cluster_label(const Launch& L) {
  if (L.nblocks == 1) return block_label(L);
  const uint3 first = L.blocks[0].idx;
  return format("%s, cluster of %d blocks from block (%u,%u,%u)", L.name, L.nblocks, first.x, first.y, first.z);
}

// Who waits where, grouped by (block, state, site); only a cluster's messages name the block.
std::string describe_waiters(const Launch& L) {
  std::map<std::string, std::vector<int>> groups;
  for (const Fiber& f : L.fibers) {
    std::string key;
    switch (f.st) {
      case St::Exited: key = "exited"; break;
      case St::Runnable: key = "runnable"; break;
      case St::AtBarrier: key = format("wait at __syncthreads() %s:%d", f.file, f.line); break;
      case St::AtWarp: key = format("wait at %s %s:%d", kind_name(f.kind), f.file, f.line); break;
      case St::AtCluster: key = format("wait at cluster.sync() %s:%d", f.file, f.line); break;
    }
    if (L.nblocks > 1) {
      const uint3 b = L.blocks[f.block].idx;
      key = format("of block (%u,%u,%u) ", b.x, b.y, b.z) + key;
    }
    groups[key].push_back(static_cast<int>(f.linear));
  }
  std::string out;
  for (const auto& [key, ids] : groups) {
    out += format("\n  %zu thread(s) [%s] %s", ids.size(), ranges(ids).c_str(), key.c_str());
  }
  return out;
}

[[noreturn]] void abort_running_fiber(Launch& L, cudaError_t code, const std::string& message) {
  if (!L.failed) {
    L.failed = true;
    set_error(code, message);
  }
  transfer(L, L.current, nullptr);
  std::fprintf(stderr, "cuda_emu: an aborted fiber was resumed\n");
  std::abort();
}

Launch& running(const char* what) {
  if (g_launch == nullptr || g_launch->current == nullptr) {
    std::fprintf(stderr, "cuda_emu: %s called outside a kernel\n", what);
    std::abort();
  }
  return *g_launch;
}

// ---- crashes

// An out-of-bounds access in a kernel is a SIGSEGV here (an illegal address on a GPU). Before the
// process dies, say which kernel, block and thread made it; then the previous handler (Python's
// faulthandler, ASan's, or the default action) takes over when the access is retried.
struct sigaction g_previous_segv;
struct sigaction g_previous_bus;
bool g_fault_handler_installed = false;

void on_fault(int sig, siginfo_t* info, void*) {
  const Launch* L = g_launch;
  if (L != nullptr && L->current != nullptr) {
    char buf[640];
    const int n = std::snprintf(buf, sizeof(buf),
                                "\ncuda_emu: %s at address %p in %s, block (%u,%u,%u), thread %u: an out-of-bounds "
                                "access (an illegal address on a GPU), or a fiber stack overflow\n",
                                sig == SIGSEGV ? "SIGSEGV" : "SIGBUS", info->si_addr, L->name, g_block_idx.x,
                                g_block_idx.y, g_block_idx.z, L->current->linear);
    if (n > 0) (void)!write(2, buf, static_cast<std::size_t>(std::min<int>(n, sizeof(buf) - 1)));
  }
  sigaction(sig, sig == SIGSEGV ? &g_previous_segv : &g_previous_bus, nullptr);
}

void install_fault_handler() {
  if (g_fault_handler_installed) return;
  g_fault_handler_installed = true;
  // The handler must not run on an overflowed fiber stack: make sure the thread has an alternate
  // signal stack (Python's faulthandler installs one; otherwise ours).
  stack_t current{};
  if (sigaltstack(nullptr, &current) == 0 && (current.ss_flags & SS_DISABLE)) {
    static char alt[1 << 16];
    stack_t ss{};
    ss.ss_sp = alt;
    ss.ss_size = sizeof(alt);
    sigaltstack(&ss, nullptr);
  }
  struct sigaction sa {};
  sa.sa_sigaction = &on_fault;
  sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGSEGV, &sa, &g_previous_segv);
  sigaction(SIGBUS, &sa, &g_previous_bus);
}

// ---- the block scheduler

void free_block_shared(Launch::Block& B) {
  for (SharedVar& v : B.statics) std::free(v.ptr);
  B.statics.clear();
  std::free(B.dynamic);
  B.dynamic = nullptr;
}

// Runs the blocks of one cluster (one block without clusters) together: one scheduler over all
// their threads, so cluster.sync() and distributed shared memory work as on the hardware, where
// the blocks of a cluster are co-scheduled.
void run_cluster(Launch& L, const std::vector<uint3>& cluster) {
  const int n = L.nthreads;
  L.blocks.assign(L.nblocks, Launch::Block{});
  for (int b = 0; b < L.nblocks; ++b) {
    L.blocks[b].idx = cluster[b];
    L.blocks[b].dynamic = alloc_shared(L.dynamic_bytes, 16);
  }
  g_block_idx = cluster[0];
  L.n_exited = 0;
  L.n_at_cluster = 0;
  L.cursor = -1;
  const uint3 first = cluster[0];
  L.rng.seed(g_seed * 0x9e3779b97f4a7c15ull + first.x + 0x10000ull * (first.y + 0x10000ull * first.z));
  for (int b = 0; b < L.nblocks; ++b) {
    for (int w = 0; w < L.warps_per_block; ++w) {
      Warp& warp = L.warps[b * L.warps_per_block + w];
      warp.arrived = 0;
      warp.lanes = std::min(32, n - w * 32);
    }
  }
  make_order(L);
  L.runnable.assign((L.fibers.size() + 63) / 64, 0);
  const unsigned bx = g_block_dim.x, by = g_block_dim.y;
  for (int b = 0; b < L.nblocks; ++b) {
    for (int t = 0; t < n; ++t) {
      Fiber& f = L.fibers[b * n + t];
      f.idx = uint3{t % bx, (t / bx) % by, t / (bx * by)};
      f.linear = t;
      f.lane = t % 32;
      f.warp = t / 32;
      f.block = b;
      f.gid = b * n + t;
      f.stack_lo = g_stacks.stack(f.gid);
      init_fiber_stack(&f);
      set_runnable(L, f);
    }
  }

  // The fibers pass control among themselves and come back here when none can run.
  if (Fiber* first_fiber = take_next(L)) transfer(L, nullptr, first_fiber);
  if (!L.failed && L.n_exited < static_cast<int>(L.fibers.size())) {
    L.failed = true;
    set_error(cudaErrorLaunchFailure,
              format("barrier error in %s: no thread can continue (divergent __syncthreads, cluster.sync or "
                     "warp intrinsic, or threads that exited before it):",
                     cluster_label(L).c_str()) +
                  describe_waiters(L));
  }
  // Shared memory lives until the whole cluster is done: another block may still map it.
  for (Launch::Block& B : L.blocks) free_block_shared(B);
}

}  // namespace

// ----------------------------------------------------------------------------- device side

extern "C" void emu_fiber_main(Fiber* f) {
#if EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, nullptr, nullptr);
#endif
  Launch& L = *g_launch;
  try {
    L.thunk(L.kernel, L.params);
  } catch (const std::exception& e) {
    abort_running_fiber(L, cudaErrorLaunchFailure, format("C++ exception in %s: %s", block_label(L).c_str(), e.what()));
  } catch (...) {
    abort_running_fiber(L, cudaErrorLaunchFailure, "C++ exception in " + block_label(L));
  }
  f->st = St::Exited;
  ++L.n_exited;
  Launch::Block& B = L.blocks[f->block];
  if (++B.n_exited == L.nthreads && L.nblocks > 1) {
    // The block is gone: on a GPU its shared memory may be reused at once. Poisoned (not freed),
    // so a block of the cluster that still reads it gets a schedule-dependent result.
    poison(B.dynamic, L.dynamic_bytes);
    for (SharedVar& v : B.statics) poison(v.ptr, v.bytes);
  }
  switch_away(L);
  std::fprintf(stderr, "cuda_emu: an exited fiber was resumed\n");
  std::abort();
}

namespace {
const char* kind_name(int kind) {
  switch (kind) {
    case kShflXor: return "__shfl_xor_sync";
    case kShflUp: return "__shfl_up_sync";
    case kShflDown: return "__shfl_down_sync";
    case kShflIdx: return "__shfl_sync";
    case kBallot: return "__ballot_sync";
    case kSyncwarp: return "__syncwarp";
    case kWmmaLoad: return "wmma::load_matrix_sync";
    case kWmmaStore: return "wmma::store_matrix_sync";
    case kWmmaMma: return "wmma::mma_sync";
    default: return "warp intrinsic";
  }
}
}  // namespace

const char* collective_name(int kind) { return kind_name(kind); }

void fail(const char* message) {
  Launch& L = running("emu::fail");
  const Fiber* f = L.current;
  abort_running_fiber(L, cudaErrorLaunchFailure,
                      format("%s, thread %u: %s", block_label(L).c_str(), f->linear, message));
}

// Aborts the launch unless all `count` fibers from `first` wait at the barrier `what` at file:line
// (a barrier some threads reach at another line is a divergent barrier).
static void check_same_barrier(Launch& L, const Fiber* first, size_t count, const char* file, int line,
                        const char* what, const std::string& where) {
  for (size_t t = 0; t < count; ++t) {
    const Fiber& o = first[t];
    if (o.line != line || (o.file != file && std::strcmp(o.file, file) != 0)) {
      abort_running_fiber(L, cudaErrorLaunchFailure,
                          format("barrier error in %s: threads wait at different %s:", where.c_str(), what) +
                              describe_waiters(L));
    }
  }
}

void syncthreads(const char* file, int line) {
  Launch& L = running("__syncthreads");
  Fiber* f = L.current;
  f->st = St::AtBarrier;
  f->file = file;
  f->line = line;
  Launch::Block& B = L.blocks[f->block];
  if (++B.n_at_barrier == L.nthreads) {
    // Every thread of the block is at a barrier: the same one, or the block diverged.
    Fiber* mine = &L.fibers[f->block * L.nthreads];
    check_same_barrier(L, mine, L.nthreads, file, line, "__syncthreads()", block_label(L));
    // A new barrier interval: the block's threads runnable, the sweep restarts at the top.
    B.n_at_barrier = 0;
    if (g_order == Order::Random) {
      for (int t = 0; t < L.nthreads; ++t) mine[t].st = St::Runnable;
      make_order(L);  // new positions for the whole cluster
      rebuild_runnable(L);
    } else {
      for (int t = 0; t < L.nthreads; ++t) set_runnable(L, mine[t]);
    }
    L.cursor = -1;
  }
  switch_away(L);
}

void cluster_sync(const char* file, int line) {
  Launch& L = running("cluster.sync()");
  Fiber* f = L.current;
  f->st = St::AtCluster;
  f->file = file;
  f->line = line;
  if (++L.n_at_cluster == static_cast<int>(L.fibers.size())) {
    check_same_barrier(L, L.fibers.data(), L.fibers.size(), file, line, "cluster.sync()", cluster_label(L));
    L.n_at_cluster = 0;
    for (Fiber& o : L.fibers) o.st = St::Runnable;
    if (g_order == Order::Random) make_order(L);
    rebuild_runnable(L);
    L.cursor = -1;
  }
  switch_away(L);
}

unsigned cluster_block_rank() { return static_cast<unsigned>(running("cluster.block_rank()").current->block); }

unsigned cluster_num_blocks() { return static_cast<unsigned>(running("cluster.num_blocks()").nblocks); }

dim3 cluster_dim_blocks() { return running("cluster.dim_blocks()").cluster_dim; }

uint3 cluster_block_index() {
  const Launch& L = running("cluster.block_index()");
  const uint3 b = L.blocks[L.current->block].idx;
  return uint3{b.x % L.cluster_dim.x, b.y % L.cluster_dim.y, b.z % L.cluster_dim.z};
}

void warp_collective(int kind, unsigned mask, const char* file, int line, void* arg, CompleteFn complete) {
  Launch& L = running("a warp intrinsic");
  Fiber* f = L.current;
  Warp& w = L.warps[f->block * L.warps_per_block + f->warp];
  const unsigned warp_mask = w.lanes == 32 ? kFullMask : ((1u << w.lanes) - 1u);
  if (mask != warp_mask) {
    abort_running_fiber(L, cudaErrorLaunchFailure,
                        format("%s, thread %u: %s at %s:%d with mask 0x%08x; the emulator supports only the "
                               "mask of every lane of the warp (0x%08x)",
                               block_label(L).c_str(), f->linear, kind_name(kind), file, line, mask, warp_mask));
  }
  f->st = St::AtWarp;
  f->kind = kind;
  f->mask = mask;
  f->file = file;
  f->line = line;
  f->arg = arg;
  f->complete = complete;
  if (++w.arrived == w.lanes) {
    Fiber* lanes = &L.fibers[f->block * L.nthreads + f->warp * 32];
    void* args[32];
    for (int l = 0; l < w.lanes; ++l) {
      if (lanes[l].kind != kind) {
        abort_running_fiber(L, cudaErrorLaunchFailure,
                            format("barrier error in %s, warp %u: lanes wait at different warp intrinsics:",
                                   block_label(L).c_str(), f->warp) +
                                describe_waiters(L));
      }
      args[l] = lanes[l].arg;
    }
    w.arrived = 0;
    complete(args, w.lanes);
    for (int l = 0; l < w.lanes; ++l) set_runnable(L, lanes[l]);
    if (g_warp_major) L.cursor = w.first_pos - 1;  // this warp goes on first
  }
  switch_away(L);
}

namespace {
template <typename Src>
void complete_shfl(void* const* args, int lanes, Src src_of) {
  for (int l = 0; l < lanes; ++l) {
    ShflArg* a = static_cast<ShflArg*>(args[l]);
    if (a->width != 32) fail("shuffles with width != 32 are not emulated");
  }
  for (int l = 0; l < lanes; ++l) {
    ShflArg* a = static_cast<ShflArg*>(args[l]);
    const int src = src_of(l, a->param);
    // Out-of-range sources read the lane's own value (PTX shfl semantics for width 32).
    a->result = (src >= 0 && src < lanes) ? static_cast<ShflArg*>(args[src])->value : a->value;
  }
}
}  // namespace

void complete_shfl_xor(void* const* args, int lanes) {
  complete_shfl(args, lanes, [](int l, int p) { return l ^ p; });
}
void complete_shfl_up(void* const* args, int lanes) {
  complete_shfl(args, lanes, [](int l, int p) { return l - p >= 0 ? l - p : l; });
}
void complete_shfl_down(void* const* args, int lanes) {
  complete_shfl(args, lanes, [](int l, int p) { return l + p < 32 ? l + p : l; });
}
void complete_shfl_idx(void* const* args, int lanes) {
  complete_shfl(args, lanes, [](int, int p) { return p & 31; });
}
void complete_ballot(void* const* args, int lanes) {
  std::uint64_t bits = 0;
  for (int l = 0; l < lanes; ++l) {
    if (static_cast<ShflArg*>(args[l])->value != 0) bits |= std::uint64_t{1} << l;
  }
  for (int l = 0; l < lanes; ++l) static_cast<ShflArg*>(args[l])->result = bits;
}
void complete_nothing(void* const*, int) {}

namespace {

// The storage of static __shared__ variable `key` in block B, allocated (poisoned) on first use.
void* shared_var(Launch& L, Launch::Block& B, const void* key, std::size_t bytes, std::size_t align, const char* name) {
  for (const SharedVar& v : B.statics) {
    if (v.key == key) return v.ptr;
  }
  B.static_bytes += bytes;
  if (B.static_bytes > kStaticSmemLimit || B.static_bytes + L.dynamic_bytes > L.smem_limit) {
    abort_running_fiber(L, cudaErrorLaunchOutOfResources,
                        format("%s: static shared memory (%zu B so far, with %s) + dynamic (%zu B) exceeds the "
                               "limits (48 KiB static, %zu B in all)",
                               block_label(L).c_str(), B.static_bytes, name, L.dynamic_bytes, L.smem_limit));
  }
  void* p = alloc_shared(bytes, align);
  if (p == nullptr) abort_running_fiber(L, cudaErrorMemoryAllocation, "out of host memory for shared memory");
  B.statics.push_back(SharedVar{key, p, bytes, name});
  return p;
}

}  // namespace

void* block_shared_raw(const void* key, std::size_t bytes, std::size_t align, const char* name) {
  Launch& L = running("__shared__");
  return shared_var(L, L.blocks[L.current->block], key, bytes, align, name);
}

void* dynamic_shared() {
  Launch& L = running("extern __shared__");
  return L.blocks[L.current->block].dynamic;
}

void* cluster_map_shared_rank(const void* addr, unsigned rank) {
  Launch& L = running("cluster.map_shared_rank()");
  if (rank >= static_cast<unsigned>(L.nblocks)) {
    fail(format("cluster.map_shared_rank(%p, %u) in a cluster of %d blocks", addr, rank, L.nblocks).c_str());
  }
  Launch::Block& me = L.blocks[L.current->block];
  Launch::Block& to = L.blocks[rank];
  const auto a = reinterpret_cast<std::uintptr_t>(addr);
  const auto dyn = reinterpret_cast<std::uintptr_t>(me.dynamic);
  if (L.dynamic_bytes > 0 && a >= dyn && a < dyn + L.dynamic_bytes) {
    return static_cast<char*>(to.dynamic) + (a - dyn);
  }
  for (const SharedVar& v : me.statics) {
    const auto base = reinterpret_cast<std::uintptr_t>(v.ptr);
    if (a >= base && a < base + v.bytes) {
      // The other block may not have reached the declaration yet: its storage is made now.
      char* other = static_cast<char*>(shared_var(L, to, v.key, v.bytes, 16, v.name));
      return other + (a - base);
    }
  }
  fail(format("cluster.map_shared_rank(%p, %u): not an address in this block's shared memory", addr, rank).c_str());
}

namespace {

// Cluster dimensions of a launch, checked as the runtime does; `why` explains a refusal.
cudaError_t check_cluster(const LaunchConfig& c, const void* kernel, int device, std::string* why) {
  const dim3 k = c.cluster;
  const std::uint64_t size = std::uint64_t{k.x} * k.y * k.z;
  if (size == 1) return cudaSuccess;
  const Device& d = g_devices[device];
  if (d.cc_major < 9) {
    *why = format("thread-block clusters need compute capability 9.0, device %d has %d.%d", device, d.cc_major,
                  d.cc_minor);
    return cudaErrorNotSupported;
  }
  if (k.x == 0 || k.y == 0 || k.z == 0 || c.grid.x % k.x != 0 || c.grid.y % k.y != 0 || c.grid.z % k.z != 0) {
    *why = format("cluster (%u,%u,%u) does not divide grid (%u,%u,%u)", k.x, k.y, k.z, c.grid.x, c.grid.y, c.grid.z);
    return cudaErrorInvalidClusterSize;
  }
  const auto it = g_nonportable_cluster.find({device, kernel});
  const bool nonportable = it != g_nonportable_cluster.end() && it->second != 0;
  const std::uint64_t limit = nonportable ? kMaxClusterBlocks : 8;
  if (size > limit) {
    *why = format("cluster of %llu blocks exceeds the limit of %llu%s", static_cast<unsigned long long>(size),
                  static_cast<unsigned long long>(limit),
                  nonportable ? "" : " (16 needs cudaFuncAttributeNonPortableClusterSizeAllowed)");
    return cudaErrorInvalidClusterSize;
  }
  return cudaSuccess;
}

}  // namespace

cudaError_t launch_config_from(const cudaLaunchConfig_t* config, LaunchConfig* out) {
  if (config == nullptr || (config->numAttrs > 0 && config->attrs == nullptr)) return cudaErrorInvalidValue;
  *out = LaunchConfig(config->gridDim, config->blockDim, config->dynamicSmemBytes, config->stream);
  for (unsigned i = 0; i < config->numAttrs; ++i) {
    const cudaLaunchAttribute& a = config->attrs[i];
    if (a.id == cudaLaunchAttributeClusterDimension) {
      out->cluster = dim3(a.val.clusterDim.x, a.val.clusterDim.y, a.val.clusterDim.z);
    } else if (a.id != cudaLaunchAttributeIgnore) {
      std::lock_guard<std::mutex> lock(g_mutex);
      set_error(cudaErrorInvalidValue, format("cudaLaunchKernelEx: launch attribute %d is not emulated", static_cast<int>(a.id)));
      return cudaErrorInvalidValue;
    }
  }
  return cudaSuccess;
}

cudaError_t run_launch(const char* name, const void* kernel, const LaunchConfig& c, void* params, Thunk thunk) {
  std::lock_guard<std::mutex> lock(g_mutex);
  ++g_launches;
  if (g_launch != nullptr) {
    set_error(cudaErrorLaunchFailure, format("%s launched from inside a kernel (dynamic parallelism is not emulated)", name));
    return cudaErrorLaunchFailure;
  }
  const std::uint64_t threads = std::uint64_t{c.block.x} * c.block.y * c.block.z;
  if (c.block.x == 0 || c.block.y == 0 || c.block.z == 0 || c.block.x > 1024 || c.block.y > 1024 ||
      c.block.z > 64 || threads > kMaxThreads) {
    set_error(cudaErrorInvalidConfiguration,
              format("%s: block (%u,%u,%u) is not a valid block size", name, c.block.x, c.block.y, c.block.z));
    return cudaErrorInvalidConfiguration;
  }
  if (c.grid.x == 0 || c.grid.y == 0 || c.grid.z == 0 || c.grid.x > 2147483647u || c.grid.y > 65535u ||
      c.grid.z > 65535u) {
    set_error(cudaErrorInvalidConfiguration,
              format("%s: grid (%u,%u,%u) is not a valid grid size", name, c.grid.x, c.grid.y, c.grid.z));
    return cudaErrorInvalidConfiguration;
  }
  if (c.stream != nullptr) {
    set_error(cudaErrorInvalidResourceHandle, format("%s: the emulator runs on stream 0 only", name));
    return cudaErrorInvalidResourceHandle;
  }
  const int device = g_current_device;
  std::size_t allowed = kDefaultDynamicSmem;
  const auto it = g_max_dynamic_smem.find({device, kernel});
  if (it != g_max_dynamic_smem.end()) allowed = static_cast<std::size_t>(it->second);
  if (c.smem > allowed) {
    set_error(cudaErrorInvalidValue,
              format("%s: %zu B of dynamic shared memory exceed the kernel's limit of %zu B on device %d "
                     "(raise it with cudaFuncSetAttribute(cudaFuncAttributeMaxDynamicSharedMemorySize))",
                     name, c.smem, allowed, device));
    return cudaErrorInvalidValue;
  }
  std::string why;
  const cudaError_t cluster_err = check_cluster(c, kernel, device, &why);
  if (cluster_err != cudaSuccess) {
    set_error(cluster_err, format("%s: %s", name, why.c_str()));
    return cluster_err;
  }

  Launch L;
  L.name = name;
  L.kernel = kernel;
  L.params = params;
  L.thunk = thunk;
  L.dynamic_bytes = c.smem;
  L.smem_limit = static_cast<std::size_t>(g_devices[device].optin);
  L.nthreads = static_cast<int>(threads);
  L.cluster_dim = c.cluster;
  L.nblocks = static_cast<int>(c.cluster.x * c.cluster.y * c.cluster.z);
  L.fibers.resize(static_cast<std::size_t>(L.nthreads) * L.nblocks);
  L.warps_per_block = (L.nthreads + 31) / 32;
  L.warps.resize(static_cast<std::size_t>(L.warps_per_block) * L.nblocks);
  if (!g_stacks.reserve(static_cast<int>(L.fibers.size()))) {
    set_error(cudaErrorMemoryAllocation, format("%s: cannot map fiber stacks", name));
    return cudaErrorMemoryAllocation;
  }
  g_grid_dim = c.grid;
  g_block_dim = c.block;

  // Clusters (single blocks without clusters) in the configured order too: a correct kernel does
  // not depend on it.
  const dim3 cgrid(c.grid.x / c.cluster.x, c.grid.y / c.cluster.y, c.grid.z / c.cluster.z);
  const std::uint64_t blocks = std::uint64_t{cgrid.x} * cgrid.y * cgrid.z;
  std::vector<std::uint64_t> block_order;
  const bool shuffled = g_order == Order::Random;
  if (shuffled) {
    if (blocks > (std::uint64_t{1} << 24)) {
      set_error(cudaErrorInvalidConfiguration, format("%s: too many blocks to shuffle (%llu)", name,
                                                      static_cast<unsigned long long>(blocks)));
      return cudaErrorInvalidConfiguration;
    }
    block_order.resize(blocks);
    for (std::uint64_t i = 0; i < blocks; ++i) block_order[i] = i;
    std::mt19937_64 rng(g_seed ^ 0x5bd1e995ull);
    std::shuffle(block_order.begin(), block_order.end(), rng);
  }
#if EMU_ASAN
  pthread_attr_t attr;
  if (pthread_getattr_np(pthread_self(), &attr) == 0) {
    void* addr = nullptr;
    pthread_attr_getstack(&attr, &addr, &g_main_size);
    g_main_bottom = addr;
    pthread_attr_destroy(&attr);
  }
#endif
  install_fault_handler();
  g_launch = &L;
  std::vector<uint3> cluster(L.nblocks);
  const dim3 k = c.cluster;
  for (std::uint64_t i = 0; i < blocks && !L.failed; ++i) {
    const std::uint64_t b = shuffled ? block_order[i] : (g_order == Order::Reverse ? blocks - 1 - i : i);
    const uint3 at{static_cast<unsigned>(b % cgrid.x), static_cast<unsigned>((b / cgrid.x) % cgrid.y),
                   static_cast<unsigned>(b / (std::uint64_t{cgrid.x} * cgrid.y))};
    // Block rank r in the cluster: x fastest, as cluster.block_rank() counts.
    for (int r = 0; r < L.nblocks; ++r) {
      const unsigned rx = r % k.x, ry = (r / k.x) % k.y, rz = r / (k.x * k.y);
      cluster[r] = uint3{at.x * k.x + rx, at.y * k.y + ry, at.z * k.z + rz};
    }
    run_cluster(L, cluster);
  }
  g_launch = nullptr;
  return cudaSuccess;
}

}  // namespace emu

// ----------------------------------------------------------------------------- runtime API

using emu::g_mutex;

namespace {
bool valid_device(int d) { return d >= 0 && d < static_cast<int>(emu::g_devices.size()); }
}  // namespace

cudaError_t cudaGetDeviceCount(int* count) {
  std::lock_guard<std::mutex> lock(g_mutex);
  *count = static_cast<int>(emu::g_devices.size());
  return cudaSuccess;
}

cudaError_t cudaGetDevice(int* device) {
  std::lock_guard<std::mutex> lock(g_mutex);
  *device = emu::g_current_device;
  return cudaSuccess;
}

cudaError_t cudaSetDevice(int device) {
  std::lock_guard<std::mutex> lock(g_mutex);
  if (!valid_device(device)) {
    emu::set_error(cudaErrorInvalidDevice, emu::format("cudaSetDevice(%d): no such device", device));
    return cudaErrorInvalidDevice;
  }
  emu::g_current_device = device;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, enum cudaDeviceAttr attr, int device) {
  std::lock_guard<std::mutex> lock(g_mutex);
  if (!valid_device(device)) return cudaErrorInvalidDevice;
  switch (attr) {
    case cudaDevAttrMaxSharedMemoryPerBlock:
      *value = static_cast<int>(emu::kStaticSmemLimit);
      return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin:
      *value = emu::g_devices[device].optin;
      return cudaSuccess;
    case cudaDevAttrMultiProcessorCount:
      *value = emu::g_devices[device].sms;
      return cudaSuccess;
    case cudaDevAttrComputeCapabilityMajor:
      *value = emu::g_devices[device].cc_major;
      return cudaSuccess;
    case cudaDevAttrComputeCapabilityMinor:
      *value = emu::g_devices[device].cc_minor;
      return cudaSuccess;
    case cudaDevAttrClusterLaunch:
      *value = emu::g_devices[device].cc_major >= 9 ? 1 : 0;
      return cudaSuccess;
  }
  return cudaErrorInvalidValue;
}

cudaError_t cudaFuncSetAttribute(const void* func, enum cudaFuncAttribute attr, int value) {
  std::lock_guard<std::mutex> lock(g_mutex);
  const int device = emu::g_current_device;
  const emu::Device& d = emu::g_devices[device];
  if (attr == cudaFuncAttributeNonPortableClusterSizeAllowed && func != nullptr && (value == 0 || value == 1) &&
      d.cc_major >= 9) {
    emu::g_nonportable_cluster[{device, func}] = value;
    return cudaSuccess;
  }
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || func == nullptr || value < 0 || value > d.optin) {
    emu::set_error(cudaErrorInvalidValue,
                   emu::format("cudaFuncSetAttribute(attr %d, value %d): invalid on device %d (opt-in maximum %d B, "
                               "compute capability %d.%d)",
                               static_cast<int>(attr), value, device, d.optin, d.cc_major, d.cc_minor));
    return cudaErrorInvalidValue;
  }
  emu::g_max_dynamic_smem[{device, func}] = value;
  return cudaSuccess;
}

cudaError_t cudaOccupancyMaxActiveClusters(int* num_clusters, const void* func, const cudaLaunchConfig_t* config) {
  emu::LaunchConfig c{dim3(), dim3()};
  const cudaError_t parsed = emu::launch_config_from(config, &c);
  if (parsed != cudaSuccess) return parsed;
  std::lock_guard<std::mutex> lock(g_mutex);
  const int device = emu::g_current_device;
  std::string why;
  const cudaError_t err = emu::check_cluster(c, func, device, &why);
  if (err != cudaSuccess) {
    emu::set_error(err, "cudaOccupancyMaxActiveClusters: " + why);
    return err;
  }
  const std::uint64_t size = std::uint64_t{c.cluster.x} * c.cluster.y * c.cluster.z;
  std::size_t allowed = emu::kDefaultDynamicSmem;
  const auto it = emu::g_max_dynamic_smem.find({device, func});
  if (it != emu::g_max_dynamic_smem.end()) allowed = static_cast<std::size_t>(it->second);
  const std::uint64_t threads = std::uint64_t{c.block.x} * c.block.y * c.block.z;
  // One block per SM, as a block of vtprune's cluster kernel takes most of an SM's shared memory.
  const bool fits = c.smem <= allowed && threads >= 1 && threads <= static_cast<std::uint64_t>(emu::kMaxThreads);
  *num_clusters = fits ? static_cast<int>(emu::g_devices[device].sms / size) : 0;
  return cudaSuccess;
}

cudaError_t cudaGetLastError(void) {
  std::lock_guard<std::mutex> lock(g_mutex);
  const cudaError_t e = emu::g_last_error;
  emu::g_last_error = cudaSuccess;
  return e;
}

cudaError_t cudaPeekAtLastError(void) {
  std::lock_guard<std::mutex> lock(g_mutex);
  return emu::g_last_error;
}

const char* cudaGetErrorName(cudaError_t error) {
  switch (error) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation";
    case cudaErrorInitializationError: return "cudaErrorInitializationError";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorInsufficientDriver: return "cudaErrorInsufficientDriver";
    case cudaErrorNoDevice: return "cudaErrorNoDevice";
    case cudaErrorInvalidDevice: return "cudaErrorInvalidDevice";
    case cudaErrorInvalidResourceHandle: return "cudaErrorInvalidResourceHandle";
    case cudaErrorIllegalAddress: return "cudaErrorIllegalAddress";
    case cudaErrorLaunchOutOfResources: return "cudaErrorLaunchOutOfResources";
    case cudaErrorMisalignedAddress: return "cudaErrorMisalignedAddress";
    case cudaErrorLaunchFailure: return "cudaErrorLaunchFailure";
    case cudaErrorNotSupported: return "cudaErrorNotSupported";
    case cudaErrorInvalidClusterSize: return "cudaErrorInvalidClusterSize";
  }
  return "cudaErrorUnknown";
}

namespace {
const char* base_error_string(cudaError_t error) {
  switch (error) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInitializationError: return "initialization error";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorInsufficientDriver: return "CUDA driver version is insufficient for CUDA runtime version";
    case cudaErrorNoDevice: return "no CUDA-capable device is detected";
    case cudaErrorInvalidDevice: return "invalid device ordinal";
    case cudaErrorInvalidResourceHandle: return "invalid resource handle";
    case cudaErrorIllegalAddress: return "an illegal memory access was encountered";
    case cudaErrorLaunchOutOfResources: return "too many resources requested for launch";
    case cudaErrorMisalignedAddress: return "misaligned address";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
    case cudaErrorNotSupported: return "operation not supported";
    case cudaErrorInvalidClusterSize: return "invalid cluster size";
  }
  return "unknown error";
}
}  // namespace

// The real string, plus the emulator's explanation when `error` is the last error it raised.
const char* cudaGetErrorString(cudaError_t error) {
  std::lock_guard<std::mutex> lock(g_mutex);
  if (error != cudaSuccess && error == emu::g_detail_code && !emu::g_detail.empty()) {
    emu::g_error_string = std::string(base_error_string(error)) + " [cuda_emu: " + emu::g_detail + "]";
    return emu::g_error_string.c_str();
  }
  return base_error_string(error);
}

cudaError_t cudaPointerGetAttributes(struct cudaPointerAttributes* attributes, const void* ptr) {
  std::lock_guard<std::mutex> lock(g_mutex);
  // All memory is host memory standing in for device memory of the configured device.
  attributes->type = cudaMemoryTypeDevice;
  attributes->device = emu::g_pointer_device;
  attributes->devicePointer = const_cast<void*>(ptr);
  attributes->hostPointer = nullptr;
  return cudaSuccess;
}

cudaError_t cudaDriverGetVersion(int* version) {
  *version = 13000;
  return cudaSuccess;
}

cudaError_t cudaRuntimeGetVersion(int* version) {
  *version = 13000;
  return cudaSuccess;
}

// ----------------------------------------------------------------------------- control (ctypes)

extern "C" {

// order: 0 forward, 1 reverse, 2 random (seeded); warp_major: see "Scheduling" above. -1 for an
// unknown order.
__attribute__((visibility("default"))) int emu_set_order(int order, int warp_major, unsigned long long seed) {
  std::lock_guard<std::mutex> lock(g_mutex);
  if (order < 0 || order > 2) return -1;
  emu::g_order = static_cast<emu::Order>(order);
  emu::g_warp_major = warp_major != 0;
  emu::g_seed = seed;
  return 0;
}

__attribute__((visibility("default"))) void emu_set_poison(unsigned int word) {
  std::lock_guard<std::mutex> lock(g_mutex);
  emu::g_poison = word;
}

// Index of an emulated device with this opt-in shared memory limit (bytes) and compute capability,
// added if there is none yet (devices never change once created: the kernels cache attributes per
// device). -1 when the device table is full or an argument is out of range.
__attribute__((visibility("default"))) int emu_device_for(int optin, int cc_major, int cc_minor) {
  std::lock_guard<std::mutex> lock(g_mutex);
  if (optin <= 0 || cc_major < 1 || cc_minor < 0) return -1;
  for (std::size_t d = 0; d < emu::g_devices.size(); ++d) {
    const emu::Device& e = emu::g_devices[d];
    if (e.optin == optin && e.cc_major == cc_major && e.cc_minor == cc_minor) return static_cast<int>(d);
  }
  if (emu::g_devices.size() >= static_cast<std::size_t>(emu::kMaxDevices)) return -1;
  emu::g_devices.push_back(emu::Device{optin, cc_major, cc_minor, emu::kDefaultSms});
  return static_cast<int>(emu::g_devices.size() - 1);
}

// The compute capability 9.0 device with this opt-in limit (see emu_device_for).
__attribute__((visibility("default"))) int emu_device_for_optin(int optin) { return emu_device_for(optin, 9, 0); }

// The device every pointer reports (cudaPointerGetAttributes), i.e. where the data "lives".
__attribute__((visibility("default"))) int emu_set_pointer_device(int device) {
  std::lock_guard<std::mutex> lock(g_mutex);
  if (!valid_device(device)) return -1;
  emu::g_pointer_device = device;
  return 0;
}

__attribute__((visibility("default"))) int emu_current_device() {
  std::lock_guard<std::mutex> lock(g_mutex);
  return emu::g_current_device;
}

// The explanation of the last error the emulator raised ("" if none).
__attribute__((visibility("default"))) const char* emu_last_detail() {
  std::lock_guard<std::mutex> lock(g_mutex);
  return emu::g_detail.c_str();
}

__attribute__((visibility("default"))) void emu_clear_detail() {
  std::lock_guard<std::mutex> lock(g_mutex);
  emu::g_detail.clear();
  emu::g_detail_code = cudaSuccess;
}

// Launches and fiber switches so far (for measuring the emulator's cost).
__attribute__((visibility("default"))) unsigned long long emu_launch_count() { return emu::g_launches; }
__attribute__((visibility("default"))) unsigned long long emu_switch_count() { return emu::g_switches; }

__attribute__((visibility("default"))) int emu_asan() { return EMU_ASAN; }

}  // extern "C"
