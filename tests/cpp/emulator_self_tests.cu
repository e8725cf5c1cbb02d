// Self-tests of the CPU emulator of CUDA's execution model (csrc/emulator): the parts of
// CUDA the project's kernels use today and those they may use next (__shared__,
// __syncthreads, __shfl_sync with widths, 2-D blocks), each rule it enforces shown to
// fire with a message that names what went wrong, and its test options (reverse order,
// grid cap, selected blocks). Written in CUDA syntax and rewritten like csrc/cuda.
#include <sys/wait.h>
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include <cuda_runtime_api.h>

namespace {

int passed = 0;
int failed = 0;

void check(bool ok, const std::string& what) {
  if (ok) {
    ++passed;
  } else {
    ++failed;
    std::printf("FAIL %s\n", what.c_str());
  }
}

// The launch's error, cleared; "" when it succeeded.
std::string launch_error() {
  const cudaError_t error = cudaGetLastError();
  return error == cudaSuccess ? "" : cudaGetErrorString(error);
}

void expect_error(const std::string& what, const std::string& needle) {
  const std::string message = launch_error();
  check(message.find(needle) != std::string::npos,
        what + ": expected an error containing '" + needle + "', got '" + message + "'");
}

constexpr int kThreads = 256;

// A tree sum of each block's values through shared memory.
__global__ void block_sum(const int* in, int* out) {
  __shared__ int partial[kThreads];
  partial[threadIdx.x] = in[blockIdx.x * blockDim.x + threadIdx.x];
  __syncthreads();
  for (unsigned half = blockDim.x / 2; half > 0; half /= 2) {
    if (threadIdx.x < half) partial[threadIdx.x] += partial[threadIdx.x + half];
    __syncthreads();
  }
  if (threadIdx.x == 0) out[blockIdx.x] = partial[0];
}

// The same without the barriers: a thread reads a neighbour's slot that may not be written.
__global__ void racy_neighbour(const float* in, float* out) {
  __shared__ float slot[kThreads];
  slot[threadIdx.x] = in[threadIdx.x];
  out[threadIdx.x] = slot[(threadIdx.x + 1) % blockDim.x];
}

// Reads its slot before any thread wrote it, then writes it.
__global__ void read_before_write(float* out) {
  __shared__ float slot[kThreads];
  __shared__ double wide[4];
  out[blockIdx.x * blockDim.x + threadIdx.x] = slot[threadIdx.x] + float(wide[threadIdx.x % 4]);
  slot[threadIdx.x] = 1.0f;
  wide[threadIdx.x % 4] = 2.0;
}

// More static shared memory than a block may declare (2 x 28 KB).
__global__ void too_much_shared(float* out) {
  __shared__ float first[7168];
  __shared__ float second[7168];
  first[threadIdx.x] = 1.0f;
  second[threadIdx.x] = 2.0f;
  out[threadIdx.x] = first[threadIdx.x] + second[threadIdx.x];
}

// Broadcasts within segments of `width` lanes, and a butterfly within them.
__global__ void shuffles(int width, int* broadcast, int* butterfly) {
  const int lane = threadIdx.x % 32;
  broadcast[threadIdx.x] = __shfl_sync(0xffffffffu, 100 + lane, 1, width);
  int v = lane;
  for (int offset = width / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset, width);
  butterfly[threadIdx.x] = v;
}

// Lanes 0..15 shuffle among themselves with a half-warp mask; the others do nothing.
__global__ void half_warp(int* out) {
  const int lane = threadIdx.x % 32;
  if (lane < 16) out[threadIdx.x] = __shfl_sync(0x0000ffffu, lane * 3, 15 - lane);
}

__global__ void shuffle_outside_mask(int* out) {
  const int lane = threadIdx.x % 32;
  if (lane < 16) out[threadIdx.x] = __shfl_sync(0x0000ffffu, lane, 20);
}

__global__ void shuffle_without_self(int* out) {
  out[threadIdx.x] = __shfl_xor_sync(0xfffffffeu, int(threadIdx.x), 1);
}

__global__ void lane_exits_before_shuffle(int* out) {
  if (threadIdx.x % 32 == 5) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, int(threadIdx.x), 1);
}

__global__ void thread_exits_before_barrier(int* out) {
  if (threadIdx.x == 70) return;
  __syncthreads();
  out[threadIdx.x] = 1;
}

// Lane 0 waits for lane 1 at a shuffle; lane 1 waits for lane 0 at the block barrier.
__global__ void deadlock(int* out) {
  if (threadIdx.x == 0) out[0] = __shfl_sync(0x3u, 1, 1);
  if (threadIdx.x == 1) __syncthreads();
}

__global__ void warp_barrier_partial_mask(int* out) {
  const int lane = threadIdx.x % 32;
  if (lane < 8) {
    out[threadIdx.x] = lane;
    __syncwarp(0xffu);
  }
}

