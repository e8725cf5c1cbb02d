// An emulator of CUDA's execution model on the CPU, for running the project's torch-free
// .cu sources without a GPU. Every CUDA thread of a block is a fiber (ucontext); blocks
// run one after another. Fibers switch only at synchronisation points (__syncthreads,
// __syncwarp, __shfl*_sync), where the emulator checks CUDA's rules: every lane a
// shuffle's mask names must reach that shuffle (a lane that exited, or one outside the
// block, is an error naming the kernel and the lane), the calling lane must be in its
// mask, and a block that can make no progress is a deadlock. Launch configurations are
// checked as a GPU would (block size 1..1024, grid dimensions within limits). Static
// __shared__ arrays (rewritten to function statics that register themselves) are filled
// with 0xff bytes, a NaN in every float, at the start of every block, and may hold at most
// 48 KB per block. A memory fault inside a kernel (CUDA's illegal address) or a fiber's
// stack overflow ends the process with a line naming the kernel, block and thread.
//
// The fiber switches are annotated for AddressSanitizer, so the emulated suites also run
// under ASan and UBSan.
//
// Options for tests: reverse order (blocks and the threads within a block run last to
// first: a result that changes is an order-dependent race), a grid cap (at most that
// many blocks, forcing grid-stride loops to wrap; grid-stride kernels must not care) and a
// selection of blocks (only those run: a kernel over more than 2^31 elements can be run on
// a few blocks to check its index arithmetic).
//
// Device code is compiled by the host compiler with the host libm: bitwise agreement with
// the CPU loops here says nothing about a GPU, where nvcc contracts a * b + c to FMA by
// default and CUDA's libm differs from glibc's by a few ulps.
//
// rewrite_for_emulator.py rewrites the sources before compilation: launches
// kernel<<<grid, block, shared, stream>>>(args) become
// ::pyflat_emu::launcher(kernel, "kernel", grid, block, shared, stream)(args), and
// `__shared__ T name[N];` becomes a function static registered with shared_memory().
#pragma once

#include <signal.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstdio>
#include <cstring>
#include <functional>
#include <set>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#define PYFLAT_EMU_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define PYFLAT_EMU_ASAN 1
#endif
#endif
#ifdef PYFLAT_EMU_ASAN
#include <sanitizer/common_interface_defs.h>
#endif

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorLaunchFailure = 4,
  cudaErrorInvalidConfiguration = 9,
};
struct CUstream_st;
using cudaStream_t = CUstream_st*;

// The running thread's coordinates, set by the scheduler before every switch.
inline dim3 threadIdx, blockIdx, blockDim, gridDim;

