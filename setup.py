"""Build of pyflat's torch extension (pyflat._C).

The CPU ops are always built. The CUDA sources are compiled when a CUDA toolkit is found
and the installed torch is a CUDA build; whether this machine has a GPU plays no part.

Environment:
    PYFLAT_CUDA        unset: auto; 0: CPU only; 1: require CUDA (fails on a CPU torch).
    PYFLAT_CUDA_ARCHS  CUDA architectures, passed on as TORCH_CUDA_ARCH_LIST
                       (default "9.0+PTX": Hopper, plus PTX for newer GPUs).
    PYFLAT_CXX_STD     C++ standard for host code (e.g. c++17), default: torch's own.

Install with ``pip install --no-build-isolation -e .`` (torch must already be installed:
build isolation would pull a second, multi-GB torch into the build environment).
"""
import os
import sys
from pathlib import Path

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils import cpp_extension
except ImportError:  # pragma: no cover - guidance for a missing build dependency
    sys.exit("pyflat: torch must be installed before building; then run "
             "`pip install --no-build-isolation -e .`")

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"


def read_sources() -> list[str]:
    """The shared source list (csrc/sources.txt), also read by CMakeLists.txt."""
    lines = (CSRC / "sources.txt").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def cuda_toolkit() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and (Path(home) / "bin" / "nvcc").exists():
        return home
    for candidate in ("/usr/local/cuda",):
        if (Path(candidate) / "bin" / "nvcc").exists():
            return candidate
    return None


def want_cuda() -> bool:
    choice = os.environ.get("PYFLAT_CUDA", "").strip()
    if choice not in ("", "0", "1"):
        sys.exit(f"pyflat: PYFLAT_CUDA must be unset, 0 or 1; got {choice!r}")
    if choice == "0":
        return False
    toolkit = cuda_toolkit()
    if choice == "1":
        if torch.version.cuda is None:
            sys.exit(f"pyflat: PYFLAT_CUDA=1 but the installed torch {torch.__version__} is a "
                     "CPU build; install a CUDA build of torch or set PYFLAT_CUDA=0")
        if toolkit is None:
            sys.exit("pyflat: PYFLAT_CUDA=1 but no CUDA toolkit was found (set CUDA_HOME to "
                     "the folder holding bin/nvcc)")
    return torch.version.cuda is not None and toolkit is not None


def openmp_flags() -> list[str]:
    """-fopenmp where torch runs its CPU threads on OpenMP (Linux wheels).

    at::parallel_for is a header template: compiled without OpenMP it runs every loop of
    ours on one thread, whatever torch.set_num_threads says. The module then needs
    libgomp.so.1, the runtime torch has already loaded, so both share one thread pool.
    """
    if sys.platform != "linux" or \
            "ATen parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return []
    return ["-fopenmp"]


def extension():
    sources = read_sources()
    cuda = want_cuda()
    openmp = openmp_flags()
    cxx = ["-O3", "-g0", "-Wall", "-Wextra", "-Wno-unused-parameter", *openmp]
    if os.environ.get("PYFLAT_CXX_STD"):
        cxx.append(f"-std={os.environ['PYFLAT_CXX_STD']}")
    define_macros = []
    if not cuda:
        sources = [s for s in sources if not s.startswith("cuda/")]
        paths = [str(Path("csrc") / s) for s in sources]
        return cpp_extension.CppExtension("pyflat._C", paths, extra_compile_args={"cxx": cxx},
                                          extra_link_args=openmp, define_macros=define_macros)
    toolkit = cuda_toolkit()
    os.environ["CUDA_HOME"] = toolkit
    cpp_extension.CUDA_HOME = toolkit
    os.environ["TORCH_CUDA_ARCH_LIST"] = os.environ.get("PYFLAT_CUDA_ARCHS", "9.0+PTX")
    define_macros.append(("PYFLAT_WITH_CUDA", "1"))
    nvcc = ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo"]
    paths = [str(Path("csrc") / s) for s in sources]
    print(f"pyflat: building with CUDA ({toolkit}) for TORCH_CUDA_ARCH_LIST="
          f"{os.environ['TORCH_CUDA_ARCH_LIST']}", file=sys.stderr)
    return cpp_extension.CUDAExtension("pyflat._C", paths,
                                       extra_compile_args={"cxx": cxx, "nvcc": nvcc},
                                       extra_link_args=openmp, define_macros=define_macros)


setup(
    packages=find_packages(include=["pyflat", "pyflat.*"]),
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
