"""Tests for rlora_kernels.cli.data: the Debian section data set and the jsonl loader."""

import gzip
import json
import logging
import lzma
import shutil
from pathlib import Path

import pytest

from rlora_kernels.cli import data

FIXTURES = Path(__file__).parent / "fixtures"
PACKAGES = FIXTURES / "Packages.sample"
TRANSLATIONS = FIXTURES / "Translation-en.sample"


def load(**kwargs):
    kwargs.setdefault("packages_files", [PACKAGES])
    kwargs.setdefault("fetch_long", False)
    return data.load_debian_sections(**kwargs)


def by_synopsis(ds):
    """Map each text's first line to (split, label name)."""
    out = {}
    for split, texts, labels in (("train", ds.train_texts, ds.train_labels),
                                 ("test", ds.test_texts, ds.test_labels)):
        for text, label in zip(texts, labels):
            out[text.split("\n")[0]] = (split, ds.label_names[label])
    return out


def test_parse_stanzas_continuations_and_separators():
    text = "A: 1\nB: two\n words\n .\n\n\nA: 3\n"
    assert list(data.parse_stanzas(text)) == [{"A": "1", "B": "two\nwords\n."}, {"A": "3"}]


def test_description_text_drops_paragraph_markers():
    assert data.description_text("syn\n a b\n  c\n .\n d") == "syn\na b c\nd"
    assert data.description_text("synopsis only") == "synopsis only"


def test_filtering_and_section_prefixes():
    ds = load()
    seen = by_synopsis(ds)
    assert ds.label_names == sorted(data.DEFAULT_SECTIONS)
    # lib*, -dev, -doc, -dbg, -data, -common packages and unwanted sections are gone.
    for dropped in ("star catalogue access library", "real-time strategy game (data files)",
                    "simple raster paint program - common files", "view and edit files in "
                    "hexadecimal", "assorted small command-line utilities"):
        assert dropped not in seen
    assert not any(s.startswith(("toolkit for genome sequence assembly -",
                                 "monitor disk health and free space -",
                                 "network probing toolkit - Python")) for s in seen)
    assert seen["first-person shooter engine"][1] == "games"  # was contrib/games
    assert seen["download whole web sites for offline reading"][1] == "net"  # non-free/net
    assert seen["network probing toolkit - collection server"][1] == "admin"
    # Identical texts are kept once; texts shared by two sections are dropped.
    assert len(ds.train_texts) + len(ds.test_texts) == len(seen) == 22
    assert "transitional package" not in seen
    # Only the stanza with an inline long description has one.
    assert not ds.long_descriptions
    assert ds.source == "debian packages (long descriptions for 1 of 25), 34 records read"


def test_long_descriptions_join_on_md5():
    ds = load(translation_files=[TRANSLATIONS])
    assert ds.long_descriptions and "long descriptions for" in ds.source
    texts = {t.split("\n")[0]: t for t in ds.train_texts + ds.test_texts}
    assert texts["real-time strategy game of ancient warfare"] == (
        "real-time strategy game of ancient warfare\nStratagem is a historically based war and "
        "economy game in which players rebuild ancient civilisations.\nIt features a custom 3D "
        "engine and an online lobby.")
    assert texts["collection of small puzzle games"].endswith("games: * slide * sweep * match")
    # No translation: the synopsis alone; inline long description: used as is.
    assert texts["tiny software synthesizer without a translation"] == (
        "tiny software synthesizer without a translation")
    assert texts["matrix algebra helper with an inline description"].endswith(
        "are used as they are.\nSecond paragraph.")
    assert not any(line.strip() == "." for t in texts.values() for line in t.split("\n"))
    # tonegen and tonegen-legacy share one description.
    assert sum("Tonegen plays" in t for t in texts.values()) == 1


@pytest.mark.parametrize("fraction", [0.2, 0.5, 0.8])
def test_split_keeps_a_source_package_together(fraction):
    seen = by_synopsis(load(test_fraction=fraction, translation_files=[TRANSLATIONS]))
    netprobe = {v[0] for k, v in seen.items() if k.startswith("network probing toolkit")}
    assert len([k for k in seen if k.startswith("network probing toolkit")]) == 3
    assert netprobe == {"test" if data._in_test("netprobe", fraction) else "train"}


def test_split_fraction_is_roughly_right():
    names = [f"pkg{i}" for i in range(5000)]
    share = sum(data._in_test(n, 0.2) for n in names) / len(names)
    assert 0.18 < share < 0.22


def test_digest_is_deterministic():
    a, b = load(), load()
    assert a.digest == b.digest and len(a.digest) == 64
    # Reading the same records twice changes nothing but the record count.
    twice = load(packages_files=[PACKAGES, PACKAGES])
    assert twice.digest == a.digest and "68 records read" in twice.source
    assert load(test_fraction=0.5).digest != a.digest
    assert load(translation_files=[TRANSLATIONS]).digest != a.digest


def test_compressed_inputs(tmp_path, monkeypatch):
    gz, xz = tmp_path / "Packages.gz", tmp_path / "Packages.xz"
    gz.write_bytes(gzip.compress(PACKAGES.read_bytes()))
    xz.write_bytes(lzma.compress(PACKAGES.read_bytes()))
    plain = load().digest
    assert load(packages_files=[gz]).digest == plain
    find = data._find
    monkeypatch.setattr(data, "_find", lambda t: None if t == data.APT_HELPER else find(t))
    assert load(packages_files=[xz]).digest == plain
    (tmp_path / "Packages.lz4").write_bytes(b"\x04\x22\x4d\x18")
    with pytest.raises(data.DataUnavailableError, match="without apt-helper"):
        load(packages_files=[tmp_path / "Packages.lz4"])


