"""Reference ops against closed forms and dense float64 linear algebra (METHOD.md section 10)."""

import pytest
import torch

from rlora_kernels import manifold, ops

from shape_spy import record_shapes

F64 = torch.float64


def rand(*shape, dtype=F64, seed=None):
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    return torch.randn(*shape, generator=g, dtype=dtype)


def orthonormal(L, rows, r, seed=None):
    return ops.thin_qr(rand(L, rows, r, seed=seed))[0]


def truncated_svd(x, r):
    u, s, vh = torch.linalg.svd(x)
    return u[..., :r] * s[..., None, :r] @ vh[..., :r, :]


@pytest.mark.parametrize("m,k", [(37, 1), (37, 6), (100, 10), (129, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_thin_qr_invariants(m, k, dtype):
    a = rand(3, m, k, dtype=dtype)
    q, r = ops.thin_qr(a)
    tol = 1e-12 if dtype == F64 else 2e-5
    eye = torch.eye(k, dtype=dtype)
    assert (q.mT @ q - eye).abs().max() < tol
    assert ((q @ r - a).norm() / a.norm()) < tol
    assert (torch.diagonal(r, dim1=-2, dim2=-1) >= 0).all()
    assert torch.equal(r, torch.triu(r))


def test_thin_qr_rejects_wide_and_non_float():
    with pytest.raises(ValueError, match="tall"):
        ops.thin_qr(rand(1, 3, 5))
    with pytest.raises(TypeError, match="dtype"):
        ops.thin_qr(torch.ones(1, 5, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"\[L, rows, cols\]"):
        ops.thin_qr(rand(5, 3))


@pytest.mark.parametrize("r,k", [(1, 4), (3, 6), (5, 7)])
def test_project_lr_matches_dense_projection(r, k):
    L, m, n = 2, 37, 29
    a_l, b_r = orthonormal(L, m, r), orthonormal(L, n, r)
    p, q = rand(L, m, k), rand(L, n, k)
    ad, bd = ops.project_lr(a_l, b_r, p, q)
    dense = manifold.project_dense(a_l, b_r, p @ q.mT)
    assert torch.allclose(manifold.tangent_dense(a_l, b_r, ad, bd), dense, atol=1e-12)
    # Ad is horizontal: A_L^T Ad = 0.
    assert (a_l.mT @ ad).abs().max() < 1e-12


@pytest.mark.parametrize("r", [1, 3, 5])
def test_projection_idempotent_and_residual_orthogonal(r):
    L, m, n = 2, 41, 33
    a_l, b_r = orthonormal(L, m, r), orthonormal(L, n, r)
    z = rand(L, m, n)
    pz = manifold.project_dense(a_l, b_r, z)
    ad, bd = ops.project_lr(a_l, b_r, *_thin(pz, 2 * r))
    assert torch.allclose(manifold.tangent_dense(a_l, b_r, ad, bd), pz, atol=1e-10)
    # <Z - P(Z), xi> = 0 for an arbitrary tangent vector xi.
    xi = manifold.tangent_dense(a_l, b_r, *manifold.riemannian_gradient(
        a_l, rand(L, m, r), rand(L, n, r)))
    assert ((z - pz) * xi).sum(dim=(-2, -1)).abs().max() < 1e-10


def _thin(x, k):
    """Exact thin factors P Q^T of a matrix of rank <= k."""
    u, s, vh = torch.linalg.svd(x)
    return u[..., :k] * s[..., None, :k], vh[..., :k, :].mT


@pytest.mark.parametrize("r", [1, 3, 5])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_retract_lr_equals_dense_truncated_svd(r, dtype):
    L, m, n = 3, 37, 30
    left, right = rand(L, m, 2 * r, dtype=dtype), rand(L, n, 2 * r, dtype=dtype)
    a_l, b, b_r = ops.retract_lr(left, right, r)
    dense = truncated_svd((left @ right.mT).to(F64), r)
    got = (a_l @ b.mT).to(F64)
    tol = 1e-10 if dtype == F64 else 1e-4
    assert ((got - dense).norm() / dense.norm()) < tol
    eye = torch.eye(r, dtype=dtype)
    assert (a_l.mT @ a_l - eye).abs().max() < tol
    assert (b_r.mT @ b_r - eye).abs().max() < tol
    # B_R spans B's columns: B = B_R (B_R^T B).
    assert torch.allclose(b_r @ (b_r.mT @ b), b, atol=tol * b.abs().max())


@pytest.mark.parametrize("r", [1, 3, 5])
def test_ortho_lr_gives_unit_singular_values(r):
    L, m, n = 2, 37, 29
    a_l, b_r = orthonormal(L, m, r), orthonormal(L, n, r)
    ad, bd = manifold.riemannian_gradient(a_l, rand(L, m, r), rand(L, n, r))
    p, q = ops.ortho_lr(ad, bd, a_l, b_r)
    s = torch.linalg.svdvals(p @ q.mT)[..., :2 * r]
    assert torch.allclose(s, torch.ones_like(s), atol=1e-10)
    # Same row and column space as the tangent vector (the polar factor of xi).
    xi = manifold.tangent_dense(a_l, b_r, ad, bd)
    u, _, vh = torch.linalg.svd(xi)
    polar = u[..., :2 * r] @ vh[..., :2 * r, :]
    assert torch.allclose(p @ q.mT, polar, atol=1e-9)


def test_ortho_lr_masks_rank_deficient_tangent():
    L, m, n, r = 1, 30, 20, 3
    a_l, b_r = orthonormal(L, m, r), orthonormal(L, n, r)
    # Only the Bd part is non-zero and of rank 1: the tangent has rank 1, not 2r.
    bd = rand(L, n, 1) @ rand(L, 1, r)
    p, q = ops.ortho_lr(torch.zeros(L, m, r, dtype=F64), bd, a_l, b_r)
    s = torch.linalg.svdvals(p @ q.mT)
    assert abs(s[0, 0] - 1) < 1e-10 and s[0, 1:].abs().max() < 1e-10
    p, q = ops.ortho_lr(torch.zeros(L, m, r, dtype=F64), torch.zeros(L, n, r, dtype=F64),
                        a_l, b_r)
    assert torch.isfinite(p).all() and (p @ q.mT).abs().max() == 0


def test_shape_errors_name_the_problem():
    with pytest.raises(ValueError, match="same number of rows"):
        ops.project_lr(rand(1, 10, 2), rand(1, 8, 2), rand(1, 9, 3), rand(1, 8, 3))
    with pytest.raises(ValueError, match="rank"):
        ops.retract_lr(rand(1, 10, 4), rand(1, 8, 4), 5)
    with pytest.raises(ValueError, match="share device and dtype"):
        ops.project_lr(rand(1, 10, 2), rand(1, 8, 2, dtype=torch.float32), rand(1, 10, 3),
                       rand(1, 8, 3))
    with pytest.raises(ValueError, match="do not chain"):
        ops.lowrank_linear(rand(4, 7), rand(5, 6), None, rand(5, 2), rand(6, 2))


def test_opcheck_all_ops():
    L, m, n, r = 2, 13, 11, 2
    a_l, b_r = orthonormal(L, m, r), orthonormal(L, n, r)
    p = rand(L, m, 3).requires_grad_()
    q = rand(L, n, 3).requires_grad_()
    torch.library.opcheck(torch.ops.rlora.thin_qr, (rand(L, m, 4),))
    torch.library.opcheck(torch.ops.rlora.project_lr, (a_l, b_r, p, q))
    torch.library.opcheck(torch.ops.rlora.retract_lr, (rand(L, m, 4), rand(L, n, 4), r))
    torch.library.opcheck(torch.ops.rlora.ortho_lr, (rand(L, m, r), rand(L, n, r), a_l, b_r,
                                                     1e-4))
    x = rand(3, 5, n).requires_grad_()
    args = (x, rand(m, n), rand(m).requires_grad_(), rand(m, 4).requires_grad_(),
            rand(n, 4).requires_grad_())
    torch.library.opcheck(torch.ops.rlora.lowrank_linear, args)
    torch.library.opcheck(torch.ops.rlora.lowrank_linear, (x, rand(m, n), None, *args[3:]))
    dy = rand(3, 5, m)
    for need_dx, need_dw in ((True, False), (False, True)):
        torch.library.opcheck(torch.ops.rlora.lowrank_linear_bwd,
                              (dy, x.detach(), args[1], rand(m, 4), rand(n, 4), need_dx, need_dw))


def test_gradcheck_lowrank_linear_and_projection():
    m, n = 7, 5
    args = [rand(2, 3, n), rand(m, n), rand(m), rand(m, 2), rand(n, 2)]
    args = [a.requires_grad_() for a in args]
    assert torch.autograd.gradcheck(ops.lowrank_linear, args)
    a_l, b_r = orthonormal(1, m, 2), orthonormal(1, n, 2)
    p, q = rand(1, m, 3).requires_grad_(), rand(1, n, 3).requires_grad_()
    assert torch.autograd.gradcheck(lambda *t: ops.project_lr(*t), (a_l.requires_grad_(),
                                                                    b_r.requires_grad_(), p, q))


def test_lowrank_linear_matches_dense_and_never_forms_m_by_n(monkeypatch):
    m, n, k, tokens = 37, 29, 6, 11
    x = rand(tokens, n).requires_grad_()
    w, bias = rand(m, n), rand(m)
    u, v = rand(m, k).requires_grad_(), rand(n, k).requires_grad_()
    y = ops.lowrank_linear(x, w, bias, u, v)
    assert torch.allclose(y, x @ (w + u @ v.mT).mT + bias, atol=1e-12)
    dy = rand(tokens, m)
    with record_shapes(monkeypatch) as seen:
        dx, du, dv = torch.autograd.grad(y, (x, u, v), dy)
    assert (tokens, k) in seen, "the spy saw no backend operation"
    assert not {(m, n), (n, m)} & set(seen), seen
    g = dy.mT @ x.detach()
    assert torch.allclose(du, g @ v.detach(), atol=1e-12)
    assert torch.allclose(dv, g.mT @ u.detach(), atol=1e-12)
    assert torch.allclose(dx, dy @ (w + u @ v.mT).detach(), atol=1e-12)


def test_backend_selection_errors():
    with pytest.raises(ValueError, match="unknown rlora backend"):
        ops.set_backend("fortran")
    with ops.use_backend("reference"):
        assert ops.get_backend() == "reference"
        ops.thin_qr(rand(1, 5, 2))
    assert ops.get_backend() in ("auto", "reference")
