"""Run every benchmark script, print one table, write DIR/results.json.

    python -m benchmarks [--quick] [--only NAME,...] [--out DIR] [--threads N] [--list]

Each script runs in its own process (`benchmarks/bench_<name>.py [--quick] --out ...`), so a
crash or a leak in one cannot skew the next. Our scripts write DIR/<name>.json in the
`common.Report` format; scripts that only take `--out FILE` (listed in FILE_OUT) write the
JSON file they are given and their figures are read from any dict holding `median_ms`.
results.json holds the machine (CPU, cores, GPU), versions, git revision and dirty flag,
date, the measured roofline, and every figure with median, p20, p80 and n.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import common

HERE = Path(__file__).resolve().parent
# Ours first, cheapest first; then any other bench_*.py found in this folder.
ORDER = ("optimizer_step", "train_step", "scaling", "convergence", "ops", "cpu_compiled")
FILE_OUT = {"cpu_compiled", "ops"}  # their --out names a JSON file, not a folder
TIMEOUT_S = {"quick": 600, "full": 4 * 3600}


def discover() -> list[str]:
    found = sorted(p.stem[len("bench_"):] for p in HERE.glob("bench_*.py"))
    return [n for n in ORDER if n in found] + [n for n in found if n not in ORDER]


def _label(item: dict) -> str:
    """The identifying fields of a row (strings, integers, short integer lists) as a name."""
    parts = []
    for value in item.values():
        if isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool)):
            parts.append(str(value))
        elif isinstance(value, list) and 0 < len(value) <= 4 and all(
                isinstance(x, int) for x in value):
            parts.append("x".join(map(str, value)))
    return ",".join(parts[:5]) or "?"


def foreign_figures(bench: str, doc) -> list[dict]:
    """Figures from a JSON in another layout: every dict with a median (ms) becomes one."""
    if isinstance(doc, dict) and isinstance(doc.get("figures"), list):
        return [dict(f, bench=bench) for f in doc["figures"] if "median" in f]
    figures = []

    def walk(obj, path):
        if isinstance(obj, dict):
            med = obj.get("median_ms", obj.get("median"))
            if isinstance(med, (int, float)):
                fig = {"bench": bench, "name": "/".join(path), "unit": "ms", "median": med}
                for ours, theirs in (("p20", "p20"), ("p80", "p80"), ("q25", "q25"),
                                     ("q75", "q75"), ("n", "n")):
                    for key in (f"{theirs}_ms", theirs):
                        if key in obj:
                            fig[ours] = obj[key]
                figures.append(fig)
                return
            for key, value in obj.items():
                if key not in ("machine",):
                    walk(value, path + [str(key)])
        elif isinstance(obj, list):
            for item in obj:
                walk(item, path + [_label(item) if isinstance(item, dict) else "?"])

    walk(doc, [])
    for fig in figures:  # "rows/thin_qr,..." -> "thin_qr,...": the list name says nothing
        fig["name"] = fig["name"].split("/", 1)[-1] if "/" in fig["name"] else fig["name"]
    return figures


def run_script(name: str, out: Path, args, env) -> dict:
    """Run one script; returns its entry of results.json."""
    script = HERE / f"bench_{name}.py"
    target = out / f"{name}.json"
    cmd = [sys.executable, str(script), "--out", str(target if name in FILE_OUT else out)]
    if args.quick:
        cmd.append("--quick")
    if args.threads and name not in FILE_OUT:
        cmd += ["--threads", str(args.threads)]
    log = out / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    timeout = args.timeout or TIMEOUT_S["quick" if args.quick else "full"]
    try:
        proc = subprocess.run(cmd, cwd=common.REPO, env=env, capture_output=True, text=True,
                              timeout=timeout)
        rc, text = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        rc, text = "timeout", f"timed out after {timeout} s\n{exc.stdout or ''}{exc.stderr or ''}"
    log.write_text(text if isinstance(text, str) else text.decode(errors="replace"))
    entry = {"command": " ".join(cmd[1:]), "returncode": rc,
             "seconds": round(time.perf_counter() - start, 1), "log": str(log.relative_to(out))}
    if rc != 0:
        entry["error_tail"] = (text or "")[-1500:]
        return entry
    if not target.is_file():
        entry["note"] = "the script wrote no JSON"
        return entry
    doc = json.loads(target.read_text())
    entry["figures"] = foreign_figures(name, doc)
    for key in ("machine", "goals", "notes", "plots", "quick"):
        if isinstance(doc, dict) and key in doc:
            entry[key] = doc[key]
    return entry


def print_table(results: dict) -> None:
    print(f"\n{'bench':<15} {'figure':<64} {'median':>10} {'p20':>9} {'p80':>9} {'n':>3}  unit")
    for name, entry in results["benches"].items():
        if entry.get("returncode") != 0:
            print(f"{name:<15} FAILED ({entry.get('returncode')}); see {entry['log']}")
            continue
        for fig in entry.get("figures", []):
            cells = [f"{fig[k]:>9.4g}" if isinstance(fig.get(k), (int, float)) else f"{'':>9}"
                     for k in ("p20", "p80")]
            print(f"{name:<15} {fig['name'][:64]:<64} {fig['median']:>10.4g} {cells[0]} "
                  f"{cells[1]} {fig.get('n', ''):>3}  {fig.get('unit', '')}")
    goals = [g for e in results["benches"].values() for g in e.get("goals", [])]
    if goals:
        print("\ngoals (reported, never asserted):")
        for g in goals:
            print(f"  {'met   ' if g['met'] else 'MISSED'} {g['goal']}: {g['value']:.3g} "
                  f"(target {'>=' if g['higher_is_better'] else '<='} {g['target']})")
    print(f"\nmachine: {common.machine_label(results['machine'])}")


def default_out(quick: bool) -> Path:
    import torch

    kind = "gpu" if torch.cuda.is_available() else "cpu"
    date = datetime.date.today().isoformat()
    return HERE / "results" / f"{kind}-{date}{'-quick' if quick else ''}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes, few repeats: the whole suite in minutes (CI)")
    parser.add_argument("--only", default=None, help="comma-separated names (see --list)")
    parser.add_argument("--out", default=None,
                        help="output folder (default benchmarks/results/<cpu|gpu>-<date>)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads in every script (default: 1 with --quick, else "
                             "torch's choice)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per script")
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    args = parser.parse_args(argv)
    if args.quick and args.threads is None:
        # NOTE (2-core VM at load ~2.5, torch 2.13): the quick suite took 378 s with torch's
        # 2 threads against ~130 s with 1, and the tiny-BERT step ratio read 4.95 instead of
        # ~2: contended OpenMP barriers around many small LAPACK calls, not the maths.
        args.threads = 1
    names = discover()
    if args.list:
        print("\n".join(names))
        return 0
    if args.only:
        wanted = [n.strip().removeprefix("bench_") for n in args.only.split(",") if n.strip()]
        unknown = sorted(set(wanted) - set(names))
        if unknown:
            parser.error(f"unknown benchmark(s) {', '.join(unknown)}; have {', '.join(names)}")
        names = [n for n in names if n in wanted]
    out = Path(args.out) if args.out else default_out(args.quick)
    out.mkdir(parents=True, exist_ok=True)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    peaks = common.roofline(args.quick)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(common.REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p]),
        HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env[common.ROOFLINE_ENV] = json.dumps(peaks)
    if args.threads:
        env[common.THREADS_ENV] = str(args.threads)
    results = {"machine": common.machine_info(), "quick": args.quick, "roofline": peaks,
               "threads": args.threads, "benches": {}}
    previous = out / "results.json"
    if args.only and previous.is_file():
        # Re-running some benchmarks into a folder keeps the others' entries (each entry
        # carries its own machine record and date).
        old = json.loads(previous.read_text())
        if old.get("quick") == args.quick:
            results["benches"] = {k: v for k, v in old.get("benches", {}).items()
                                  if k not in names}
            results["rerun"] = names
    start = time.perf_counter()
    for i, name in enumerate(names, 1):
        print(f"[{i}/{len(names)}] {name} ...", end=" ", flush=True)
        entry = run_script(name, out, args, env)
        results["benches"][name] = entry
        status = "ok" if entry["returncode"] == 0 else f"FAILED ({entry['returncode']})"
        print(f"{status} in {entry['seconds']:.0f} s")
    results["seconds"] = round(time.perf_counter() - start, 1)
    results["machine"]["load_average_end"] = list(os.getloadavg())
    (out / "results.json").write_text(json.dumps(results, indent=1, default=float) + "\n")
    print_table(results)
    print(f"wrote {out / 'results.json'} ({results['seconds']:.0f} s)")
    return 0 if all(e["returncode"] == 0 for e in results["benches"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
