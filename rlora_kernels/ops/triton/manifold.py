"""Projection, retraction and orthogonalisation on the fixed-rank manifold, batched over L.

Every tall product is one launch of the kernels in `panel`; the 2r x 2r cores are tiny.
Inputs may be fp16, bf16 or fp32; everything is computed and returned in fp32, like the
reference backend.
"""

import torch

from .panel import panel, tn
from .qr import thin_qr_f32

__all__ = ["project_lr_f32", "retract_lr_f32", "ortho_lr_f32"]


def project_lr_f32(a_l, b_r, p, q):
    """Ad = (P - A_L (A_L^T P)) (Q^T B_R), Bd = Q (P^T A_L), without the m x k temporary.

    a_l [L, m, r], b_r [L, n, r], p [L, m, k], q [L, n, k] -> Ad [L, m, r], Bd [L, n, r].
    Written as Ad = P M + A_L N with M = Q^T B_R (k x r) and N = -(A_L^T P) M (r x r):
    two reductions over the tall rows, one tiny product, two panel products.
    """
    atp = tn(a_l, p)                      # [L, r, k]
    m_small = tn(q, b_r)                  # [L, k, r]
    n_small = panel(atp, m_small).neg_()  # [L, r, r]
    ad = panel(p, m_small, x2=a_l, s2=n_small)
    bd = panel(q, atp.mT)
    return ad, bd


def _core_svd(left, right):
    """QR both factors of L R^T, then the SVD of the small core T_L T_R^T.

    The SVD goes through torch.linalg.svd: there is no batched small-SVD kernel here yet,
    and the core is 2r x 2r, so its cost is O(L r^3) against the O(L (m + n) r^2) of the
    panels. torch.linalg.svd checks convergence on the host: the one sync of these ops.
    """
    q_l, t_l = thin_qr_f32(left)
    q_r, t_r = thin_qr_f32(right)
    u, s, vh = torch.linalg.svd(panel(t_l, t_r.mT))
    return q_l, u, s, q_r, vh.mT


def retract_lr_f32(left, right, rank: int):
    """SVD_rank(L R^T) as (A_L, B, B_R), B = B_R diag(s); left [L,m,k], right [L,n,k]."""
    q_l, u, s, q_r, v = _core_svd(left, right)
    a_l = panel(q_l, u[..., :rank])
    b_r, b = panel(q_r, v[..., :rank], scale=s[..., :rank])
    return a_l, b, b_r


def ortho_lr_f32(ad, bd, a_l, b_r, eps: float):
    """Polar factor P Q^T of [Ad, A_L] [B_R, Bd]^T; singular values < eps s_max give 0 in P.

    ad, a_l [L, m, r], bd, b_r [L, n, r] -> P [L, m, 2r], Q [L, n, 2r].
    """
    # Limitation: the concatenations copy two m x 2r / n x 2r panels; the QR kernels could
    # read the two halves in place instead (about a quarter of this op's memory traffic).
    left = torch.cat([ad, a_l], dim=-1)
    right = torch.cat([b_r, bd], dim=-1)
    q_l, u, s, q_r, v = _core_svd(left, right)
    keep = (s > eps * s[..., :1]).to(u.dtype)
    return panel(q_l, u * keep.unsqueeze(-2)), panel(q_r, v)
