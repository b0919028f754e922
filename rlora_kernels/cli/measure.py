"""Measurement helpers of `rlora finetune`: peak memory and a CPU thread governor."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import resource
import threading
import time

import torch


# -- measurement ------------------------------------------------------------------------------

class PeakMemory:
    """Peak memory of a block above its starting level, in MB.

    CUDA: torch's allocator peak. CPU: the process RSS sampled every 5 ms from /proc (max RSS
    from getrusage is a lifetime maximum, useless for the second run of a process), with the
    getrusage delta as the fallback where /proc is missing.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_mb = 0.0
        self._paused = False
        self._cuda_peak = 0

    @staticmethod
    def _rss() -> int | None:
        try:
            with open("/proc/self/statm") as fh:
                return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            return None

    def _sample(self):
        while not self._stop.wait(0.005):
            if not self._paused:
                self._max = max(self._max, self._rss() or 0)

    @contextlib.contextmanager
    def paused(self):
        """Leave a block (an evaluation, say) out of the CPU measurement."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._cuda_peak = max(self._cuda_peak, torch.cuda.max_memory_allocated(self.device))
        self._paused = True
        try:
            yield
        finally:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
                torch.cuda.reset_peak_memory_stats(self.device)
            else:
                _release_free_memory()  # what the block freed must not count afterwards
            self._paused = False

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        _release_free_memory()
        self._start = self._rss()
        if self._start is None:
            self._start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            return self
        self._max, self._stop = self._start, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = max(self._cuda_peak, torch.cuda.max_memory_allocated(self.device))
        elif hasattr(self, "_thread"):
            self._stop.set()
            self._thread.join()
            peak = max(self._max, self._rss() or 0)
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.peak_mb = max(0.0, (peak - self._start) / 2**20)
        return False


def _release_free_memory():
    """Hand freed heap pages back to the OS, so a run does not look small merely because it
    reuses memory an earlier run of this process freed (glibc keeps it otherwise)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


class ThreadGovernor:
    """Keeps torch's CPU thread count at the number of cores other processes leave free.

    NOTE (2-core VM, MiniLM, batch 32 x 64 tokens, one other single-threaded process busy):
    2 threads took 4.5 s per training step, 1 thread 1.2 s; on an idle machine 2 threads are
    the faster. OpenMP threads that share a core with another busy process stall each other,
    and on a shared machine the other load comes and goes, so `update` re-measures (Linux
    /proc: machine-wide busy time minus this process's own) at most every `period` seconds.
    """

    def __init__(self, requested: str, period: float = 5.0):
        self.fixed = None if requested == "auto" else int(requested)
        self.limit = torch.get_num_threads()
        self.period = period
        self.free = float(os.cpu_count() or 1)
        self._last = None

    @staticmethod
    def _sample():
        """(machine total ticks, machine busy ticks, this process's busy ticks) or None."""
        try:
            with open("/proc/stat") as fh:
                values = [int(v) for v in fh.readline().split()[1:]]
            with open("/proc/self/stat") as fh:
                fields = fh.read().rpartition(")")[2].split()
            return sum(values), sum(values) - values[3] - values[4], int(fields[11]) + int(
                fields[12])
        except (OSError, ValueError, IndexError):
            return None

    def start(self, window: float = 0.3) -> tuple[int, str]:
        """Pick the initial thread count; returns it and the reason."""
        if self.fixed is not None:
            torch.set_num_threads(self.fixed)
            return self.fixed, "--threads"
        self._last = self._sample()
        time.sleep(window)
        chosen = self.update(force=True)
        if chosen is None:
            return self.limit, "torch default"
        return chosen, f"{self.free:.1f} of {os.cpu_count()} cores free; re-checked every " \
                       f"{self.period:.0f} s"

    def update(self, force: bool = False) -> int | None:
        if self.fixed is not None or self._last is None:
            return None
        now = self._sample()
        if now is None or now[0] <= self._last[0] or (
                not force and (now[0] - self._last[0]) / os.sysconf("SC_CLK_TCK")
                < self.period * (os.cpu_count() or 1)):
            return None
        total, busy, mine = (b - a for a, b in zip(self._last, now))
        self._last = now
        cores = os.cpu_count() or 1
        self.free = cores * (1 - max(0, busy - mine) / total)
        chosen = max(1, min(self.limit, int(self.free + 0.5)))
        if chosen != torch.get_num_threads():
            torch.set_num_threads(chosen)
        return chosen


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


