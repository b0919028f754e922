"""Triton backend of the rlora ops: the functions of `ops.reference`, same names, signatures
and results, with the tall work in batched Triton kernels (one launch per product per bucket).

float64 inputs go to the reference: the hot path runs in 16/32 bits, and fp64 tl.dot is
slow or missing on most GPUs. So do panels wider than 256 columns (thin_qr with k > 256,
retraction and polar factor with r > 128), with one warning.
"""

import logging
import os

import torch
import triton  # noqa: F401  (ImportError here marks the backend unavailable)

from .. import reference
from ._common import INTERPRET, LOW_PRECISION, MAX_PANEL
from .linear import lowrank_linear_bwd_lp, lowrank_linear_fwd_lp
from .manifold import ortho_lr_f32, project_lr_f32, retract_lr_f32
from .qr import thin_qr_f32

__all__ = ["available", "thin_qr", "project_lr", "retract_lr", "ortho_lr",
           "lowrank_linear_fwd", "lowrank_linear_bwd"]

log = logging.getLogger(__name__)
_warned: set[str] = set()


def _too_wide(op: str, width: int) -> bool:
    """True (and one warning per op) when panels are wider than the kernels keep in registers."""
    if width <= MAX_PANEL:
        return False
    if op not in _warned:
        _warned.add(op)
        log.warning("rlora triton %s: panels %d wide exceed %d; using the reference backend",
                    op, width, MAX_PANEL)
    return True


def available(backend_name: str, device_type: str) -> bool:
    """CUDA tensors when a GPU is present; CPU tensors only under TRITON_INTERPRET=1.

    The kernels were built as interpreted or compiled when this module was imported, so
    CPU tensors also need TRITON_INTERPRET=1 to have been set by then.
    """
    if device_type == "cuda":
        return torch.cuda.is_available()
    if device_type == "cpu":
        return INTERPRET and os.environ.get("TRITON_INTERPRET") == "1"
    return False


def _fast(*tensors) -> bool:
    """True when the kernels take these tensors: one dtype among fp16, bf16, fp32."""
    dtype = tensors[0].dtype
    return dtype in LOW_PRECISION and all(t is None or t.dtype == dtype for t in tensors)


def thin_qr(a):
    """Q [L, m, k], R [L, k, k] of tall panels a, diag(R) >= 0, in a's dtype."""
    L, m, k = a.shape
    if not _fast(a) or m < k or 0 in a.shape or _too_wide("thin_qr", k):
        return reference.thin_qr(a)
    q, r = thin_qr_f32(a)
    return q.to(a.dtype), r.to(a.dtype)


def project_lr(a_l, b_r, p, q):
    """Tangent components (Ad, Bd) of P Q^T at the point with bases (A_L, B_R)."""
    if not _fast(a_l, b_r, p, q):
        return reference.project_lr(a_l, b_r, p, q)
    return project_lr_f32(a_l, b_r, p, q)


def retract_lr(left, right, rank: int):
    """SVD_rank(L R^T) as (A_L, B, B_R) with B = B_R diag(s)."""
    k = left.shape[-1]
    if (not _fast(left, right) or 0 in left.shape or 0 in right.shape
            or _too_wide("retract_lr", k)):
        return reference.retract_lr(left, right, rank)
    return retract_lr_f32(left, right, rank)


def ortho_lr(ad, bd, a_l, b_r, eps: float):
    """Polar factor (P, Q) of the tangent vector [Ad, A_L] [B_R, Bd]^T, eps-masked."""
    if (not _fast(ad, bd, a_l, b_r) or 0 in ad.shape or 0 in bd.shape
            or _too_wide("ortho_lr", 2 * ad.shape[-1])):
        return reference.ortho_lr(ad, bd, a_l, b_r, eps)
    return ortho_lr_f32(ad, bd, a_l, b_r, eps)


def lowrank_linear_fwd(x, weight, bias, u, v):
    """y = x W^T + b + (x V) U^T in x's dtype."""
    if not _fast(x, weight, bias, u, v):
        return reference.lowrank_linear_fwd(x, weight, bias, u, v)
    return lowrank_linear_fwd_lp(x, weight, bias, u, v)


def lowrank_linear_bwd(dy, x, weight, u, v, need_dx=True, need_dw=False):
    """(dx, dW, db, dU, dV) of lowrank_linear_fwd; dW only when need_dw."""
    if not _fast(dy, x, weight, u, v):
        return reference.lowrank_linear_bwd(dy, x, weight, u, v, need_dx, need_dw)
    return lowrank_linear_bwd_lp(dy, x, weight, u, v, need_dx, need_dw)
