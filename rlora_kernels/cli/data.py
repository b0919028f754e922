"""Labelled text data for the section-classification job: Debian package descriptions labelled
by archive Section, read from the system's apt lists, or user-supplied jsonl records.
"""

from __future__ import annotations

import bz2
import glob
import gzip
import hashlib
import json
import logging
import lzma
import os
import shlex
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

logger = logging.getLogger(__name__)

DEFAULT_SECTIONS = ("net", "science", "admin", "text", "games", "sound", "graphics", "fonts",
                    "web", "math")
DROP_SUFFIXES = ("-dev", "-doc", "-dbg", "-data", "-common")
APT_HELPER = "/usr/lib/apt/apt-helper"
SYSTEM_LISTS = "/var/lib/apt/lists"
NO_APT_MESSAGE = ("apt-get was not found, so the Debian package data set cannot be built on this "
                  "machine; pass labelled data with `--data file.jsonl` (one "
                  '{"text": ..., "label": ...} object per line)')


class DataUnavailableError(RuntimeError):
    """The requested data set cannot be built on this machine."""


@dataclass
class TextDataset:
    train_texts: list[str]
    train_labels: list[int]
    test_texts: list[str]
    test_labels: list[int]
    label_names: list[str]
    digest: str  # sha256 hex of the sorted (split, label, text) records
    source: str  # human description of where the data came from
    long_descriptions: bool = False  # False when only one-line synopses were available


def _find(tool: str) -> str | None:
    # One seam for tests to simulate machines without apt.
    if os.path.isabs(tool):
        return tool if os.access(tool, os.X_OK) else None
    return shutil.which(tool)


def read_index(path: str | os.PathLike) -> str:
    """Return the text of an apt index file, decompressing it when needed."""
    path = os.fspath(path)
    helper = _find(APT_HELPER)
    if helper is not None:
        # apt-helper knows every compressor apt uses (lz4 and zstd have no stdlib module).
        proc = subprocess.run([helper, "cat-file", path], capture_output=True, check=False)
        if proc.returncode == 0:
            return proc.stdout.decode("utf-8", errors="replace")
        logger.debug("apt-helper cat-file %s failed: %s", path, proc.stderr.decode().strip())
    openers = {".gz": gzip.open, ".xz": lzma.open, ".lzma": lzma.open, ".bz2": bz2.open}
    suffix = Path(path).suffix
    if suffix in (".lz4", ".zst"):
        raise DataUnavailableError(f"{path}: cannot decompress {suffix} without apt-helper")
    with openers.get(suffix, open)(path, "rb") as fh:
        return fh.read().decode("utf-8", errors="replace")


def parse_stanzas(text: str) -> Iterator[dict[str, str]]:
    """Yield RFC822-style stanzas; continuation lines are kept, minus their first space."""
    fields: dict[str, str] = {}
    key = None
    for line in text.split("\n"):
        if not line.strip():
            if fields:
                yield fields
            fields, key = {}, None
        elif line[0] in " \t":
            if key is not None:
                fields[key] += "\n" + line[1:].rstrip()
        elif ":" in line and not line.startswith("#"):
            key, _, value = line.partition(":")
            key = key.strip()
            fields[key] = value.strip()
        else:
            key = None  # malformed line: also drop any continuation that follows it
    if fields:
        yield fields


def description_text(description: str) -> str:
    """Synopsis plus long description, one line per paragraph, ` .` markers removed."""
    synopsis, *lines = description.split("\n")
    paragraphs, words = [], []
    for line in lines:
        if line.strip() == ".":
            paragraphs.append(" ".join(words))
            words = []
        else:
            words.extend(line.split())
    paragraphs.append(" ".join(words))
    return "\n".join(p for p in [synopsis.strip(), *paragraphs] if p)


def _in_test(key: str, test_fraction: float) -> bool:
    # A stable hash, unlike hash(), gives the same split in every process and Python version.
    value = int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest()[:8], "big")
    return value / 2.0**64 < test_fraction


def _dataset(rows: Iterable[tuple[str, str, str]], label_names: list[str], source: str,
             long_descriptions: bool = False) -> TextDataset:
    """Assemble a TextDataset from (split, label name, text) rows, in the order given."""
    rows = list(rows)
    index = {name: i for i, name in enumerate(label_names)}
    lines = sorted(json.dumps(row, ensure_ascii=False) for row in rows)
    digest = hashlib.sha256("\n".join(lines).encode("utf-8")).hexdigest()
    split = {s: ([t for p, _, t in rows if p == s], [index[lab] for p, lab, _ in rows if p == s])
             for s in ("train", "test")}
    return TextDataset(*split["train"], *split["test"], label_names, digest, source,
                       long_descriptions)


