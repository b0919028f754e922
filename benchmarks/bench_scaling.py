"""How the Riemannion step scales: time against total adapter size L x (m + n) r (square
layers, several layer counts, rank 16) and against rank r in {4, 8, 16, 32, 64} (SmolLM2
shapes), with the cost model t = c_bucket B + c_layer L + c_work sum (m + n) r^2 (B buckets,
L layers) fitted to all points and overlaid on a log-log plot. The naive per-layer loop is
measured alongside.

    python -m benchmarks.bench_scaling [--quick] [--out DIR]
"""

from __future__ import annotations

import sys
from pathlib import Path

if not __package__:  # run as a file: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

import rlora_kernels as rk
from benchmarks import common, shapes
from benchmarks.naive import NaiveRiemannion

BENCH = "scaling"
CONTENDERS = ("riemannion", "naive-loop")


def sweep_points(quick: bool):
    """(sweep, label, layer shapes, rank) per measured point."""
    sizes, counts = ((64, 128, 256), (1, 4)) if quick else ((128, 256, 512, 1024, 2048),
                                                            (1, 8, 32))
    ranks, blocks = ((4, 8, 16), 1) if quick else ((4, 8, 16, 32, 64), 4)
    points = [("size", f"{count}x({s},{s})", [(s, s)] * count, 16)
              for count in counts for s in sizes]
    points += [("rank", f"smollm2[{blocks}]", shapes.layer_shapes("smollm2-135m", blocks), r)
               for r in ranks]
    return points


def measure(layer_shapes, rank, repeats):
    model = shapes.custom_model(layer_shapes)
    layers = rk.inject(model, ["proj"], rank=rank)
    shapes.fake_grads([p for l in layers for p in (l.lora_Z1, l.lora_B)])
    riem = rk.Riemannion(model, lr=1e-2)
    naive = NaiveRiemannion(layers, lr=1e-2)
    return common.interleave({"riemannion": riem.step, "naive-loop": naive.step}, repeats,
                             warmup=2)


def fit(rows):
    """Least squares, on relative errors, for t = c_bucket B + c_layer L + c_work W with B
    buckets (distinct shapes), L layers and W = sum (m + n) r^2."""
    design = np.array([[r["buckets"], r["layers"], r["work"]] for r in rows], dtype=float)
    t = np.array([r["ms"] for r in rows])
    coef, *_ = np.linalg.lstsq(design / t[:, None], np.ones_like(t), rcond=None)
    pred = design @ coef
    return {"ms_per_bucket": float(coef[0]), "ms_per_layer": float(coef[1]),
            "ms_per_work": float(coef[2]),
            "median_abs_rel_error": float(np.median(np.abs(pred - t) / t))}


def predict(model, row):
    return (model["ms_per_bucket"] * row["buckets"] + model["ms_per_layer"] * row["layers"]
            + model["ms_per_work"] * row["work"])


def run(args) -> common.Report:
    report = common.Report(BENCH, args)
    peaks = common.roofline(args.quick)
    repeats = args.repeats or (3 if args.quick else 7)
    rows = []
    for sweep, label, layer_shapes, rank in sweep_points(args.quick):
        times = measure(layer_shapes, rank, repeats)
        work = sum((m + n) * rank**2 for m, n in layer_shapes)
        size = shapes.adapter_size(layer_shapes, rank)
        flops, nbytes = shapes.riemannion_step_cost(layer_shapes, rank)
        for name, samples in times.items():
            stats = common.summarize(samples)
            frac = common.roofline_fraction(flops, nbytes, stats["median"] / 1e3, peaks)
            report.add(f"{sweep}/{label}/r{rank}/{name}", stats, roofline=frac,
                       params={"layers": len(layer_shapes), "rank": rank,
                               "adapter_params": size, "work": work})
            rows.append({"sweep": sweep, "label": label, "contender": name, "rank": rank,
                         "layers": len(layer_shapes), "size": size, "work": work,
                         "flops": flops, "buckets": len(set(layer_shapes)),
                         "ms": stats["median"], "p20": stats["p20"], "p80": stats["p80"]})
    models = {name: fit([r for r in rows if r["contender"] == name]) for name in CONTENDERS}
    flops_per_work = float(np.mean([r["flops"] / r["work"] for r in rows]))  # about 66
    for name, model in models.items():
        report.add(f"fit/{name}/per bucket", {"median": 1e3 * model["ms_per_bucket"]},
                   unit="us")
        report.add(f"fit/{name}/per layer", {"median": 1e3 * model["ms_per_layer"]}, unit="us")
        report.add(f"fit/{name}/throughput", {"median": flops_per_work / model["ms_per_work"]
                                              / 1e6}, unit="GF/s",
                   note="FLOP rate the fitted O((m+n) r^2) term implies")
        report.add(f"fit/{name}/median relative error",
                   {"median": model["median_abs_rel_error"]}, unit="frac")
    report.data.update(rows=rows, fits=models, roofline=peaks)
    report.notes.append("Model t = c_bucket * buckets + c_layer * layers + c_work * "
                        "sum((m + n) r^2), fitted by least squares on relative error over "
                        "both sweeps together.")
    plot(report, rows, models)
    return report


