"""Shared benchmark machinery: interleaved timing, summaries with spread, the machine record,
a measured roofline, peak-memory probes, and the JSON report every script writes.

Every timed figure is a median with its 20th and 80th percentiles over n repeats. Contenders
are interleaved (one repeat of each, in rotating order, per round) so that load from other
jobs on a shared machine hits all of them alike; speed goals are ratios of medians.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
ROOFLINE_ENV = "RLORA_BENCH_ROOFLINE"  # set by the runner so the roofline is measured once
THREADS_ENV = "RLORA_BENCH_THREADS"


# ------------------------------------------------------------------------------ arguments
def parse_args(description: str, argv=None, extra=None) -> argparse.Namespace:
    """The arguments every script takes; `extra(parser)` may add its own."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes and few repeats (CI smoke run, seconds)")
    parser.add_argument("--out", default=None,
                        help="folder for the JSON and plots (default: benchmarks/results/last)")
    parser.add_argument("--repeats", type=int, default=None, help="override the repeat count")
    parser.add_argument("--threads", type=int, default=None,
                        help=f"torch intra-op threads (default: ${THREADS_ENV} or torch's)")
    if extra is not None:
        extra(parser)
    args = parser.parse_args(argv)
    threads = args.threads or int(os.environ.get(THREADS_ENV, "0"))
    if threads > 0:
        # NOTE (2-core VM shared with 4 other jobs, torch 2.13): with 2 OpenMP threads a
        # batched [30, 1536, 32] QR took 89 ms median against 16 ms with 1 thread; on a
        # loaded machine contended thread barriers, not the maths, set the time.
        torch.set_num_threads(threads)
        os.environ[THREADS_ENV] = str(threads)  # for the subprocesses a script starts
    args.out = Path(args.out or REPO / "benchmarks" / "results" / "last")
    return args


# ------------------------------------------------------------------------------- summaries
def summarize(samples, scale: float = 1e3) -> dict:
    """Median, p20, p80 and n of `samples` (seconds), scaled (default: to ms)."""
    x = np.asarray(samples, dtype=float) * scale
    return {"median": float(np.median(x)), "p20": float(np.percentile(x, 20)),
            "p80": float(np.percentile(x, 80)), "n": int(x.size)}


def ratio(slow, fast) -> dict:
    """slow / fast as the ratio of medians, with p20/p80 of the per-round paired ratios."""
    slow, fast = np.asarray(slow, dtype=float), np.asarray(fast, dtype=float)
    paired = slow / fast
    return {"median": float(np.median(slow) / np.median(fast)),
            "p20": float(np.percentile(paired, 20)), "p80": float(np.percentile(paired, 80)),
            "n": int(paired.size)}


def interleave(contenders: dict, repeats: int, warmup: int = 1,
               cpu: dict | None = None) -> dict[str, list[float]]:
    """Time each zero-argument callable `repeats` times, interleaved, after `warmup` calls.

    Round i runs the contenders starting at offset i, so none is always first after a
    pause. Returns wall-clock seconds per call, per contender, in round order (paired by
    index). When `cpu` is a dict it receives the process CPU seconds of the same calls: on a
    machine shared with other jobs, time spent waiting for a core counts in wall-clock time
    but not in CPU time, so CPU-time ratios are the steadier cross-check.
    """
    names = list(contenders)
    for _ in range(warmup):
        for name in names:
            contenders[name]()
    times = {name: [] for name in names}
    if cpu is not None:
        cpu.update({name: [] for name in names})
    for i in range(repeats):
        for j in range(len(names)):
            name = names[(i + j) % len(names)]
            start, start_cpu = time.perf_counter(), time.process_time()
            contenders[name]()
            times[name].append(time.perf_counter() - start)
            if cpu is not None:
                cpu[name].append(time.process_time() - start_cpu)
    return times


# --------------------------------------------------------------------------------- machine
def _cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
        found = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
        if found:
            return found.group(1).strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:  # absent or broken: record that, never fail a benchmark over it
        return None


