"""Pure-PyTorch oracle for the fixed-rank manifold ops (thin QR, projection, retraction,
orthogonalisation). Works on any device and in float64; every fast backend is tested
against these functions. All tensors carry a leading layer dimension L."""

import torch

__all__ = ["compute_dtype", "thin_qr", "project_lr", "retract_lr", "ortho_lr"]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """QR and SVD run in float32 at least: torch has no half-precision factorisations."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def thin_qr(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Householder thin QR of a [L, m, k] batch with m >= k and diag(R) >= 0.

    The sign convention makes Q unique for full-rank panels, so every backend and every
    data-parallel rank returns the same factors.
    """
    cd = compute_dtype(a.dtype)
    q, r = torch.linalg.qr(a.to(cd), mode="reduced")
    sign = torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    q = q * sign.unsqueeze(-2)
    r = r * sign.unsqueeze(-1)
    return q.to(a.dtype), r.to(a.dtype)


def project_lr(a_l, b_r, p, q):
    """Tangent projection of the thin matrix P Q^T at the point with bases (A_L, B_R).

    Ad = (P - A_L (A_L^T P)) (Q^T B_R),  Bd = Q (P^T A_L); cost O((m + n) r k).
    """
    cd = compute_dtype(p.dtype)
    a_l, b_r, p, q = (t.to(cd) for t in (a_l, b_r, p, q))
    atp = a_l.mT @ p
    ad = (p - a_l @ atp) @ (q.mT @ b_r)
    bd = q @ atp.mT
    return ad, bd


def _core_svd(left, right):
    """QR both factors of L R^T and take the SVD of the small core T_L T_R^T."""
    q_l, t_l = thin_qr(left)
    q_r, t_r = thin_qr(right)
    u, s, vh = torch.linalg.svd(t_l @ t_r.mT)
    return q_l, u, s, q_r, vh.mT


def retract_lr(left, right, rank: int):
    """SVD_r(L R^T) for L [L, m, k], R [L, n, k]; returns (A_L, B, B_R).

    A_L and B_R have orthonormal columns and B = B_R diag(s), so X = A_L B^T.
    """
    cd = compute_dtype(left.dtype)
    q_l, u, s, q_r, v = _core_svd(left.to(cd), right.to(cd))
    a_l = q_l @ u[..., :rank]
    b_r = q_r @ v[..., :rank]
    return a_l, b_r * s[..., None, :rank], b_r


def ortho_lr(ad, bd, a_l, b_r, eps: float):
    """Polar factor of the tangent vector [Ad, A_L][B_R, Bd]^T as P Q^T (both 2r wide).

    Singular values below eps * s_max become 0 instead of 1, so a rank-deficient tangent
    (first step from B = 0, a zero gradient) never turns rounding noise into a direction.
    """
    cd = compute_dtype(ad.dtype)
    left = torch.cat([ad, a_l], dim=-1).to(cd)
    right = torch.cat([b_r, bd], dim=-1).to(cd)
    q_l, u, s, q_r, v = _core_svd(left, right)
    keep = s > eps * s[..., :1]
    return (q_l @ u) * keep.unsqueeze(-2).to(cd), q_r @ v
