"""Triton backend against the float64 reference: values, invariants, QR fallbacks, opcheck.

Interpreter tests run the kernels under TRITON_INTERPRET=1 on CPU (tiny shapes: ~2 ms per
tl.dot); on a CUDA machine the same tests run compiled on the GPU, and the `gpu` tests add
real sizes and bf16. Without a GPU, one test still compiles every kernel variant for sm_90
down to a cubin, which the interpreter never does.

Tolerances: every result is compared with the reference evaluated in float64 on the same
(rounded) inputs, and the error allowed is FACTOR times the error of the same maths done
naively in the test dtype (the reference backend run in that dtype), plus half an ulp of
the output dtype. The kernels sum in a different order than torch, so they may land on
either side of the naive result.
NOTE: measured on this suite (interpreter, CPU): fp16 kernel errors are 0.4x..1x the naive
ones (one rounding of the fp32 accumulator instead of several); fp32 ones up to 2.4x (sums
in another order; lowrank y 2.4x, retraction X 2.3x and projectors 2.1x), and 4.4x on one
singular value where both errors sit at the half-ulp floor.
"""

import math

import pytest
import torch

pytest.importorskip("triton")

from rlora_kernels import manifold, ops  # noqa: E402
from rlora_kernels.ops import _dispatch, reference  # noqa: E402

if not ops.backend_available("triton", "cuda" if torch.cuda.is_available() else "cpu"):
    pytest.skip("Triton backend unavailable (no GPU and TRITON_INTERPRET unset at import)",
                allow_module_level=True)

from rlora_kernels.ops import triton as tb  # noqa: E402
from rlora_kernels.ops.triton import linear, panel, qr  # noqa: E402

F64 = torch.float64
DEV = "cuda" if torch.cuda.is_available() else "cpu"
FACTOR = 4.0
DTYPES = [torch.float32, torch.float16]

pytestmark = pytest.mark.interpreter


# --------------------------------------------------------------------------------- helpers
def rand(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=F64).to(device=DEV, dtype=dtype)


def orthonormal(L, rows, r, dtype=torch.float32, seed=0):
    return reference.thin_qr(rand(L, rows, r, dtype=F64, seed=seed))[0].to(dtype)


def conditioned(L, m, k, cond, seed=0):
    """fp32 panels with singular values spread geometrically from 1 to 1/cond."""
    u = orthonormal(L, m, k, F64, seed)
    v = orthonormal(L, k, k, F64, seed + 1)
    s = torch.logspace(0, -math.log10(cond), k, dtype=F64, device=DEV)
    return ((u * s) @ v.mT).float()


def assert_oracle(got, exact, naive, what="", ulp_of=None):
    """|got - exact| <= FACTOR |naive - exact| + half an ulp (of got's dtype, or of ulp_of
    for quantities derived in float64 from results in that dtype), max norms."""
    ulp = torch.finfo(ulp_of or got.dtype).eps
    got, naive = got.double(), naive.double()
    err = (got - exact).abs().max().item()
    base = (naive - exact).abs().max().item()
    floor = 0.5 * ulp * exact.abs().max().item()
    assert err <= FACTOR * base + floor, f"{what}: error {err:.3g}, naive {base:.3g}"


def in_dtype(dtype, *tensors):
    return tuple(t.to(dtype) for t in tensors)


def as64(*tensors):
    return tuple(t.double() for t in tensors)


def eye(k):
    return torch.eye(k, dtype=F64, device=DEV)


# --------------------------------------------------------------------------------- dispatch
def test_available_and_forced_dispatch():
    assert tb.available("triton", DEV)
    assert not tb.available("triton", "mps")
    with ops.use_backend("triton"):
        assert _dispatch.resolve("thin_qr", DEV) is tb.thin_qr
        assert _dispatch.resolve("lowrank_linear_bwd", DEV) is tb.lowrank_linear_bwd