def _git(*args) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True,
                              check=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info() -> dict:
    """Machine, versions, git revision and date, stored beside every figure."""
    mem_kb = None
    try:
        mem_kb = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))
    except (OSError, AttributeError):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    # Dirty: any change to tracked files, or code not yet committed (new files in the package,
    # its C++ sources or these benchmarks), so a figure never claims a revision it did not run.
    status = _git("status", "--porcelain", "--untracked-files=no")
    new_code = _git("status", "--porcelain", "--untracked-files=all", "--", "rlora_kernels",
                    "csrc", "benchmarks", ":!benchmarks/results")
    if status is not None and new_code:
        status += "\n" + new_code
    from rlora_kernels import ops

    return {
        "cpu": _cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "memory_gb": round(mem_kb / 2**20, 1) if mem_kb else None, "gpu": gpu,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(), "torch": torch.__version__,
        "triton": _version("triton"), "transformers": _version("transformers"),
        "peft": _version("peft"), "rlora_backend": ops.get_backend(),
        "git_revision": _git("rev-parse", "HEAD"), "git_dirty": bool(status) if status is not None
        else None,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def machine_label(info: dict) -> str:
    """One line naming the machine, for tables, plots and the README."""
    dev = info.get("gpu") or f"{info.get('cpu')}, {info.get('cores')} cores"
    rev = (info.get("git_revision") or "?")[:8] + ("+dirty" if info.get("git_dirty") else "")
    return f"{dev}; torch {info.get('torch')}; {rev}; {info.get('date', '')[:10]}"


# -------------------------------------------------------------------------------- roofline
def roofline(quick: bool = False) -> dict:
    """Measured peaks of this machine: float32 matmul GFLOP/s and copy bandwidth GB/s.

    Measured, not quoted from a datasheet, on all torch threads; the best of a few repeats
    (a peak is what the hardware can do, not what a noisy moment gives).
    """
    if os.environ.get(ROOFLINE_ENV):
        return json.loads(os.environ[ROOFLINE_ENV])
    n = 512 if quick else 1536
    a, b = torch.randn(n, n), torch.randn(n, n)
    flops = []
    for _ in range(3 if quick else 5):
        start = time.perf_counter()
        a @ b
        flops.append(2 * n**3 / (time.perf_counter() - start))
    elems = (8 if quick else 64) * 2**20
    src, dst = torch.randn(elems), torch.empty(elems)
    bandwidth = []
    for _ in range(3 if quick else 5):
        start = time.perf_counter()
        dst.copy_(src)
        bandwidth.append(8 * elems / (time.perf_counter() - start))  # read + write, fp32
    return {"peak_gflops": max(flops) / 1e9, "bandwidth_gbs": max(bandwidth) / 1e9,
            "how": f"fp32 {n}^3 matmul; copy of {elems * 4 >> 20} MiB; best of repeats"}


def roofline_fraction(flops: float, nbytes: float, seconds: float, peaks: dict) -> float:
    """(time the roofline allows) / (time measured): 1.0 means at the hardware limit."""
    bound = max(flops / (peaks["peak_gflops"] * 1e9), nbytes / (peaks["bandwidth_gbs"] * 1e9))
    return bound / seconds


# ---------------------------------------------------------------------------------- memory
def _status_kb(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def reset_peak_rss() -> int:
    """Reset this process's peak RSS (Linux >= 4.0) and return the current RSS in KiB."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_kb("VmRSS")


def peak_rss_kb() -> int:
    return _status_kb("VmHWM")


def subprocess_json(module: str, args: list[str], timeout: float = 1800) -> dict:
    """Run `python -m module args` from the repository root; its last stdout line is JSON."""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{module} {' '.join(args)} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------- report
class Report:
    """Figures, goals, notes and plots of one benchmark script; `save` writes NAME.json."""

    def __init__(self, bench: str, args: argparse.Namespace):
        self.bench, self.args = bench, args
        self.machine = machine_info()
        self.figures: list[dict] = []
        self.goals: list[dict] = []
        self.notes: list[str] = []
        self.plots: list[str] = []
        self.data: dict = {}
        self.started = time.perf_counter()
        args.out.mkdir(parents=True, exist_ok=True)

    def add(self, name: str, stats: dict, unit: str = "ms", **extra) -> dict:
        fig = {"bench": self.bench, "name": name, "unit": unit, **stats, **extra}
        self.figures.append(fig)
        return fig

    def goal(self, text: str, value: float, target: float, higher_is_better: bool) -> None:
        met = value >= target if higher_is_better else value <= target
        self.goals.append({"bench": self.bench, "goal": text, "value": value, "target": target,
                           "higher_is_better": higher_is_better, "met": bool(met)})

    def plot_path(self, stem: str) -> Path:
        path = self.args.out / f"{self.bench}_{stem}.png"
        self.plots.append(path.name)
        return path

    def save(self) -> Path:
        path = self.args.out / f"{self.bench}.json"
        doc = {"bench": self.bench, "quick": bool(self.args.quick), "machine": self.machine,
               "seconds": time.perf_counter() - self.started, "figures": self.figures,
               "goals": self.goals, "notes": self.notes, "plots": self.plots, "data": self.data}
        path.write_text(json.dumps(doc, indent=1, default=float) + "\n")
        for fig in self.figures:
            spread = f"[{fig['p20']:.3g}, {fig['p80']:.3g}]" if "p20" in fig else ""
            print(f"{self.bench:>16} {fig['name']:<44} {fig['median']:>10.4g} {fig['unit']:<4}"
                  f" {spread}")
        for g in self.goals:
            print(f"{'goal':>16} {g['goal']}: {g['value']:.3g} "
                  f"({'met' if g['met'] else 'MISSED'}, target {g['target']})")
        return path


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
