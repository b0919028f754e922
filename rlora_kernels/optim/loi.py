"""LOI, the locally optimal initialisation: BackPropRSVD of every adapted layer's gradient at
once, with each product G Omega / G^T Y taken from one ordinary backward on a fixed batch."""

import logging
import time
from collections import defaultdict

import torch

from .. import ops
from ..adapters.inject import rlora_layers
from ..adapters.layer import base_weight

log = logging.getLogger(__name__)

__all__ = ["loi_init", "backprop_products"]


def backprop_products(model, layers, loss_fn, batch, sketches, side):
    """G @ S (side="right", S [n, k]) or G^T @ S (side="left", S [m, k]) for every layer,
    from one backward: the probe adapter [0, M] [N, 0]^T adds nothing to the forward."""
    probes = []
    for layer, s in zip(layers, sketches):
        m, n = layer.shape
        zero = torch.zeros(m if side == "right" else n, s.shape[-1], dtype=s.dtype,
                           device=s.device, requires_grad=True)
        u, v = (zero, s) if side == "right" else (s, zero)
        layer.set_probe(u, v)
        probes.append(zero)
    try:
        with torch.enable_grad():
            loss = loss_fn(model, batch)
            grads = torch.autograd.grad(loss, probes, allow_unused=True)
    finally:
        for layer in layers:
            layer.set_probe(None, None)
    if any(g is None for g in grads):
        unused = [l.layer_name for l, g in zip(layers, grads) if g is None]
        raise RuntimeError(f"loss_fn does not depend on adapted layers {unused[:5]}")
    return list(grads)


def _qr_q(blocks):
    """Orthonormal bases of a list of [rows, k] blocks, batched per shape."""
    out = [None] * len(blocks)
    groups = defaultdict(list)
    for i, b in enumerate(blocks):
        groups[tuple(b.shape)].append(i)
    for idx in groups.values():
        q = ops.thin_qr(torch.stack([blocks[i] for i in idx]))[0]
        for j, i in enumerate(idx):
            out[i] = q[j]
    return out


@torch.no_grad()
def loi_init(model, batch, loss_fn, *, alpha=None, oversample=16, power_iters=1, seed=0):
    """Move every freshly injected adapter to the locally optimal point X0.

    X0 = alpha U[:, :r] V[:, r:2r]^T from a randomised SVD of each layer's gradient G at the
    current weights, so the first Riemannian gradient is the best rank-2r approximation of
    G. The frozen weights are re-centred (W <- W - X0), so the model's outputs do not change.
    `loss_fn(model, batch)` returns the scalar loss; the model runs in eval mode so every
    product sees the same function. Returns a dict with timing and captured energy.
    """
    layers = rlora_layers(model)
    if not layers:
        raise ValueError("loi_init: the model has no RiemannLoRA layers; call inject first")
    for layer in layers:
        if layer.lora_B.abs().max() > 0:
            raise ValueError(f"loi_init expects freshly injected adapters (B = 0); layer "
                             f"{layer.layer_name!r} has already been trained or initialised")
    start = time.perf_counter()
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    dims = []
    for layer in layers:
        m, n = layer.shape
        k = min(2 * layer.rank + oversample, m, n)
        dims.append(k)
    cd = torch.float64 if layers[0].lora_B.dtype == torch.float64 else torch.float32
    omega = [torch.randn(l.shape[1], k, generator=gen, dtype=cd).to(l.lora_B.device)
             for l, k in zip(layers, dims)]
    try:
        run = lambda sk, side: backprop_products(model, layers, loss_fn, batch, sk, side)
        y = _qr_q(run(omega, "right"))
        for _ in range(power_iters):
            z = _qr_q(run(y, "left"))
            y = _qr_q(run(z, "right"))
        gty = run(y, "left")
    finally:
        model.train(was_training)
    captured = []
    for layer, y_l, c_t in zip(layers, y, gty):
        r = layer.rank
        u_c, s, vh = torch.linalg.svd(c_t.mT.to(cd), full_matrices=False)
        u = y_l.to(cd) @ u_c[:, :2 * r]
        v = vh[:2 * r].mT
        scale = alpha if alpha is not None else -0.01 / r ** 0.5
        a_l, b = u[:, :r], scale * v[:, r:2 * r]
        b_r = ops.thin_qr(b[None])[0][0]
        weight = base_weight(layer.base_layer)
        weight.sub_((a_l @ b.mT).to(weight.dtype))
        for name, value in (("lora_A", a_l), ("lora_B", b), ("lora_BR", b_r),
                            ("lora_offset_A", a_l), ("lora_offset_B", b)):
            getattr(layer, name).data.copy_(value)
        total = s.square().sum()
        captured.append(float(s[:2 * r].square().sum() / total) if total > 0 else 0.0)
    seconds = time.perf_counter() - start
    log.info("LOI: %d layers in %.2f s, %d backward passes", len(layers), seconds,
             2 * (power_iters + 1))
    return {"seconds": seconds, "layers": len(layers), "backward_passes": 2 * (power_iters + 1),
            "captured_energy": captured}
