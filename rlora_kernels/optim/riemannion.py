"""Riemannion: heavy-ball momentum, transported by re-projection, orthogonalised like Muon,
then retracted onto the rank-r manifold; one batched pass per bucket of equal-shape layers."""

from .. import manifold, ops
from ._base import RiemannianOptimizer, finite_float

__all__ = ["Riemannion"]

MOMENTUM_STORES = ("gradient", "direction")


class Riemannion(RiemannianOptimizer):
    """Muon-like optimizer on the manifold of rank-r matrices.

    Args:
        params: a model with RiemannLoRA layers, or parameter groups (see
            `adapter_param_groups`); groups without adapter factors take AdamW.
        lr: step size eta; X <- SVD_r(X - eta (D + weight_decay X)).
        momentum: heavy-ball beta (no dampening).
        weight_decay: decoupled weight decay acting on X (and AdamW's on other groups).
        momentum_stores: "gradient" accumulates raw Riemannian gradients (Muon's choice,
            the default); "direction" stores the orthogonalised direction instead, as the
            paper's printed listing does.
        orthogonalize: False gives plain Riemannian heavy ball (no polar factor).
        ortho_eps: relative cut-off below which singular values of the momentum are
            dropped rather than set to 1.
    """

    def __init__(self, params, lr=1e-3, momentum=0.9, weight_decay=0.0,
                 momentum_stores="gradient", orthogonalize=True,
                 ortho_eps=ops.DEFAULT_ORTHO_EPS, betas=(0.9, 0.999), eps=1e-8):
        if momentum_stores not in MOMENTUM_STORES:
            raise ValueError(f"momentum_stores must be one of {MOMENTUM_STORES}, "
                             f"got {momentum_stores!r}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
        defaults = dict(lr=finite_float("lr", lr), momentum=momentum,
                        weight_decay=finite_float("weight_decay", weight_decay),
                        momentum_stores=momentum_stores, orthogonalize=bool(orthogonalize),
                        ortho_eps=finite_float("ortho_eps", ortho_eps), betas=betas, eps=eps)
        super().__init__(params, defaults)

    def _step_bucket(self, group, bucket, states):
        cd, a_l, b, b_r = self._compute(bucket)
        ad_g, bd_g = self._gradient(bucket, cd, a_l)
        beta = group["momentum"]
        moved = self._transported_momentum(states, cd, a_l, b_r) if beta > 0 else None
        if moved is not None:
            ad_m, bd_m = beta * moved[0] + ad_g, beta * moved[1] + bd_g
        else:
            ad_m, bd_m = ad_g, bd_g
        if group["orthogonalize"]:
            ad_d, bd_d = manifold.orthogonalise(ad_m, bd_m, a_l, b_r, group["ortho_eps"])
        else:
            ad_d, bd_d = ad_m, bd_m
        new_a, new_b, new_br = manifold.retract(a_l, b, b_r, ad_d, bd_d, group["lr"],
                                                group["weight_decay"])
        if beta > 0:
            keep = (ad_m, bd_m) if group["momentum_stores"] == "gradient" else (ad_d, bd_d)
            self._store_momentum(states, bucket.b.dtype, a_l, b_r, *keep)
        self._advance_step(states)
        bucket.write_point(new_a, new_b, new_br)
