"""`rlora finetune`: Riemannion with LOI against LoRA + AdamW on one text-classification task.

Every seed fixes the head initialisation and the batch order, and every method trains on exactly
those batches. Writes results.json (every figure), curves.png and the best Riemannion adapter.
"""

from __future__ import annotations

import copy
import json
import math
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import create_rlora_optimizer, inject, loi_init
from ..adapters.inject import match_modules
from ..adapters.layer import base_weight
from .data import TextDataset, load_debian_sections, load_jsonl
from .measure import PeakMemory, ThreadGovernor, sync
from .models import default_model_dir, init_head, load_classifier, load_tokenizer
from .report import (METHODS, export_adapter, finite, format_table, plot_curves, summarise,
                     versions)



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
            sync(device)
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
            sync(device)
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
        json.dump(finite(report), fh, indent=1, allow_nan=False)
    if adapter is not None:
        out(adapter.get("note") or f"adapter of riemannion seed {adapter['seed']} "
                                   f"(PEFT format): {adapter['path']}")
    out(f"wrote {outdir / 'results.json'} and {outdir / 'curves.png'} "
        f"({report['wall_seconds']:.0f} s in all)")
    return 0
