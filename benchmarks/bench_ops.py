"""Every rlora op under every available backend, side by side, on Llama-shaped buckets.

Per op and bucket: median ms with the 20/80 percentiles, effective GB/s (compulsory bytes:
inputs read once, outputs written once), that as a fraction of a device copy of the same
bytes measured in the same run, and the speed-up over the reference backend (ratio of
medians, p20/p80 of the per-round ratios). Backends are interleaved round by round.
GPU timing uses CUDA events; CPU timing perf_counter.

    python benchmarks/bench_ops.py [--quick] [--out FILE.json | DIR] [--repeats N]

--quick: tiny sizes and few repeats (CPU/CI smoke run; without a GPU it runs the Triton
kernels in the interpreter, whose timings mean nothing but exercise the code path).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make `rlora_kernels` and `benchmarks` found
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

if "--quick" in sys.argv and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported

import json  # noqa: E402
import time  # noqa: E402

from benchmarks import common  # noqa: E402
from rlora_kernels import ops  # noqa: E402
from rlora_kernels.ops import _dispatch  # noqa: E402

OPS = ("thin_qr", "project_lr", "retract_lr", "ortho_lr", "lowrank_fwd", "lowrank_bwd")
# (m, n) of Llama-3-8B and SmolLM2 projections: q/o, gate/up, down, and the small ones.
FULL = dict(shapes=((576, 576), (1536, 576), (4096, 4096), (14336, 4096), (4096, 14336)),
            ranks=(8, 16, 64), layers=32, tokens=4096, repeats=20, warmup=3)
QUICK = dict(shapes=((64, 48), (96, 64)), ranks=(2, 4), layers=2, tokens=16, repeats=3,
             warmup=1)


def parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, few repeats")
    parser.add_argument("--out", default=None, help="JSON file, or a folder for bench_ops.json")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"),
                        help="dtype of the lowrank_linear activations and weights")
    parser.add_argument("--ops", default=",".join(OPS), help="comma-separated subset of ops")
    args = parser.parse_args(argv)
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / "last"
    args.out = out if out.suffix == ".json" else out / "bench_ops.json"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    return args


# ---------------------------------------------------------------------------------- inputs
def _inputs(op, L, m, n, r, tokens, act_dtype, dev, gen):
    def rnd(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=gen, device=dev, dtype=torch.float32).to(dtype)

    def orth(*shape):
        return ops.reference.thin_qr(rnd(*shape))[0]

    if op == "thin_qr":
        return (rnd(L, m, 2 * r),)
    if op == "project_lr":
        return orth(L, m, r), orth(L, n, r), rnd(L, m, 2 * r), rnd(L, n, 2 * r)
    if op == "retract_lr":  # the optimizer's panels [-lr Ad, A_L], [B_R, B - lr Bd]
        a_l, b_r = orth(L, m, r), orth(L, n, r)
        scale = torch.linspace(1, 0.1, r, device=dev)
        return (torch.cat([-1e-3 * rnd(L, m, r), a_l], -1),
                torch.cat([b_r, b_r * scale + 1e-3 * rnd(L, n, r)], -1), r)
    if op == "ortho_lr":
        a_l, b_r = orth(L, m, r), orth(L, n, r)
        ad = rnd(L, m, r)
        return ad - a_l @ (a_l.mT @ ad), rnd(L, n, r), a_l, b_r, ops.DEFAULT_ORTHO_EPS
    x = rnd(tokens, n, dtype=act_dtype)
    w = (rnd(m, n) / n**0.5).to(act_dtype)
    u, v = rnd(m, 2 * r, dtype=act_dtype), rnd(n, 2 * r, dtype=act_dtype)
    if op == "lowrank_fwd":
        return x, w, None, u, v
    return rnd(tokens, m, dtype=act_dtype), x, w, u, v, True, False


def _nbytes(args, outs) -> int:
    """Compulsory traffic: every tensor argument read once, every output written once."""
    tensors = [t for t in (*args, *outs) if isinstance(t, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors)


# The backend functions behind torch.ops.rlora.*, so the custom-op wrapper (the same for
# every backend) is not timed; lowrank_linear's halves are timed apart.
FN = {"thin_qr": "thin_qr", "project_lr": "project_lr", "retract_lr": "retract_lr",
      "ortho_lr": "ortho_lr", "lowrank_fwd": "lowrank_linear_fwd",
      "lowrank_bwd": "lowrank_linear_bwd"}


def backend_fn(backend: str, op: str, dev: str):
    with ops.use_backend(backend):
        return _dispatch.resolve(FN[op], dev)


# ---------------------------------------------------------------------------------- timing
def _timer(dev):
    if dev == "cuda":
        def timed(fn):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
    else:
        def timed(fn):
            start = time.perf_counter()
            fn()
            return time.perf_counter() - start
    return timed


def interleaved(contenders: dict, repeats: int, warmup: int, dev: str) -> dict:
    """Seconds per call of each zero-argument callable, interleaved with rotating order."""
    timed = _timer(dev)
    names = list(contenders)
    for _ in range(warmup):
        for name in names:
            contenders[name]()
    if dev == "cuda":
        torch.cuda.synchronize()
    times = {name: [] for name in names}
    for i in range(repeats):
        for j in range(len(names)):
            name = names[(i + j) % len(names)]
            times[name].append(timed(contenders[name]))
    return times


def copy_seconds(nbytes: int, dev: str, repeats: int) -> list[float]:
    """A device copy moving nbytes (half read, half written), timed like the ops."""
    elems = max(1, nbytes // 8)
    src = torch.empty(elems, device=dev, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    return interleaved({"copy": lambda: dst.copy_(src)}, repeats, 2, dev)["copy"]


# ------------------------------------------------------------------------------------ main
def backends_for(dev: str) -> list[str]:
    return [b for b in ops.BACKENDS if ops.backend_available(b, dev)]


def main(argv=None) -> int:
    args = parse(argv)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = dict(QUICK if args.quick else FULL)
    if not args.quick and dev == "cpu":  # full Llama buckets would take hours on a CPU
        cfg.update(layers=4, tokens=512, repeats=5)
    repeats = args.repeats or cfg["repeats"]
    act_dtype = getattr(torch, args.dtype)
    backends = backends_for(dev)
    wanted = [o for o in args.ops.split(",") if o]
    gen = torch.Generator(device=dev).manual_seed(0)
    rows = []
    for m, n in cfg["shapes"]:
        for r in cfg["ranks"]:
            for op in wanted:
                inputs = _inputs(op, cfg["layers"], m, n, r, cfg["tokens"], act_dtype, dev, gen)
                calls, nbytes = {}, None
                for name in backends:
                    fn = backend_fn(name, op, dev)
                    calls[name] = (lambda fn=fn: fn(*inputs))
                    if nbytes is None:
                        nbytes = _nbytes(inputs, calls[name]())
                times = interleaved(calls, repeats, cfg["warmup"], dev)
                copy = common.summarize(copy_seconds(nbytes, dev, repeats))
                for name, samples in times.items():
                    stats = common.summarize(samples)
                    row = {"op": op, "backend": name, "shape": [m, n], "r": r,
                           "layers": cfg["layers"] if not op.startswith("lowrank") else 1,
                           "tokens": cfg["tokens"] if op.startswith("lowrank") else None,
                           "median_ms": stats["median"], "p20_ms": stats["p20"],
                           "p80_ms": stats["p80"], "n": stats["n"], "bytes": nbytes,
                           "gbps": nbytes / stats["median"] / 1e6,
                           "copy_ms": copy["median"],
                           "fraction_of_copy": copy["median"] / stats["median"]}
                    if "reference" in times and name != "reference":
                        row["speedup_vs_reference"] = common.ratio(times["reference"], samples)
                    rows.append(row)
                    _print_row(row)
    info = common.machine_info()
    info["device"] = torch.cuda.get_device_name(0) if dev == "cuda" else info["cpu"]
    doc = {"bench": "ops", "quick": bool(args.quick), "device_type": dev,
           "activation_dtype": args.dtype, "backends": backends,
           "triton_interpreter": os.environ.get("TRITON_INTERPRET") == "1",
           "machine": info, "config": {k: v for k, v in cfg.items()}, "rows": rows}
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


def _print_row(row):
    speed = row.get("speedup_vs_reference")
    sp = f"{speed['median']:6.2f}x" if speed else "      -"
    m, n = row["shape"]
    print(f"{row['op']:<12} {m:>6}x{n:<6} r={row['r']:<3} {row['backend']:<10}"
          f" {row['median_ms']:9.3f} ms [{row['p20_ms']:.3f}, {row['p80_ms']:.3f}]"
          f" {row['gbps']:9.3g} GB/s {row['fraction_of_copy']:8.2%} of copy {sp}", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
