"""The Riemannion step as a user would hand-write it: a Python loop over layers calling
torch.linalg once per layer (no buckets, no batching). The baseline of the optimizer-step
benchmark; `benchmarks/test_benchmarks.py` checks it takes the same step as the library.
"""

from __future__ import annotations

import torch


class NaiveRiemannion:
    """Riemannion (heavy ball, momentum of raw gradients, polar direction, retraction with
    decoupled weight decay) over RiemannLoRA layers, one layer at a time."""

    def __init__(self, layers, lr=1e-3, momentum=0.9, weight_decay=0.0, eps=1e-4):
        self.layers = list(layers)
        self.lr, self.beta, self.wd, self.eps = lr, momentum, weight_decay, eps
        self.state = [dict() for _ in self.layers]

    @torch.no_grad()
    def step(self):
        for layer, st in zip(self.layers, self.state):
            a, b, b_r = layer.lora_A, layer.lora_B, layer.lora_BR
            g_a, g_b = layer.lora_Z1.grad, layer.lora_B.grad
            # Riemannian gradient: the tangent part of G, from G B_R and G^T A_L.
            ad, bd = g_a - a @ (a.T @ g_a), g_b
            if "mom_a" in st:  # transport the old momentum by projecting it here
                pa, pb = _project(a, b_r, st["mom_a"], st["mom_b"])
                ad, bd = self.beta * pa + ad, self.beta * pb + bd
            # Polar factor of [Ad, A_L] [B_R, Bd]^T, re-projected onto the tangent space.
            q_l, t_l = torch.linalg.qr(torch.cat([ad, a], 1))
            q_r, t_r = torch.linalg.qr(torch.cat([b_r, bd], 1))
            u, s, vh = torch.linalg.svd(t_l @ t_r.T)
            keep = (s > self.eps * s[0]).to(u.dtype)
            dir_a, dir_b = _project(a, b_r, (q_l @ u) * keep, q_r @ vh.T)
            # Retraction: best rank-r approximation of X - lr (D + wd X).
            left = torch.cat([-self.lr * dir_a, a], 1)
            right = torch.cat([b_r, (1 - self.lr * self.wd) * b - self.lr * dir_b], 1)
            q_l, t_l = torch.linalg.qr(left)
            q_r, t_r = torch.linalg.qr(right)
            u, s, vh = torch.linalg.svd(t_l @ t_r.T)
            r = a.shape[1]
            st["mom_a"], st["mom_b"] = torch.cat([ad, a], 1), torch.cat([b_r, bd], 1)
            new_br = q_r @ vh[:r].T
            a.copy_(q_l @ u[:, :r])
            b_r.copy_(new_br)
            b.copy_(new_br * s[:r])


def _project(a, b_r, p, q):
    """Tangent components of P Q^T at the point with bases (A_L, B_R)."""
    atp = a.T @ p
    return (p - a @ atp) @ (q.T @ b_r), q @ atp.T