def _apt_targets(apt_get: str, identifier: str) -> list[str]:
    proc = subprocess.run([apt_get, "indextargets"], capture_output=True, text=True, check=False,
                          timeout=60)
    if proc.returncode != 0:
        logger.warning("apt-get indextargets failed: %s", proc.stderr.strip())
        return []
    # Targets are listed whether or not `apt-get update` ever fetched them.
    return sorted({t["Filename"] for t in parse_stanzas(proc.stdout)
                   if t.get("Identifier") == identifier and os.path.isfile(t.get("Filename", ""))})


def _apt_config(tmp: str) -> dict[str, str]:
    """Environment for a private `apt-get update` that runs none of the system's update hooks."""
    # Hooks (appstream, command-not-found, packagekit) would rebuild system caches from the
    # system lists; a #clear in the main config file, read after apt.conf.d, disables them.
    proc = subprocess.run(["apt-config", "shell", "MAIN", "Dir::Etc::main/f"], capture_output=True,
                          text=True, check=False)
    main = dict(x.split("=", 1) for x in shlex.split(proc.stdout) if "=" in x).get("MAIN", "")
    conf, user = [], os.environ.get("APT_CONFIG")
    if main and os.path.isfile(main):
        conf.append(f'#include "{main}";')
    conf += [f"#clear APT::Update::{hook};" for hook in
             ("Pre-Invoke", "Post-Invoke", "Post-Invoke-Success")]
    Path(tmp, "main.conf").write_text("\n".join(conf) + "\n")
    outer = [f'#include "{user}";'] if user and os.path.isfile(user) else []
    outer.append(f'Dir::Etc::main "{Path(tmp, "main.conf")}";')
    Path(tmp, "apt.conf").write_text("\n".join(outer) + "\n")
    return dict(os.environ, APT_CONFIG=str(Path(tmp, "apt.conf")))