namespace pyflat_emu {

constexpr int kWarp = 32;
constexpr std::size_t kStackBytes = 64 * 1024;
constexpr std::size_t kStaticSharedBytes = 48 * 1024;  // what a block may declare statically
constexpr unsigned char kPoison = 0xff;                 // a NaN in every float and double

struct Settings {
  bool reverse = false;  // run blocks and threads last to first
  unsigned grid_cap = 0;  // at most this many blocks in x (0: as launched)
  bool select_blocks = false;  // run only the blocks listed (linear indices; none: a dry run)
  std::vector<std::uint64_t> blocks;
};
inline Settings& settings() {
  static Settings s;
  return s;
}

struct Status {
  cudaError_t error = cudaSuccess;
  std::string message;
};
inline Status& status() {
  static Status s;
  return s;
}

// The kernels launched so far, by name without template arguments: tests check that
// every __global__ of the sources ran.
inline std::set<std::string>& launched() {
  static std::set<std::string> names;
  return names;
}

// The configuration of the last launch, after the grid cap.
struct LaunchConfig {
  dim3 grid, block;
};
inline LaunchConfig& last_launch() {
  static LaunchConfig config;
  return config;
}

// Fiber stacks with a guard page below each, kept for the whole run: a stack overflow is a
// fault the handler names instead of silent corruption of a neighbour.
struct Stack {
  char* base = nullptr;  // lowest usable byte
};
inline std::size_t page_bytes() {
  static const std::size_t bytes = static_cast<std::size_t>(sysconf(_SC_PAGESIZE));
  return bytes;
}
inline std::vector<Stack>& stack_pool() {
  static std::vector<Stack> pool;
  return pool;
}
inline void reserve_stacks(std::size_t count) {
  std::vector<Stack>& pool = stack_pool();
  while (pool.size() < count) {
    const std::size_t guard = page_bytes();
    void* memory = mmap(nullptr, guard + kStackBytes, PROT_READ | PROT_WRITE,
                        MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (memory == MAP_FAILED || mprotect(memory, guard, PROT_NONE) != 0) {
      std::fprintf(stderr, "pyflat emulator: cannot map a fiber stack\n");
      std::abort();
    }
    pool.push_back(Stack{static_cast<char*>(memory) + guard});
  }
}

// What the lanes of one warp exchange at a shuffle: two generations (the one being read
// and the next), since no lane can post twice ahead before all have read.
struct WarpSlots {
  std::uint64_t value[2][kWarp] = {};
  std::uint64_t posted[kWarp] = {};  // shuffles each lane has posted
};

struct Lane {
  ucontext_t context;
  char* stack = nullptr;
  bool started = false;
  bool done = false;
  unsigned tid = 0;
  std::uint64_t barriers = 0;  // __syncthreads passed
  void* fake_stack = nullptr;  // ASan's record of the fiber's stack while it is switched out
};

struct Block {
  const char* kernel = "";
  std::function<void()> body;
  std::vector<Lane> lanes;
  std::vector<WarpSlots> warps;
  ucontext_t scheduler;
  int current = -1;
  bool failed = false;
  bool cancelling = false;  // failed: each suspended fiber is resumed once to unwind
  std::uint64_t events = 0;  // posts and completions: progress for deadlock detection
  dim3 block_index;
  std::set<const void*> shared_seen;  // __shared__ arrays poisoned in this block
  std::size_t shared_bytes = 0;
  const void* scheduler_stack = nullptr;  // the scheduler's stack, for ASan's switches
  std::size_t scheduler_stack_bytes = 0;
};

inline Block*& active() {
  static Block* block = nullptr;
  return block;
}

inline void set_coordinates(const Block& b, unsigned tid) {
  threadIdx = dim3(tid % blockDim.x, (tid / blockDim.x) % blockDim.y,
                   tid / (blockDim.x * blockDim.y));
  blockIdx = b.block_index;
}

// AddressSanitizer must be told of every switch between stacks (its fake stacks and
// stack bounds are per stack); without ASan these are no-ops.
inline void switching_to(void** fake_stack, const void* bottom, std::size_t bytes) {
#ifdef PYFLAT_EMU_ASAN
  __sanitizer_start_switch_fiber(fake_stack, bottom, bytes);
#else
  (void)fake_stack, (void)bottom, (void)bytes;
#endif
}
inline void switched(void* fake_stack, const void** old_bottom, std::size_t* old_bytes) {
#ifdef PYFLAT_EMU_ASAN
  __sanitizer_finish_switch_fiber(fake_stack, old_bottom, old_bytes);
#else
  (void)fake_stack, (void)old_bottom, (void)old_bytes;
#endif
}

// Thrown inside a fiber of a failed block: unwinds the kernel's frames (destroying its
// locals) back to entry(). Kernels must not catch it, nor call the emulator's
// synchronisation from noexcept functions.
struct Abandon {};

// From the running fiber back to the scheduler; `final` when the fiber will not resume.
inline void to_scheduler(Block& b, bool final) {
  Lane& self = b.lanes[b.current];
  switching_to(final ? nullptr : &self.fake_stack, b.scheduler_stack, b.scheduler_stack_bytes);
  swapcontext(&self.context, &b.scheduler);
  switched(self.fake_stack, &b.scheduler_stack, &b.scheduler_stack_bytes);
  if (b.cancelling) throw Abandon{};
}

// Ends the launch with an error: the first message is kept, every fiber unwinds.
[[noreturn]] inline void fail(Block& b, const std::string& what) {
  if (!b.failed) {
    b.failed = true;
    status().error = cudaErrorLaunchFailure;
    status().message = std::string(b.kernel) + ": " + what;
  }
  throw Abandon{};
}

inline void yield(Block& b) { to_scheduler(b, false); }

inline void entry() {
  Block& b = *active();
  switched(nullptr, &b.scheduler_stack, &b.scheduler_stack_bytes);
  try {
    b.body();
  } catch (const Abandon&) {
  }
  b.lanes[b.current].done = true;
  ++b.events;
  to_scheduler(b, true);
}

inline unsigned lane_of(unsigned tid) { return tid % kWarp; }

// The lanes of the calling lane's warp that exist in this block, as a mask.
inline unsigned existing_lanes(const Block& b, unsigned tid) {
  const unsigned first = tid - lane_of(tid);
  unsigned mask = 0;
  for (unsigned l = 0; l < static_cast<unsigned>(kWarp); ++l) {
    if (first + l < b.lanes.size()) mask |= 1u << l;
  }
  return mask;
}

// Posts `bits` for the calling lane and waits until every lane of `mask` has posted the
// same shuffle; returns the slot generation to read.
inline int exchange(unsigned mask, std::uint64_t bits, const char* what) {
  Block& b = *active();
  const unsigned tid = b.lanes[b.current].tid;
  const unsigned lane = lane_of(tid);
  WarpSlots& warp = b.warps[tid / kWarp];
  if (!(mask & (1u << lane))) {
    fail(b, std::string(what) + ": lane " + std::to_string(lane) + " (thread " +
                std::to_string(tid) + ") calls it with a mask that leaves itself out");
  }
  const unsigned outside = mask & ~existing_lanes(b, tid);
  if (outside) {
    fail(b, std::string(what) + ": the mask names lane " +
                std::to_string(__builtin_ctz(outside)) + ", which this block does not have");
  }
  const std::uint64_t generation = warp.posted[lane];
  const int parity = static_cast<int>(generation & 1);
  warp.value[parity][lane] = bits;
  warp.posted[lane] = generation + 1;
  ++b.events;
  const unsigned first = tid - lane;
  for (;;) {
    bool ready = true;
    for (unsigned l = 0; l < static_cast<unsigned>(kWarp); ++l) {
      if (!(mask & (1u << l))) continue;
      const Lane& other = b.lanes[first + l];
      if (warp.posted[l] > generation) continue;
      if (other.done) {
        fail(b, std::string(what) + ": lane " + std::to_string(l) + " (thread " +
                    std::to_string(first + l) + ") exited before lane " +
                    std::to_string(lane) + " reached it with that lane in its mask");
      }
      ready = false;
    }
    if (ready) return parity;
    yield(b);
  }
}

template <typename T>
std::uint64_t to_bits(T value) {
  static_assert(sizeof(T) <= sizeof(std::uint64_t), "shuffles move at most 8 bytes");
  std::uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  return bits;
}

template <typename T>
T from_bits(std::uint64_t bits) {
  T value;
  std::memcpy(&value, &bits, sizeof(T));
  return value;
}

template <typename T>
T shuffle(unsigned mask, T value, unsigned source_of_lane_xor, bool is_xor, int width,
          const char* what) {
  Block& b = *active();
  const unsigned tid = b.lanes[b.current].tid;
  const unsigned lane = lane_of(tid);
  if (width <= 0 || width > kWarp || (width & (width - 1)) != 0) {
    fail(b, std::string(what) + ": width must be a power of 2 in [1, 32], got " +
                std::to_string(width));
  }
  const int parity = exchange(mask, to_bits(value), what);
  const unsigned segment = lane - lane % static_cast<unsigned>(width);
  unsigned source = is_xor ? (lane ^ source_of_lane_xor) : source_of_lane_xor;
  // CUDA: a source outside the caller's segment of `width` lanes reads the caller's own value
  if (source < segment || source >= segment + static_cast<unsigned>(width)) source = lane;
  if (!(mask & (1u << source))) {
    fail(b, std::string(what) + ": lane " + std::to_string(lane) + " reads lane " +
                std::to_string(source) + ", which is outside the mask");
  }
  return from_bits<T>(b.warps[tid / kWarp].value[parity][source]);
}

// A static __shared__ array, registered by the rewritten declaration each time a thread
// passes it: the first thread of a block poisons it, and the block's total is checked.
inline void shared_memory(void* array, std::size_t bytes, const char* name) {
  Block* b = active();
  if (b == nullptr || !b->shared_seen.insert(array).second) return;
  std::memset(array, kPoison, bytes);
  b->shared_bytes += bytes;
  if (b->shared_bytes > kStaticSharedBytes) {
    fail(*b, std::string("__shared__ ") + name + " brings the block's static shared memory to " +
                 std::to_string(b->shared_bytes) + " bytes, over the " +
                 std::to_string(kStaticSharedBytes) + " a block may declare");
  }
}

// A fault while a kernel runs: CUDA would report an illegal address (or a stack overflow)
// and the context would be lost. Named on stdout, then the process ends with status 1.
inline void on_fault(int signal_number, siginfo_t* info, void*) {
  Block* b = active();
  if (b == nullptr || b->current < 0) {
    ::signal(signal_number, SIG_DFL);
    ::raise(signal_number);
    return;
  }
  const Lane& lane = b->lanes[b->current];
  const char* address = static_cast<const char*>(info->si_addr);
  const bool overflow = address < lane.stack && address >= lane.stack - page_bytes();
  char line[512];
  const int n = std::snprintf(
      line, sizeof line, "FAIL %s: %s at %p, block (%u, %u, %u) thread %u\n", b->kernel,
      overflow ? "the thread's stack overflowed" : "illegal memory access", info->si_addr,
      b->block_index.x, b->block_index.y, b->block_index.z, lane.tid);
  if (n > 0) {
    ssize_t written = ::write(STDOUT_FILENO, line, static_cast<std::size_t>(n));
    (void)written;
  }
  ::_exit(1);
}

inline void install_fault_handler() {
  static bool installed = false;
  if (installed) return;
  installed = true;
  static std::vector<char> alternate(64 * 1024);  // the handler cannot run on a full stack
  stack_t handler_stack{};
  handler_stack.ss_sp = alternate.data();
  handler_stack.ss_size = alternate.size();
  sigaltstack(&handler_stack, nullptr);
  struct sigaction action {};
  action.sa_sigaction = on_fault;
  action.sa_flags = SA_SIGINFO | SA_ONSTACK;
  sigemptyset(&action.sa_mask);
  sigaction(SIGSEGV, &action, nullptr);
  sigaction(SIGBUS, &action, nullptr);
}

template <typename Kernel, typename... Args>
struct Launch {
  Kernel kernel;
  const char* name;
  dim3 grid, block;

  void operator()(Args... args) const {
    Status& s = status();
    const std::uint64_t threads = std::uint64_t(block.x) * block.y * block.z;
    if (threads == 0 || threads > 1024 || block.z > 64 || grid.x == 0 || grid.y == 0 ||
        grid.z == 0 || grid.y > 65535 || grid.z > 65535) {
      s.error = cudaErrorInvalidConfiguration;
      s.message = std::string(name) + ": invalid launch configuration (grid " +
                  std::to_string(grid.x) + "x" + std::to_string(grid.y) + "x" +
                  std::to_string(grid.z) + ", block " + std::to_string(block.x) + "x" +
                  std::to_string(block.y) + "x" + std::to_string(block.z) + ")";
      return;
    }
    const unsigned cap = settings().grid_cap;
    launched().insert(std::string(name).substr(0, std::string(name).find('<')));
    gridDim = dim3(cap && grid.x > cap ? cap : grid.x, grid.y, grid.z);
    blockDim = block;
    last_launch() = LaunchConfig{gridDim, blockDim};
    install_fault_handler();
    reserve_stacks(threads);
    std::tuple<Args...> bound(args...);
    Block b;
    b.kernel = name;
    b.body = [this, &bound] { std::apply(kernel, bound); };
    b.lanes.resize(threads);
    for (unsigned t = 0; t < threads; ++t) {
      b.lanes[t].stack = stack_pool()[t].base;
      b.lanes[t].tid = t;
    }
    std::vector<std::uint64_t> order;  // linear block indices, in the order they run
    const std::uint64_t blocks = std::uint64_t(gridDim.x) * gridDim.y * gridDim.z;
    if (settings().select_blocks) {
      for (std::uint64_t index : settings().blocks)
        if (index < blocks) order.push_back(index);
    } else {
      for (std::uint64_t i = 0; i < blocks; ++i) order.push_back(i);
    }
    if (settings().reverse) std::reverse(order.begin(), order.end());
    Block* previous = active();
    active() = &b;
    for (std::uint64_t index : order) {
      b.block_index = dim3(index % gridDim.x, (index / gridDim.x) % gridDim.y,
                           index / (std::uint64_t(gridDim.x) * gridDim.y));
      run_block(b);
      if (b.failed) break;
    }
    active() = previous;
  }

  static void run_block(Block& b) {
    b.warps.assign((b.lanes.size() + kWarp - 1) / kWarp, WarpSlots());
    b.shared_seen.clear();
    b.shared_bytes = 0;
    b.current = -1;
    b.cancelling = false;
    for (Lane& lane : b.lanes) {
      lane.started = false;
      lane.done = false;
      lane.barriers = 0;
      lane.fake_stack = nullptr;
      getcontext(&lane.context);
      lane.context.uc_stack.ss_sp = lane.stack;
      lane.context.uc_stack.ss_size = kStackBytes;
      lane.context.uc_link = &b.scheduler;
      makecontext(&lane.context, entry, 0);
    }
    const int n = static_cast<int>(b.lanes.size());
    for (;;) {
      bool all_done = true;
      const std::uint64_t events = b.events;
      for (int step = 0; step < n && !b.failed; ++step) {
        const int t = settings().reverse ? n - 1 - step : step;
        if (b.lanes[t].done) continue;
        all_done = false;
        resume(b, t);
      }
      if (all_done) return;
      if (!b.failed && b.events == events) {
        Status& s = status();
        s.error = cudaErrorLaunchFailure;
        s.message = std::string(b.kernel) + ": deadlock: the lanes wait on each other";
        b.failed = true;
      }
      if (b.failed) {  // unwind the fibers that wait, so their locals are destroyed
        b.cancelling = true;
        for (int t = 0; t < n; ++t) {
          if (b.lanes[t].started && !b.lanes[t].done) resume(b, t);
          b.lanes[t].done = true;
        }
        return;
      }
    }
  }

  static void resume(Block& b, int t) {
    b.current = t;
    b.lanes[t].started = true;
    set_coordinates(b, b.lanes[t].tid);
    void* fake_stack = nullptr;
    switching_to(&fake_stack, b.lanes[t].stack, kStackBytes);
    swapcontext(&b.scheduler, &b.lanes[t].context);
    switched(fake_stack, nullptr, nullptr);
    b.current = -1;
  }
};

template <typename... Args>
struct Launcher {
  void (*kernel)(Args...);
  const char* name;
  dim3 grid, block;
  template <typename... Given>
  void operator()(Given&&... given) const {
    Launch<void (*)(Args...), Args...>{kernel, name, grid, block}(
        Args(std::forward<Given>(given))...);
  }
};

template <typename... Args>
Launcher<Args...> launcher(void (*kernel)(Args...), const char* name, dim3 grid, dim3 block,
                           std::size_t shared_bytes = 0, cudaStream_t stream = nullptr) {
  (void)stream;
  if (shared_bytes != 0) {
    status().error = cudaErrorInvalidConfiguration;
    status().message = std::string(name) + ": dynamic shared memory is not emulated";
  }
  return Launcher<Args...>{kernel, name, grid, block};
}

}  // namespace pyflat_emu

inline cudaError_t cudaGetLastError() {
  const cudaError_t error = pyflat_emu::status().error;
  pyflat_emu::status().error = cudaSuccess;
  return error;
}

inline const char* cudaGetErrorString(cudaError_t error) {
  return error == cudaSuccess ? "no error" : pyflat_emu::status().message.c_str();
}

inline void __syncthreads() {
  pyflat_emu::Block& b = *pyflat_emu::active();
  pyflat_emu::Lane& self = b.lanes[b.current];
  const std::uint64_t target = ++self.barriers;
  ++b.events;
  for (;;) {
    bool ready = true;
    for (const pyflat_emu::Lane& other : b.lanes) {
      if (other.barriers >= target) continue;
      if (other.done) {
        pyflat_emu::fail(b, "__syncthreads: thread " + std::to_string(other.tid) +
                                " exited while thread " + std::to_string(self.tid) +
                                " waits at the barrier");
      }
      ready = false;
    }
    if (ready) return;
    pyflat_emu::yield(b);
  }
}

inline void __syncwarp(unsigned mask = 0xffffffffu) {
  pyflat_emu::exchange(mask, 0, "__syncwarp");
}

template <typename T>
T __shfl_xor_sync(unsigned mask, T value, int lane_mask, int width = pyflat_emu::kWarp) {
  return pyflat_emu::shuffle(mask, value, static_cast<unsigned>(lane_mask), true, width,
                             "__shfl_xor_sync");
}

template <typename T>
T __shfl_sync(unsigned mask, T value, int source, int width = pyflat_emu::kWarp) {
  const unsigned lane = threadIdx.x % pyflat_emu::kWarp;  // 1-D blocks in this project
  const unsigned segment = lane - lane % static_cast<unsigned>(width);
  return pyflat_emu::shuffle(mask, value, segment + static_cast<unsigned>(source) % width,
                             false, width, "__shfl_sync");
}