def test_no_apt_raises_with_jsonl_hint(monkeypatch):
    monkeypatch.setattr(data, "_find", lambda tool: None)
    with pytest.raises(data.DataUnavailableError, match=r"--data file\.jsonl") as info:
        data.load_debian_sections()
    assert '{"text": ..., "label": ...}' in str(info.value)


def test_refuses_the_system_lists_dir():
    with pytest.raises(ValueError, match="system's apt lists"):
        load(fetch_long=True, lists_dir="/var/lib/apt/lists")


def fake_apt_get(tmp_path, rc):
    """An apt-get that records its arguments and apt config, then exits with `rc`."""
    script = tmp_path / "apt-get"
    script.write_text(f'#!/bin/sh\necho "$@" > {tmp_path}/args\ncat "$APT_CONFIG" '
                      f'"$(sed -n "s/^Dir::Etc::main \\"\\(.*\\)\\";/\\1/p" "$APT_CONFIG")" '
                      f'> {tmp_path}/conf\necho "E: no network" >&2\nexit {rc}\n')
    script.chmod(0o755)
    return str(script)


def test_fetch_runs_private_update_without_hooks(tmp_path, monkeypatch):
    fake = fake_apt_get(tmp_path, 0)
    monkeypatch.setattr(data, "_find", lambda t: fake if t == "apt-get" else None)
    lists = tmp_path / "lists"
    assert data.fetch_lists(lists, fake) == lists.resolve()
    assert (lists / "partial").is_dir()
    args = (tmp_path / "args").read_text()
    assert f"Dir::State::Lists={lists.resolve()}" in args and "Acquire::Languages=en" in args
    assert "Dir::Cache::pkgcache=" in args
    assert "#clear APT::Update::Post-Invoke-Success;" in (tmp_path / "conf").read_text()


def test_failed_fetch_falls_back(tmp_path, monkeypatch, caplog):
    fake = fake_apt_get(tmp_path, 100)
    monkeypatch.setattr(data, "_find", lambda t: fake if t == "apt-get" else None)
    lists = tmp_path / "lists"
    with caplog.at_level(logging.WARNING, logger=data.__name__):
        ds = load(fetch_long=True, lists_dir=lists)
    assert not ds.long_descriptions and "no network" in caplog.text
    assert "one-line synopses" in caplog.text
    # Lists a previous run fetched are still used.
    shutil.copy(TRANSLATIONS, lists / "mirror_dists_main_i18n_Translation-en")
    ds = load(fetch_long=True, lists_dir=lists)
    assert ds.long_descriptions and ds.digest == load(translation_files=[TRANSLATIONS]).digest


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("apt-get") is None, reason="needs apt-get")
def test_real_system_lists_synopses():
    try:
        ds = data.load_debian_sections(fetch_long=False)
    except data.DataUnavailableError as exc:
        pytest.skip(str(exc))
    assert len(ds.train_texts) + len(ds.test_texts) > 1000
    assert len(ds.label_names) >= 8
    assert 0.1 < len(ds.test_texts) / (len(ds.train_texts) + len(ds.test_texts)) < 0.3


def write_jsonl(tmp_path, lines):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(x if isinstance(x, str) else json.dumps(x) + "\n" for x in lines))
    return path


def test_jsonl_explicit_and_hashed_splits(tmp_path):
    rows = [{"text": f"text {i}", "label": ["b", "a"][i % 2]} for i in range(40)]
    rows += ['{"text": "kept for test", "label": "a", "split": "test"}\n', "\n"]
    path = write_jsonl(tmp_path, rows)
    ds = data.load_jsonl(path)
    assert ds.label_names == ["a", "b"]
    assert "kept for test" in ds.test_texts
    assert len(ds.train_texts) + len(ds.test_texts) == 41 and ds.train_texts
    assert data.load_jsonl(path).digest == ds.digest
    assert data.load_jsonl(path, seed=1).digest != ds.digest


def test_jsonl_integer_labels_sort_numerically(tmp_path):
    path = write_jsonl(tmp_path, [{"text": "x", "label": 10, "split": "train"},
                                  {"text": "y", "label": 2, "split": "test"}])
    ds = data.load_jsonl(path)
    assert ds.label_names == ["2", "10"] and ds.train_labels == [1] and ds.test_labels == [0]


@pytest.mark.parametrize("bad, message", [
    ('{"text": "a", "label": "x"', "invalid JSON"),
    ('["a", "x"]', "expected a JSON object"),
    ('{"label": "x"}', '"text" must be a non-empty string'),
    ('{"text": "a", "label": null}', '"label" must be a string or an integer'),
    ('{"text": "a", "label": true}', '"label" must be a string or an integer'),
    ('{"text": "a", "label": "x", "split": "dev"}', '"split" must be "train" or "test"'),
    ('{"text": "a", "label": 3}', "mixes integer and string labels"),
])
def test_jsonl_errors_name_the_line(tmp_path, bad, message):
    good = '{"text": "fine", "label": "y", "split": "train"}\n'
    path = write_jsonl(tmp_path, [good, "\n", bad + "\n", good])
    with pytest.raises(ValueError, match=message) as info:
        data.load_jsonl(path)
    assert f"{path}, line 3:" in str(info.value)


@pytest.mark.parametrize("lines, message", [
    ([], "no records"),
    (["\n", "  \n"], "no records"),
    ([{"text": "a", "label": "x"}, {"text": "b", "label": "x"}], "only the label 'x'"),
    ([{"text": "a", "label": "x", "split": "train"}, {"text": "b", "label": "y",
                                                        "split": "train"}], "no test records"),
])
def test_jsonl_empty_or_single_label(tmp_path, lines, message):
    with pytest.raises(ValueError, match=message):
        data.load_jsonl(write_jsonl(tmp_path, lines))
