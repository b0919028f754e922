"""Pure-PyTorch oracle for the low-rank adapted linear y = x W^T + b + (x V) U^T.

The backward returns the adapter gradients dU = G V and dV = G^T U, where G = dy^T x is the
m x n weight gradient, without ever forming G: every product goes through the thin factors.
"""

import torch

__all__ = ["lowrank_linear_fwd", "lowrank_linear_bwd"]


def lowrank_linear_fwd(x, weight, bias, u, v):
    """x [..., n], weight [m, n], bias [m] or None, u [m, k], v [n, k] -> y [..., m]."""
    y = x @ weight.mT
    if bias is not None:
        y = y + bias
    return y + (x @ v) @ u.mT


def lowrank_linear_bwd(dy, x, weight, u, v, need_dx=True, need_dw=False):
    """Gradients (dx, dW, db, dU, dV) of lowrank_linear_fwd; dW only when asked for.

    dU = dy^T (x V) = G V and dV = x^T (dy U) = G^T U: tokens are contracted against the
    thin factors first, so the largest temporary is tokens x k.
    """
    x2 = x.reshape(-1, x.shape[-1])
    dy2 = dy.reshape(-1, dy.shape[-1])
    dyu = dy2 @ u
    du = dy2.mT @ (x2 @ v)
    dv = x2.mT @ dyu
    dx = None
    if need_dx:
        dx = (dy2 @ weight + dyu @ v.mT).reshape(x.shape)
    dw = dy2.mT @ x2 if need_dw else None
    db = dy2.sum(0)
    return dx, dw, db, du, dv
