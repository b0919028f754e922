"""Where a Riemannion step spends its time: torch.profiler over a few optimizer steps on an
architecture's adapter shapes (or over whole training steps of the main job's model), broken
down by rlora op and by the ATen kernels under them.

    python -m benchmarks.profile_step [--arch smollm2-135m] [--train minilm] [--steps 3]
        [--backend reference] [--threads 1] [--out DIR]
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

if not __package__:  # run as a file: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from torch.profiler import ProfilerActivity, profile

import rlora_kernels as rk
from benchmarks import common, shapes

RLORA_OPS = ("rlora::thin_qr", "rlora::project_lr", "rlora::ortho_lr", "rlora::retract_lr",
             "rlora::lowrank_linear")


def _profile(fn, steps):
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            fn()
    return prof


def breakdown(prof, steps: int, root: str) -> dict:
    """ms per step: the root event, each rlora op (inclusive), the rest of the root, and the
    top ATen kernels by self time."""
    events = prof.key_averages()
    total = {e.key: e.cpu_time_total / 1e3 / steps for e in events}
    self_ms = {e.key: e.self_cpu_time_total / 1e3 / steps for e in events}
    calls = {e.key: e.count / steps for e in events}
    root_ms = max((v for k, v in total.items() if k.startswith(root)), default=0.0)
    ops = {k: {"ms": total[k], "calls": calls[k]} for k in RLORA_OPS if k in total}
    inside = sum(v["ms"] for k, v in ops.items() if k != "rlora::lowrank_linear")
    kernels = sorted(((k, v) for k, v in self_ms.items() if k.startswith("aten::")),
                     key=lambda kv: -kv[1])[:12]
    return {"root": root, "root_ms": root_ms, "ops": ops,
            "outside_ops_ms": root_ms - inside if root.startswith("Optimizer") else None,
            "aten_self_ms": {k: {"ms": v, "calls": calls[k]} for k, v in kernels}}


def profile_optimizer(arch: str, steps: int, rank: int = 16) -> dict:
    model = shapes.shape_model(arch)
    layers = rk.inject(model, shapes.target_names(arch), rank=rank)
    shapes.fake_grads([p for l in layers for p in (l.lora_Z1, l.lora_B)])
    opt = rk.Riemannion(model, lr=1e-2)
    opt.step()
    opt.step()
    return breakdown(_profile(opt.step, steps), steps, "Optimizer.step")


def profile_train(workload: str, steps: int) -> dict:
    from benchmarks import bench_train_step as bts

    out = {}
    for method in bts.CONTENDERS:
        model, opt, loss_fn, batch = bts.prepare(workload, method)
        phases = defaultdict(list)
        step = lambda: bts.phased_step(model, opt, loss_fn, batch, phases,  # noqa: E731
                                       bts._device())
        step()
        step()
        phases.clear()
        result = breakdown(_profile(step, steps), steps, "ProfilerStep")
        result["phases_ms"] = {k: 1e3 * sum(v) / len(v) for k, v in phases.items()}
        out[method] = result
    return out


def main(argv=None) -> int:
    def extra(parser):
        parser.add_argument("--arch", default="smollm2-135m", choices=sorted(shapes.ARCHS))
        parser.add_argument("--train", default=None, help="also profile training steps of "
                            "this workload (minilm, smollm2, tiny-bert, tiny-llama)")
        parser.add_argument("--steps", type=int, default=3)
        parser.add_argument("--backend", default=None,
                            help="force an rlora backend (reference, cpu, ...); default auto")

    args = common.parse_args(__doc__.split("\n\n")[0], argv, extra)
    with rk.ops.use_backend(args.backend):
        result = {"machine": common.machine_info(), "backend": args.backend or "auto",
                  "optimizer": {args.arch: profile_optimizer(args.arch, args.steps)}}
        if args.train:
            result["train"] = {args.train: profile_train(args.train, args.steps)}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"profile_{args.arch}{'_' + args.train if args.train else ''}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    opt = result["optimizer"][args.arch]
    print(f"Riemannion step, {args.arch} shapes: {opt['root_ms']:.1f} ms per step")
    for k, v in opt["ops"].items():
        print(f"  {k:<24} {v['ms']:9.1f} ms  {v['calls']:5.1f} calls")
    print(f"  {'outside the rlora ops':<24} {opt['outside_ops_ms']:9.1f} ms")
    print("  ATen self time:")
    for k, v in opt["aten_self_ms"].items():
        print(f"    {k:<26} {v['ms']:9.1f} ms  {v['calls']:6.1f} calls")
    for workload, methods in result.get("train", {}).items():
        for method, r in methods.items():
            phases = ", ".join(f"{k} {v:.0f} ms" for k, v in r["phases_ms"].items())
            print(f"train step {workload} {method}: {phases}")
            for k, v in list(r["aten_self_ms"].items())[:6]:
                print(f"    {k:<26} {v['ms']:9.1f} ms  {v['calls']:6.1f} calls")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
