"""Batched tall-skinny products, the two kernels every other op of the backend is built from.

- `tn(x, y)`: C = X^T Y, contracting the long row dimension (Gram matrices, A_L^T P,
  dy^T (x V)); rows are split over programs and the partial sums added in a fixed order.
- `panel(x, s)`: C = X S (+ X2 S2), a tall panel times a small matrix (Q = A R^-1, Q_L U,
  the projection Ad = P M + A_L N, x V); one program owns whole rows, so it may run in place.

Both run over a leading layer dimension L in one launch and compute in fp32.
"""

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, MAX_PANEL, dims3, native_dot, parallel_slots, pow2


@triton.jit
def _tn_kernel(
    # pointers
    x_ptr, y_ptr, c_ptr, colsum_ptr, flag_ptr,
    # sizes
    ROWS, KX, KY, ROWS_PER_SPLIT,
    # strides
    stride_xl, stride_xm, stride_xk,
    stride_yl, stride_ym, stride_yk,
    stride_cs, stride_cl, stride_ci, stride_cj,
    stride_ss, stride_sl,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
    NATIVE_DOT: tl.constexpr, HAS_COLSUM: tl.constexpr, HAS_FLAG: tl.constexpr,
):
    """C[s, l] = X[l, rows_s]^T Y[l, rows_s] over the rows of split s.

    x [L, ROWS, KX], y [L, ROWS, KY] -> c [S, L, KX, KY] (fp32 partials, or the output
    itself when S = 1); colsum [S, L, KX] = column sums of X (the bias gradient).
    Grid: (tiles of C, L, S). With HAS_FLAG, layers whose flag is 0 are skipped and their
    block of C is left unwritten.
    """
    pid_t = tl.program_id(0)
    pid_l = tl.program_id(1)
    pid_s = tl.program_id(2)
    tiles_j = tl.cdiv(KY, BLOCK_J)
    pid_i = pid_t // tiles_j
    pid_j = pid_t % tiles_j
    active = 1
    if HAS_FLAG:
        active = tl.load(flag_ptr + pid_l)
    if active != 0:
        offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
        offs_j = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
        offs_m = tl.arange(0, BLOCK_M)
        x_base = x_ptr + pid_l.to(tl.int64) * stride_xl
        y_base = y_ptr + pid_l.to(tl.int64) * stride_yl
        row_lo = pid_s * ROWS_PER_SPLIT
        row_hi = tl.minimum(row_lo + ROWS_PER_SPLIT, ROWS)
        acc = tl.zeros((BLOCK_I, BLOCK_J), dtype=tl.float32)
        csum = tl.zeros((BLOCK_I,), dtype=tl.float32)
        for m0 in range(row_lo, row_hi, BLOCK_M):
            rows = (m0 + offs_m).to(tl.int64)
            in_rows = rows < row_hi
            # X^T tile [BLOCK_I, BLOCK_M] straight from X through its strides.
            xt = tl.load(x_base + offs_i[:, None] * stride_xk + rows[None, :] * stride_xm,
                         mask=(offs_i[:, None] < KX) & in_rows[None, :], other=0.0)
            y = tl.load(y_base + rows[:, None] * stride_ym + offs_j[None, :] * stride_yk,
                        mask=in_rows[:, None] & (offs_j[None, :] < KY), other=0.0)
            if NATIVE_DOT:
                acc = tl.dot(xt, y, acc)
            else:
                acc = tl.dot(xt.to(tl.float32), y.to(tl.float32), acc, input_precision="ieee")
            if HAS_COLSUM:
                csum += tl.sum(xt.to(tl.float32), axis=1)
        c_base = c_ptr + pid_s * stride_cs + pid_l * stride_cl
        tl.store(c_base + offs_i[:, None] * stride_ci + offs_j[None, :] * stride_cj,
                 acc.to(c_ptr.dtype.element_ty),
                 mask=(offs_i[:, None] < KX) & (offs_j[None, :] < KY))
        if HAS_COLSUM:
            s_base = colsum_ptr + pid_s * stride_ss + pid_l * stride_sl
            # Only the first column tile writes the sums (one limit, not a scalar mask).
            limit = tl.where(pid_j == 0, KX, 0)
            tl.store(s_base + offs_i, csum.to(colsum_ptr.dtype.element_ty), mask=offs_i < limit)