def _count_launches(monkeypatch):
    counts = {}
    for mod, name in ((panel, "_tn_kernel"), (panel, "_panel_kernel"), (qr, "_cgs2_kernel"),
                      (linear, "_linear_kernel")):
        kernel = getattr(mod, name)

        class Spy:
            def __getitem__(self, grid, kernel=kernel, name=name):
                counts[name] = counts.get(name, 0) + 1
                return kernel[grid]
        monkeypatch.setattr(mod, name, Spy())
    return counts


def test_launch_count_does_not_grow_with_layers(monkeypatch):
    counts = _count_launches(monkeypatch)
    seen = []
    for L in (1, 3):
        counts.clear()
        a_l, b_r = orthonormal(L, 37, 2), orthonormal(L, 29, 2)
        ad, bd = manifold.riemannian_gradient(a_l, rand(L, 37, 2, seed=1), rand(L, 29, 2))
        tb.ortho_lr(ad, bd, a_l, b_r, 1e-4)
        tb.project_lr(a_l, b_r, rand(L, 37, 4), rand(L, 29, 4))
        seen.append(dict(counts))
    assert seen[0] == seen[1] and sum(seen[0].values()) > 0, seen


# ---------------------------------------------------------------------------------- thin_qr
@pytest.mark.parametrize("L,m,k", [(1, 37, 1), (3, 100, 6), (3, 129, 16), (1, 129, 10)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_thin_qr_matches_reference(L, m, k, dtype):
    a = rand(L, m, k, dtype=dtype, seed=m + k)
    q, r = tb.thin_qr(a)
    assert q.dtype == r.dtype == dtype and q.shape == a.shape and r.shape == (L, k, k)
    q64, r64 = reference.thin_qr(a.double())
    qn, rn = reference.thin_qr(a)
    assert_oracle(q, q64, qn, "Q")
    assert_oracle(r, r64, rn, "R")
    assert (torch.diagonal(r, dim1=-2, dim2=-1) >= 0).all()
    assert torch.equal(r, torch.triu(r))


@pytest.mark.parametrize("cond", [1e2, 1e4, 1e6])
def test_thin_qr_ill_conditioned_stays_orthonormal(cond):
    L, m, k = 3, 100, 8
    a = conditioned(L, m, k, cond, seed=int(math.log10(cond)))
    q, r, shifted, redone = qr.thin_qr_f32(a, with_paths=True)
    # NOTE: measured orthogonality 3e-7..5e-7 and residual 1e-7..3e-7 for all three, which
    # is what Householder QR reaches in fp32 (torch.linalg.qr: 4e-7 and 2e-7).
    orth = (q.double().mT @ q.double() - eye(k)).norm(dim=(-2, -1)).max().item()
    res = ((q.double() @ r.double() - a.double()).norm(dim=(-2, -1))
           / a.double().norm(dim=(-2, -1))).max().item()
    assert orth < 2e-6 and res < 2e-6, (orth, res)
    # CholeskyQR2 holds to ~1e3; beyond it the shifted CholeskyQR3 takes over.
    assert bool(shifted.all()) == (cond > 1e3) and not redone.any()


def test_thin_qr_rank_deficient_falls_back_to_gram_schmidt():
    L, m, k = 5, 50, 6
    a = rand(L, m, k)
    a[0, :, 2] = a[0, :, 0]                    # a repeated column
    a[1] = 0.0
    a[1, :, 3] = 1.0                           # a single non-zero column
    a[2] = conditioned(1, m, k, 1e12, seed=3)  # numerically rank-deficient
    a[4] = 0.0
    a[4, 1, 0] = 2.0                           # e_1, then zeros: e_1 cannot complete column 1
    q, r, shifted, redone = qr.thin_qr_f32(a, with_paths=True)
    # Zero columns need a new direction, which only Gram-Schmidt supplies; the repeated
    # column's rounding noise is a direction shifted CholeskyQR3 can already normalise.
    assert shifted[[0, 1, 2, 4]].all() and redone[[1, 2, 4]].all()
    assert not shifted[3] and not redone[3]
    assert torch.isfinite(q).all() and torch.isfinite(r).all()
    orth = (q.double().mT @ q.double() - eye(k)).abs().max().item()
    assert orth < 2e-6
    scale = a.double().norm(dim=(-2, -1), keepdim=True)
    assert ((q.double() @ r.double() - a.double()).abs() / scale).max() < 2e-6
    assert torch.equal(r, torch.triu(r)) and (torch.diagonal(r, dim1=-2, dim2=-1) >= 0).all()
    diag = torch.diagonal(r[1], dim1=-2, dim2=-1)
    assert diag[3] > 0 and (diag[[0, 1, 2, 4, 5]] == 0).all()


def test_thin_qr_of_zero_panels_matches_householder():
    # B = 0, the usual LoRA start: Householder QR gives Q = I[:, :k], R = 0, and so must we,
    # or the first B_R, hence the whole first step, would differ between backends.
    a = torch.zeros(2, 37, 5, device=DEV)
    q, r = tb.thin_qr(a)
    q64, r64 = reference.thin_qr(a.double())
    assert torch.equal(q.double(), q64) and torch.equal(r.double(), r64)


# ------------------------------------------------------------------------------- project_lr
@pytest.mark.parametrize("L,m,n,r,k", [(1, 37, 29, 1, 2), (3, 100, 37, 3, 6),
                                       (3, 129, 100, 5, 7), (1, 129, 37, 8, 16)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_project_lr_matches_reference(L, m, n, r, k, dtype):
    a_l, b_r = orthonormal(L, m, r, dtype, 1), orthonormal(L, n, r, dtype, 2)
    p, q = rand(L, m, k, dtype=dtype, seed=3), rand(L, n, k, dtype=dtype, seed=4)
    ad, bd = tb.project_lr(a_l, b_r, p, q)
    exact = reference.project_lr(*as64(a_l, b_r, p, q))
    naive = reference.project_lr(a_l, b_r, p, q)
    for got, ex, nv, what in zip((ad, bd), exact, naive, ("Ad", "Bd")):
        assert got.dtype == nv.dtype and got.shape == ex.shape
        assert_oracle(got, ex, nv, what)


# ------------------------------------------------------------------------------- retract_lr
def _retract_invariants(a_l, b, b_r):
    a_l, b, b_r = as64(a_l, b, b_r)
    return a_l @ b.mT, a_l @ a_l.mT, b_r @ b_r.mT, b.norm(dim=-2)


@pytest.mark.parametrize("L,m,n,r", [(1, 37, 29, 1), (3, 100, 37, 3), (3, 129, 100, 5),
                                     (1, 100, 129, 8)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_retract_lr_matches_reference(L, m, n, r, dtype):
    left, right = rand(L, m, 2 * r, dtype=dtype, seed=5), rand(L, n, 2 * r, dtype=dtype, seed=6)
    got = tb.retract_lr(left, right, r)
    naive = reference.retract_lr(left, right, r)
    assert [t.dtype for t in got] == [t.dtype for t in naive]
    exact = _retract_invariants(*reference.retract_lr(*as64(left, right), r))
    for g, e, nv, what in zip(_retract_invariants(*got), exact, _retract_invariants(*naive),
                              ("X", "A_L A_L^T", "B_R B_R^T", "s")):
        assert_oracle(g, e, nv, what, ulp_of=got[0].dtype)
    orth = (got[0].double().mT @ got[0].double() - eye(r)).abs().max().item()
    assert orth < 2e-6


# --------------------------------------------------------------------------------- ortho_lr
@pytest.mark.parametrize("L,m,n,r", [(1, 37, 29, 1), (3, 100, 37, 3), (1, 129, 100, 5),
                                     (1, 37, 129, 8)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_ortho_lr_matches_reference(L, m, n, r, dtype):
    a_l, b_r = orthonormal(L, m, r, F64, 7), orthonormal(L, n, r, F64, 8)
    ad, bd = manifold.riemannian_gradient(a_l, rand(L, m, r, dtype=F64, seed=9),
                                          rand(L, n, r, dtype=F64, seed=10))
    args = in_dtype(dtype, ad, bd, a_l, b_r)
    p, q = tb.ortho_lr(*args, 1e-4)
    pn, qn = reference.ortho_lr(*args, 1e-4)
    pe, qe = reference.ortho_lr(*as64(*args), 1e-4)
    assert p.dtype == pn.dtype and p.shape == pe.shape and q.shape == qe.shape
    assert_oracle(p.double() @ q.double().mT, pe @ qe.mT, pn.double() @ qn.double().mT, "PQ^T",
                  ulp_of=p.dtype)


def test_ortho_lr_masks_rank_deficient_tangent():
    L, m, n, r = 1, 30, 20, 3
    a_l, b_r = orthonormal(L, m, r), orthonormal(L, n, r)
    bd = rand(L, n, 1, seed=11) @ rand(L, 1, r, seed=12)  # tangent of rank 1, not 2r
    p, q = tb.ortho_lr(torch.zeros_like(a_l), bd, a_l, b_r, 1e-4)
    s = torch.linalg.svdvals(p.double() @ q.double().mT)
    assert abs(s[0, 0] - 1) < 1e-5 and s[0, 1:].abs().max() < 1e-5
    p, q = tb.ortho_lr(torch.zeros_like(a_l), torch.zeros_like(b_r), a_l, b_r, 1e-4)
    assert torch.isfinite(p).all() and torch.isfinite(q).all()
    assert (p.double() @ q.double().mT).abs().max() == 0


# --------------------------------------------------------------------------- lowrank_linear
LINEAR_CASES = [((37,), 29, 100, 1, True), ((3, 11), 129, 37, 5, False),
                ((2, 50), 100, 129, 8, True)]


def _linear_args(lead, m, n, k, bias, dtype):
    x = rand(*lead, n, dtype=dtype, seed=13)
    w = rand(m, n, dtype=dtype, seed=14) / math.sqrt(n)
    b = rand(m, dtype=dtype, seed=15) if bias else None
    return x, w, b, rand(m, k, dtype=dtype, seed=16), rand(n, k, dtype=dtype, seed=17)


@pytest.mark.parametrize("lead,m,n,k,bias", LINEAR_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_lowrank_linear_fwd_matches_reference(lead, m, n, k, bias, dtype):
    x, w, b, u, v = _linear_args(lead, m, n, k, bias, dtype)
    y = tb.lowrank_linear_fwd(x, w, b, u, v)
    assert y.dtype == dtype and y.shape == (*lead, m)
    exact = reference.lowrank_linear_fwd(*(None if t is None else t.double()
                                           for t in (x, w, b, u, v)))
    assert_oracle(y, exact, reference.lowrank_linear_fwd(x, w, b, u, v), "y")


@pytest.mark.parametrize("lead,m,n,k,bias", LINEAR_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_lowrank_linear_bwd_matches_reference(lead, m, n, k, bias, dtype):
    x, w, _, u, v = _linear_args(lead, m, n, k, bias, dtype)
    dy = rand(*lead, m, dtype=dtype, seed=18)
    need_dw = bias  # both settings, across the cases
    got = tb.lowrank_linear_bwd(dy, x, w, u, v, True, need_dw)
    naive = reference.lowrank_linear_bwd(dy, x, w, u, v, True, need_dw)
    exact = reference.lowrank_linear_bwd(*as64(dy, x, w, u, v), True, need_dw)
    for g, nv, e, what in zip(got, naive, exact, ("dx", "dW", "db", "dU", "dV")):
        if e is None:
            assert g is None, what
            continue
        assert g.dtype == nv.dtype and g.shape == e.shape, what
        assert_oracle(g, e, nv, what)
    assert tb.lowrank_linear_bwd(dy, x, w, u, v, False, False)[:2] == (None, None)


def test_lowrank_linear_never_forms_m_by_n():
    from shape_spy import ShapeSpy

    class AllocSpy(ShapeSpy):
        """Shapes produced by ops, minus in-place ones: the interpreter re-seats every kernel
        argument with set_ and copies it back with copy_, which allocates nothing."""

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func._schema.is_mutable:
                return func(*args, **(kwargs or {}))
            return super().__torch_dispatch__(func, types, args, kwargs)

    m, n, k, tokens = 37, 29, 6, 11
    x, w, b, u, v = _linear_args((tokens,), m, n, k, True, torch.float32)
    seen = []
    with AllocSpy(seen):
        tb.lowrank_linear_fwd(x, w, b, u, v)
        tb.lowrank_linear_bwd(rand(tokens, m, seed=19), x, w, u, v, True, False)
    assert (tokens, k) in seen, "the spy saw no operation"
    assert not {(m, n), (n, m), (1, m, n), (1, n, m)} & set(seen), seen


# ----------------------------------------------------------------------------- torch ops
def _op_cases():
    L, m, n, r = 2, 13, 11, 2
    a_l, b_r = orthonormal(L, m, r), orthonormal(L, n, r)
    p = rand(L, m, 3, seed=20).requires_grad_()
    q = rand(L, n, 3, seed=21).requires_grad_()
    x = rand(3, 5, n, seed=22).requires_grad_()
    lin = (x, rand(m, n, seed=23), rand(m, seed=24).requires_grad_(),
           rand(m, 4, seed=25).requires_grad_(), rand(n, 4, seed=26).requires_grad_())
    return {
        "thin_qr": (rand(L, m, 4, seed=27),),
        "project_lr": (a_l, b_r, p, q),
        "retract_lr": (rand(L, m, 4, seed=28), rand(L, n, 4, seed=29), r),
        "ortho_lr": (rand(L, m, r, seed=30), rand(L, n, r, seed=31), a_l, b_r, 1e-4),
        "lowrank_linear": lin,
        "lowrank_linear_nobias": (x, lin[1], None, *lin[3:]),
    }


@pytest.mark.parametrize("case", ["thin_qr", "project_lr", "retract_lr", "ortho_lr",
                                  "lowrank_linear", "lowrank_linear_nobias"])
def test_opcheck_under_triton_backend(case):
    op = getattr(torch.ops.rlora, case.removesuffix("_nobias"))
    with ops.use_backend("triton"):
        torch.library.opcheck(op, _op_cases()[case])


def test_opcheck_lowrank_linear_bwd_under_triton():
    x, w, _, u, v = _op_cases()["lowrank_linear"]
    dy = rand(*x.shape[:-1], w.shape[0], seed=32)
    with ops.use_backend("triton"):
        for need_dx, need_dw in ((True, False), (False, True)):
            torch.library.opcheck(torch.ops.rlora.lowrank_linear_bwd,
                                  (dy, x.detach(), w, u.detach(), v.detach(), need_dx, need_dw))


def test_float64_and_wide_panels_use_the_reference(caplog):
    a = rand(2, 20, 5, dtype=F64)
    q, r = tb.thin_qr(a)
    q64, r64 = reference.thin_qr(a)
    assert q.dtype == F64 and torch.equal(q, q64) and torch.equal(r, r64)
    wide = rand(1, 300, 257)
    with caplog.at_level("WARNING"):
        q, r = tb.thin_qr(wide)
    assert torch.equal(q, reference.thin_qr(wide)[0])


# ------------------------------------------------------------------------ optimizer steps
def _riemannion_run(backend, dtype=torch.float32, steps=2):
    import rlora_kernels as rk
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(23, 37), nn.Tanh(), nn.Linear(37, 29), nn.Tanh(),
                          nn.Linear(29, 37), nn.Tanh(), nn.Linear(37, 29)).to(DEV, F64)
    model = model.to(dtype)  # the same weights, rounded to dtype
    layers = rk.inject(model, ["0", "2", "4", "6"], rank=3, seed=0)  # B = 0: X starts at 0
    opt = rk.Riemannion(model, lr=0.05, momentum=0.9, weight_decay=0.01)
    with ops.use_backend(backend):
        for step in range(steps):
            opt.zero_grad()
            model(rand(16, 23, dtype=dtype, seed=50 + step)).square().mean().backward()
            opt.step()
    return [layer.delta_weight().detach().double() for layer in layers]


def test_riemannion_steps_match_reference_backend():
    # Two steps from B = 0 (the first QR is of zero panels) through every op: the forward
    # and backward of the adapted linears and the optimizer's QR, projection, polar factor
    # and retraction, in fp32 on both backends, against the same steps in float64.
    # NOTE: measured: Triton ended 1.8e-6..4.8e-6 of max |X| from the float64 run, the fp32
    # reference 3.1e-6..4.2e-6 (ratio 0.6..1.2).
    exact = _riemannion_run("reference", F64)
    for x_tri, x_ref, x64 in zip(_riemannion_run("triton"), _riemannion_run("reference"), exact):
        assert x64.abs().max() > 0
        assert_oracle(x_tri, x64, x_ref, "X after two steps", ulp_of=torch.float32)


# --------------------------------------------------------------- compiled code, no GPU
# Compiles every kernel variant the launchers choose on a GPU (sm_90) with Triton's real
# compiler down to a cubin, which needs no driver: the interpreter skips type checks,
# layouts and register allocation, so this is what catches a kernel that would not build.
COMPILE_CHECK = r"""
import os, sys
assert os.environ.get("TRITON_INTERPRET") != "1"
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from rlora_kernels.ops.triton import linear, panel, qr

def build(kernel, ptrs, consts, cfg):
    cfg = dict(cfg)
    opts = {k: cfg.pop(k) for k in ("num_warps", "num_stages") if k in cfg}
    consts = {**consts, **cfg}
    sig = {a: "constexpr" if a in consts else ptrs.get(a, "i32") for a in kernel.arg_names}
    triton.compile(ASTSource(kernel, sig, consts), target=GPUTarget("cuda", 90, 32),
                   options=opts)
    print("compiled", kernel.__name__, consts, opts, flush=True)

def ptrs(names, dtype, **extra):
    return {**{n: "*" + dtype for n in names}, "flag_ptr": "*i32", **extra}

TN = ("x_ptr", "y_ptr", "c_ptr", "colsum_ptr")
for kx, ky, native, colsum, flag in ((32, 32, False, False, True), (4096, 32, False, True, False),
                                     (4096, 32, True, True, False), (4096, 4096, True, False,
                                                                     False)):
    build(panel._tn_kernel, ptrs(TN, "bf16" if native else "fp32", c_ptr="*fp32",
                                 colsum_ptr="*fp32"),
          dict(NATIVE_DOT=native, HAS_COLSUM=colsum, HAS_FLAG=flag),
          panel.tn_config(kx, ky, native))
PANEL = ("x_ptr", "s_ptr", "x2_ptr", "s2_ptr", "c_ptr", "scale_ptr", "c2_ptr")
for n, native, x2, scale, flag, in_place in ((256, False, False, False, True, True),
                                             (32, False, True, False, False, False),
                                             (64, False, False, True, False, False),
                                             (32, True, False, False, False, False)):
    build(panel._panel_kernel, ptrs(PANEL, "bf16" if native else "fp32"),
          dict(NATIVE_DOT=native, HAS_X2=x2, HAS_SCALE=scale, HAS_FLAG=flag,
               IN_PLACE=in_place), panel.panel_config(n))
for k in (2, 64, 256):
    build(qr._cgs2_kernel, ptrs(("q_ptr", "r_ptr", "work_ptr"), "fp32", a_ptr="*bf16"),
          dict(KEEP_RATIO=qr.KEEP), qr.cgs2_config(k))
LINEAR = ("x_ptr", "w_ptr", "t_ptr", "u_ptr", "b_ptr", "y_ptr")
for dtype, native in (("bf16", True), ("fp16", True), ("fp32", False)):
    build(linear._linear_kernel, ptrs(LINEAR, dtype), dict(NATIVE_DOT=native, HAS_BIAS=True),
          linear.linear_config(native, 32))
"""


def test_kernels_compile_for_sm90_without_a_gpu():
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", COMPILE_CHECK], env=env, cwd=root,
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 and "ptxas" in proc.stderr and "CompilationError" not in proc.stderr:
        pytest.skip(f"no usable ptxas here: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.stdout.count("compiled") == 14


# ------------------------------------------------------------------------- GPU, real sizes
gpu = pytest.mark.gpu


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cond", [1e2, 1e4, 1e6])
def test_gpu_thin_qr_real_sizes(dtype, cond):
    L, m, k = 32, 4096, 32
    a = conditioned(L, m, k, cond, seed=40).to(dtype)
    q, r, shifted, redone = qr.thin_qr_f32(a, with_paths=True)
    orth = (q.double().mT @ q.double() - eye(k)).norm(dim=(-2, -1)).max().item()
    res = ((q.double() @ r.double() - a.double()).norm(dim=(-2, -1))
           / a.double().norm(dim=(-2, -1))).max().item()
    assert orth < 5e-6 and res < 5e-6, (orth, res)
    assert not redone.any()


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_manifold_ops_real_sizes(dtype):
    L, m, n, r = 32, 4096, 1536, 16
    a_l, b_r = orthonormal(L, m, r, dtype, 41), orthonormal(L, n, r, dtype, 42)
    p, q = rand(L, m, 2 * r, dtype=dtype, seed=43), rand(L, n, 2 * r, dtype=dtype, seed=44)
    for g, e, nv in zip(tb.project_lr(a_l, b_r, p, q), reference.project_lr(*as64(a_l, b_r, p, q)),
                        reference.project_lr(a_l, b_r, p, q)):
        assert_oracle(g, e, nv, "project")
    left, right = rand(L, m, 2 * r, dtype=dtype, seed=45), rand(L, n, 2 * r, dtype=dtype, seed=46)
    got = _retract_invariants(*tb.retract_lr(left, right, r))
    exact = _retract_invariants(*reference.retract_lr(*as64(left, right), r))
    naive = _retract_invariants(*reference.retract_lr(left, right, r))
    assert_oracle(got[0], exact[0], naive[0], "retract X", ulp_of=torch.float32)
    ad, bd = manifold.riemannian_gradient(a_l, p[..., :r], q[..., :r])
    pp, qq = tb.ortho_lr(ad, bd, a_l, b_r, 1e-4)
    pe, qe = reference.ortho_lr(*as64(ad, bd, a_l, b_r), 1e-4)
    pn, qn = reference.ortho_lr(ad, bd, a_l, b_r, 1e-4)
    for g, e, nv, what in ((pp, pe, pn, "P^T P"), (qq, qe, qn, "Q^T Q")):
        g, nv = g.double(), nv.double()
        assert_oracle(g.mT @ g, e.mT @ e, nv.mT @ nv, what, ulp_of=torch.float32)


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gpu_lowrank_linear_real_sizes(dtype):
    x, w, b, u, v = _linear_args((4, 1024), 4096, 1536, 32, True, dtype)
    exact = reference.lowrank_linear_fwd(*as64(x, w, b, u, v))
    assert_oracle(tb.lowrank_linear_fwd(x, w, b, u, v), exact,
                  reference.lowrank_linear_fwd(x, w, b, u, v), "y")
    dy = rand(4, 1024, 4096, dtype=dtype, seed=47)
    got = tb.lowrank_linear_bwd(dy, x, w, u, v, True, True)
    naive = reference.lowrank_linear_bwd(dy, x, w, u, v, True, True)
    exact = reference.lowrank_linear_bwd(*as64(dy, x, w, u, v), True, True)
    for g, nv, e, what in zip(got, naive, exact, ("dx", "dW", "db", "dU", "dV")):
        assert_oracle(g, e, nv, what)
