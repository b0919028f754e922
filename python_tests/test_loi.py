"""LOI: BackPropRSVD products, the theorem on the first gradient, and unchanged outputs."""

import pytest
import torch
from torch import nn

import rlora_kernels as rk
from rlora_kernels import manifold
from rlora_kernels.optim.loi import backprop_products

from test_optim import batch, dense_gradients, loss_fn, make_model

F64 = torch.float64


def test_backprop_products_equal_dense_products():
    model, layers = make_model()
    b = batch(0)
    grads = dense_gradients(model, layers, b)
    g = torch.Generator().manual_seed(3)
    right = [torch.randn(l.shape[1], 5, generator=g, dtype=F64) for l in layers]
    left = [torch.randn(l.shape[0], 4, generator=g, dtype=F64) for l in layers]
    for got, dense, s in zip(backprop_products(model, layers, loss_fn, b, right, "right"),
                             grads, right):
        assert torch.allclose(got, dense @ s, atol=1e-12)
    for got, dense, s in zip(backprop_products(model, layers, loss_fn, b, left, "left"),
                             grads, left):
        assert torch.allclose(got, dense.mT @ s, atol=1e-12)
    assert all(l._probe is None for l in layers)


def test_first_riemannian_gradient_is_best_rank_2r_approximation():
    # 16 tokens give gradients of rank <= 16 <= k = 2r + 16, so the sketch is exact and
    # the theorem holds to rounding; SVD_2r(G) still drops most of G's spectrum.
    model, layers = make_model()
    b = batch(0)
    out_before = model(b[0])
    grads_before = dense_gradients(model, layers, b)
    info = rk.loi_init(model, b, loss_fn, seed=4)
    assert info["backward_passes"] == 4
    assert torch.allclose(model(b[0]), out_before, atol=1e-12)
    grads_after = dense_gradients(model, layers, b)
    dropped = []
    for layer, g0, g in zip(layers, grads_before, grads_after):
        assert torch.allclose(g, g0, atol=1e-12)
        r = layer.rank
        u, s, vh = torch.linalg.svd(g, full_matrices=False)
        best = u[:, :2 * r] * s[:2 * r] @ vh[:2 * r]
        dropped.append(float((best - g).norm() / g.norm()))
        riem = manifold.project_dense(layer.lora_A, layer.lora_BR, g)
        assert (riem - best).norm() / best.norm() < 1e-8
        eye = torch.eye(r, dtype=F64)
        assert (layer.lora_A.mT @ layer.lora_A - eye).abs().max() < 1e-12
        assert torch.allclose(layer.lora_offset_A @ layer.lora_offset_B.mT,
                              layer.delta_weight(), atol=0)
    # The last layer feeds 4 classes (rank-4 gradient); the others must lose real energy.
    assert max(dropped) > 0.1, dropped


def test_loi_is_seeded_and_refuses_trained_adapters():
    results = []
    for _ in range(2):
        model, layers = make_model()
        rk.loi_init(model, batch(0), loss_fn, seed=11)
        results.append(torch.cat([l.lora_B.detach().flatten() for l in layers]))
    assert torch.equal(results[0], results[1])
    with pytest.raises(ValueError, match="freshly injected"):
        rk.loi_init(model, batch(0), loss_fn)
    with pytest.raises(ValueError, match="no RiemannLoRA layers"):
        rk.loi_init(nn.Linear(3, 3), batch(0), loss_fn)


def test_loi_then_riemannion_lowers_the_loss():
    model, _ = make_model(dtype=torch.float32)
    data = batch(0, tokens=64, dtype=torch.float32)
    rk.loi_init(model, data, loss_fn)
    opt = rk.create_rlora_optimizer(model, lr=0.05, other_lr=0.01)
    first = None
    for _ in range(30):
        opt.zero_grad()
        loss = loss_fn(model, data)
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
    assert loss.item() < 0.8 * first
