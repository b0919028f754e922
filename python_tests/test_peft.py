"""PEFT exchange: export loads in peft with the same outputs, import and conversion reproduce
peft's own outputs, round trips keep X, and bad adapters fail with named layers."""

import copy
import json
import logging
import os
import shutil

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import rlora_kernels as rk  # noqa: E402
from rlora_kernels.adapters import convert_peft_model, export_peft, import_peft  # noqa: E402
from rlora_kernels.adapters.layer import is_conv1d  # noqa: E402
from rlora_kernels.adapters.peft_io import original_state_dict  # noqa: E402

transformers.logging.set_verbosity_error()
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Every tensor here is tiny; with 2 OpenMP threads on a loaded 2-core machine a batched
    # 4 x 128 x 22 QR took 0.15-1.2 s against 1e-4 s on one thread, ruling the test time.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)

LOGGER = "rlora_kernels.adapters.peft_io"
VOCAB, RANK = 97, 3
TARGETS = {"bert": ["query", "value", "dense"], "gpt2": ["c_attn", "c_proj", "c_fc"]}


def make_base(kind, seed=0, layers=2, intermediate=48):
    """A tiny random model built from a config; dropout off so every forward is the same."""
    torch.manual_seed(seed)
    if kind == "bert":
        cfg = transformers.BertConfig(
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
            intermediate_size=intermediate, num_labels=3, max_position_embeddings=32,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        return transformers.BertForSequenceClassification(cfg).eval()
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=layers, n_head=4,
                                  n_positions=32, bos_token_id=0, eos_token_id=0,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def make_batch(kind, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (4, 11), generator=g)
    if kind == "bert":
        return {"input_ids": ids, "labels": torch.randint(0, 3, (4,), generator=g)}
    return {"input_ids": ids, "labels": ids}


def loss_fn(model, batch):
    return model(**batch).loss


def logits(model, seed=123):
    model.eval()
    with torch.no_grad():
        return model(input_ids=make_batch("bert", seed)["input_ids"]).logits


def trained(kind, loi=True, dtype=torch.float32):
    """(original base, adapted copy) after LOI and two Riemannion steps; BERT's classifier
    head trains too, so it must travel as a module to save."""
    orig = make_base(kind).to(dtype)
    model = copy.deepcopy(orig)
    rk.inject(model, TARGETS[kind], rank=RANK)
    batch = make_batch(kind, 1)
    if loi:
        rk.loi_init(model, batch, loss_fn)
    if kind == "bert":
        model.classifier.requires_grad_(True)
    opt = rk.Riemannion(model, lr=0.05)
    for _ in range(2):
        opt.zero_grad()
        loss_fn(model, batch).backward()
        opt.step()
    return orig, model.eval()


def assert_same_function(got, ours, ref64):
    """Two float32 routes to one function: `got` may err against the float64 forward at
    most 4x what `ours` errs (measured: 1-3x; the export rounds the factors to float32 once
    more), plus a floor of 1e-7 relative for when `ours` happens to be nearly exact."""
    base = (ours.double() - ref64).abs().max()
    err = (got.double() - ref64).abs().max()
    assert err <= 4 * base + 1e-7 * ref64.abs().max(), (float(err), float(base))


def peft_delta(pm, name):
    """Dense scale * lora_B @ lora_A of one PEFT layer in [out, in] layout."""
    layer = pm.base_model.model.get_submodule(name)
    delta = layer.get_delta_weight("default")
    return delta.mT if layer.fan_in_fan_out else delta


def rlora_named(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, rk.RiemannLoRALinear)}


# ------------------------------------------------------------------------------- export
@pytest.mark.parametrize("kind,loi", [("bert", True), ("bert", False), ("gpt2", True),
                                      ("gpt2", False)])
