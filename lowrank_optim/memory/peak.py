"""Measured peak memory of a function: CUDA allocator statistics, or the CPU process's RSS peak.

On CUDA the allocator's own counters are exact: ``reset_peak_memory_stats`` before, and
``max_memory_allocated - memory_allocated(before)`` after, is the most the function held at once
beyond what existed already.

On CPU there is no allocator counter, so the operating system's view is read: the resident set
size (RSS). Linux keeps the high-water mark ``VmHWM`` and resets it when ``5`` is written to
``/proc/self/clear_refs``; a sampling thread (every ``interval`` seconds) backs it up where that
file is not writable. Before the baseline, glibc's ``malloc_trim`` hands freed heap pages back
to the kernel, so memory the function allocates shows up as new resident pages instead of
being served silently from the allocator's cache. The reading is therefore a real measurement
of the process, allocator overheads and transient buffers included, not an estimate.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["PeakMemory", "measure_peak", "resident_bytes"]


@dataclass(frozen=True)
class PeakMemory:
    """``peak_bytes``: most memory held during the call beyond ``baseline_bytes`` (before it)."""

    peak_bytes: int
    baseline_bytes: int
    method: str
    result: Any = None


def resident_bytes() -> int:
    """The process's current resident set size."""
    with open(f"/proc/{os.getpid()}/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _high_water_bytes() -> int | None:
    try:
        with open(f"/proc/{os.getpid()}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_high_water() -> bool:
    try:
        with open(f"/proc/{os.getpid()}/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def _trim_heap() -> None:
    gc.collect()
    # Not glibc: RSS is still measured; it may only under-read pages the allocator reuses.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class _Sampler(threading.Thread):
    def __init__(self, interval: float) -> None:
        super().__init__(daemon=True)
        self.interval, self.peak, self._stop_event = interval, resident_bytes(), threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.peak = max(self.peak, resident_bytes())
            time.sleep(self.interval)

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        return max(self.peak, resident_bytes())


def measure_peak(
    fn: Callable[[], Any], device: torch.device | str | None = None, interval: float = 0.002
) -> PeakMemory:
    """Run ``fn()`` and measure the most memory it held at once beyond what existed before.

    Args:
        fn: the work to measure; its return value is passed back in ``result``.
        device: a CUDA device uses the allocator's peak statistics; otherwise (default) the
            process RSS peak is read from the kernel and a sampling thread.
        interval: sampling period of the CPU thread, in seconds.
    """
    if not interval > 0:
        raise ValueError(f"Invalid interval: {interval!r}; must be > 0 seconds")
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        baseline = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - baseline
        return PeakMemory(int(peak), int(baseline), "cuda max_memory_allocated", result)
    _trim_heap()
    baseline = resident_bytes()
    exact = _reset_high_water()
    sampler = _Sampler(interval)
    sampler.start()
    try:
        result = fn()
    finally:
        sampled = sampler.stop()
    high_water = _high_water_bytes() if exact else None
    peak = max(sampled, high_water or 0)
    method = "cpu VmHWM (reset via clear_refs)" if high_water else "cpu RSS sampling"
    return PeakMemory(max(peak - baseline, 0), baseline, method, result)
