"""pyflat.tune_allocator: an opt-in that keeps large temporaries in malloc's heap instead of
fresh mappings per product. It changes the whole process for good, so it runs in a child."""
import json
import platform
import subprocess
import sys

import pytest

import pyflat

CHILD = r"""
import ctypes, json, torch
import pyflat

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2

def mapped_for_a_block():
    # bytes glibc serves by mmap for a live 64 MiB temporary, as a product's are
    before = libc.mallinfo2().hblkhd
    block = torch.empty(64 << 20, dtype=torch.uint8).fill_(1)
    mapped = libc.mallinfo2().hblkhd - before
    del block
    return mapped

mapped_before = mapped_for_a_block()
applied = pyflat.tune_allocator()
mapped_after = mapped_for_a_block()
print(json.dumps({"mapped_before": mapped_before, "mapped_after": mapped_after,
                  "applied": applied,
                  "settings": pyflat.allocator_settings()}))
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_tuned_allocator_serves_large_temporaries_from_its_heap():
    done = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["applied"]
    assert result["settings"] == {"mmap_threshold": 1 << 30, "trim_threshold": 2 ** 31 - 1}
    assert result["mapped_before"] >= 64 << 20  # glibc maps it, and unmaps it on free
    assert result["mapped_after"] == 0  # the heap serves it
    # whether freed heap pages then stay resident depends on the heap's history (measured
    # per product by bench.blocks), so page faults are not asserted here


def test_importing_pyflat_leaves_the_allocator_alone():
    done = subprocess.run([sys.executable, "-c",
                           "import pyflat; print(pyflat.allocator_settings())"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "None"


@pytest.mark.parametrize("kwargs, error, message", [
    ({"mmap_threshold": -1}, ValueError, r"mmap_threshold must be in \[0, 2147483647\] bytes"),
    ({"trim_threshold": 2 ** 31}, ValueError, "trim_threshold must be in"),
    ({"mmap_threshold": 1.5}, TypeError, "mmap_threshold must be an int of bytes"),
    ({"trim_threshold": True}, TypeError, "trim_threshold must be an int of bytes"),
])
def test_bad_thresholds_are_refused_before_anything_changes(kwargs, error, message):
    settings = pyflat.allocator_settings()
    with pytest.raises(error, match=message):
        pyflat.tune_allocator(**kwargs)
    assert pyflat.allocator_settings() == settings
