"""Compiled backend (rlora_kernels._C, ops rlora_C::*) against the float64 reference.

Tolerances come from the data: the compiled result in a dtype may be off the float64
oracle by at most a few times the reference's own error in that dtype, plus a floor of a
few unit roundoffs. The fallback tests run whether or not the extension is built.
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from rlora_kernels import ops
from rlora_kernels.ops import compiled
from rlora_kernels.ops import reference as ref

BUILT = compiled.available("cpu", "cpu")
needs_ext = pytest.mark.skipif(not BUILT, reason="rlora_kernels._C is not built")

DTYPES = (torch.float32, torch.float64)
SHAPES = [(m, r) for m in (37, 100, 129) for r in (1, 3, 5)]
N_OTHER = 61  # the other side of the layer (n), deliberately not m


def _eps(dtype):
    return torch.finfo(dtype).eps


def _randn(*shape, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, dtype=torch.float64, generator=gen).to(dtype)


def _orth(*shape, dtype, seed):
    return ref.thin_qr(_randn(*shape, dtype=torch.float64, seed=seed))[0].to(dtype)


def _err(x, y):
    return ((x.double() - y.double()).norm() / y.double().norm().clamp_min(1e-300)).item()


def _assert_near_oracle(got, ref32, oracle, dtype, what, slack=4.0):
    """got may be off the float64 oracle by `slack` times the float32 reference's own error
    (ref32), scaled by eps(dtype) / eps(float32), and never by less than 50 eps: the
    compiled maths rounds differently but must not be less accurate. Measured ratio
    compiled / reference error: 0.47-2.1 over the shapes below."""
    scale = _eps(dtype) / _eps(torch.float32)
    bound = slack * _err(ref32, oracle) * scale + 50 * _eps(dtype)
    assert _err(got, oracle) <= bound, f"{what}: {_err(got, oracle):.2e} > {bound:.2e}"


def _check_qr(a, q, r):
    k, dt = a.shape[-1], a.dtype
    tol = 100 * _eps(dt)
    eye = torch.eye(k, dtype=torch.float64)
    assert (q.double().mT @ q.double() - eye).abs().max() <= tol, "Q^T Q != I"
    assert _err(q.double() @ r.double(), a) <= tol, "A != QR"
    assert torch.all(torch.diagonal(r, dim1=-2, dim2=-1) >= 0), "diag(R) < 0"
    assert torch.equal(r, r.triu()), "R is not upper triangular"


# ----------------------------------------------------------------------------- thin_qr
@needs_ext
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,r", SHAPES)
def test_thin_qr_matches_reference(dtype, m, r):
    for k in sorted({r, 2 * r}):
        a64 = _randn(3, m, k, dtype=torch.float64, seed=m * 10 + k)
        a = a64.to(dtype)
        q, rr, path = compiled.thin_qr_ex(a)
        assert set(path.tolist()) <= {2, 3}, "well-conditioned panels need no Householder"
        _check_qr(a, q, rr)
        q64, r64 = ref.thin_qr(a64)
        q_lo, r_lo = ref.thin_qr(a64.float())
        _assert_near_oracle(q, q_lo, q64, dtype, "Q")
        _assert_near_oracle(rr, r_lo, r64, dtype, "R")


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES)
def test_thin_qr_scaled_and_ill_conditioned_panels(dtype):
    # The retraction's panel [-lr * Ad, A_L], and panels with cond up to ~1e4 (float32).
    gen_cond = 1e4 if dtype == torch.float32 else 1e10
    u = _orth(4, 129, 10, dtype=torch.float64, seed=1)
    v = _orth(4, 10, 10, dtype=torch.float64, seed=2)
    s = torch.logspace(0, -torch.log10(torch.tensor(gen_cond)).item(), 10, dtype=torch.float64)
    ill = (u * s) @ v.mT
    scaled = torch.cat([-1e-4 * _randn(4, 129, 5, dtype=torch.float64, seed=3),
                        _orth(4, 129, 5, dtype=torch.float64, seed=4)], -1)
    for a64 in (ill, scaled):
        a = a64.to(dtype)
        q, r, path = compiled.thin_qr_ex(a)
        _check_qr(a, q, r)
        q_lo, r_lo = ref.thin_qr(a64.float())
        _assert_near_oracle(q @ r, q_lo @ r_lo, a64, dtype, "QR")


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES)
def test_thin_qr_rank_deficient_falls_back_to_householder(dtype):
    a = _randn(4, 37, 6, dtype=dtype, seed=5)
    a[1, :, 2] = 0                 # zero column: no Cholesky at all
    a[2, :, 4] = 3 * a[2, :, 1]    # dependent columns
    a[3] = 0                       # a zero panel (B = 0 on the first step)
    q, r, path = compiled.thin_qr_ex(a)
    assert path.tolist() == [2, -1, -1, -1]
    _check_qr(a[:3], q[:3], r[:3])
    q_ref, r_ref = ref.thin_qr(a)
    torch.testing.assert_close(q[1], q_ref[1], rtol=0, atol=0)  # the reference's own path
    torch.testing.assert_close(r[3], r_ref[3], rtol=0, atol=0)


@needs_ext
def test_thin_qr_householder_method_is_the_reference():
    a = _randn(5, 100, 6, dtype=torch.float32, seed=6)
    q, r, path = compiled.thin_qr_ex(a, compiled.QR_HOUSEHOLDER)
    assert path.tolist() == [-1] * 5
    q_ref, r_ref = ref.thin_qr(a)
    torch.testing.assert_close(q, q_ref, rtol=0, atol=0)
    torch.testing.assert_close(r, r_ref, rtol=0, atol=0)


@needs_ext
def test_thin_qr_is_deterministic_and_handles_edges():
    a = _randn(7, 129, 10, dtype=torch.float32, seed=7)
    assert all(torch.equal(x, y) for x, y in zip(compiled.thin_qr(a), compiled.thin_qr(a)))
    q, r = compiled.thin_qr(torch.empty(0, 5, 3))
    assert q.shape == (0, 5, 3) and r.shape == (0, 3, 3)
    sq = _randn(2, 6, 6, dtype=torch.float64, seed=8)  # square panels
    _check_qr(sq, *compiled.thin_qr(sq))
    with pytest.raises(RuntimeError, match="tall"):
        torch.ops.rlora_C.thin_qr(torch.randn(2, 3, 5))
    with pytest.raises(RuntimeError, match="float32 or float64"):
        torch.ops.rlora_C.thin_qr(torch.ones(2, 5, 3, dtype=torch.int32))


# -------------------------------------------------------------------- the other ops
def _point(m, n, r, dtype, seed):
    return _orth(3, m, r, dtype=dtype, seed=seed), _orth(3, N_OTHER, r, dtype=dtype,
                                                         seed=seed + 1)


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,r", SHAPES)
def test_project_lr_matches_reference(dtype, m, r):
    a_l, b_r = _point(m, N_OTHER, r, torch.float64, seed=m + r)
    p = _randn(3, m, 2 * r, dtype=torch.float64, seed=11)
    q = _randn(3, N_OTHER, 2 * r, dtype=torch.float64, seed=12)
    oracle = ref.project_lr(a_l, b_r, p, q)
    low = [t.to(dtype) for t in (a_l, b_r, p, q)]
    f32 = [t.float() for t in (a_l, b_r, p, q)]
    for got, lo, want in zip(compiled.project_lr(*low), ref.project_lr(*f32), oracle):
        assert got.dtype == dtype
        _assert_near_oracle(got, lo, want, dtype, "project_lr")


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,r", SHAPES)
def test_retract_lr_matches_reference(dtype, m, r):
    left = _randn(3, m, 2 * r, dtype=torch.float64, seed=m * r)
    right = _randn(3, N_OTHER, 2 * r, dtype=torch.float64, seed=m * r + 1)
    a64, b64, br64 = ref.retract_lr(left, right, r)
    a_lo, b_lo, _ = ref.retract_lr(left.float(), right.float(), r)
    a_l, b, b_r = compiled.retract_lr(left.to(dtype), right.to(dtype), r)
    # The factors carry SVD signs; the point X = A_L B^T and B = B_R diag(s) do not.
    _assert_near_oracle(a_l @ b.mT, a_lo @ b_lo.mT, a64 @ b64.mT, dtype, "X")
    eye = torch.eye(r, dtype=torch.float64)
    tol = 100 * _eps(dtype)
    assert (a_l.double().mT @ a_l.double() - eye).abs().max() <= tol
    assert (b_r.double().mT @ b_r.double() - eye).abs().max() <= tol
    s = b.norm(dim=-2)
    torch.testing.assert_close(b, b_r * s.unsqueeze(-2), rtol=0, atol=tol * s.max().item())
    _assert_near_oracle(s, b_lo.norm(dim=-2), b64.norm(dim=-2), dtype, "singular values")


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,r", SHAPES)
def test_ortho_lr_matches_reference(dtype, m, r):
    if 2 * r > min(m, N_OTHER):
        pytest.skip("2r > min(m, n)")
    a_l, b_r = _point(m, N_OTHER, r, torch.float64, seed=3 * m + r)
    ad = _randn(3, m, r, dtype=torch.float64, seed=21)
    ad = ad - a_l @ (a_l.mT @ ad)  # a tangent vector: A_L^T Ad = 0
    bd = _randn(3, N_OTHER, r, dtype=torch.float64, seed=22)
    bd[1] = 0  # a rank-deficient tangent: the eps mask must zero the spurious directions
    args = (ad, bd, a_l, b_r)
    eps = ops.DEFAULT_ORTHO_EPS
    p64, q64 = ref.ortho_lr(*args, eps)
    p_lo, q_lo = ref.ortho_lr(*(t.float() for t in args), eps)
    p, q = compiled.ortho_lr(*(t.to(dtype) for t in args), eps)
    _assert_near_oracle(p @ q.mT, p_lo @ q_lo.mT, p64 @ q64.mT, dtype, "P Q^T")
    kept = (p.norm(dim=-2) > 0.5).sum(-1)
    assert torch.equal(kept, (p64.norm(dim=-2) > 0.5).sum(-1))


# ------------------------------------------------------------- dispatch and op checks
@needs_ext
def test_public_ops_use_the_compiled_backend():
    a = _randn(3, 100, 6, dtype=torch.float64, seed=30)
    with ops.use_backend("cpu"):
        q, r = ops.thin_qr(a)
    q_c, r_c = compiled.thin_qr(a)
    assert torch.equal(q, q_c) and torch.equal(r, r_c)
    half = a.to(torch.bfloat16)  # half types compute in float32 and come back as they came
    with ops.use_backend("cpu"):
        q, r = ops.thin_qr(half)
    assert q.dtype == torch.bfloat16 and r.dtype == torch.bfloat16


@needs_ext
def test_cpu_dispatch_takes_only_the_ops_that_beat_the_reference():
    from rlora_kernels.ops import _dispatch, reference
    assert _dispatch.resolve("thin_qr", "cpu") is compiled.thin_qr
    assert _dispatch.resolve("project_lr", "cpu") is compiled.project_lr
    assert _dispatch.resolve("retract_lr", "cpu") is reference.retract_lr
    assert _dispatch.resolve("ortho_lr", "cpu") is reference.ortho_lr


@needs_ext
def test_results_do_not_depend_on_the_thread_count():
    # One thread runs each bucket in one piece; more threads split it into cache-sized
    # chunks of layers. Both must agree to rounding.
    left = _randn(9, 129, 10, dtype=torch.float64, seed=31)
    right = _randn(9, 100, 10, dtype=torch.float64, seed=32)
    a_l, b_r = _orth(9, 129, 5, dtype=torch.float64, seed=33), _orth(9, 100, 5,
                                                                    dtype=torch.float64, seed=34)
    calls = (lambda: compiled.thin_qr(left), lambda: compiled.retract_lr(left, right, 5),
             lambda: compiled.ortho_lr(left[..., :5], right[..., :5], a_l, b_r, 1e-4))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = [fn() for fn in calls]
    finally:
        torch.set_num_threads(threads)
    for one, many in zip(single, (fn() for fn in calls)):
        for x, y in zip(one, many):
            torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)


def _opcheck_cases():
    a_l, b_r = _point(37, N_OTHER, 3, torch.float32, seed=40)
    p = _randn(3, 37, 6, dtype=torch.float32, seed=41)
    q = _randn(3, N_OTHER, 6, dtype=torch.float32, seed=42)
    ad = _randn(3, 37, 3, dtype=torch.float32, seed=43)
    bd = _randn(3, N_OTHER, 3, dtype=torch.float32, seed=44)
    return {
        "thin_qr": (p,),
        "thin_qr_ex": (p, 0),
        "project_lr": (a_l, b_r, p, q),
        "retract_lr": (p, q, 3),
        "ortho_lr": (ad, bd, a_l, b_r, 1e-4),
    }


@needs_ext
@pytest.mark.parametrize("name", ["thin_qr", "thin_qr_ex", "project_lr", "retract_lr",
                                  "ortho_lr"])
def test_opcheck(name):
    op = getattr(torch.ops.rlora_C, name).default
    torch.library.opcheck(op, _opcheck_cases()[name])


# ------------------------------------------------------------------- CUDA kernels (GPU)
@pytest.mark.gpu
@pytest.mark.skipif(not compiled.available("cuda", "cuda"),
                    reason="needs a CUDA build of rlora_kernels._C and a GPU")
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_kernels_match_reference(dtype):
    # CholeskyQR2 + fallback flags and the fused projection (csrc/cuda), then the shared
    # retraction / orthogonalisation cores on top of them.
    a64 = _randn(5, 129, 10, dtype=torch.float64, seed=50)
    a64[3, :, 4] = 0  # a layer for the Householder fallback
    q, r, path = compiled.thin_qr_ex(a64.to(dtype).cuda())
    assert path.tolist() == [2, 2, 2, -1, 2]
    _check_qr(a64.to(dtype), q.cpu(), r.cpu())
    a_l, b_r = _point(100, N_OTHER, 5, torch.float64, seed=51)
    p = _randn(3, 100, 10, dtype=torch.float64, seed=52)
    q_ = _randn(3, N_OTHER, 10, dtype=torch.float64, seed=53)
    f32 = [t.float() for t in (a_l, b_r, p, q_)]
    got = compiled.project_lr(*(t.to(dtype).cuda() for t in (a_l, b_r, p, q_)))
    for x, lo, want in zip(got, ref.project_lr(*f32), ref.project_lr(a_l, b_r, p, q_)):
        _assert_near_oracle(x.cpu(), lo, want, dtype, "project_lr (cuda)")
    a_c, b_c, _ = compiled.retract_lr(p.to(dtype).cuda(), q_.to(dtype).cuda(), 5)
    a64_, b64_, _ = ref.retract_lr(p, q_, 5)
    a_lo, b_lo, _ = ref.retract_lr(p.float(), q_.float(), 5)
    _assert_near_oracle((a_c @ b_c.mT).cpu(), a_lo @ b_lo.mT, a64_ @ b64_.mT, dtype, "X (cuda)")


# ----------------------------------------------------------------- missing or stale build
def _run_python(code):
    env = dict(os.environ, RLORA_BACKEND="auto")
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


def test_missing_extension_never_breaks_import():
    out = _run_python("""
        import logging, sys
        logging.basicConfig(level=logging.WARNING)
        sys.modules["rlora_kernels._C"] = None  # what an unbuilt install looks like
        import torch
        import rlora_kernels
        from rlora_kernels import ops
        a = torch.randn(2, 9, 4)
        q, r = ops.thin_qr(a)              # auto: the reference serves CPU tensors
        ops.thin_qr(a)
        assert not ops.backend_available("cpu", "cpu")
        try:
            with ops.use_backend("cpu"):
                ops.thin_qr(a)
        except RuntimeError as exc:
            print("FORCED:", exc)
        else:
            raise SystemExit("forcing the unbuilt cpu backend must raise")
    """)
    assert "FORCED: rlora backend 'cpu' cannot run on cpu tensors" in out
    assert out.count("rlora_kernels._C is not available") == 1, out


def test_stale_extension_is_refused():
    out = _run_python("""
        import logging, sys, types
        logging.basicConfig(level=logging.WARNING)
        sys.modules["rlora_kernels._C"] = types.SimpleNamespace(
            torch_version="0.0.1", abi_version=1, with_cuda=0)
        from rlora_kernels.ops import compiled
        assert not compiled.available("cpu", "cpu")
        assert compiled.build_info()["built"] is False
    """)
    assert "built for torch 0.0.1" in out
