"""Batched thin QR of tall panels: CholeskyQR2, shifted CholeskyQR3 for ill-conditioned
panels, and a Gram-Schmidt fallback for (numerically) rank-deficient ones.

The tall work (Gram matrices, Q = A R^-1) runs in the Triton kernels of `panel`; only the
k x k Cholesky factors and their inverses go through torch.linalg (in float64, a few
microseconds of O(L k^3) work). Every decision is a per-layer flag on the device, so
nothing waits for the host: passes a layer does not need are skipped inside the kernels.
"""

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, MAX_PANEL, pow2
from .panel import panel, tn

__all__ = ["thin_qr_f32"]

U32 = 2.0**-24
# Plain CholeskyQR2 is used while the column-scaled panel A D^-1 (unit columns) has
# ||R^-1||_F <= KAPPA; that bounds 1/sigma_min from above (and is free: R^-1 is needed
# anyway), so misjudging errs towards the safe, shifted path. CholeskyQR2 itself holds up
# to a condition number of about u^-1/2 = 4e3.
# NOTE: measured with fp32 Grams and fp64 Cholesky on random panels (m 129..4096, k 16..256,
# singular values geometric): plain CholeskyQR2 broke down at cond 1e4..3e4.
KAPPA = 1e3
# Shift of the unit-diagonal Gram in shifted CholeskyQR. It must cover the fp32 rounding of
# the Gram (~sqrt(m) u) yet stay small enough for two CholeskyQR passes to finish the job.
# NOTE: same panels (torch's fp32 matmul standing in for the Gram kernel), column norms
# spread over 1e3 as well: 30 u worked up to cond 1e7 for m up to 14336 and k up to 256
# (orthogonality <= 2.5e-6, residual <= 1e-6); 10 u let the shifted Cholesky fail at
# m = 129, 300 u let the following passes fail at cond 1e7.
SHIFT = 30 * U32
# One CholeskyQR pass of a panel Y leaves ||Q^T Q - I|| ~ u / (1 - delta) when
# delta = ||Y^T Y - I||_F < 1. The last pass of each layer must start from delta <= ACCEPT,
# else the layer is redone by Gram-Schmidt.
ACCEPT = 0.5
# A Gram-Schmidt column is kept when the second projection leaves at least half its norm
# ("twice is enough"); otherwise it lay in the span of the previous columns.
KEEP = 0.25  # on squared norms


# --------------------------------------------------------------------- Gram-Schmidt fallback
@triton.jit
def _src(v_base, stride_vm, rows, M, seed, SOURCE: tl.constexpr):
    """Rows of the vector being orthogonalised: loaded (SOURCE 0), the unit vector e_seed
    (1), or a pseudo-random vector (2). Both completions are deterministic, the same on
    every rank and device; e_j first, as Householder QR gives e_j for a zero panel."""
    if SOURCE == 0:
        v = tl.load(v_base + rows * stride_vm, mask=rows < M, other=0.0).to(tl.float32)
    elif SOURCE == 1:
        v = tl.where(rows == seed, 1.0, 0.0)
    else:
        v = tl.where(rows < M, tl.rand(seed, rows.to(tl.int32)) - 0.5, 0.0)
    return v


@triton.jit
def _coef(q_base, stride_qm, stride_qk, v_base, stride_vm, j, M, seed,
          SOURCE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """c = Q[:, :j]^T v (zero past j) for the source vector v."""
    offs_k = tl.arange(0, BLOCK_K)
    c = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        rows = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)
        v = _src(v_base, stride_vm, rows, M, seed, SOURCE)
        q = tl.load(q_base + rows[:, None] * stride_qm + offs_k[None, :] * stride_qk,
                    mask=(rows[:, None] < M) & (offs_k[None, :] < j), other=0.0)
        c += tl.sum(q * v[:, None], axis=0)
    return c


@triton.jit
def _subtract(q_base, stride_qm, stride_qk, v_base, stride_vm, w_base, c, j, M, seed,
              SOURCE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """w = v - Q[:, :j] c (w is a contiguous work vector); returns ||v||^2 and ||w||^2."""
    offs_k = tl.arange(0, BLOCK_K)
    nv = tl.zeros((BLOCK_M,), dtype=tl.float32)
    nw = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        rows = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)
        v = _src(v_base, stride_vm, rows, M, seed, SOURCE)
        q = tl.load(q_base + rows[:, None] * stride_qm + offs_k[None, :] * stride_qk,
                    mask=(rows[:, None] < M) & (offs_k[None, :] < j), other=0.0)
        w = v - tl.sum(q * c[None, :], axis=1)
        tl.store(w_base + rows, w, mask=rows < M)
        nv += v * v
        nw += w * w
    return tl.sum(nv, axis=0), tl.sum(nw, axis=0)