def test_export_loads_in_peft_with_same_outputs(tmp_path, kind, loi):
    orig, model = trained(kind, loi)
    extra = dict(modules_to_save=["classifier"], task_type="SEQ_CLS") if kind == "bert" else {}
    cfg = export_peft(model, tmp_path, **extra)
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]
    width = 2 * RANK if loi else RANK
    assert cfg["r"] == cfg["lora_alpha"] == width
    assert cfg["fan_in_fan_out"] == (kind == "gpt2")
    layers = rlora_named(model)
    assert cfg["target_modules"] == sorted(layers)

    pm = peft.PeftModel.from_pretrained(copy.deepcopy(orig), tmp_path).eval()
    from safetensors.torch import load_file
    saved = load_file(tmp_path / "adapter_model.safetensors")
    # The keys are exactly those peft itself would save for the loaded model.
    assert set(saved) == set(peft.get_peft_model_state_dict(pm))
    assert all(k.startswith("base_model.model.") and ".default." not in k for k in saved)
    assert_same_function(logits(pm), logits(model), logits(copy.deepcopy(model).double()))
    assert not torch.allclose(logits(pm), logits(orig), atol=1e-3)

    for name, layer in layers.items():
        x = layer.delta_weight().double()
        x0 = layer.lora_offset_A.double() @ layer.lora_offset_B.double().mT
        assert torch.allclose(peft_delta(pm, name).double(), x - x0, atol=1e-6)
        a = saved[f"base_model.model.{name}.lora_A.weight"].double()
        b = saved[f"base_model.model.{name}.lora_B.weight"].double()
        # Balanced factors: both Gram matrices equal the same diagonal S.
        gram = b.mT @ b
        assert torch.allclose(gram, a @ a.mT, atol=1e-6)
        assert torch.allclose(gram, torch.diag(gram.diagonal()), atol=1e-6)


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_original_state_dict_rebuilds_the_base(tmp_path, kind):
    orig, model = trained(kind)
    export_peft(model, tmp_path, modules_to_save=["classifier"] if kind == "bert" else None)
    rebuilt = make_base(kind, seed=5)
    rebuilt.load_state_dict(original_state_dict(model))
    want = orig.state_dict()
    for key, value in rebuilt.state_dict().items():
        # The classifier is trained outside the adapters, so it keeps its trained values.
        ref = model.state_dict()[key] if key.startswith("classifier") else want[key]
        # W' + X0 in float32 recovers W to one rounding of |W|.
        assert torch.allclose(value, ref, atol=1e-6), key
    pm = peft.PeftModel.from_pretrained(rebuilt, tmp_path)
    assert_same_function(logits(pm), logits(model), logits(copy.deepcopy(model).double()))


# ------------------------------------------------------------------------------- import
def check_point(layer):
    """Orthonormal A_L and B_R, B in B_R's span, zero offsets; to a few roundings."""
    eps = 1e-12 if layer.lora_A.dtype == torch.float64 else 1e-6
    eye = torch.eye(layer.rank, dtype=layer.lora_A.dtype)
    b = layer.lora_B.detach()
    assert (layer.lora_A.mT @ layer.lora_A - eye).abs().max() < eps
    assert (layer.lora_BR.mT @ layer.lora_BR - eye).abs().max() < eps
    assert (layer.lora_BR @ (layer.lora_BR.mT @ b) - b).abs().max() < eps * b.abs().max()
    assert layer.lora_offset_A.abs().max() == 0 and layer.lora_offset_B.abs().max() == 0


@pytest.mark.parametrize("loi", [True, False])
def test_round_trip_export_import_keeps_x(tmp_path, loi):
    # float64 end to end, so the round trip must be exact to rounding.
    orig, model = trained("gpt2", loi, dtype=torch.float64)
    export_peft(model, tmp_path)
    want = {n: l.delta_weight() - l.lora_offset_A @ l.lora_offset_B.mT
            for n, l in rlora_named(model).items()}
    out = logits(model)
    fresh = import_peft(copy.deepcopy(orig), tmp_path)
    # Into an injected model: reused layers, LOI's re-centring undone first.
    reused = copy.deepcopy(orig)
    rk.inject(reused, TARGETS["gpt2"], rank=2 * RANK if loi else RANK, seed=9)
    rk.loi_init(reused, make_batch("gpt2", 2), loss_fn)
    import_peft(reused, tmp_path)
    for imported in (fresh, reused):
        layers = rlora_named(imported)
        assert set(layers) == set(want)
        for name, layer in layers.items():
            assert layer.rank == (2 * RANK if loi else RANK)
            check_point(layer)
            assert torch.allclose(layer.delta_weight(), want[name], atol=1e-12), name
        assert torch.allclose(logits(imported), out, atol=1e-10)


