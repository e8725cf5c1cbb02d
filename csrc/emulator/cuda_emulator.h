// An emulator of CUDA's execution model on the CPU, for running the project's torch-free
// .cu sources without a GPU. Every CUDA thread of a block is a fiber (ucontext); blocks
// run one after another. Fibers switch only at synchronisation points (__syncthreads,
// __syncwarp, __shfl*_sync), where the emulator checks CUDA's rules: every lane a
// shuffle's mask names must reach that shuffle (a lane that exited, or one outside the
// block, is an error naming the kernel and the lane), the calling lane must be in its
// mask, and a block that can make no progress is a deadlock. Launch configurations are
// checked as a GPU would (block size 1..1024, grid dimensions within limits).
//
// Options for tests: reverse order (blocks and the threads within a block run last to
// first: a result that changes is an order-dependent race) and a grid cap (at most that
// many blocks, forcing grid-stride loops to wrap; grid-stride kernels must not care).
//
// Device code is compiled by the host compiler with the host libm: bitwise agreement with
// the CPU loops here says nothing about a GPU, where nvcc contracts a * b + c to FMA by
// default and CUDA's libm differs from glibc's by a few ulps.
//
// Launches are rewritten from kernel<<<grid, block, shared, stream>>>(args) to
// ::pyflat_emu::launcher(kernel, "kernel", grid, block, shared, stream)(args) by
// rewrite_launches.py before compilation.
#pragma once

#include <ucontext.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <memory>
#include <set>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

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

struct Settings {
  bool reverse = false;  // run blocks and threads last to first
  unsigned grid_cap = 0;  // at most this many blocks in x (0: as launched)
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

// What the lanes of one warp exchange at a shuffle: two generations (the one being read
// and the next), since no lane can post twice ahead before all have read.
struct WarpSlots {
  std::uint64_t value[2][kWarp] = {};
  std::uint64_t posted[kWarp] = {};  // shuffles each lane has posted
};

struct Lane {
  ucontext_t context;
  std::unique_ptr<char[]> stack;
  bool done = false;
  unsigned tid = 0;
  std::uint64_t barriers = 0;  // __syncthreads passed
};

struct Block {
  const char* kernel = "";
  std::function<void()> body;
  std::vector<Lane> lanes;
  std::vector<WarpSlots> warps;
  ucontext_t scheduler;
  int current = -1;
  bool failed = false;
  std::uint64_t events = 0;  // posts and completions: progress for deadlock detection
  dim3 block_index;
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

// Ends the launch with an error; the failing fiber is never resumed.
inline void fail(Block& b, const std::string& what) {
  if (!b.failed) {
    b.failed = true;
    status().error = cudaErrorLaunchFailure;
    status().message = std::string(b.kernel) + ": " + what;
  }
  swapcontext(&b.lanes[b.current].context, &b.scheduler);
}

inline void yield(Block& b) { swapcontext(&b.lanes[b.current].context, &b.scheduler); }

inline void entry() {
  Block& b = *active();
  b.body();
  b.lanes[b.current].done = true;
  ++b.events;
}  // returns to the scheduler through uc_link

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
    std::tuple<Args...> bound(args...);
    Block b;
    b.kernel = name;
    b.body = [this, &bound] { std::apply(kernel, bound); };
    b.lanes.resize(threads);
    for (unsigned t = 0; t < threads; ++t) {
      b.lanes[t].stack.reset(new char[kStackBytes]);
      b.lanes[t].tid = t;
    }
    Block* previous = active();
    active() = &b;
    const std::uint64_t blocks = std::uint64_t(gridDim.x) * gridDim.y * gridDim.z;
    for (std::uint64_t i = 0; i < blocks && !b.failed; ++i) {
      const std::uint64_t index = settings().reverse ? blocks - 1 - i : i;
      b.block_index = dim3(index % gridDim.x, (index / gridDim.x) % gridDim.y,
                           index / (std::uint64_t(gridDim.x) * gridDim.y));
      run_block(b);
    }
    active() = previous;
  }

  static void run_block(Block& b) {
    b.warps.assign((b.lanes.size() + kWarp - 1) / kWarp, WarpSlots());
    for (Lane& lane : b.lanes) {
      lane.done = false;
      lane.barriers = 0;
      getcontext(&lane.context);
      lane.context.uc_stack.ss_sp = lane.stack.get();
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
        b.current = t;
        set_coordinates(b, b.lanes[t].tid);
        swapcontext(&b.scheduler, &b.lanes[t].context);
      }
      if (b.failed || all_done) return;
      if (b.events == events) {
        Status& s = status();
        s.error = cudaErrorLaunchFailure;
        s.message = std::string(b.kernel) + ": deadlock: the lanes wait on each other";
        b.failed = true;
        return;
      }
    }
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
