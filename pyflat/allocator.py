"""An opt-in tuning of the process's memory allocator for long runs of products.

A block of k directions allocates temporaries k times a single product's (tangents,
deltas, convolution outputs, pyflat's and oneDNN's alike). glibc's malloc serves a block
above its mmap threshold (dynamic, at most 32 MiB) with fresh pages from the kernel and
returns them on free, and it trims the top of its heap beyond a trim threshold (at most
64 MiB): every product then faults its large temporaries in again as zeroed pages. On this
project's 2-core CPU machine a digits CNN's GGN on blocks of 16 directions (batch 1,024,
float32) faulted 360,000 pages (1.4 GiB) per product and ran at 62 ms per direction;
after :func:`tune_allocator` it faulted about 3,000 and ran at 26-28 ms.

The price is memory: freed blocks stay with the process (up to the trim threshold at the
heap's top) instead of going back to the system. So this is an opt-in, never done on
import; the command line's long runs and the benchmarks call it and say so.
"""
from __future__ import annotations

import ctypes
import platform

__all__ = ["allocator_settings", "tune_allocator"]

# mallopt's parameter numbers (glibc's malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_INT_MAX = 2 ** 31 - 1

_settings: dict[str, int] | None = None


def _check(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"pyflat.tune_allocator: {name} must be an int of bytes in [0, "
                        f"{_INT_MAX}], got {type(value).__name__} {value!r}")
    if not 0 <= value <= _INT_MAX:
        raise ValueError(f"pyflat.tune_allocator: {name} must be in [0, {_INT_MAX}] bytes "
                         f"(mallopt takes a C int), got {value}")
    return value


def tune_allocator(mmap_threshold: int = 1 << 30, trim_threshold: int = _INT_MAX) -> bool:
    """Asks glibc's malloc to keep large blocks in its heap and freed memory for reuse.

    Sets ``M_MMAP_THRESHOLD`` (blocks at least this large come from mmap: default 1 GiB)
    and ``M_TRIM_THRESHOLD`` (free memory at the heap's top beyond this goes back to the
    system: default 2 GiB) with ``mallopt``, the same as starting Python with
    ``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_`` in the environment, for the
    allocations that follow. It affects the whole process (torch's CPU tensors included),
    cannot be undone (glibc then stops adapting its thresholds), and keeps freed memory in
    the process.

    Args:
        mmap_threshold: bytes, in [0, 2^31 - 1].
        trim_threshold: bytes, in [0, 2^31 - 1].

    Returns:
        True where it took effect; False where the C library is not glibc (macOS, musl,
        Windows), where nothing changes.
    """
    global _settings
    mmap_threshold = _check(mmap_threshold, "mmap_threshold")
    trim_threshold = _check(trim_threshold, "trim_threshold")
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return False
    applied = (mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(mmap_threshold)) == 1
               and mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(trim_threshold)) == 1)
    if applied:
        _settings = {"mmap_threshold": mmap_threshold, "trim_threshold": trim_threshold}
    return applied


def allocator_settings() -> dict[str, int] | None:
    """The thresholds :func:`tune_allocator` set in this process, or None if it has not
    (or could not)."""
    return None if _settings is None else dict(_settings)
