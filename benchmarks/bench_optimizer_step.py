"""Optimizer step over every adapter of a real architecture (MiniLM-L6, SmolLM2-135M,
Llama-3-8B shapes; no weights needed): Riemannion against the same Riemannian step written
as a per-layer torch.linalg loop, and against AdamW on plain LoRA factors (foreach, fused,
for-loop) and through PEFT. Gradients are fixed Gaussian noise; only the step is timed.

    python -m benchmarks.bench_optimizer_step [--quick] [--out DIR]
"""

from __future__ import annotations

import sys
from pathlib import Path

if not __package__:  # run as a file: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

import rlora_kernels as rk
from benchmarks import common, shapes
from benchmarks.naive import NaiveRiemannion

BENCH = "optimizer_step"
RANK = 16
LR = 1e-2  # the value only shapes the point the steps wander to, never the cost


def state_bytes(state) -> int:
    """Bytes of every tensor held in an optimizer state (dict of dicts or list of dicts)."""
    rows = state.values() if isinstance(state, dict) else state
    return sum(v.numel() * v.element_size() for st in rows for v in st.values()
               if isinstance(v, torch.Tensor))


def _peft_model(arch, blocks, rank):
    import peft

    model = peft.get_peft_model(shapes.shape_model(arch, blocks), peft.LoraConfig(
        r=rank, lora_alpha=2 * rank, target_modules=shapes.target_names(arch)))
    params = [p for p in model.parameters() if p.requires_grad]
    shapes.fake_grads(params, seed=2)
    return params


def contenders(arch: str, rank: int = RANK, blocks: int | None = None, peft_too: bool = True):
    """name -> (step callable, optimizer-state getter) for one architecture.

    Riemannion and the naive loop step the same adapter layers (each keeps its own state;
    the point stays a valid rank-r point whichever moves it), and the three AdamW variants
    share one set of LoRA factors, so a Llama-3-8B-sized run fits in memory.
    """
    model = shapes.shape_model(arch, blocks)
    layers = rk.inject(model, shapes.target_names(arch), rank=rank)
    shapes.fake_grads([p for l in layers for p in (l.lora_Z1, l.lora_B)], seed=1)
    riem = rk.Riemannion(model, lr=LR, momentum=0.9)
    naive = NaiveRiemannion(layers, lr=LR, momentum=0.9)
    out = {"riemannion": (riem.step, lambda: riem.state),
           "naive-loop": (naive.step, lambda: naive.state)}
    if rk.ops.backend_available("cpu", "cpu"):
        ref = rk.Riemannion(model, lr=LR, momentum=0.9)

        def step_reference():
            with rk.ops.use_backend("reference"):
                ref.step()

        out["riemannion[reference]"] = (step_reference, lambda: ref.state)
    factors = shapes.lora_factors(shapes.layer_shapes(arch, blocks), rank)
    for name, kw in (("adamw-foreach", dict(foreach=True)), ("adamw-fused", dict(fused=True)),
                     ("adamw-forloop", dict(foreach=False))):
        try:
            opt = torch.optim.AdamW(factors, lr=1e-3, **kw)
            opt.step()
        except (RuntimeError, ValueError) as exc:  # fused not supported on this build
            print(f"{BENCH}: {name} unavailable: {exc}", file=sys.stderr)
            continue
        out[name] = (opt.step, lambda opt=opt: opt.state)
    if peft_too:
        try:
            params = _peft_model(arch, blocks, rank)
        except ImportError:
            params = None
        if params is not None:
            opt = torch.optim.AdamW(params, lr=1e-3)  # torch's default choice of kernel
            out["peft+adamw"] = (opt.step, lambda opt=opt: opt.state)
    return out, shapes.layer_shapes(arch, blocks)


def plan(quick: bool):
    """(arch, blocks, repeats) per run; Llama-3-8B only in full mode (GBs of adapters)."""
    if quick:
        return [("minilm-l6", 1, 3), ("smollm2-135m", 1, 3)]
    return [("minilm-l6", None, 21), ("smollm2-135m", None, 15), ("llama3-8b", None, 5)]


