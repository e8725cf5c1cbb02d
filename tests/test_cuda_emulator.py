"""The emulated CUDA kernel tests can fail: a mutation check.

tests/cpp/emulated_kernel_tests.cpp runs every CUDA kernel on the CPU under the emulator
of CUDA's execution model (csrc/emulator) against the CPU loops. Here each mutant puts one
bug of a kind that reviews miss into a copy of csrc/cuda; the mutant must compile and run,
and the suite must fail on a result or on a named emulator check (an illegal address
included): not on a compile error, a crash or a hang. The unmutated sources must pass, and
so must the emulator's own tests (tests/cpp/emulator_self_tests.cu). ctest runs the same
suites again under ASan and UBSan.
"""
from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CUDA = ROOT / "csrc" / "cuda"
ACTIVATION, SOFTMAX = "activation_kernel.cu", "softmax_cross_entropy_kernel.cu"

# (name, file, text, replacement, caught): each text occurs exactly once in its file, and the
# suite's first FAIL line must contain `caught` (the kernel or the emulator check it trips)
MUTANTS = [
    ("wrong rows", ACTIVATION, "p.out[i] = p.first[n * p.cols + c] * p.tangent[i];",
     "p.out[i] = p.first[c] * p.tangent[i];",
     "FAIL tangent_kernel"),
    ("off by one", ACTIVATION, "const int64_t row = (i / (p.k * p.cols)) * p.cols + c;",
     "const int64_t row = (i / (p.k * p.cols)) * p.cols + c + (c + 1 < p.cols);",
     "FAIL delta_kernel"),
    ("grid stride skips", ACTIVATION,
     "       i += int64_t(blockDim.x) * gridDim.x) {\n    const T g = p.grad[i];",
     "       i += int64_t(blockDim.x) * gridDim.x + 1) {\n    const T g = p.grad[i];",
     "FAIL backward_kernel"),
    ("race", ACTIVATION,
     "    p.out[i] = p.first[n * p.cols + c] * p.tangent[i];",
     "    p.out[i - i % 2] = p.first[n * p.cols + c] * p.tangent[i];",
     "FAIL tangent_kernel"),
    ("missing reduction step", SOFTMAX,
     "for (int offset = kWarp / 2; offset > 0; offset /= 2) v +=",
     "for (int offset = kWarp / 4; offset > 0; offset /= 2) v +=",
     "FAIL cross_entropy_kernel"),
    ("flipped comparison", SOFTMAX, "if (other > best || (other == best && other_index < index))",
     "if (other < best || (other == best && other_index < index))",
     "FAIL cross_entropy_kernel"),
    ("lane exits before a shuffle", SOFTMAX, "    rest = warp_sum(rest);",
     "    if (lane == 7) return;\n    rest = warp_sum(rest);",
     "exited before lane"),
    ("wrong shuffle mask", SOFTMAX, "v += __shfl_xor_sync(0xffffffffu, v, offset)",
     "v += __shfl_xor_sync(0x7fffffffu, v, offset)",
     "a mask that leaves itself out"),
    ("truncated index width", ACTIVATION,
     "  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;\n"
     "       i += int64_t(blockDim.x) * gridDim.x) {\n    const int64_t c = i % p.cols;\n"
     "    const int64_t n = i / (p.k * p.cols);",
     "  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < total;\n"
     "       i += blockDim.x * gridDim.x) {\n    const int64_t c = i % p.cols;\n"
     "    const int64_t n = i / (p.k * p.cols);",
     "FAIL tangent_kernel<T>: illegal memory access"),
    ("truncated row offset", SOFTMAX, "const T* f = p.logits + n * C;",
     "const T* f = p.logits + static_cast<int>(n * C);",
     "FAIL cross_entropy_kernel<T>: illegal memory access"),
    ("uninitialised accumulator", SOFTMAX, "    T s = T(0);\n", "    T s;\n",
     "FAIL hessian_kernel"),
]


def _compiler() -> str:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return name
    raise RuntimeError("the mutation check needs a C++ compiler (c++, g++ or clang++)")


@pytest.fixture(scope="module")
def objects(tmp_path_factory) -> list[str]:
    """The test driver and the CPU loops, compiled once: mutants change csrc/cuda only."""
    out = tmp_path_factory.mktemp("emulated-objects")
    compiled = []
    for source in (ROOT / "tests/cpp/emulated_kernel_tests.cpp",
                   ROOT / "csrc/cpu/activation_kernel.cpp",
                   ROOT / "csrc/cpu/softmax_cross_entropy_kernel.cpp"):
        target = out / (source.stem + ".o")
        built = _compile(target, "-c", f"-I{CUDA}", f'-DPYFLAT_CUDA_SOURCES="{CUDA}"',
                         str(source))
        assert built.returncode == 0, built.stderr[-3000:]
        compiled.append(str(target))
    return compiled


def _build(cuda: Path, out: Path, objects: list[str]) -> subprocess.CompletedProcess:
    """Rewrites cuda/*.cu for the emulator and links them with the test driver."""
    rewritten = [_rewrite(source, out) for source in sorted(cuda.glob("*.cu"))]
    return _compile(out / "emulated_kernel_tests", f"-I{cuda}", *rewritten, *objects)