// Coordinates of a 2-D block in a 2-D grid: each thread writes its linear position.
__global__ void coordinates(int* out) {
  const int block = blockIdx.y * gridDim.x + blockIdx.x;
  const int thread = threadIdx.y * blockDim.x + threadIdx.x;
  out[block * blockDim.x * blockDim.y + thread] = block * 1000 + thread;
}

__global__ void grid_stride_ones(int64_t n, int* out) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(blockDim.x) * gridDim.x)
    out[i] += 1;
}

__global__ void illegal_address(int* out) {
  if (threadIdx.x == 3 && blockIdx.x == 1) out[-(int64_t(1) << 40)] = 1;
}

__device__ int deep(int depth) {
  volatile char frame[1024];
  frame[0] = static_cast<char>(depth);
  return depth == 0 ? frame[0] : deep(depth - 1) + frame[0];
}

__global__ void stack_overflow(int* out) { out[threadIdx.x] = deep(threadIdx.x == 9 ? 1000 : 1); }

// Runs `body` in a child process and returns what it wrote to stdout and its exit status:
// the emulator ends the process on a fault, as a GPU loses its context.
template <typename Body>
std::pair<std::string, int> in_child(Body body) {
  std::fflush(stdout);
  int pipe_ends[2];
  if (pipe(pipe_ends) != 0) return {"pipe failed", -1};
  const pid_t child = fork();
  if (child == 0) {
    dup2(pipe_ends[1], STDOUT_FILENO);
    close(pipe_ends[0]);
    body();
    std::fflush(stdout);
    _exit(0);
  }
  close(pipe_ends[1]);
  std::string text;
  char buffer[512];
  for (ssize_t n; (n = read(pipe_ends[0], buffer, sizeof buffer)) > 0;) text.append(buffer, n);
  close(pipe_ends[0]);
  int wstatus = 0;
  waitpid(child, &wstatus, 0);
  return {text, WIFEXITED(wstatus) ? WEXITSTATUS(wstatus) : -WTERMSIG(wstatus)};
}

void shared_memory_and_barriers() {
  const int blocks = 3;
  std::vector<int> in(blocks * kThreads), out(blocks, -1);
  for (std::size_t i = 0; i < in.size(); ++i) in[i] = static_cast<int>(i * 7 % 101) - 50;
  for (bool reverse : {false, true}) {
    pyflat_emu::settings().reverse = reverse;
    block_sum<<<blocks, kThreads>>>(in.data(), out.data());
    pyflat_emu::settings() = pyflat_emu::Settings();
    check(launch_error().empty(), "block_sum runs");
    for (int b = 0; b < blocks; ++b) {
      int want = 0;
      for (int t = 0; t < kThreads; ++t) want += in[b * kThreads + t];
      check(out[b] == want, "block_sum block " + std::to_string(b) + (reverse ? " reversed" : ""));
    }
  }

  // Without barriers, the order of the threads decides what is read: poison (NaN) from a
  // slot not yet written, as launched; the neighbour's value, reversed.
  std::vector<float> values(kThreads), forward(kThreads), backward(kThreads);
  for (int t = 0; t < kThreads; ++t) values[t] = float(t);
  racy_neighbour<<<1, kThreads>>>(values.data(), forward.data());
  check(launch_error().empty(), "racy_neighbour runs");
  pyflat_emu::settings().reverse = true;
  racy_neighbour<<<1, kThreads>>>(values.data(), backward.data());
  pyflat_emu::settings() = pyflat_emu::Settings();
  check(std::isnan(forward[0]) && backward[0] == 1.0f,
        "the missing barrier shows as poison in order and as the neighbour's value reversed");

  std::vector<float> read(2 * kThreads, 0.0f);
  read_before_write<<<2, kThreads>>>(read.data());
  check(launch_error().empty(), "read_before_write runs");
  bool all_nan = true;
  for (float v : read) all_nan = all_nan && std::isnan(v);
  check(all_nan, "shared memory read before written is NaN in every block, the second included");

  std::vector<float> big(kThreads);
  too_much_shared<<<1, kThreads>>>(big.data());
  expect_error("too_much_shared", "over the 49152");
}