def plot(report, rows, models):
    plt = common.pyplot()
    fig, (ax_size, ax_rank) = plt.subplots(1, 2, figsize=(11, 4.5))
    colours = {"riemannion": "tab:red", "naive-loop": "tab:blue"}
    styles = [("o", "-"), ("s", "--"), ("^", ":"), ("D", "-.")]
    for name in CONTENDERS:
        mine = [r for r in rows if r["contender"] == name]
        counts = sorted({r["layers"] for r in mine if r["sweep"] == "size"})
        for (marker, line), layers in zip(styles, counts):
            pts = sorted((r for r in mine if r["sweep"] == "size" and r["layers"] == layers),
                         key=lambda r: r["size"])
            x = [r["size"] for r in pts]
            ax_size.errorbar(x, [r["ms"] for r in pts],
                             yerr=[[r["ms"] - r["p20"] for r in pts],
                                   [r["p80"] - r["ms"] for r in pts]],
                             fmt=marker, ms=4, color=colours[name], alpha=0.8,
                             label=f"{name}, {layers} layer(s)")
            ax_size.plot(x, [predict(models[name], r) for r in pts], line,
                         color=colours[name], lw=1)
        pts = sorted((r for r in mine if r["sweep"] == "rank"), key=lambda r: r["rank"])
        x = [r["rank"] for r in pts]
        ax_rank.errorbar(x, [r["ms"] for r in pts],
                         yerr=[[r["ms"] - r["p20"] for r in pts],
                               [r["p80"] - r["ms"] for r in pts]],
                         fmt="o", ms=4, color=colours[name], label=f"{name} measured")
        ax_rank.plot(x, [predict(models[name], r) for r in pts], "-",
                     color=colours[name], lw=1, label=f"{name} fit")
    ax_size.set(xscale="log", yscale="log", xlabel="total adapter size  layers x (m+n) r",
                ylabel="ms per step (median, p20-p80)")
    label = next((r["label"] for r in rows if r["sweep"] == "rank"), "")
    ranks = sorted({r["rank"] for r in rows if r["sweep"] == "rank"})
    top = max((r for r in rows if r["sweep"] == "rank" and r["contender"] == "riemannion"),
              key=lambda r: r["rank"], default=None)
    if top is not None:  # slope-2 guide through the largest rank: pure O((m + n) r^2)
        ax_rank.plot(ranks, [top["ms"] * (r / top["rank"]) ** 2 for r in ranks], ":",
                     color="grey", label="~ r^2")
    ax_rank.set(xscale="log", yscale="log", xlabel="rank r",
                ylabel="ms per step (median, p20-p80)", title=f"{label} shapes, rank sweep")
    ax_rank.set_xticks(ranks, [str(r) for r in ranks])
    ax_size.set_title("square layers, rank 16 (lines: fitted model)")
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    for ax in (ax_size, ax_rank):
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    for axis in (ax_size.yaxis, ax_rank.xaxis, ax_rank.yaxis):  # plain numbers, no offset
        axis.set_major_formatter(ScalarFormatter(useOffset=False))
        axis.set_minor_formatter(NullFormatter())
    fig.suptitle("Optimizer step scaling; fit t = c_bucket B + c_layer L + c_work sum (m+n) r^2"
                 "\n"
                 + common.machine_label(report.machine), fontsize=9)
    fig.tight_layout()
    fig.savefig(report.plot_path("loglog"), dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    args = common.parse_args(__doc__.split("\n\n")[0], argv)
    run(args).save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
