"""`rlora finetune`: Riemannion with LOI against LoRA + AdamW on one text-classification task.

Every seed fixes the head initialisation and the batch order, and every method trains on exactly
those batches. Writes results.json (every figure), curves.png and the best Riemannion adapter.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import gc
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import __version__, create_rlora_optimizer, inject, loi_init
from ..adapters.inject import match_modules
from ..adapters.layer import base_weight
from .data import TextDataset, load_debian_sections, load_jsonl
from .models import default_model_dir, init_head, load_classifier, load_tokenizer

METHODS = ("riemannion", "lora")


class UsageError(ValueError):
    """A problem with the command line or its inputs; reported without a traceback."""


# -- data -----------------------------------------------------------------------------------

def load_data(args) -> TextDataset:
    if args.data is not None:
        return load_jsonl(args.data)
    if args.debian_packages:
        # Files on the command line: stay offline, long descriptions only from files given.
        return load_debian_sections(packages_files=args.debian_packages,
                                    translation_files=args.debian_translations or [],
                                    fetch_long=bool(args.debian_translations))
    return load_debian_sections(fetch_long=not args.synopses_only,
                                translation_files=args.debian_translations)


def encode(tokenizer, texts, max_length):
    return tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]


def collate(ids, rows, pad_id, device):
    """Right-padded input ids and attention mask for `rows` of the pre-tokenised `ids`."""
    width = max(len(ids[i]) for i in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for j, i in enumerate(rows):
        input_ids[j, :len(ids[i])] = torch.tensor(ids[i])
        mask[j, :len(ids[i])] = 1
    return input_ids.to(device), mask.to(device)


def batch_order(n, steps, batch_size, seed):
    """Row indices of every training batch: reshuffled each epoch by a generator that depends
    on the seed only, so all methods of one seed see identical batches."""
    gen = torch.Generator().manual_seed(seed)
    rows: list[int] = []
    while len(rows) < steps * batch_size:
        rows += torch.randperm(n, generator=gen).tolist()
    return [rows[i * batch_size:(i + 1) * batch_size] for i in range(steps)]


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


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- one run ----------------------------------------------------------------------------------

@dataclass
class Task:
    """Everything shared by the runs: data, tokenised texts, the pristine model."""
    data: TextDataset
    train_ids: list
    test_ids: list
    curve_rows: list[int]  # test rows evaluated at intermediate steps
    pristine: torch.nn.Module
    pad_id: int
    device: torch.device
    targets: list[str]
    model_dir: Path


@dataclass
class RunResult:
    method: str
    seed: int
    accuracy: float = float("nan")
    losses: list[float] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    eval_accuracy: list[float] = field(default_factory=list)
    ms_per_step: float = float("nan")
    eval_seconds: float = 0.0
    peak_memory_mb: float = float("nan")
    skipped_steps: int = 0
    trainable_params: int = 0
    threads: list[int] = field(default_factory=list)  # torch CPU threads at each step
    loi: dict | None = None

    @property
    def final_loss(self) -> float:
        tail = [x for x in self.losses[-10:] if math.isfinite(x)]
        return sum(tail) / len(tail) if tail else float("nan")


@torch.inference_mode()
def predict(model, ids, rows, batch_size, pad_id, device, after_batch=None):
    model.eval()
    rows = sorted(rows, key=lambda i: len(ids[i]))  # less padding per batch
    preds = {}
    for k in range(0, len(rows), batch_size):
        chunk = rows[k:k + batch_size]
        logits = model(*collate(ids, chunk, pad_id, device))
        preds.update(zip(chunk, logits.argmax(-1).tolist()))
        if after_batch is not None:
            after_batch()
    return preds


def accuracy(preds, labels, rows):
    return sum(preds[i] == labels[i] for i in rows) / len(rows)


def _build(method, task, args, seed, first_batch, loss_fn):
    """A fresh model for one run and its optimizer; returns (model, optimizer, loi info)."""
    model = copy.deepcopy(task.pristine)
    init_head(model, seed)  # identical head for every method of one seed
    model.to(task.device)
    loi = None
    if method == "riemannion":
        inject(model, task.targets, args.rank, seed=seed)
        model.head.requires_grad_(True)
        if not args.no_loi:
            loi = loi_init(model, first_batch, loss_fn, seed=seed)
            loi = {"seconds": loi["seconds"], "backward_passes": loi["backward_passes"],
                   "captured_energy_mean": sum(loi["captured_energy"]) / loi["layers"]}
        opt = create_rlora_optimizer(model, lr=args.lr, other_lr=args.head_lr, momentum=0.9,
                                     weight_decay=args.weight_decay)
        return model, opt, loi
    import peft

    config = peft.LoraConfig(r=args.rank, lora_alpha=args.lora_alpha or 2 * args.rank,
                             target_modules=task.targets, lora_dropout=0.0)
    with warnings.catch_warnings():  # peft calls a deprecated transformers property
        warnings.simplefilter("ignore", FutureWarning)
        model.encoder = peft.get_peft_model(model.encoder, config)
    model.head.requires_grad_(True)
    lora = [p for n, p in model.encoder.named_parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": lora, "lr": args.lora_lr},
                             {"params": list(model.head.parameters()), "lr": args.head_lr}],
                            weight_decay=args.weight_decay)
    return model, opt, loi


def _grads_finite(params):
    grads = [p.grad for p in params if p.grad is not None]
    return all(bool(torch.isfinite(g).all()) for g in grads)


def train_run(method, task, args, seed, batches, progress, governor=None):
    labels = task.data.train_labels
    test_labels = task.data.test_labels
    device = task.device

    def loss_fn(model, batch):
        input_ids, mask, y = batch
        return F.cross_entropy(model(input_ids, mask), y)

    def make_batch(rows):
        return (*collate(task.train_ids, rows, task.pad_id, device),
                torch.tensor([labels[i] for i in rows], device=device))

    result = RunResult(method, seed)
    torch.manual_seed(seed)  # dropout masks
    first = make_batch(batches[0])
    model, opt, result.loi = _build(method, task, args, seed, first, loss_fn)
    params = [p for p in model.parameters() if p.requires_grad]
    result.trainable_params = sum(p.numel() for p in params)
    every = args.eval_every or max(1, len(batches) // 4)
    tick = governor.update if governor is not None else (lambda: None)

    def evaluate(step):
        began = time.perf_counter()
        preds = predict(model, task.test_ids, task.curve_rows, args.eval_batch_size,
                        task.pad_id, device, tick)
        result.eval_steps.append(step)
        result.eval_accuracy.append(accuracy(preds, test_labels, task.curve_rows))
        result.eval_seconds += time.perf_counter() - began

    evaluate(0)
    train_seconds = 0.0
    bar = progress(total=len(batches), desc=f"{method:<10} seed {seed}", unit="step",
                   file=sys.stderr, dynamic_ncols=True, leave=True)
    with PeakMemory(device) as mem:
        for step, rows in enumerate(batches, 1):
            batch = first if step == 1 else make_batch(rows)
            _sync(device)
            start = time.perf_counter()
            model.train()
            loss = loss_fn(model, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if method == "riemannion":
                opt.step()  # skips by itself on a non-finite gradient
            elif math.isfinite(loss.item()) and _grads_finite(params):
                opt.step()
            else:
                result.skipped_steps += 1
            _sync(device)
            train_seconds += time.perf_counter() - start
            result.losses.append(loss.item())
            result.threads.append(torch.get_num_threads())
            tick()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
            if step % every == 0 and step < len(batches):
                bar.set_postfix_str("evaluating")
                with mem.paused():
                    evaluate(step)
    bar.close()
    if method == "riemannion":
        result.skipped_steps = opt.skipped_steps
    result.peak_memory_mb = mem.peak_mb
    result.ms_per_step = 1000.0 * train_seconds / len(batches)
    began = time.perf_counter()
    every_row = list(range(len(task.test_ids)))
    preds = predict(model, task.test_ids, every_row, args.eval_batch_size, task.pad_id, device,
                    tick)
    result.accuracy = accuracy(preds, test_labels, every_row)
    result.eval_steps.append(len(batches))
    result.eval_accuracy.append(accuracy(preds, test_labels, task.curve_rows))
    result.eval_seconds += time.perf_counter() - began
    return result, model


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


def _finite(obj):
    """JSON has no NaN: non-finite floats become null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
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