@triton.jit
def _panel_kernel(
    # pointers
    x_ptr, s_ptr, x2_ptr, s2_ptr, c_ptr, scale_ptr, c2_ptr, flag_ptr,
    # sizes
    M, N, K, K2,
    # strides
    stride_xl, stride_xm, stride_xk,
    stride_sl, stride_sk, stride_sn,
    stride_x2l, stride_x2m, stride_x2k,
    stride_s2l, stride_s2k, stride_s2n,
    stride_cl, stride_cm, stride_cn,
    stride_scl, stride_scn,
    stride_c2l, stride_c2m, stride_c2n,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    NATIVE_DOT: tl.constexpr, HAS_X2: tl.constexpr, HAS_SCALE: tl.constexpr,
    HAS_FLAG: tl.constexpr, IN_PLACE: tl.constexpr,
):
    """C[l] = X[l] S[l] (+ X2[l] S2[l]); with HAS_SCALE also C2[l] = C[l] diag(scale[l]).

    x [L, M, K], s [L, K, N], x2 [L, M, K2], s2 [L, K2, N], scale [L, N] -> c, c2 [L, M, N].
    Grid: (row blocks, column blocks, L). IN_PLACE (c is x) needs one column block; every
    program then reads all of its rows before any of its threads writes them back. With
    HAS_FLAG, layers whose flag is 0 are skipped and keep what c holds.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_l = tl.program_id(2).to(tl.int64)
    active = 1
    if HAS_FLAG:
        active = tl.load(flag_ptr + pid_l)
    if active != 0:
        rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        in_rows = rows < M
        in_cols = offs_n < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        x_base = x_ptr + pid_l * stride_xl + rows[:, None] * stride_xm
        s_base = s_ptr + pid_l * stride_sl + offs_n[None, :] * stride_sn
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + offs_k
            x = tl.load(x_base + ks[None, :] * stride_xk,
                        mask=in_rows[:, None] & (ks[None, :] < K), other=0.0)
            s = tl.load(s_base + ks[:, None] * stride_sk,
                        mask=(ks[:, None] < K) & in_cols[None, :], other=0.0)
            if NATIVE_DOT:
                acc = tl.dot(x, s, acc)
            else:
                acc = tl.dot(x.to(tl.float32), s.to(tl.float32), acc, input_precision="ieee")
        if HAS_X2:
            x2_base = x2_ptr + pid_l * stride_x2l + rows[:, None] * stride_x2m
            s2_base = s2_ptr + pid_l * stride_s2l + offs_n[None, :] * stride_s2n
            for k0 in range(0, K2, BLOCK_K):
                ks = k0 + offs_k
                x2 = tl.load(x2_base + ks[None, :] * stride_x2k,
                             mask=in_rows[:, None] & (ks[None, :] < K2), other=0.0)
                s2 = tl.load(s2_base + ks[:, None] * stride_s2k,
                             mask=(ks[:, None] < K2) & in_cols[None, :], other=0.0)
                if NATIVE_DOT:
                    acc = tl.dot(x2, s2, acc)
                else:
                    acc = tl.dot(x2.to(tl.float32), s2.to(tl.float32), acc,
                                 input_precision="ieee")
        if IN_PLACE:
            tl.debug_barrier()  # every warp has read its rows of x before any is overwritten
        mask = in_rows[:, None] & in_cols[None, :]
        c_offs = pid_l * stride_cl + rows[:, None] * stride_cm + offs_n[None, :] * stride_cn
        tl.store(c_ptr + c_offs, acc.to(c_ptr.dtype.element_ty), mask=mask)
        if HAS_SCALE:
            scale = tl.load(scale_ptr + pid_l * stride_scl + offs_n * stride_scn,
                            mask=in_cols, other=0.0).to(tl.float32)
            c2_offs = (pid_l * stride_c2l + rows[:, None] * stride_c2m
                       + offs_n[None, :] * stride_c2n)
            tl.store(c2_ptr + c2_offs, (acc * scale[None, :]).to(c2_ptr.dtype.element_ty),
                     mask=mask)


# ------------------------------------------------------------------------------ launchers
# NOTE: register use from ptxas (sm_90, Triton 3.9, compiled here without a GPU): the fp32
# tn tile 64 x 64 x 64 needs 255 registers and spills with 4 warps, 152 with 8; the fp32
# panel tile 64 x 64 reaches 255 with 4 warps. Hence 8 warps wherever fp32 tiles are wide.
def tn_config(kx: int, ky: int, native: bool) -> dict:
    """Tile sizes and warps of `_tn_kernel` for a kx x ky result."""
    return dict(BLOCK_M=64, BLOCK_I=pow2(kx, hi=64), BLOCK_J=pow2(ky, hi=64),
                num_warps=4 if native or INTERPRET else 8)


def panel_config(n: int) -> dict:
    """Tile sizes and warps of `_panel_kernel` for an n-wide result (one tile up to 256)."""
    block_n = pow2(n, hi=MAX_PANEL)
    return dict(BLOCK_M=64 if (INTERPRET or block_n <= 64) else 32, BLOCK_N=block_n,
                BLOCK_K=64 if INTERPRET else (32 if block_n <= 128 else 16),
                num_warps=4 if block_n <= 32 else 8)


def _flag_arg(flag: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return like if flag is None else flag.to(torch.int32)


def tn(x: torch.Tensor, y: torch.Tensor, *, out_dtype: torch.dtype = torch.float32,
       colsum: bool = False, flag: torch.Tensor | None = None):
    """X^T Y per layer for x [L, rows, kx], y [L, rows, ky] -> [L, kx, ky] in out_dtype.

    colsum=True also returns the column sums of X, [L, kx]. flag [L] (bool) skips layers
    whose flag is false; their block of the result is unspecified.
    """
    L, rows, kx = x.shape
    ky = y.shape[-1]
    dev = x.device
    out = torch.empty(L, kx, ky, device=dev, dtype=out_dtype)
    sums = torch.empty(L, kx, device=dev, dtype=out_dtype) if colsum else None
    if L == 0 or kx == 0 or ky == 0:
        return (out, sums) if colsum else out
    native = native_dot(x, y)
    cfg = tn_config(kx, ky, native)
    block_m, block_i, block_j = cfg["BLOCK_M"], cfg["BLOCK_I"], cfg["BLOCK_J"]
    tiles = triton.cdiv(kx, block_i) * triton.cdiv(ky, block_j)
    # Split the rows when the tiles alone leave the device idle (a Gram per layer is one
    # tile); partial sums are added by torch in a fixed order, so results are deterministic.
    splits = max(1, min(triton.cdiv(parallel_slots(dev), tiles * L),
                        triton.cdiv(rows, 8 * block_m)))
    per_split = triton.cdiv(triton.cdiv(max(rows, 1), splits), block_m) * block_m
    splits = triton.cdiv(max(rows, 1), per_split)
    if splits == 1:
        ws, ws_sums = out.unsqueeze(0), (sums.unsqueeze(0) if colsum else None)
    else:
        ws = torch.empty(splits, L, kx, ky, device=dev, dtype=torch.float32)
        ws_sums = torch.empty(splits, L, kx, device=dev, dtype=torch.float32) if colsum else None
    sum_arg = ws_sums if colsum else ws
    grid = (tiles, L, splits)
    _tn_kernel[grid](
        x, y, ws, sum_arg, _flag_arg(flag, ws),
        rows, kx, ky, per_split,
        *dims3(x), *dims3(y),
        *ws.stride(),
        sum_arg.stride(0), sum_arg.stride(1),
        NATIVE_DOT=native, HAS_COLSUM=colsum, HAS_FLAG=flag is not None, **cfg,
    )
    if splits > 1:
        out.copy_(ws.sum(0))
        if colsum:
            sums.copy_(ws_sums.sum(0))
    return (out, sums) if colsum else out


def panel(x: torch.Tensor, s: torch.Tensor, *, x2: torch.Tensor | None = None,
          s2: torch.Tensor | None = None, scale: torch.Tensor | None = None,
          out: torch.Tensor | None = None, flag: torch.Tensor | None = None,
          out_dtype: torch.dtype = torch.float32):
    """X S (+ X2 S2) per layer: x [L, M, K], s [L, K, N] -> [L, M, N] in out_dtype.

    scale [L, N] also returns X S diag(scale). `out` may be x itself (in place, N <= 256).
    flag [L] (bool) skips layers whose flag is false, leaving `out` untouched there.
    """
    L, m, k = x.shape
    n = s.shape[-1]
    if out is None:
        out = torch.empty(L, m, n, device=x.device, dtype=out_dtype)
    out2 = torch.empty_like(out) if scale is not None else None
    in_place = out.data_ptr() == x.data_ptr()
    if in_place and (n > MAX_PANEL or out.stride() != x.stride() or n != k):
        raise ValueError("panel: in place needs out to be x itself with N = K <= 256")
    if L == 0 or m == 0 or n == 0:
        return (out, out2) if scale is not None else out
    cfg = panel_config(n)
    has_x2 = x2 is not None
    x2_, s2_ = (x2, s2) if has_x2 else (x, s)
    sc = scale if scale is not None else out[:, 0]
    o2 = out2 if scale is not None else out
    grid = (triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(n, cfg["BLOCK_N"]), L)
    _panel_kernel[grid](
        x, s, x2_, s2_, out, sc, o2, _flag_arg(flag, out),
        m, n, k, x2_.shape[-1],
        *dims3(x), *dims3(s), *dims3(x2_), *dims3(s2_), *dims3(out),
        sc.stride(0), sc.stride(1), *dims3(o2),
        NATIVE_DOT=native_dot(x, s, *((x2, s2) if has_x2 else ())),
        HAS_X2=has_x2, HAS_SCALE=scale is not None, HAS_FLAG=flag is not None,
        IN_PLACE=in_place, **cfg,
    )
    return (out, out2) if scale is not None else out