def fetch_lists(lists_dir: str | os.PathLike | None, apt_get: str | None,
                protected: Iterable[str] = ()) -> Path:
    """Run `apt-get update` with English translations into a private lists folder."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    lists = Path(lists_dir or cache / "rlora_kernels" / "apt-lists").expanduser().resolve()
    if str(lists) in {os.path.realpath(p) for p in (SYSTEM_LISTS, *protected)}:
        raise ValueError(f"{lists} holds the system's apt lists; pass a private lists_dir")
    if apt_get is None:
        logger.warning("apt-get not found: cannot fetch long descriptions")
        return lists
    (lists / "partial").mkdir(parents=True, exist_ok=True)
    cmd = [apt_get, "update", "-qq", "-o", f"Dir::State::Lists={lists}",
           "-o", "Acquire::Languages=en",
           # An empty pkgcache keeps apt from rewriting the system's binary caches.
           "-o", "Dir::Cache::pkgcache=", "-o", "Dir::Cache::srcpkgcache="]
    with tempfile.TemporaryDirectory() as tmp:
        try:
            proc = subprocess.run(cmd, env=_apt_config(tmp), capture_output=True, text=True,
                                  check=False, timeout=600)
            failure = proc.stderr.strip()[-500:] if proc.returncode != 0 else None
        except (OSError, subprocess.TimeoutExpired) as exc:
            failure = str(exc)
    if failure is not None:
        logger.warning("apt-get update into %s failed (%s); using whatever lists it already "
                       "holds", lists, failure)
    return lists


def load_debian_sections(sections: Sequence[str] = DEFAULT_SECTIONS,
                         lists_dir: str | os.PathLike | None = None, fetch_long: bool = True,
                         packages_files: Sequence[str | os.PathLike] | None = None,
                         translation_files: Sequence[str | os.PathLike] | None = None,
                         test_fraction: float = 0.2) -> TextDataset:
    """Debian binary package descriptions labelled by archive Section, split by source package.

    Long descriptions come from English Translation files joined on Description-md5: the files
    given, or those a private `apt-get update` fetches into `lists_dir` when `fetch_long`.
    Without them each text is the one-line synopsis.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie strictly between 0 and 1, got {test_fraction}")
    apt_get = _find("apt-get")
    if packages_files is None and apt_get is None:
        raise DataUnavailableError(NO_APT_MESSAGE)
    system = _apt_targets(apt_get, "Packages") if packages_files is None else []
    if translation_files is None:
        translation_files = []
        if fetch_long:
            private = fetch_lists(lists_dir, apt_get, [os.path.dirname(f) for f in system])
            translation_files = sorted(glob.glob(str(private / "*Translation-en*")))
            if packages_files is None and not system:
                system = sorted(glob.glob(str(private / "*_Packages*")))
    if packages_files is None:
        if not system:
            raise DataUnavailableError("no apt Packages lists on this machine: run `apt-get "
                                       "update`, or " + NO_APT_MESSAGE.split("; ", 1)[1])
        packages_files = system

    long_by_md5 = {}
    for path in translation_files:
        for st in parse_stanzas(read_index(path)):
            if "Description-md5" in st and "Description-en" in st:
                long_by_md5[st["Description-md5"]] = st["Description-en"]

    wanted, read, kept, with_long = set(sections), 0, 0, 0
    by_text: dict[str, tuple[str, str]] = {}  # text -> smallest (source, name) carrying it
    labels_of: dict[str, set[str]] = {}
    for path in packages_files:
        for st in parse_stanzas(read_index(path)):
            read += 1
            name = st.get("Package", "")
            section = st.get("Section", "").rsplit("/", 1)[-1]
            if (section not in wanted or "Description" not in st or name.startswith("lib")
                    or name.endswith(DROP_SUFFIXES)):
                continue
            description = st["Description"]
            if "\n" not in description:  # Packages files usually carry only the synopsis
                description = long_by_md5.get(st.get("Description-md5", ""), description)
            kept, with_long = kept + 1, with_long + ("\n" in description)
            text = description_text(description)
            source = (st.get("Source") or name).split()[0]
            labels_of.setdefault(text, set()).add(section)
            by_text[text] = min(by_text.get(text, (source, name)), (source, name))
    # Generic texts ("transitional package") shared across sections say nothing about either.
    conflicts = {t for t, labs in labels_of.items() if len(labs) > 1}
    rows = sorted((*by_text[t], t) for t in by_text if t not in conflicts)
    rows = [("test" if _in_test(src, test_fraction) else "train", labels_of[t].pop(), t)
            for src, _, t in rows]
    long_descriptions = kept > 0 and 2 * with_long >= kept
    if fetch_long and not long_descriptions:
        logger.warning("long descriptions found for only %d of %d packages; most texts are "
                       "one-line synopses", with_long, kept)
    logger.info("read %d records from %d files; kept %d packages (%d with a long description) "
                "as %d texts; dropped %d texts shared by several sections", read,
                len(packages_files), kept, with_long, len(rows), len(conflicts))
    kind = f"long descriptions for {with_long} of {kept}" if with_long else "synopses only"
    label_names = sorted({lab for _, lab, _ in rows})
    return _dataset(rows, label_names, f"debian packages ({kind}), {read} records read",
                    long_descriptions)


def load_jsonl(path: str | os.PathLike, test_fraction: float = 0.2, seed: int = 0) -> TextDataset:
    """Load {"text": str, "label": str | int, "split"?: "train" | "test"} objects, one a line.

    Records without a split go to test by a hash of (seed, text), so the split is stable.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie strictly between 0 and 1, got {test_fraction}")
    rows = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"{path}, line {lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where}: invalid JSON ({exc.msg}, column {exc.colno})") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            text, label, split = obj.get("text"), obj.get("label"), obj.get("split")
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f'{where}: "text" must be a non-empty string, got {text!r:.60}')
            # bool is an int subclass, but true/false labels are almost surely a mistake.
            if isinstance(label, bool) or not isinstance(label, (str, int)) or label == "":
                raise ValueError(f'{where}: "label" must be a string or an integer, got {label!r}')
            if split not in (None, "train", "test"):
                raise ValueError(f'{where}: "split" must be "train" or "test", got {split!r}')
            if rows and isinstance(label, int) != isinstance(rows[0][1], int):
                raise ValueError(f"{where}: label {label!r} mixes integer and string labels")
            if split is None:
                split = "test" if _in_test(f"{seed}:{text}", test_fraction) else "train"
            rows.append((split, label, text))
    if not rows:
        raise ValueError(f"{path}: no records; expected one JSON object per line")
    names = [str(lab) for lab in sorted({lab for _, lab, _ in rows})]
    if len(names) < 2:
        raise ValueError(f"{path}: found only the label {names[0]!r}; a classifier needs >= 2")
    for split in ("train", "test"):
        if not any(s == split for s, _, _ in rows):
            raise ValueError(f'{path}: no {split} records; add "split" fields or more records')
    rows = [(s, str(lab), t) for s, lab, t in rows]
    return _dataset(rows, names, f"{path}, {len(rows)} records")
