"""Timing benchmarks fairly and recording them: host and CUDA clocks, interleaved rounds
with medians and quartiles, float32 in IEEE precision on the GPU, the machine's
description, and results written as markdown and JSON. Shared by ``pyflat bench`` and the
repository's benchmarks (bench/)."""
from __future__ import annotations

import datetime
import json
import platform
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ..allocator import allocator_settings, tune_allocator

__all__ = ["cuda_clock", "host_clock", "machine", "tf32_off", "time_interleaved",
           "write_results"]


def host_clock(fn: Callable[[], object]) -> float:
    """Seconds of wall time of one call of fn."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def cuda_clock(fn: Callable[[], object]) -> float:
    """Seconds of GPU time between two CUDA events around fn, synchronized."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def time_interleaved(methods: dict[str, Callable[[], object]], min_seconds: float = 1.0,
                     max_rounds: int = 50, min_rounds: int = 5,
                     clock: Callable[[Callable[[], object]], float] = host_clock
                     ) -> dict[str, dict[str, float]]:
    """Times every method in interleaved rounds (one call of each per round, in a
    shuffled order), so that drift of a shared machine hits all of them alike; returns
    median and quartiles. ``clock`` times one call (host_clock, or cuda_clock on a GPU)."""
    for fn in methods.values():  # warm-up: allocator, thread pool, lazy init
        fn()
        fn()
    samples: dict[str, list[float]] = {name: [] for name in methods}
    order = list(methods)
    shuffle = random.Random(0).shuffle  # a new order each round: no method always follows
    start = time.perf_counter()         # the same (cache-cold) neighbour
    rounds = 0
    while rounds < min_rounds or (rounds < max_rounds and
                                  time.perf_counter() - start < min_seconds):
        shuffle(order)
        for name in order:
            samples[name].append(clock(methods[name]))
        rounds += 1
    out = {}
    for name, ts in samples.items():
        q = statistics.quantiles(ts, n=4) if len(ts) >= 2 else [ts[0]] * 3
        out[name] = {"median_s": statistics.median(ts), "q1_s": q[0], "q3_s": q[2],
                     "rounds": len(ts)}
    return out


def machine() -> dict[str, object]:
    """Date, torch, CUDA and Python versions, CPU model, threads and GPU of this run."""
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "cpu": cpu,
        "threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        # pyflat.tune_allocator's thresholds, or None: glibc's own adaptive ones
        "allocator": allocator_settings(),
    }


def write_results(out: Path, stem: str, markdown: str, payload: dict) -> None:
    """Prints the markdown table and writes it and the JSON payload to out/stem.{md,json}."""
    print(markdown)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.md").write_text(markdown)
    (out / f"{stem}.json").write_text(json.dumps(payload, indent=2))


def tf32_off() -> None:
    """float32 GEMMs and convolutions in IEEE precision for every method timed, torch.func
    and the plain matmul included. torch >= 2.9 has per-operator fp32_precision settings;
    there the legacy allow_tf32 switches are not used (reading them raises once the two
    disagree)."""
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        torch.backends.cuda.matmul.fp32_precision = "ieee"
        torch.backends.cudnn.conv.fp32_precision = "ieee"
    else:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False


def allocator_argument(parser) -> None:
    """--default-allocator: time with glibc's own thresholds instead of the tuned ones."""
    parser.add_argument("--default-allocator", action="store_true",
                        help="leave glibc's malloc thresholds alone (by default the run "
                             "calls pyflat.tune_allocator, and says so in its output)")


def apply_allocator(default_allocator: bool) -> None:
    """Calls pyflat.tune_allocator unless the default allocator was asked for."""
    if not default_allocator:
        tune_allocator()


def allocator_text(settings: dict | None) -> str:
    """How the run's allocator was set (``allocator_settings()``, as ``machine()`` records
    it), for the header of a results table."""
    if settings is None:
        return "glibc malloc defaults"
    return (f"malloc tuned by pyflat.tune_allocator (mmap threshold "
            f"{settings['mmap_threshold'] / 2**30:g} GiB, trim threshold "
            f"{settings['trim_threshold'] / 2**30:.0f} GiB)")
