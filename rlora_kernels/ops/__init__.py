"""The rlora ops: batched fixed-rank manifold primitives and the low-rank adapted linear.

These wrappers check shapes and dtypes, then call the registered torch ops
(`torch.ops.rlora.*`), which dispatch to the fastest backend for the tensors' device.
"""

import torch
from torch import Tensor

from . import _library
from ._dispatch import BACKENDS, backend_available, get_backend, set_backend, use_backend

__all__ = ["thin_qr", "project_lr", "retract_lr", "ortho_lr", "lowrank_linear",
           "set_backend", "get_backend", "use_backend", "backend_available", "BACKENDS",
           "DEFAULT_ORTHO_EPS"]

# Relative cut-off of ortho_lr's mask. The core SVD in float32 leaves spurious singular
# values near 1e-7 * s_max; 1e-4 keeps a wide margin above them and below real directions.
DEFAULT_ORTHO_EPS = 1e-4

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check(name: str, **tensors: Tensor) -> None:
    first = next(iter(tensors.values()))
    for arg, t in tensors.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: {arg} must be a tensor, got {type(t).__name__}")
        if t.dim() != 3:
            raise ValueError(f"{name}: {arg} must be [L, rows, cols], got {tuple(t.shape)}")
        if t.dtype not in _FLOATS:
            raise TypeError(f"{name}: {arg} has dtype {t.dtype}; expected a floating dtype")
        if t.device != first.device or t.dtype != first.dtype:
            raise ValueError(f"{name}: all inputs must share device and dtype; {arg} is "
                             f"{t.dtype} on {t.device}, not {first.dtype} on {first.device}")
        if t.shape[0] != first.shape[0]:
            raise ValueError(f"{name}: layer dimension mismatch, {arg} has L={t.shape[0]}")


def _same_rows(name: str, a: str, ta: Tensor, b: str, tb: Tensor) -> None:
    if ta.shape[-2] != tb.shape[-2]:
        raise ValueError(f"{name}: {a} {tuple(ta.shape)} and {b} {tuple(tb.shape)} must have "
                         "the same number of rows")


def thin_qr(a: Tensor) -> tuple[Tensor, Tensor]:
    """Thin QR of tall panels a [L, m, k] (m >= k): Q [L, m, k], R [L, k, k], diag(R) >= 0."""
    _check("thin_qr", a=a)
    if a.shape[-2] < a.shape[-1]:
        raise ValueError(f"thin_qr: panels must be tall (m >= k), got {tuple(a.shape)}")
    return torch.ops.rlora.thin_qr(a)


def project_lr(a_l: Tensor, b_r: Tensor, p: Tensor, q: Tensor) -> tuple[Tensor, Tensor]:
    """Tangent components (Ad, Bd) of P Q^T at the point with bases A_L [L,m,r], B_R [L,n,r]."""
    _check("project_lr", a_l=a_l, b_r=b_r, p=p, q=q)
    _same_rows("project_lr", "a_l", a_l, "p", p)
    _same_rows("project_lr", "b_r", b_r, "q", q)
    if a_l.shape[-1] != b_r.shape[-1] or p.shape[-1] != q.shape[-1]:
        raise ValueError("project_lr: a_l/b_r and p/q must have matching column counts, got "
                         f"{tuple(a_l.shape)}, {tuple(b_r.shape)}, {tuple(p.shape)}, "
                         f"{tuple(q.shape)}")
    return torch.ops.rlora.project_lr(a_l, b_r, p, q)


def retract_lr(left: Tensor, right: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """Best rank-`rank` approximation of left @ right^T as (A_L, B, B_R), B = B_R diag(s)."""
    _check("retract_lr", left=left, right=right)
    k = left.shape[-1]
    if right.shape[-1] != k:
        raise ValueError(f"retract_lr: left {tuple(left.shape)} and right "
                         f"{tuple(right.shape)} must have the same width")
    if not 1 <= rank <= k or k > min(left.shape[-2], right.shape[-2]):
        raise ValueError(f"retract_lr: need 1 <= rank <= width <= min(m, n); got rank={rank}, "
                         f"left {tuple(left.shape)}, right {tuple(right.shape)}")
    return torch.ops.rlora.retract_lr(left, right, int(rank))


def ortho_lr(ad: Tensor, bd: Tensor, a_l: Tensor, b_r: Tensor,
             eps: float = DEFAULT_ORTHO_EPS) -> tuple[Tensor, Tensor]:
    """Orthogonalised tangent direction: P [L,m,2r], Q [L,n,2r] with unit singular values."""
    _check("ortho_lr", ad=ad, bd=bd, a_l=a_l, b_r=b_r)
    if ad.shape != a_l.shape or bd.shape != b_r.shape:
        raise ValueError(f"ortho_lr: ad {tuple(ad.shape)} must match a_l {tuple(a_l.shape)} "
                         f"and bd {tuple(bd.shape)} must match b_r {tuple(b_r.shape)}")
    if 2 * ad.shape[-1] > min(ad.shape[-2], bd.shape[-2]):
        raise ValueError(f"ortho_lr: 2r must not exceed min(m, n), got {tuple(ad.shape)}, "
                         f"{tuple(bd.shape)}")
    if not eps >= 0:
        raise ValueError(f"ortho_lr: eps must be >= 0, got {eps}")
    return torch.ops.rlora.ortho_lr(ad, bd, a_l, b_r, float(eps))


def lowrank_linear(x: Tensor, weight: Tensor, bias: Tensor | None, u: Tensor,
                   v: Tensor) -> Tensor:
    """y = x W^T + b + (x V) U^T; its backward gives dU = G V, dV = G^T U, never G itself.

    x [..., n], weight [m, n], bias [m] or None, u [m, k], v [n, k]. The weight gradient
    (m x n) is only computed when weight.requires_grad.
    """
    m, n = weight.shape
    if x.shape[-1] != n or u.shape[0] != m or v.shape[0] != n or u.shape[1] != v.shape[1]:
        raise ValueError(f"lowrank_linear: shapes do not chain: x {tuple(x.shape)}, weight "
                         f"{tuple(weight.shape)}, u {tuple(u.shape)}, v {tuple(v.shape)}")
    if bias is not None and bias.shape != (m,):
        raise ValueError(f"lowrank_linear: bias must have shape ({m},), got {tuple(bias.shape)}")
    return torch.ops.rlora.lowrank_linear(x, weight, bias, u, v)
