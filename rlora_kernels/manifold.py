"""Geometry of the manifold of rank-r matrices, written with the batched rlora ops.

A point is X = A_L B^T with orthonormal A_L (and B_R, an orthonormal basis of B's columns);
a tangent vector is the pair (Ad, Bd) meaning Ad B_R^T + A_L Bd^T with A_L^T Ad = 0.
Every function works on a whole bucket: tensors carry a leading layer dimension.
"""

import torch

from . import ops

__all__ = ["riemannian_gradient", "transport", "orthogonalise", "retract", "tangent_dense",
           "project_dense"]


def riemannian_gradient(a_l, g_a, g_b):
    """Tangent components of the gradient G from g_a = G B_R and g_b = G^T A_L."""
    return g_a - a_l @ (a_l.mT @ g_a), g_b


def transport(a_l, b_r, mom_a, mom_b):
    """Vector transport by re-projection of the ambient momentum mom_a mom_b^T."""
    return ops.project_lr(a_l, b_r, mom_a, mom_b)


def orthogonalise(ad, bd, a_l, b_r, eps=ops.DEFAULT_ORTHO_EPS):
    """Muon-like direction: the polar factor of the tangent vector, re-projected."""
    p, q = ops.ortho_lr(ad, bd, a_l, b_r, eps)
    return ops.project_lr(a_l, b_r, p, q)


def retract(a_l, b, b_r, ad, bd, lr, weight_decay=0.0):
    """SVD_r(X - lr (xi + weight_decay X)) for xi = (Ad, Bd); returns (A_L, B, B_R).

    X - lr (xi + wd X) = [-lr Ad, A_L] [B_R, (1 - lr wd) B - lr Bd]^T, a rank-2r product.
    """
    left = torch.cat([-lr * ad, a_l], dim=-1)
    right = torch.cat([b_r, (1.0 - lr * weight_decay) * b - lr * bd], dim=-1)
    return ops.retract_lr(left, right, a_l.shape[-1])


def tangent_dense(a_l, b_r, ad, bd):
    """Dense m x n form of a tangent vector (tests and small problems only)."""
    return ad @ b_r.mT + a_l @ bd.mT


def project_dense(a_l, b_r, z):
    """Dense projection P_X(Z) = A A^T Z + (I - A A^T) Z B_R B_R^T (tests only)."""
    az = a_l @ (a_l.mT @ z)
    return az + (z - az) @ b_r @ b_r.mT