void warp_shuffles() {
  for (int width : {32, 16, 8, 1}) {
    std::vector<int> broadcast(64, -1), butterfly(64, -1);
    shuffles<<<1, 64>>>(width, broadcast.data(), butterfly.data());
    check(launch_error().empty(), "shuffles width " + std::to_string(width) + " run");
    bool ok = true;
    for (int t = 0; t < 64; ++t) {
      const int lane = t % 32, segment = lane - lane % width;
      const int source = segment + 1 % width;
      int sum = 0;
      for (int l = segment; l < segment + width; ++l) sum += l;
      ok = ok && broadcast[t] == 100 + source && butterfly[t] == sum;
    }
    check(ok, "__shfl_sync broadcast and __shfl_xor_sync butterfly, width " + std::to_string(width));
  }
  std::vector<int> out(64, -1);
  half_warp<<<1, 64>>>(out.data());
  check(launch_error().empty(), "a half-warp mask with the other lanes idle is legal");
  bool ok = true;
  for (int t = 0; t < 64; ++t) ok = ok && out[t] == (t % 32 < 16 ? (15 - t % 32) * 3 : -1);
  check(ok, "half_warp reads the mirrored lane");

  shuffle_outside_mask<<<1, 32>>>(out.data());
  expect_error("shuffle_outside_mask", "reads lane 20, which is outside the mask");
  shuffle_without_self<<<1, 32>>>(out.data());
  expect_error("shuffle_without_self", "lane 0 (thread 0) calls it with a mask that leaves itself out");
  lane_exits_before_shuffle<<<1, 64>>>(out.data());
  expect_error("lane_exits_before_shuffle", "lane 5 (thread 5) exited before");
  shuffles<<<1, 40>>>(32, out.data(), out.data());
  expect_error("a full mask in a block of 40 threads", "names lane 8, which this block does not have");
  warp_barrier_partial_mask<<<1, 32>>>(out.data());
  check(launch_error().empty(), "__syncwarp with the mask of the lanes that reach it");
}

void rules() {
  std::vector<int> out(256, 0);
  thread_exits_before_barrier<<<1, 128>>>(out.data());
  expect_error("thread_exits_before_barrier", "__syncthreads: thread 70 exited");
  deadlock<<<1, 2>>>(out.data());
  expect_error("deadlock", "deadlock: the lanes wait on each other");
  grid_stride_ones<<<1, 1025>>>(1, out.data());
  expect_error("1025 threads", "invalid launch configuration (grid 1x1x1, block 1025x1x1)");
  grid_stride_ones<<<0, 32>>>(1, out.data());
  expect_error("an empty grid", "invalid launch configuration");
  grid_stride_ones<<<dim3(1, 65536), 32>>>(1, out.data());
  expect_error("grid.y of 65536", "invalid launch configuration");
  grid_stride_ones<<<1, 32, 1024>>>(1, out.data());
  expect_error("dynamic shared memory", "dynamic shared memory is not emulated");
}

void coordinates_and_options() {
  const dim3 grid(3, 2), block(8, 4);
  std::vector<int> out(6 * 32, -1);
  coordinates<<<grid, block>>>(out.data());
  check(launch_error().empty(), "coordinates runs");
  bool ok = true;
  for (int b = 0; b < 6; ++b)
    for (int t = 0; t < 32; ++t) ok = ok && out[b * 32 + t] == b * 1000 + t;
  check(ok, "2-D grid and block coordinates");

  const int64_t n = 1000;
  for (unsigned cap : {0u, 1u, 3u}) {
    std::vector<int> ones(n, 0);
    pyflat_emu::settings().grid_cap = cap;
    grid_stride_ones<<<8, 64>>>(n, ones.data());
    pyflat_emu::settings() = pyflat_emu::Settings();
    bool once = launch_error().empty();
    for (int v : ones) once = once && v == 1;
    check(once && pyflat_emu::last_launch().grid.x == (cap ? cap : 8u),
          "a grid-stride loop covers every element once, grid cap " + std::to_string(cap));
  }
  std::vector<int> ones(n, 0);
  pyflat_emu::settings().select_blocks = true;
  pyflat_emu::settings().blocks = {2, 5, 99};  // 99 is past the grid: ignored
  grid_stride_ones<<<8, 64>>>(n, ones.data());
  pyflat_emu::settings() = pyflat_emu::Settings();
  ok = launch_error().empty();
  for (int64_t i = 0; i < n; ++i) ok = ok && ones[i] == ((i / 64) % 8 == 2 || (i / 64) % 8 == 5);
  check(ok, "selected blocks run, and only they");
}

void faults() {
  std::vector<int> out(256, 0);
  const auto [text, status] = in_child([&] { illegal_address<<<2, 32>>>(out.data()); });
  check(status == 1 && text.find("FAIL illegal_address: illegal memory access") == 0 &&
            text.find("block (1, 0, 0) thread 3") != std::string::npos,
        "an out-of-range write is named (got status " + std::to_string(status) + ", '" + text + "')");
  const auto [text2, status2] = in_child([&] { stack_overflow<<<1, 32>>>(out.data()); });
  check(status2 == 1 && text2.find("FAIL stack_overflow: the thread's stack overflowed") == 0 &&
            text2.find("thread 9") != std::string::npos,
        "a fiber's stack overflow is named (got status " + std::to_string(status2) + ", '" +
            text2 + "')");
}

}  // namespace

int main() {
  std::setvbuf(stdout, nullptr, _IOLBF, 0);
  shared_memory_and_barriers();
  warp_shuffles();
  rules();
  coordinates_and_options();
  faults();
  std::printf("%d passed, %d failed\n", passed, failed);
  return failed == 0 ? 0 : 1;
}
