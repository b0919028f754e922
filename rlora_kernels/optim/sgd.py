"""RiemannSGD: Riemannian SGD / heavy ball with EMA momentum and the optional scalar
normalisation that imitates Adam's scale-freeness, retracted onto the rank-r manifold."""

from .. import manifold
from ._base import RiemannianOptimizer, finite_float, new_state, stacked_state

__all__ = ["RiemannSGD"]


class RiemannSGD(RiemannianOptimizer):
    """Riemannian SGD with heavy-ball momentum on the rank-r manifold.

    Args:
        lr: step size. momentum: EMA coefficient beta (with dampening 1 - beta).
        weight_decay: decoupled decay acting on X.
        normalize: divide Ad and Bd by running RMS estimates of their Frobenius norms
            (bias-corrected EMA with coefficient `norm_beta`), per layer.
    """

    def __init__(self, params, lr=1e-2, momentum=0.9, weight_decay=0.0, normalize=False,
                 norm_beta=0.999, norm_eps=1e-8, betas=(0.9, 0.999), eps=1e-8):
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
        if not 0.0 <= norm_beta < 1.0:
            raise ValueError(f"norm_beta must be in [0, 1), got {norm_beta!r}")
        defaults = dict(lr=finite_float("lr", lr), momentum=momentum,
                        weight_decay=finite_float("weight_decay", weight_decay),
                        normalize=bool(normalize), norm_beta=norm_beta,
                        norm_eps=finite_float("norm_eps", norm_eps), betas=betas, eps=eps)
        super().__init__(params, defaults)

    def _step_bucket(self, group, bucket, states):
        cd, a_l, b, b_r = self._compute(bucket)
        ad, bd = self._gradient(bucket, cd, a_l)
        beta = group["momentum"]
        if beta > 0:
            moved = self._transported_momentum(states, cd, a_l, b_r)
            if moved is not None:
                ad, bd = beta * moved[0] + (1 - beta) * ad, beta * moved[1] + (1 - beta) * bd
            self._store_momentum(states, bucket.b.dtype, a_l, b_r, ad, bd)
        step = self._advance_step(states)
        if group["normalize"]:
            ad, bd = self._normalise(group, states, ad, bd, step)
        new_a, new_b, new_br = manifold.retract(a_l, b, b_r, ad, bd, group["lr"],
                                                group["weight_decay"])
        bucket.write_point(new_a, new_b, new_br)

    @staticmethod
    def _normalise(group, states, ad, bd, step):
        nb = group["norm_beta"]
        scaled = []
        for key, d in (("norm_A", ad), ("norm_B", bd)):
            sq = d.square().sum(dim=(-2, -1)).float()
            old = stacked_state(states, key)
            avg = sq * (1 - nb) if old is None else old * nb + sq * (1 - nb)
            new_state(states, key, avg)
            rms = (avg / (1 - nb ** step)).sqrt().to(d.device, d.dtype)
            scaled.append(d / (rms + group["norm_eps"])[:, None, None])
        return scaled
