"""Optimizers against a dense float64 transcription of METHOD.md, plus the torch.optim contract."""

import copy
import io

import pytest
import torch
from torch import nn

import rlora_kernels as rk
from rlora_kernels import manifold, ops

from shape_spy import record_shapes

F64 = torch.float64


def make_model(seed=0, dims=(23, 37, 29, 37), rank=3, dtype=F64):
    """Three adapted linears, two of equal shape (one bucket of 2), and a trainable head."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(dims[0], dims[1]), nn.Tanh(), nn.Linear(dims[1], dims[2]),
                          nn.Tanh(), nn.Linear(dims[2], dims[3]), nn.Linear(dims[3], 4))
    model = model.to(dtype)
    layers = rk.inject(model, ["0", "2", "4"], rank=rank, seed=seed)
    model[5].requires_grad_(True)
    return model, layers


def batch(seed, n_in=23, tokens=16, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(tokens, n_in, generator=g, dtype=dtype), torch.randint(0, 4, (tokens,),
                                                                              generator=g)


def loss_fn(model, b):
    return nn.functional.cross_entropy(model(b[0]), b[1])


def give_point(layers, seed=1):
    """Move every adapter to a random non-zero point of the manifold."""
    g = torch.Generator().manual_seed(seed)
    for layer in layers:
        m, n = layer.shape
        left = torch.randn(1, m, layer.rank, generator=g, dtype=F64)
        right = torch.randn(1, n, layer.rank, generator=g, dtype=F64) * 0.3
        a_l, b, b_r = ops.retract_lr(torch.cat([left, left], -1), torch.cat([right, right], -1),
                                     layer.rank)
        layer.lora_A.copy_(a_l[0]), layer.lora_B.data.copy_(b[0]), layer.lora_BR.copy_(b_r[0])


def dense_gradients(model, layers, b):
    """dL/dW of every adapted layer, by making the effective weights dense leaves."""
    model = copy.deepcopy(model)
    dense = []
    for layer in (l for l in model.modules() if isinstance(l, rk.RiemannLoRALinear)):
        w = (layer.base_layer.weight + layer.delta_weight()).detach().requires_grad_()
        layer.forward = (lambda x, w=w, bias=layer.base_layer.bias:
                         nn.functional.linear(x, w, bias))
        dense.append(w)
    loss = loss_fn(model, b)
    return torch.autograd.grad(loss, dense)


def polar(xi, eps):
    u, s, vh = torch.linalg.svd(xi, full_matrices=False)
    keep = (s > eps * s[:1]).to(xi.dtype)
    return u * keep @ vh


def truncated(x, r):
    u, s, vh = torch.linalg.svd(x)
    return u[:, :r] * s[:r] @ vh[:r]


def test_doubled_adapter_gradients_equal_dense_products():
    model, layers = make_model()
    give_point(layers)
    b = batch(0)
    loss_fn(model, b).backward()
    for layer, g in zip(layers, dense_gradients(model, layers, b)):
        assert torch.allclose(layer.lora_Z1.grad, g @ layer.lora_BR, atol=1e-12)
        assert torch.allclose(layer.lora_B.grad, g.mT @ layer.lora_A, atol=1e-12)


@pytest.mark.parametrize("stores", ["gradient", "direction"])
@pytest.mark.parametrize("orthogonalize", [True, False])
def test_riemannion_matches_dense_transcription(stores, orthogonalize):
    lr, beta, wd, eps = 0.07, 0.9, 0.01, 1e-4
    model, layers = make_model()
    give_point(layers)
    opt = rk.Riemannion([{"params": [p for l in layers for p in (l.lora_Z1, l.lora_B)]}],
                        lr=lr, momentum=beta, weight_decay=wd, momentum_stores=stores,
                        orthogonalize=orthogonalize, ortho_eps=eps)
    xs = [l.delta_weight().clone() for l in layers]
    moms = [torch.zeros_like(x) for x in xs]
    for step in range(3):
        b = batch(step)
        grads = dense_gradients(model, layers, b)
        opt.zero_grad()
        loss_fn(model, b).backward()
        opt.step()
        for i, (layer, g) in enumerate(zip(layers, grads)):
            x = xs[i]
            u, s, vh = torch.linalg.svd(x, full_matrices=False)
            a, br = u[:, :layer.rank], vh[:layer.rank].mT
            proj = lambda z: manifold.project_dense(a, br, z)
            xi = beta * proj(moms[i]) + proj(g)
            d = proj(polar(xi, eps)) if orthogonalize else xi
            xs[i] = truncated(x - lr * (d + wd * x), layer.rank)
            moms[i] = xi if stores == "gradient" else d
            assert torch.allclose(layer.delta_weight(), xs[i], atol=1e-10), (step, i)


def test_riemann_sgd_matches_dense_transcription_with_normalisation():
    lr, beta, nb = 0.05, 0.8, 0.9
    model, layers = make_model()
    give_point(layers)
    opt = rk.RiemannSGD([p for l in layers for p in (l.lora_Z1, l.lora_B)], lr=lr,
                        momentum=beta, normalize=True, norm_beta=nb, norm_eps=0.0)
    xs = [l.delta_weight().clone() for l in layers]
    moms = [None] * len(xs)
    sq = [[0.0, 0.0] for _ in xs]
    for step in range(1, 4):
        b = batch(step)
        grads = dense_gradients(model, layers, b)
        opt.zero_grad()
        loss_fn(model, b).backward()
        opt.step()
        for i, (layer, g) in enumerate(zip(layers, grads)):
            x = xs[i]
            u, s, vh = torch.linalg.svd(x, full_matrices=False)
            a, br = u[:, :layer.rank], vh[:layer.rank].mT
            proj = lambda z: manifold.project_dense(a, br, z)
            xi = proj(g) if moms[i] is None else beta * proj(moms[i]) + (1 - beta) * proj(g)
            moms[i] = xi
            # Split into the two tangent components to normalise each separately.
            ad_part = xi - a @ (a.mT @ xi)
            bd_part = xi - ad_part
            for j, part in enumerate((ad_part, bd_part)):
                sq[i][j] = nb * sq[i][j] + (1 - nb) * float(part.square().sum())
            ra = (sq[i][0] / (1 - nb ** step)) ** 0.5
            rb = (sq[i][1] / (1 - nb ** step)) ** 0.5
            xs[i] = truncated(x - lr * (ad_part / ra + bd_part / rb), layer.rank)
            assert torch.allclose(layer.delta_weight(), xs[i], atol=1e-10), (step, i)


def test_step_is_gauge_invariant():
    """The same X written with another basis (A O, B O) gives the same trajectory."""
    model, layers = make_model()
    give_point(layers)
    twin = copy.deepcopy(model)
    g = torch.Generator().manual_seed(5)
    for layer in rk.rlora_layers(twin):
        o = torch.linalg.qr(torch.randn(layer.rank, layer.rank, generator=g, dtype=F64))[0]
        layer.lora_A.copy_(layer.lora_A @ o)
        layer.lora_B.data.copy_(layer.lora_B @ o)
        o2 = torch.linalg.qr(torch.randn(layer.rank, layer.rank, generator=g, dtype=F64))[0]
        layer.lora_BR.copy_(layer.lora_BR @ o2)
    opts = [rk.create_rlora_optimizer(m, lr=0.05, weight_decay=0.01) for m in (model, twin)]
    for step in range(3):
        for m, opt in zip((model, twin), opts):
            opt.zero_grad()
            loss_fn(m, batch(step)).backward()
            opt.step()
    for a, b in zip(rk.rlora_layers(model), rk.rlora_layers(twin)):
        assert torch.allclose(a.delta_weight(), b.delta_weight(), atol=1e-10)


def test_start_from_b_zero_reaches_rank_r_without_nan():
    model, layers = make_model(dtype=torch.float32)
    opt = rk.create_rlora_optimizer(model, lr=0.1)
    loss_fn(model, batch(0, dtype=torch.float32)).backward()
    opt.step()
    for layer in layers:
        assert torch.isfinite(layer.lora_B).all()
        s = torch.linalg.svdvals(layer.delta_weight())
        assert (s[:layer.rank] > 1e-4).all()
        eye = torch.eye(layer.rank)
        assert (layer.lora_A.mT @ layer.lora_A - eye).abs().max() < 1e-5


def test_bucket_parameters_are_views_updated_in_place():
    model, layers = make_model(dims=(23, 37, 37, 37))
    twins = [l for l in layers if l.shape == (37, 37)]
    assert len(twins) == 2
    for name in ("lora_B", "lora_Z1", "lora_A", "lora_BR"):
        a, b = (getattr(l, name) for l in twins)
        assert a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr(), name
        assert b.storage_offset() == a.storage_offset() + a.numel(), name
    ptrs = [l.lora_B.untyped_storage().data_ptr() for l in layers]
    before = [l.lora_B.detach().clone() for l in layers]
    opt = rk.create_rlora_optimizer(model, lr=0.1)
    loss_fn(model, batch(0)).backward()
    opt.step()
    assert [l.lora_B.untyped_storage().data_ptr() for l in layers] == ptrs
    assert all(not torch.equal(l.lora_B, b0) for l, b0 in zip(layers, before))


def test_nonfinite_gradient_skips_step_and_keeps_everything():
    model, layers = make_model()
    opt = rk.create_rlora_optimizer(model, lr=0.1)
    loss_fn(model, batch(0)).backward()
    opt.step()
    before = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    opt.zero_grad()
    loss_fn(model, batch(1)).backward()
    layers[1].lora_B.grad[0, 0] = float("nan")
    opt.step()
    assert opt.skipped_steps == 1
    after = model.state_dict(), opt.state_dict()
    for k, v in before[0].items():
        assert torch.equal(v, after[0][k]), k
    for pid, st in before[1]["state"].items():
        for k, v in st.items():
            assert torch.equal(v, after[1]["state"][pid][k])
    assert opt.step(lambda: torch.tensor(float("inf"))) is not None
    assert opt.skipped_steps == 2


def _train(model, opt, steps, start=0):
    dtype = model[5].weight.dtype
    for step in range(start, start + steps):
        opt.zero_grad()
        loss_fn(model, batch(step, dtype=dtype)).backward()
        opt.step()


@pytest.mark.parametrize("cls", ["riemannion", "riemann_sgd"])
def test_state_dict_round_trip_resumes_bit_for_bit(cls):
    model, _ = make_model(dtype=torch.float32)
    opt = rk.create_rlora_optimizer(model, cls, lr=0.05, other_lr=1e-2)
    _train(model, opt, 2)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    _train(model, opt, 3, start=2)
    buf.seek(0)
    saved = torch.load(buf)
    resumed, _ = make_model(seed=7, dtype=torch.float32)
    resumed.load_state_dict(saved["model"])
    opt2 = rk.create_rlora_optimizer(resumed, cls, lr=0.05, other_lr=1e-2)
    opt2.load_state_dict(saved["opt"])
    _train(resumed, opt2, 3, start=2)
    for k, v in model.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k


def test_loading_state_of_another_model_is_a_clear_error():
    model, _ = make_model()
    opt = rk.create_rlora_optimizer(model, lr=0.05)
    _train(model, opt, 1)
    other, _ = make_model(dims=(23, 41, 29, 37))
    opt2 = rk.create_rlora_optimizer(other, lr=0.05)
    with pytest.raises(ValueError, match="other layers or shapes"):
        opt2.load_state_dict(opt.state_dict())


def test_scheduler_drives_lr_and_param_group_errors():
    model, layers = make_model()
    opt = rk.create_rlora_optimizer(model, lr=0.1, other_lr=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    _train(model, opt, 1)
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)
    assert opt.param_groups[1]["lr"] == pytest.approx(0.005)
    with pytest.raises(ValueError, match="mixes"):
        rk.Riemannion([layers[0].lora_B, layers[0].lora_Z1, model[5].weight], lr=0.1)
    with pytest.raises(ValueError, match="same parameter group"):
        rk.Riemannion([layers[0].lora_B], lr=0.1)
    with pytest.raises(ValueError, match="momentum_stores"):
        rk.Riemannion(model, lr=0.1, momentum_stores="both")
    with pytest.raises(ValueError, match="lr"):
        rk.Riemannion(model, lr=float("nan"))


def test_inject_errors_name_layers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.Linear(6, 4))
    with pytest.raises(ValueError, match="too large for layer '1'.*\\(4, 6\\)"):
        rk.inject(model, ["0", "1"], rank=3)
    with pytest.raises(ValueError, match="available names: 0, 1"):
        rk.inject(model, ["q_proj"], rank=1)


def test_conv1d_layers_are_adapted():
    transformers = pytest.importorskip("transformers")
    conv = transformers.pytorch_utils.Conv1D(12, 9).double()
    torch.nn.init.normal_(conv.weight)
    model = nn.Sequential(conv)
    x = torch.randn(5, 9, dtype=F64)
    ref = model(x)
    (layer,) = rk.inject(model, ["0"], rank=2)
    give_point([layer])
    expected = ref + x @ layer.delta_weight().mT
    assert torch.allclose(model(x), expected, atol=1e-12)


def test_backward_and_step_never_form_an_m_by_n_tensor(monkeypatch):
    model, layers = make_model(dims=(23, 37, 29, 41))
    forbidden = {s for l in layers for s in (l.shape, l.shape[::-1])}
    opt = rk.create_rlora_optimizer(model, lr=0.05)
    loss = loss_fn(model, batch(0))
    with record_shapes(monkeypatch) as seen:
        loss.backward()
        opt.step()
    shapes = {s[-2:] for s in seen}
    assert (16, 37) in shapes and (37, 6) in shapes, "the spy missed the backends' ops"
    assert not forbidden & shapes, forbidden & shapes