@triton.jit
def _twice(q_base, stride_qm, stride_qk, v_base, stride_vm, w0, w1, j, M, seed,
           SOURCE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Project the source vector off Q[:, :j] twice: w0 = v - Q c1, w1 = w0 - Q c2.

    Returns (c1 + c2, ||w0||^2, ||w1||^2); w1 holds the result. Each loop reads one
    buffer and writes another, and a barrier separates them.
    """
    c1 = _coef(q_base, stride_qm, stride_qk, v_base, stride_vm, j, M, seed, SOURCE,
               BLOCK_M, BLOCK_K)
    _, n1 = _subtract(q_base, stride_qm, stride_qk, v_base, stride_vm, w0, c1, j, M, seed,
                      SOURCE, BLOCK_M, BLOCK_K)
    tl.debug_barrier()
    c2 = _coef(q_base, stride_qm, stride_qk, w0, 1, j, M, seed, 0, BLOCK_M, BLOCK_K)
    _, n2 = _subtract(q_base, stride_qm, stride_qk, w0, 1, w1, c2, j, M, seed, 0,
                      BLOCK_M, BLOCK_K)
    tl.debug_barrier()
    return c1 + c2, n1, n2


@triton.jit
def _cgs2_kernel(
    # pointers
    a_ptr, q_ptr, r_ptr, work_ptr, flag_ptr,
    # sizes
    M, K,
    # strides
    stride_al, stride_am, stride_ak,
    stride_ql, stride_qm, stride_qk,
    stride_rl, stride_ri, stride_rj,
    stride_wl,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, KEEP_RATIO: tl.constexpr,
):
    """Column-by-column classical Gram-Schmidt, twice, of the layers whose flag is set.

    a [L, M, K] -> q [L, M, K] (fp32), r [L, K, K] (fp32, upper, diag >= 0). A column that
    lies in the span of the previous ones gets R_jj = 0 and a unit vector orthogonal to
    them, as Householder QR would. work [L, 2, M] fp32 holds the vectors in flight so no
    loop reads the buffer it writes. Grid: (L,), one program per layer.
    """
    pid_l = tl.program_id(0).to(tl.int64)
    if tl.load(flag_ptr + pid_l) != 0:
        a_base = a_ptr + pid_l * stride_al
        q_base = q_ptr + pid_l * stride_ql
        r_base = r_ptr + pid_l * stride_rl
        w0 = work_ptr + pid_l * stride_wl
        w1 = w0 + M
        offs_k = tl.arange(0, BLOCK_K)
        for j in range(0, K):
            a_col = a_base + j * stride_ak
            c1, n1, n2 = _twice(q_base, stride_qm, stride_qk, a_col, stride_am, w0, w1, j, M,
                                j, 0, BLOCK_M, BLOCK_K)
            r_col = c1
            reject = (n2 <= KEEP_RATIO * n1) | (n2 <= 0.0)
            r_jj = tl.where(reject, 0.0, tl.sqrt(n2))
            if reject:  # a_j lies in the span of the previous columns: complete the basis
                _, n1, n2 = _twice(q_base, stride_qm, stride_qk, w0, 1, w0, w1, j, M,
                                   j, 1, BLOCK_M, BLOCK_K)
                if n2 <= KEEP_RATIO * n1:  # so does e_j
                    _, n1, n2 = _twice(q_base, stride_qm, stride_qk, w0, 1, w0, w1, j, M,
                                       j + 1, 2, BLOCK_M, BLOCK_K)
            inv = 1.0 / tl.sqrt(tl.maximum(n2, 1e-30))
            for m0 in range(0, M, BLOCK_M):
                rows = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)
                w = tl.load(w1 + rows, mask=rows < M, other=0.0)
                tl.store(q_base + rows * stride_qm + j * stride_qk, w * inv, mask=rows < M)
            r_out = tl.where(offs_k < j, r_col, tl.where(offs_k == j, r_jj, 0.0))
            tl.store(r_base + offs_k * stride_ri + j * stride_rj, r_out, mask=offs_k < K)
            tl.debug_barrier()


# ------------------------------------------------------------------------------ launchers
def _chol_upper(g: torch.Tensor):
    """Upper Cholesky factor and per-layer info flag (0 = success); no host sync."""
    low, info = torch.linalg.cholesky_ex(g)
    return low.mT, info


def _inv_upper(r: torch.Tensor) -> torch.Tensor:
    eye = torch.eye(r.shape[-1], dtype=r.dtype, device=r.device).expand_as(r)
    return torch.linalg.solve_triangular(r, eye, upper=True)


def _distance(g: torch.Tensor, eye: torch.Tensor) -> torch.Tensor:
    """||G - I||_F per layer (NaN stays NaN, so `<=` tests reject it)."""
    return torch.linalg.matrix_norm(g - eye)


def cgs2_config(k: int) -> dict:
    """Tile of `_cgs2_kernel`: a [BLOCK_M, BLOCK_K] fp32 tile of Q per step.

    NOTE: ptxas (sm_90, 8 warps) spilled 368 bytes at 64 x 256 and used 80..153 registers,
    no spills, for BLOCK_M * BLOCK_K <= 8192.
    """
    block_k = pow2(k)
    return dict(BLOCK_M=64 if INTERPRET else min(256, max(16, 8192 // block_k)),
                BLOCK_K=block_k, num_warps=8)


def gram_schmidt(a: torch.Tensor, q: torch.Tensor, r: torch.Tensor, flag: torch.Tensor):
    """Overwrite q [L, m, k] and r [L, k, k] (fp32, contiguous) by CGS2 of the flagged layers.

    Unflagged layers cost one program that reads its flag and exits.
    """
    # Limitation: one program per flagged layer walks its k columns in turn, O(m k^2) work
    # on one SM. Right for the rare rank-deficient layer and for B = 0 at the start; a bucket
    # that is rank-deficient at every step would make thin_qr many times slower.
    L, m, k = a.shape
    work = torch.empty(L, 2, m, device=a.device, dtype=torch.float32)
    _cgs2_kernel[(L,)](
        a, q, r, work, flag.to(torch.int32),
        m, k,
        *a.stride(), *q.stride(), *r.stride(), work.stride(0), KEEP_RATIO=KEEP,
        **cgs2_config(k),
    )


def thin_qr_f32(a: torch.Tensor, with_paths: bool = False):
    """Thin QR of a [L, m, k] (fp16/bf16/fp32, m >= k, k <= 256): fp32 Q and R, diag(R) >= 0.

    1. G = A^T A (fp32, Triton), scaled to unit diagonal: G' = D^-1 G D^-1, D = diag(||a_j||).
       R1 = chol(G') D in fp64, or, for a layer with ||chol(G')^-1||_F > KAPPA (or a failed
       Cholesky), the shifted R1 = chol(G' + SHIFT I) D.
    2. Q1 = A R1^-1; one CholeskyQR pass Q = Q1 R2^-1 (CholeskyQR2), and one more for the
       shifted layers only (shifted CholeskyQR3); R = R3 R2 R1.
    3. A layer whose last pass started too far from orthonormal (rank-deficient panels), or
       whose Cholesky failed, is redone by Gram-Schmidt.

    with_paths=True also returns the per-layer flags (shifted, gram_schmidt) for tests.
    """
    L, m, k = a.shape
    if k > MAX_PANEL:
        raise ValueError(f"thin_qr_f32: k = {k} > {MAX_PANEL}; use the reference backend")
    eye = torch.eye(k, dtype=torch.float64, device=a.device)
    g = tn(a, a).double()
    d = torch.diagonal(g, dim1=-2, dim2=-1).sqrt()
    d = torch.where(d > 0, d, torch.ones_like(d))  # a zero column: the shift alone carries it
    g = g / d[..., :, None] / d[..., None, :]
    r_plain, info = _chol_upper(g)
    r_shift, info_shift = _chol_upper(g + SHIFT * eye)
    inv_plain, inv_shift = _inv_upper(torch.cat([r_plain, r_shift])).split(L)
    kappa = torch.linalg.matrix_norm(inv_plain)
    shifted = (info != 0) | ~(kappa <= KAPPA)
    pick = shifted[:, None, None]
    r = torch.where(pick, r_shift, r_plain) * d[..., None, :]
    q = panel(a, (torch.where(pick, inv_shift, inv_plain) / d[..., :, None]).float())
    g = tn(q, q).double()
    r2, info2 = _chol_upper(g)
    near = _distance(g, eye) <= ACCEPT
    panel(q, _inv_upper(r2).float(), out=q)
    r = r2 @ r
    # Third pass, shifted layers only: the kernels skip the others, whose factor is I.
    g = torch.where(pick, tn(q, q, flag=shifted).double(), eye)
    r3, info3 = _chol_upper(g)
    panel(q, _inv_upper(r3).float(), out=q, flag=shifted)
    r = torch.triu(r3 @ r).float()
    near_shifted = (_distance(g, eye) <= ACCEPT) & (info_shift == 0) & (info3 == 0)
    ok = (info2 == 0) & torch.where(shifted, near_shifted, near)
    bad = ~(ok & torch.isfinite(r).all(-1).all(-1))
    gram_schmidt(a, q, r, bad)
    return (q, r, shifted, bad) if with_paths else (q, r)