def native_peft(kind, seed=3, r=4, alpha=11, rslora=False, alpha_pattern=None):
    """A peft LoRA model with random non-zero factors (and classifier) and lora_alpha != r."""
    orig = make_base(kind)
    extra = dict(modules_to_save=["classifier"], task_type="SEQ_CLS") if kind == "bert" else {}
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, use_rslora=rslora, lora_dropout=0.0,
                          target_modules=TARGETS[kind][:2], fan_in_fan_out=kind == "gpt2",
                          alpha_pattern=alpha_pattern or {}, **extra)
    pm = peft.get_peft_model(copy.deepcopy(orig), cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return orig, pm.eval()


NATIVE = {"bert": dict(alpha_pattern={"value": 5}), "gpt2": dict(rslora=True)}


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
@pytest.mark.parametrize("rank", [None, 6])
def test_import_native_peft_adapter_matches_peft(tmp_path, caplog, kind, rank):
    orig, pm = native_peft(kind, **NATIVE[kind])
    pm.save_pretrained(tmp_path)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        model = import_peft(copy.deepcopy(orig), tmp_path, rank=rank)
    assert not [r for r in caplog.records if "truncation" in r.getMessage()]
    layers = rlora_named(model)
    assert set(layers) == {n for n, m in pm.base_model.model.named_modules()
                           if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert all(layer.rank == (rank or 4) for layer in layers.values())
    for name, layer in layers.items():
        check_point(layer)
        assert torch.allclose(layer.delta_weight(), peft_delta(pm, name), atol=1e-6)
    if kind == "bert":
        assert model.classifier.weight.requires_grad
    assert_same_function(logits(model), logits(pm), logits(copy.deepcopy(pm).double()))


@pytest.mark.parametrize("peft_rank", [5, 40])  # 40 > min(m, n) = 32: wider than the matrix
def test_import_truncates_to_best_rank_r_and_warns(tmp_path, caplog, peft_rank):
    orig, pm = native_peft("bert", r=peft_rank)
    pm.save_pretrained(tmp_path)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        model = import_peft(copy.deepcopy(orig), tmp_path, rank=2)
    warned = [r for r in caplog.records if "truncation" in r.getMessage()]
    assert len(warned) == 1
    for name, layer in rlora_named(model).items():
        u, s, vh = torch.linalg.svd(peft_delta(pm, name).double())
        best = u[:, :2] * s[:2] @ vh[:2]
        assert torch.allclose(layer.delta_weight().double(), best, atol=1e-6)


def test_import_of_fresh_peft_adapter_keeps_random_bases(tmp_path):
    orig = make_base("bert")
    pm = peft.get_peft_model(copy.deepcopy(orig), peft.LoraConfig(r=2, target_modules=["query"]))
    pm.save_pretrained(tmp_path)  # peft starts lora_B at zero: the delta is exactly zero
    model = import_peft(copy.deepcopy(orig), tmp_path)
    for layer in rlora_named(model).values():
        assert layer.lora_B.abs().max() == 0
        assert torch.isfinite(layer.lora_A).all() and layer.lora_A.abs().min() > 0
    assert torch.allclose(logits(model), logits(orig), atol=1e-6)


# ------------------------------------------------------------------------------ convert
@pytest.mark.parametrize("kind,merge", [("bert", False), ("bert", True), ("gpt2", False)])
def test_convert_peft_model_matches_peft(kind, merge):
    orig, pm = native_peft(kind, **NATIVE[kind])
    ref, ref64 = logits(pm), logits(copy.deepcopy(pm).double())
    deltas = {n: peft_delta(pm, n) for n, m in pm.base_model.model.named_modules()
              if isinstance(m, peft.tuners.lora.LoraLayer)}
    if merge:
        pm.merge_adapter()
    base = convert_peft_model(pm)
    assert type(base) is type(orig)
    assert not any(isinstance(m, peft.tuners.tuners_utils.BaseTunerLayer)
                   for m in base.modules())
    layers = rlora_named(base)
    assert set(layers) == set(deltas)
    for name, layer in layers.items():
        check_point(layer)
        assert torch.allclose(layer.delta_weight(), deltas[name], atol=1e-6)
    if merge:  # unmerging subtracts in float32 first: a few roundings of |W + delta|
        assert torch.allclose(logits(base), ref, atol=1e-5)
    else:
        assert_same_function(logits(base), ref, ref64)
    if kind == "bert":
        assert base.classifier.weight.requires_grad
    opt = rk.Riemannion(base, lr=0.01)
    batch = make_batch(kind, 4)
    before = loss_fn(base, batch)
    before.backward()
    opt.step()
    assert torch.isfinite(loss_fn(base, batch))


# ------------------------------------------------------------------------------- errors
def test_export_errors(tmp_path):
    with pytest.raises(ValueError, match="no RiemannLoRA layers"):
        export_peft(make_base("bert"), tmp_path)
    _, model = trained("bert", loi=False)
    with pytest.raises(ValueError, match="'pooler_head' matches no module"):
        export_peft(model, tmp_path, modules_to_save=["pooler_head"])
    with pytest.raises(ValueError, match="holds RiemannLoRA layer"):
        export_peft(model, tmp_path, modules_to_save=["attention"])


def test_import_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        import_peft(make_base("bert"), tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        import_peft(make_base("bert"), tmp_path / "empty")
    _, model = trained("bert", loi=False)
    good = tmp_path / "good"
    export_peft(model, good)
    (good / "adapter_model.safetensors").rename(tmp_path / "weights")
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        import_peft(make_base("bert"), good)
    (tmp_path / "weights").rename(good / "adapter_model.safetensors")

    shallow, narrow = make_base("bert", layers=1), make_base("bert", intermediate=40)
    with pytest.raises(ValueError, match=r"lacks: \['bert.encoder.layer.1.attention.output"):
        import_peft(shallow, good)
    with pytest.raises(ValueError, match=r"shape mismatch at layer 'bert.encoder.layer.0."
                                         r"intermediate.dense'.*\(40, 32\).*\(48, 3\)"):
        import_peft(narrow, good)
    partial = make_base("bert")
    rk.inject(partial, ["query"], rank=RANK)
    with pytest.raises(ValueError, match="'bert.encoder.layer.0.attention.output.dense', "
                                         "which is not a RiemannLoRA layer"):
        import_peft(partial, good)

    def edited(name, **changes):
        dst = tmp_path / name
        shutil.copytree(good, dst)
        cfg = json.loads((dst / "adapter_config.json").read_text())
        (dst / "adapter_config.json").write_text(json.dumps({**cfg, **changes}))
        return dst

    fresh = make_base("bert")
    with pytest.raises(ValueError, match="IA3 PEFT adapter; only LoRA"):
        import_peft(fresh, edited("ia3", peft_type="IA3"))
    with pytest.raises(NotImplementedError, match="DoRA"):
        import_peft(fresh, edited("dora", use_dora=True))
    with pytest.raises(ValueError, match="config says rank 5"):
        import_peft(fresh, edited("rank", r=5))
    # Every check runs before the model is touched.
    assert not any(rlora_named(m) for m in (shallow, narrow, fresh))


def test_convert_rejects_non_lora_models():
    with pytest.raises(ValueError, match="expects a PEFT LoRA model"):
        convert_peft_model(make_base("bert"))
    ia3 = peft.get_peft_model(make_base("bert"), peft.IA3Config(
        target_modules=["query"], feedforward_modules=[]))
    with pytest.raises(ValueError, match="expects a PEFT LoRA model"):
        convert_peft_model(ia3)
    dora = peft.get_peft_model(make_base("bert"), peft.LoraConfig(
        r=2, target_modules=["query"], use_dora=True))
    with pytest.raises(NotImplementedError, match="'bert.encoder.layer.0.attention.self.query'"
                                                  ".*DoRA"):
        convert_peft_model(dora)
