"""The emulated CUDA kernel tests can fail: a mutation check.

tests/cpp/emulated_kernel_tests.cpp runs every CUDA kernel on the CPU under the emulator
of CUDA's execution model (csrc/emulator) against the CPU loops. Here each mutant puts one
bug of a kind that reviews miss into a copy of csrc/cuda; the mutant must compile and run,
and the suite must fail on a result or on a named emulator check: not on a compile error,
a crash or a hang. The unmutated sources must pass.
"""
from __future__ import annotations

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

# (name, file, text, replacement): each text occurs exactly once in its file
MUTANTS = [
    ("wrong rows", ACTIVATION, "p.out[i] = p.first[n * p.cols + c] * p.tangent[i];",
     "p.out[i] = p.first[c] * p.tangent[i];"),
    ("off by one", ACTIVATION, "const int64_t row = (i / (p.k * p.cols)) * p.cols + c;",
     "const int64_t row = (i / (p.k * p.cols)) * p.cols + c + (c + 1 < p.cols);"),
    ("grid stride skips", ACTIVATION,
     "       i += int64_t(blockDim.x) * gridDim.x) {\n    const T g = p.grad[i];",
     "       i += int64_t(blockDim.x) * gridDim.x + 1) {\n    const T g = p.grad[i];"),
    ("race", ACTIVATION,
     "    p.out[i] = p.first[n * p.cols + c] * p.tangent[i];",
     "    p.out[i - i % 2] = p.first[n * p.cols + c] * p.tangent[i];"),
    ("missing reduction step", SOFTMAX,
     "for (int offset = kWarp / 2; offset > 0; offset /= 2) v +=",
     "for (int offset = kWarp / 4; offset > 0; offset /= 2) v +="),
    ("flipped comparison", SOFTMAX, "if (other > best || (other == best && other_index < index))",
     "if (other < best || (other == best && other_index < index))"),
    ("lane exits before a shuffle", SOFTMAX, "    rest = warp_sum(rest);",
     "    if (lane == 7) return;\n    rest = warp_sum(rest);"),
    ("wrong shuffle mask", SOFTMAX, "v += __shfl_xor_sync(0xffffffffu, v, offset)",
     "v += __shfl_xor_sync(0x7fffffffu, v, offset)"),
]


def _compiler() -> str:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return name
    raise RuntimeError("the mutation check needs a C++ compiler (c++, g++ or clang++)")


def _build(cuda: Path, out: Path) -> subprocess.CompletedProcess:
    """Rewrites the launches of cuda/*.cu and links them with the CPU loops and the test."""
    out.mkdir(parents=True, exist_ok=True)
    rewritten = []
    for source in sorted(cuda.glob("*.cu")):
        target = out / (source.stem + ".cpp")
        subprocess.run([sys.executable, str(ROOT / "csrc/emulator/rewrite_launches.py"),
                        str(source), str(target)], check=True)
        rewritten.append(str(target))
    cpu = [str(ROOT / "csrc/cpu" / f) for f in ("activation_kernel.cpp",
                                               "softmax_cross_entropy_kernel.cpp")]
    command = [_compiler(), "-std=c++17", "-O1", "-w", f"-I{cuda}",
               f"-I{ROOT / 'csrc/emulator/include'}",
               "-include", str(ROOT / "csrc/emulator/cuda_emulator.h"),
               f'-DPYFLAT_CUDA_SOURCES="{cuda}"', "-o", str(out / "emulated_kernel_tests"),
               str(ROOT / "tests/cpp/emulated_kernel_tests.cpp"), *rewritten, *cpu]
    return subprocess.run(command, capture_output=True, text=True)


def _run(out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(out / "emulated_kernel_tests")], capture_output=True, text=True,
                          timeout=600)


def test_the_unmutated_kernels_pass(tmp_path):
    built = _build(CUDA, tmp_path)
    assert built.returncode == 0, built.stderr[-3000:]
    ran = _run(tmp_path)
    assert ran.returncode == 0, ran.stdout[-3000:]
    assert " 0 failed" in ran.stdout


@pytest.mark.parametrize("name, file, text, replacement", MUTANTS, ids=[m[0] for m in MUTANTS])
def test_each_mutant_fails_the_emulated_suite(tmp_path, name, file, text, replacement):
    cuda = tmp_path / "csrc" / "cuda"  # with the shared math beside it, as in the tree
    shutil.copytree(CUDA, cuda)
    shutil.copytree(ROOT / "csrc" / "kernels", tmp_path / "csrc" / "kernels")
    source = (cuda / file).read_text()
    assert source.count(text) == 1, f"the mutant '{name}' no longer matches {file}"
    (cuda / file).write_text(source.replace(text, replacement))
    built = _build(cuda, tmp_path / "build")
    assert built.returncode == 0, f"the mutant '{name}' does not compile:\n{built.stderr[-2000:]}"
    ran = _run(tmp_path / "build")
    assert ran.returncode != -signal.SIGSEGV and ran.returncode >= 0, \
        f"the mutant '{name}' crashed (signal {-ran.returncode}) instead of failing a check"
    assert ran.returncode == 1 and "FAIL " in ran.stdout, \
        f"the mutant '{name}' passed the emulated suite:\n{ran.stdout[-1000:]}"
