"""Reporting of `rlora finetune`: summary statistics, the table, versions, the curves plot
and the adapter export."""

from __future__ import annotations

import math
import os
import platform
import shutil
import subprocess
from pathlib import Path

import torch

from .. import __version__

METHODS = ("riemannion", "lora")


# -- reporting --------------------------------------------------------------------------------

def _mean_std(values):
    values = [v for v in values if math.isfinite(v)]
    if not values:
        return float("nan"), float("nan")
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def summarise(results):
    summary = {}
    for method in METHODS:
        runs = [r for r in results if r.method == method]
        if not runs:
            continue
        acc = _mean_std([r.accuracy for r in runs])
        summary[method] = {
            "seeds": [r.seed for r in runs],
            "accuracy_per_seed": [r.accuracy for r in runs],
            "accuracy_mean": acc[0], "accuracy_std": acc[1],
            "final_loss_mean": _mean_std([r.final_loss for r in runs])[0],
            "ms_per_step_mean": _mean_std([r.ms_per_step for r in runs])[0],
            "cpu_threads_mean": _mean_std([sum(r.threads) / len(r.threads) for r in runs
                                           if r.threads])[0],
            "peak_memory_mb_max": max(r.peak_memory_mb for r in runs),
            "skipped_steps_total": sum(r.skipped_steps for r in runs),
        }
    return summary


def format_table(summary, n_test):
    header = ("method", "accuracy (mean +- std)", "final loss", "ms/step", "threads", "peak MB",
              "skipped")
    rows = [header]
    for method, s in summary.items():
        rows.append((method, f"{s['accuracy_mean']:.4f} +- {s['accuracy_std']:.4f} "
                             f"(n={len(s['seeds'])})",
                     f"{s['final_loss_mean']:.4f}", f"{s['ms_per_step_mean']:.0f}",
                     f"{s['cpu_threads_mean']:.1f}", f"{s['peak_memory_mb_max']:.0f}",
                     str(s["skipped_steps_total"])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in
                       enumerate(zip(row, widths))) for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    lines.append(f"accuracy on all {n_test} test texts; final loss: mean train loss of the last "
                 "10 steps; threads: mean torch CPU threads per step (ms/step compares fairly "
                 "only at equal threads); peak MB: memory above the loaded model while training")
    return "\n".join(lines)


def finite(obj):
    """JSON has no NaN: non-finite floats become null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def versions():
    import transformers

    out = {"rlora_kernels": __version__, "python": platform.python_version(),
           "torch": torch.__version__, "transformers": transformers.__version__,
           "platform": platform.platform(), "cpu_count": os.cpu_count()}
    try:
        import peft
        out["peft"] = peft.__version__
    except ImportError:
        out["peft"] = None
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent, timeout=10, check=False)
        out["git_revision"] = rev.stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        out["git_revision"] = None
    return out


def plot_curves(results, path, curve_size):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"riemannion": "tab:red", "lora": "tab:blue"}
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = {}
    for r in results:
        style = styles.setdefault(r.seed, ("-", "--", ":", "-.")[len(styles) % 4])
        label = f"{r.method} seed {r.seed}"
        losses = torch.tensor(r.losses, dtype=torch.float64)
        width = min(10, len(losses))  # moving average: batch-32 losses are noisy
        smooth = losses.unfold(0, width, 1).mean(-1) if width else losses
        steps = range(width, width + len(smooth))
        ax_loss.plot(list(steps), smooth.tolist(), color=colours[r.method], ls=style,
                     alpha=0.8, lw=1.2, label=label)
        ax_acc.plot(r.eval_steps, r.eval_accuracy, marker="o", ms=3, color=colours[r.method],
                    ls=style, alpha=0.8, lw=1.2, label=label)
    ax_loss.set(xlabel="step", ylabel="train loss (moving average of 10)",
                title="training loss")
    ax_acc.set(xlabel="step", ylabel="accuracy", title=f"test accuracy ({curve_size} test texts)")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def export_adapter(model, path: Path, base: str) -> dict:
    """The PEFT adapter (with the head as a module to save), or the raw state as a fallback."""
    if path.exists():
        shutil.rmtree(path)
    try:
        from ..adapters import export_peft
    except ImportError:
        from safetensors.torch import save_file

        path.mkdir(parents=True)
        state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()
                 if "lora_" in k or k.startswith("head.")}
        save_file(state, str(path / "rlora_state.safetensors"))
        note = ("PEFT export is unavailable in this build (rlora_kernels.adapters.export_peft "
                "is missing); wrote the raw RiemannLoRA state and head instead")
        return {"format": "rlora_state", "path": str(path), "note": note}
    export_peft(model, path, base_model_name_or_path=base, modules_to_save=["head"])
    return {"format": "peft", "path": str(path)}