def _rewrite(source: Path, out: Path) -> str:
    out.mkdir(parents=True, exist_ok=True)
    target = out / (source.stem + ".cpp")
    subprocess.run([sys.executable, str(ROOT / "csrc/emulator/rewrite_for_emulator.py"),
                    str(source), str(target)], check=True)
    return str(target)


def _compile(executable: Path, *arguments: str) -> subprocess.CompletedProcess:
    """Compiles for the emulator as CMake does, uninitialised locals filled with a pattern
    where the compiler can (GCC >= 12, Clang >= 8)."""
    pattern = ["-ftrivial-auto-var-init=pattern"] if _supports_pattern_init() else []
    command = [_compiler(), "-std=c++17", "-O1", "-w", *pattern,
               f"-I{ROOT / 'csrc/emulator/include'}",
               "-include", str(ROOT / "csrc/emulator/cuda_emulator.h"),
               "-o", str(executable), *arguments]
    return subprocess.run(command, capture_output=True, text=True)


@functools.cache
def _supports_pattern_init() -> bool:
    probe = subprocess.run([_compiler(), "-ftrivial-auto-var-init=pattern", "-x", "c++",
                            "-fsyntax-only", "-"], input="int main() {}\n",
                           capture_output=True, text=True)
    return probe.returncode == 0


def _run(executable: Path, *arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(executable), *arguments], capture_output=True, text=True,
                          timeout=600)


def test_the_unmutated_kernels_pass(tmp_path, objects):
    built = _build(CUDA, tmp_path, objects)
    assert built.returncode == 0, built.stderr[-3000:]
    ran = _run(tmp_path / "emulated_kernel_tests")
    assert ran.returncode == 0, ran.stdout[-3000:]
    assert " 0 failed" in ran.stdout


def test_the_emulator_passes_its_own_tests(tmp_path):
    source = _rewrite(ROOT / "tests/cpp/emulator_self_tests.cu", tmp_path)
    built = _compile(tmp_path / "emulator_self_tests", source)
    assert built.returncode == 0, built.stderr[-3000:]
    ran = _run(tmp_path / "emulator_self_tests")
    assert ran.returncode == 0 and " 0 failed" in ran.stdout, ran.stdout[-3000:]


def test_the_rewrite_takes_launches_and_shared_arrays_and_refuses_the_rest(tmp_path):
    rewrite = [sys.executable, str(ROOT / "csrc/emulator/rewrite_for_emulator.py")]
    good = tmp_path / "good.cu"
    good.write_text("// no __shared__ here, only in this comment\n"
                    "__global__ void k(float* x) {\n  __shared__ float tile[32][33];\n}\n"
                    "void launch(float* x) { k<<<dim3(2, 1), 64, 0, nullptr>>>(x); }\n")
    done = subprocess.run([*rewrite, str(good), str(tmp_path / "good.cpp")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    text = (tmp_path / "good.cpp").read_text()
    assert "static float tile[32][33]; ::pyflat_emu::shared_memory(&tile, sizeof(tile), " \
           '"tile");' in text
    assert '::pyflat_emu::launcher(k, "k", dim3(2, 1), 64, 0, nullptr)(x);' in text
    for name, body, what in (
            ("dynamic", "__global__ void k() { extern __shared__ float dynamic[]; }\n",
             "__shared__ declarations"),
            ("two", "__global__ void k() { __shared__ float a[4], b[4]; }\n",
             "__shared__ declarations"),
            ("macro", "#define LAUNCH(k) k<<<1, 32>>>\nvoid f() { LAUNCH(g)(); }\n", "launches")):
        source = tmp_path / f"{name}.cu"
        source.write_text(body)
        refused = subprocess.run([*rewrite, str(source), str(tmp_path / f"{name}.cpp")],
                                 capture_output=True, text=True)
        assert refused.returncode == 1 and what in refused.stderr, (name, refused.stderr)
        assert not (tmp_path / f"{name}.cpp").exists()


@pytest.mark.parametrize("name, file, text, replacement, caught", MUTANTS,
                         ids=[m[0] for m in MUTANTS])
def test_each_mutant_fails_the_emulated_suite(tmp_path, objects, name, file, text, replacement,
                                              caught):
    cuda = tmp_path / "csrc" / "cuda"  # with the shared math beside it, as in the tree
    shutil.copytree(CUDA, cuda)
    shutil.copytree(ROOT / "csrc" / "kernels", tmp_path / "csrc" / "kernels")
    source = (cuda / file).read_text()
    assert source.count(text) == 1, f"the mutant '{name}' no longer matches {file}"
    (cuda / file).write_text(source.replace(text, replacement))
    built = _build(cuda, tmp_path / "build", objects)
    assert built.returncode == 0, f"the mutant '{name}' does not compile:\n{built.stderr[-2000:]}"
    ran = _run(tmp_path / "build" / "emulated_kernel_tests", "--sources", str(cuda),
               "--stop-at-first-failure")
    assert ran.returncode != -signal.SIGSEGV and ran.returncode >= 0, \
        f"the mutant '{name}' crashed (signal {-ran.returncode}) instead of failing a check"
    assert ran.returncode == 1 and "FAIL " in ran.stdout, \
        f"the mutant '{name}' passed the emulated suite:\n{ran.stdout[-1000:]}"
    first_failure = next(line for line in ran.stdout.splitlines() if line.startswith("FAIL "))
    assert caught in first_failure, \
        f"the mutant '{name}' was caught, but not by {caught!r}: {first_failure}"