def run(args) -> common.Report:
    report = common.Report(BENCH, args)
    peaks = common.roofline(args.quick)
    report.data["roofline"] = peaks
    report.data["backend_cpu_compiled"] = rk.ops.backend_available("cpu", "cpu")
    results = {}
    for arch, blocks, repeats in plan(args.quick):
        repeats = args.repeats or repeats
        steps, layer_shapes = contenders(arch, RANK, blocks)
        cpu = {}
        times = common.interleave({k: f for k, (f, _) in steps.items()}, repeats, warmup=2,
                                  cpu=cpu)
        label = arch if blocks is None else f"{arch}[{blocks} blocks]"
        costs = {"riemannion": shapes.riemannion_step_cost(layer_shapes, RANK),
                 "adamw": shapes.adamw_step_cost(layer_shapes, RANK)}
        costs["naive-loop"] = costs["riemannion[reference]"] = costs["riemannion"]
        params = {"arch": arch, "layers": len(layer_shapes), "rank": RANK,
                  "adapter_params": shapes.adapter_size(layer_shapes, RANK)}
        for name, samples in times.items():
            stats = common.summarize(samples)
            flops, nbytes = costs.get(name, costs["adamw"])
            frac = common.roofline_fraction(flops, nbytes, stats["median"] / 1e3, peaks)
            mib = state_bytes(steps[name][1]()) / 2**20
            report.add(f"{label}/{name}", stats, roofline=frac, state_mib=mib, params=params)
        for name in times:
            # Ratios read as "how many times slower": the loops over riemannion, riemannion
            # over the (much cheaper) AdamW variants.
            if name.startswith(("naive", "riemannion[")):
                report.add(f"{label}/{name} over riemannion",
                           common.ratio(times[name], times["riemannion"]), unit="x")
            elif name != "riemannion":
                report.add(f"{label}/riemannion over {name}",
                           common.ratio(times["riemannion"], times[name]), unit="x")
        results[label] = {k: common.summarize(v) for k, v in times.items()}
        report.add(f"{label}/naive-loop over riemannion (cpu time)",
                   common.ratio(cpu["naive-loop"], cpu["riemannion"]), unit="x")
        if arch == "smollm2-135m" and blocks is None:  # the goal is about the full model
            value = common.ratio(times["naive-loop"], times["riemannion"])["median"]
            report.goal(f"Riemannion step vs naive per-layer loop, {label}, rank {RANK} "
                        "(x faster, wall)", value, 10.0, higher_is_better=True)
        del steps
    report.data["medians_ms"] = results
    plot(report, results)
    report.notes.append(
        "Riemannion and naive-loop run the same maths (checked in test_benchmarks.py); "
        "AdamW variants step plain LoRA factors of the same rank; peft+adamw uses "
        "torch.optim.AdamW defaults (for-loop on CPU). Roofline: FLOP/byte models in "
        "benchmarks/shapes.py against the measured matmul peak and copy bandwidth.")
    return report


def plot(report: common.Report, results: dict) -> None:
    plt = common.pyplot()
    archs = list(results)
    names = list(dict.fromkeys(n for r in results.values() for n in r))
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        xs, med, lo, hi = [], [], [], []
        for j, arch in enumerate(archs):
            if name in results[arch]:
                s = results[arch][name]
                xs.append(j + i * width)
                med.append(s["median"])
                lo.append(s["median"] - s["p20"])
                hi.append(s["p80"] - s["median"])
        ax.bar(xs, med, width, yerr=[lo, hi], label=name, capsize=2)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(archs))], archs)
    ax.set_yscale("log")
    ax.set_ylabel(f"ms per optimizer step (median, p20-p80), rank {RANK}")
    ax.set_title("Optimizer step over all adapters\n" + common.machine_label(report.machine),
                 fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(report.plot_path("bars"), dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    args = common.parse_args(__doc__.split("\n\n")[0], argv)
    run(args).save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