# -- the command ------------------------------------------------------------------------------

def check_rank(model, targets, rank, methods):
    """Fail before training when a layer cannot carry the requested rank."""
    try:
        chosen = match_modules(model, targets)
    except ValueError as exc:
        raise UsageError(f"--target-modules: {exc}") from None
    need = 2 if "riemannion" in methods else 1
    for name, module in chosen:
        m, n = base_weight(module).shape
        if need * rank > min(m, n):
            why = "Riemannion needs 2 * rank <=" if need == 2 else "LoRA needs rank <="
            raise UsageError(f"--rank {rank} is too large for layer {name!r} of shape ({m}, {n}):"
                             f" {why} min(m, n) = {min(m, n)}")
    return len(chosen)


def prepare_task(args, out=print) -> Task:
    """Load the data, the tokenizer and the pristine model; tokenise every text once."""
    methods = METHODS if args.method == "both" else (args.method,)
    device = resolve_device(args.device)
    try:
        data = load_data(args)
    except (ValueError, OSError) as exc:  # malformed or unreadable --data / Packages files
        raise UsageError(str(exc)) from None
    out(f"data: {data.source}")
    out(f"data digest: sha256 {data.digest}")
    out(f"  {len(data.train_texts)} train / {len(data.test_texts)} test texts, "
        f"{len(data.label_names)} labels: {', '.join(data.label_names)}")
    model_dir = Path(args.model) if args.model else default_model_dir()
    tokenizer = load_tokenizer(model_dir)
    pristine = load_classifier(model_dir, len(data.label_names), seed=0)
    targets = list(args.target_modules)
    n_layers = check_rank(pristine, targets, args.rank, methods)
    out(f"model: {model_dir} ({sum(p.numel() for p in pristine.parameters()) / 1e6:.1f}M "
        f"parameters), {n_layers} adapted Linear layers, rank {args.rank}, device {device}")
    test_ids = encode(tokenizer, data.test_texts, args.max_length)
    # Curve points use one fixed random subset of the test split, the same for every run.
    order = torch.randperm(len(test_ids), generator=torch.Generator().manual_seed(1234)).tolist()
    curve_rows = sorted(order[:args.curve_size]) if args.curve_size else order
    return Task(data, encode(tokenizer, data.train_texts, args.max_length), test_ids,
                sorted(curve_rows), pristine, tokenizer.pad_token_id or 0, device, targets,
                model_dir)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise UsageError(f"--device {name}: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available in this torch build/machine")
    return device


