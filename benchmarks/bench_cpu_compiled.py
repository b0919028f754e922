"""Compiled CPU backend against the reference on the optimizer-step ops, MiniLM buckets.

all-MiniLM-L6-v2 adapts per model 24 layers of 384 x 384, 6 of 1536 x 384 and 6 of
384 x 1536; one call handles a whole bucket. Both backends run through the public
`rlora_kernels.ops` functions, interleaved repeat by repeat so background load hits both
alike. Prints a table; `--out FILE` writes the numbers, machine, versions and revision.
On a machine shared with other jobs, `--clock cpu` (one thread, thread CPU time) gives
stable ratios; two-thread wall times there mostly measure the contention.

    python -m benchmarks.bench_cpu_compiled [--quick] [--clock cpu] [--out results.json]
"""

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from rlora_kernels import ops
from rlora_kernels.ops import compiled

BUCKETS = ((24, 384, 384), (6, 1536, 384), (6, 384, 1536))  # (layers, m, n)
OPS = ("thin_qr", "project_lr", "retract_lr", "ortho_lr")
# One Riemannion step per bucket (METHOD.md sec. 4): qr(B) for B_R, transport and the
# re-projection of the orthogonalised direction (2 x project_lr), ortho_lr, retract_lr.
STEP = {"thin_qr": 1, "project_lr": 2, "ortho_lr": 1, "retract_lr": 1}


def _orth(shape, dtype, gen):
    return ops.reference.thin_qr(torch.randn(*shape, dtype=dtype, generator=gen))[0]


def make_inputs(n_layers, m, n, r, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, dtype=dtype, generator=gen)  # noqa: E731
    a_l, b_r = _orth((n_layers, m, r), dtype, gen), _orth((n_layers, n, r), dtype, gen)
    return {
        "thin_qr": (rnd(n_layers, m, 2 * r),),
        "project_lr": (a_l, b_r, rnd(n_layers, m, 2 * r), rnd(n_layers, n, 2 * r)),
        # The retraction's panels as the optimizer builds them: [-lr * Ad, A_L], [B_R, B].
        "retract_lr": (torch.cat([-1e-3 * rnd(n_layers, m, r), a_l], -1),
                       torch.cat([b_r, b_r * torch.linspace(1, 0.1, r, dtype=dtype)
                                  + 1e-3 * rnd(n_layers, n, r)], -1), r),
        "ortho_lr": (rnd(n_layers, m, r), rnd(n_layers, n, r), a_l, b_r),
    }


def time_pair(fn, args, reps, warmup, clock=time.perf_counter):
    """Median and quartiles (ms) of fn(*args) under each backend, interleaved."""
    times = {"cpu": [], "reference": []}
    for i in range(warmup + reps):
        for backend in ("cpu", "reference"):
            with ops.use_backend(backend):
                t0 = clock()
                fn(*args)
                dt = (clock() - t0) * 1e3
            if i >= warmup:
                times[backend].append(dt)
    out = {}
    for backend, ts in times.items():
        q = statistics.quantiles(ts, n=4) if len(ts) > 1 else [ts[0]] * 3
        out[backend] = {"median_ms": statistics.median(ts), "q25_ms": q[0], "q75_ms": q[2],
                        "min_ms": min(ts)}
    return out


def machine():
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        rev = None
    return {"cpu": cpu, "threads": torch.get_num_threads(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__,
            "extension": compiled.build_info(), "git_revision": rev or None}


def run(ranks, dtypes, reps, warmup, clock):
    rows = []
    for dtype in dtypes:
        for r in ranks:
            for n_layers, m, n in BUCKETS:
                inputs = make_inputs(n_layers, m, n, r, dtype)
                for op in OPS:
                    res = time_pair(getattr(ops, op), inputs[op], reps, warmup, clock)
                    rows.append({"op": op, "dtype": str(dtype).replace("torch.", ""), "rank": r,
                                 "bucket": [n_layers, m, n], **res,
                                 "speedup": res["reference"]["median_ms"]
                                 / res["cpu"]["median_ms"]})
    return rows


def summarise(rows):
    """Per (dtype, rank): each op summed over the buckets (one model), and the step."""
    out = []
    for key in sorted({(r["dtype"], r["rank"]) for r in rows}):
        sel = [r for r in rows if (r["dtype"], r["rank"]) == key]
        tot = {op: {b: sum(r[b]["median_ms"] for r in sel if r["op"] == op)
                    for b in ("cpu", "reference")} for op in OPS}
        step = {b: sum(STEP[op] * tot[op][b] for op in OPS) for b in ("cpu", "reference")}
        for name, t in list(tot.items()) + [("riemannion_step", step)]:
            out.append({"dtype": key[0], "rank": key[1], "op": name, "cpu_ms": t["cpu"],
                        "reference_ms": t["reference"],
                        "speedup": t["reference"] / t["cpu"]})
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="rank 16, float32, few repeats")
    p.add_argument("--ranks", type=int, nargs="+", default=[16])
    p.add_argument("--dtypes", nargs="+", default=["float32", "float64"])
    p.add_argument("--reps", type=int, default=25)
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="cpu: the calling thread's CPU time, which a busy machine does not "
                        "inflate; implies --threads 1")
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.clock == "cpu":
        args.threads = 1
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    if not compiled.available("cpu", "cpu"):
        print("bench_cpu_compiled: skipped, rlora_kernels._C is not built (.ci/build_ext.sh)")
        return 0
    dtypes = ["float32"] if args.quick else args.dtypes
    ranks = [16] if args.quick else args.ranks
    reps, warmup = (7, 2) if args.quick else (args.reps, 3)
    rows = run(ranks, [getattr(torch, d) for d in dtypes], reps, warmup, clock)
    summary = summarise(rows)

    print(f"{'dtype':8} {'r':>3} {'bucket':16} {'op':11} {'compiled ms':>11} {'ref ms':>8} "
          f"{'speed-up':>8}")
    for row in rows:
        print(f"{row['dtype']:8} {row['rank']:3d} {str(tuple(row['bucket'])):16} {row['op']:11} "
              f"{row['cpu']['median_ms']:11.3f} {row['reference']['median_ms']:8.3f} "
              f"{row['speedup']:7.2f}x")
    print("\nper model (sum over buckets); riemannion_step = qr + 2 project + ortho + retract")
    for row in summary:
        print(f"{row['dtype']:8} {row['rank']:3d} {row['op']:16} {row['cpu_ms']:9.3f} "
              f"{row['reference_ms']:9.3f} {row['speedup']:7.2f}x")
    if args.out:
        args.out.write_text(json.dumps({"machine": machine(), "reps": reps, "clock": args.clock,
                                        "rows": rows, "summary": summary}, indent=1))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
