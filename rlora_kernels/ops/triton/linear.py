"""The low-rank adapted linear y = x W^T + b + (x V) U^T and its backward, in Triton.

Forward: T = x V (tokens x k, the `panel` kernel), then one GEMM whose accumulator also
takes T U^T and the bias before the single store. Backward: dy U and x V (tokens x k), then
dx = dy W + (dy U) V^T by the same GEMM, dU = dy^T (x V) with db = sum(dy) fused in, and
dV = x^T (dy U); dW = dy^T x only when asked. No m x n temporary unless dW is wanted.
"""

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, native_dot, pow2
from .panel import panel, tn

__all__ = ["lowrank_linear_fwd_lp", "lowrank_linear_bwd_lp"]


@triton.jit
def _linear_kernel(
    # pointers
    x_ptr, w_ptr, t_ptr, u_ptr, b_ptr, y_ptr,
    # sizes
    M, N, K, R,
    # strides
    stride_xm, stride_xk,
    stride_wn, stride_wk,
    stride_tm, stride_tr,
    stride_un, stride_ur,
    stride_ym, stride_yn,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
    NATIVE_DOT: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    """Y = X W^T + T U^T (+ b), accumulated in fp32 and stored once.

    x [M, K], w [N, K], t [M, R] (fp32), u [N, R], b [N] -> y [M, N]. Any strides, so
    dx = dy W + (dy U) V^T is the same kernel with w = W^T and u = V.
    Grid: (row blocks * column blocks,), row blocks grouped by GROUP_M for L2 reuse.
    """
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_size = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_size
    pid_n = (pid % per_group) // group_size

    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    in_rows = rows < M
    in_cols = cols < N
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + offs_k
        x = tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :] * stride_xk,
                    mask=in_rows[:, None] & (ks[None, :] < K), other=0.0)
        wt = tl.load(w_ptr + ks[:, None] * stride_wk + cols[None, :] * stride_wn,
                     mask=(ks[:, None] < K) & in_cols[None, :], other=0.0)
        if NATIVE_DOT:
            acc = tl.dot(x, wt, acc)
        else:
            acc = tl.dot(x.to(tl.float32), wt.to(tl.float32), acc, input_precision="ieee")
    # Adapter epilogue: T U^T into the same accumulator (k is small next to K).
    offs_r = tl.arange(0, BLOCK_R)
    for r0 in range(0, R, BLOCK_R):
        rs = r0 + offs_r
        t = tl.load(t_ptr + rows[:, None] * stride_tm + rs[None, :] * stride_tr,
                    mask=in_rows[:, None] & (rs[None, :] < R), other=0.0)
        ut = tl.load(u_ptr + rs[:, None] * stride_ur + cols[None, :] * stride_un,
                     mask=(rs[:, None] < R) & in_cols[None, :], other=0.0)
        if NATIVE_DOT:
            acc = tl.dot(t, ut, acc)
        else:
            acc = tl.dot(t.to(tl.float32), ut.to(tl.float32), acc, input_precision="ieee")
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=in_cols, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rows[:, None] * stride_ym + cols[None, :] * stride_yn,
             acc.to(y_ptr.dtype.element_ty), mask=in_rows[:, None] & in_cols[None, :])


def linear_config(native: bool, r: int) -> dict:
    """Tiles of `_linear_kernel`: tensor-core tiles for 16-bit inputs, FMA tiles for fp32."""
    if INTERPRET:
        cfg = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=1)
    elif native:
        cfg = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3)
    else:
        cfg = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=3)
    return dict(cfg, BLOCK_R=pow2(r, hi=64), GROUP_M=8)


def _linear(x, w, t, u, bias, out_dtype, w_is_kn=False):
    """x [M, K] @ w[N, K]^T + t [M, R] @ u [N, R]^T (+ bias [N]) -> [M, N] in out_dtype.

    w_is_kn: w is given as [K, N] (W^T without making the transposed view).
    """
    m, k = x.shape
    r = t.shape[1]
    n = w.shape[1] if w_is_kn else w.shape[0]
    stride_wn, stride_wk = w.stride()[::-1] if w_is_kn else w.stride()
    y = torch.empty(m, n, device=x.device, dtype=out_dtype)
    if m == 0 or n == 0:
        return y
    native = native_dot(x, w, t, u)
    cfg = linear_config(native, r)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
    _linear_kernel[grid](
        x, w, t, u, bias if bias is not None else y, y,
        m, n, k, r,
        x.stride(0), x.stride(1), stride_wn, stride_wk, t.stride(0), t.stride(1),
        u.stride(0), u.stride(1), y.stride(0), y.stride(1),
        NATIVE_DOT=native, HAS_BIAS=bias is not None, **cfg,
    )
    return y


def _mid_dtype(*tensors) -> torch.dtype:
    """dtype of the tokens x k products x V and dy U.

    On a GPU with 16-bit inputs they are rounded to the input dtype, as the reference does,
    so every later product stays on the tensor cores; elsewhere (fp32 inputs, and the
    interpreter, whose bf16 is unreliable) they stay in fp32.
    """
    return tensors[0].dtype if native_dot(*tensors) else torch.float32


def lowrank_linear_fwd_lp(x, weight, bias, u, v):
    """y = x W^T + b + (x V) U^T for x [..., n], W [m, n], b [m] or None, U [m, k], V [n, k]."""
    # Limitation: x is read twice, once for x V and once by the GEMM. Computing x V inside
    # the GEMM would redo it for every column block (k / BLOCK_N more FLOPs), which pays
    # only when m fits in a few column blocks; not measured on a GPU yet.
    n, m = x.shape[-1], weight.shape[0]
    x2 = x.reshape(-1, n)
    t = panel(x2[None], v[None], out_dtype=_mid_dtype(x, weight, u, v))[0]
    return _linear(x2, weight, t, u, bias, x.dtype).reshape(*x.shape[:-1], m)


def lowrank_linear_bwd_lp(dy, x, weight, u, v, need_dx=True, need_dw=False):
    """(dx, dW, db, dU, dV) of the forward above, in the input dtype; dW only if need_dw."""
    n, m = x.shape[-1], weight.shape[0]
    x2 = x.reshape(-1, n)
    dy2 = dy.reshape(-1, m)
    mid = _mid_dtype(dy, x, weight, u, v)
    dyu = panel(dy2[None], u[None], out_dtype=mid)[0]
    xv = panel(x2[None], v[None], out_dtype=mid)[0]
    du, db = tn(dy2[None], xv[None], out_dtype=dy.dtype, colsum=True)
    dv = tn(x2[None], dyu[None], out_dtype=x.dtype)[0]
    dx = None
    if need_dx:
        dx = _linear(dy2, weight, dyu, v, None, x.dtype, w_is_kn=True).reshape(x.shape)
    dw = tn(dy2[None], x2[None], out_dtype=weight.dtype)[0] if need_dw else None
    return dx, dw, db[0], du[0], dv