def run(args, out=print, progress=None) -> int:
    if progress is None:
        from tqdm.auto import tqdm as progress
    start = time.perf_counter()
    previous = torch.get_num_threads()
    governor = None
    if resolve_device(args.device).type == "cpu":
        governor = ThreadGovernor(args.threads)
        threads, why = governor.start()
        out(f"torch threads: {threads} ({why})")
    try:
        return _run(args, out, progress, start, governor)
    finally:
        torch.set_num_threads(previous)


def _run(args, out, progress, start, governor) -> int:
    methods = METHODS if args.method == "both" else (args.method,)
    task = prepare_task(args, out)
    data, model_dir = task.data, task.model_dir
    counts = torch.bincount(torch.tensor(data.test_labels), minlength=len(data.label_names))
    majority = float(counts.max()) / len(data.test_labels)
    out(f"majority-class test accuracy: {majority:.4f}; setup took "
        f"{time.perf_counter() - start:.1f} s")

    outdir = Path(args.out)
    outdir.mkdir(parents=True, exist_ok=True)
    results, best, adapter = [], None, None
    for seed in args.seeds:
        batches = batch_order(len(task.train_ids), args.steps, args.batch_size, seed)
        for method in methods:
            result, model = train_run(method, task, args, seed, batches, progress, governor)
            results.append(result)
            out(f"{method} seed {seed}: accuracy {result.accuracy:.4f}, final loss "
                f"{result.final_loss:.4f}, {result.ms_per_step:.0f} ms/step")
            if method == "riemannion" and (best is None or result.accuracy > best.accuracy):
                best = result
                adapter = export_adapter(model, outdir / "adapter", str(model_dir))
                adapter["seed"] = seed
            del model

    summary = summarise(results)
    out("")
    out(format_table(summary, len(data.test_texts)))
    if set(methods) == set(METHODS):
        diff = summary["riemannion"]["accuracy_mean"] - summary["lora"]["accuracy_mean"]
        paired = [a - b for a, b in zip(summary["riemannion"]["accuracy_per_seed"],
                                        summary["lora"]["accuracy_per_seed"])]
        p = (summary["riemannion"]["accuracy_mean"] + summary["lora"]["accuracy_mean"]) / 2
        out(f"riemannion - lora accuracy: {diff:+.4f} (per seed: "
            f"{', '.join(f'{d:+.4f}' for d in paired)}); binomial standard error of one "
            f"accuracy figure on {len(data.test_texts)} texts: "
            f"{math.sqrt(p * (1 - p) / len(data.test_texts)):.4f}")
    plot_curves(results, outdir / "curves.png", len(task.curve_rows))
    config = {k: v for k, v in vars(args).items() if k != "func"}
    config["model"] = str(model_dir)
    config["resolved_device"] = str(task.device)
    config["lora_alpha"] = args.lora_alpha or 2 * args.rank
    report = {
        "config": config,
        "data": {"digest": data.digest, "source": data.source,
                 "train_size": len(data.train_texts), "test_size": len(data.test_texts),
                 "labels": data.label_names, "curve_test_size": len(task.curve_rows),
                 "majority_accuracy": majority},
        "versions": versions(),
        "summary": summary,
        "runs": [{**vars(r), "final_loss": r.final_loss} for r in results],
        "adapter": adapter,
        "wall_seconds": time.perf_counter() - start,
    }
    with open(outdir / "results.json", "w") as fh:
        json.dump(_finite(report), fh, indent=1, allow_nan=False)
    if adapter is not None:
        out(adapter.get("note") or f"adapter of riemannion seed {adapter['seed']} "
                                   f"(PEFT format): {adapter['path']}")
    out(f"wrote {outdir / 'results.json'} and {outdir / 'curves.png'} "
        f"({report['wall_seconds']:.0f} s in all)")
    return 0
