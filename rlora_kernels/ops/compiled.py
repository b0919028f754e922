"""Compiled backend ("cpu" and "cuda"): the rlora_C ops of rlora_kernels._C behind the
reference signatures. A missing or stale build logs one warning and reports unavailable;
importing this module never fails.
"""

import logging

import torch

from .reference import compute_dtype

log = logging.getLogger(__name__)

__all__ = ["available", "build_info", "thin_qr", "thin_qr_ex", "project_lr", "retract_lr",
           "ortho_lr", "QR_AUTO", "QR_HOUSEHOLDER", "QR_PATHS"]

# Must equal RLORA_C_ABI in csrc/module.cpp: the schemas this file calls.
_ABI_VERSION = 1

# NOTE (Xeon AVX-512, 2 cores shared with other jobs, torch 2.13 CPU + MKL; per model = the
# MiniLM buckets summed, from benchmarks/bench_cpu_compiled.py). One thread, CPU time,
# compiled vs reference, float32 r = 8 / 16: thin_qr 1.54x / 1.76x, project_lr 1.06x /
# 1.31x, retract_lr 1.05x / 1.00x, ortho_lr 1.15x / 1.06x; float64: 1.8x, 1.4-1.55x,
# 1.2-1.3x, 1.2-1.3x. Two threads, wall clock, while other jobs loaded the machine: the
# Riemannion step ops 2.4x-3.8x (the reference suffers more from a busy machine); no clean
# two-thread measurement could be made here.
# On the 24 x 384 x 384 bucket in float32 with one thread, retract_lr and ortho_lr measured
# 0.82-0.98x and 0.89-1.05x of the reference (both spend their time in torch's small SVD, and
# the retraction's right panel needs a third CholeskyQR pass), and 1.00-1.15x per model: no
# clear win, so CPU tensors keep the reference for them; the CUDA backend takes all four.
OPS = {"cpu": ("thin_qr", "project_lr"),
       "cuda": ("thin_qr", "project_lr", "retract_lr", "ortho_lr")}
# Limitation: the "cuda" backend's kernels (csrc/cuda) have only been compile-checked for
# sm_80 / sm_90; they have never run on a GPU. Test them (python_tests/test_compiled.py on a
# CUDA build) before trusting them.

# thin_qr_ex's `method` argument and its per-layer `path` codes.
QR_AUTO, QR_HOUSEHOLDER = 0, 1
QR_PATHS = {2: "CholeskyQR2", 3: "CholeskyQR3", -1: "Householder"}


def _load():
    """The extension module, or None with one warning saying why."""
    # ImportError: not built, or built against another torch (undefined symbols); anything
    # else (a second copy registering the rlora_C library again) must not break import either.
    try:
        from rlora_kernels import _C
    except Exception as exc:  # noqa: BLE001
        log.warning("rlora_kernels._C is not available (%s); the compiled cpu/cuda backends "
                    "are off and the reference serves those ops. Build it with "
                    "`pip install --no-build-isolation .` or .ci/build_ext.sh", exc)
        return None
    built_for = getattr(_C, "torch_version", "?")
    running = torch.__version__.split("+")[0]
    if built_for != running or getattr(_C, "abi_version", None) != _ABI_VERSION:
        log.warning("rlora_kernels._C was built for torch %s (ABI %s) but torch %s (ABI %s) "
                    "is running; the compiled backends are off until it is rebuilt",
                    built_for, getattr(_C, "abi_version", None), running, _ABI_VERSION)
        return None
    return _C


_ext = _load()


def build_info() -> dict:
    """What was built: {"built": bool, "cuda": bool, "torch": str}."""
    if _ext is None:
        return {"built": False, "cuda": False, "torch": None}
    return {"built": True, "cuda": bool(_ext.with_cuda), "torch": _ext.torch_version}


def available(backend_name: str, device_type: str) -> bool:
    """"cpu" serves cpu tensors; "cuda" serves cuda tensors when the CUDA kernels were built."""
    if _ext is None:
        return False
    if backend_name == "cpu":
        return device_type == "cpu"
    if backend_name == "cuda":
        return device_type == "cuda" and bool(_ext.with_cuda) and torch.cuda.is_available()
    return False


def _up(*tensors, like=None):
    # The kernels take float32/float64; half types compute in float32 like the reference.
    cd = compute_dtype((tensors[0] if like is None else like).dtype)
    return [t.to(cd) for t in tensors]


def thin_qr(a):
    """Thin QR of [L, m, k] panels with diag(R) >= 0 (CholeskyQR2, Householder fallback)."""
    q, r = torch.ops.rlora_C.thin_qr(*_up(a))
    return q.to(a.dtype), r.to(a.dtype)


def thin_qr_ex(a, method: int = QR_AUTO):
    """thin_qr plus the per-layer path taken ([L] int8, codes in QR_PATHS); method
    QR_HOUSEHOLDER forces the fallback path."""
    q, r, path = torch.ops.rlora_C.thin_qr_ex(*_up(a), int(method))
    return q.to(a.dtype), r.to(a.dtype), path


def project_lr(a_l, b_r, p, q):
    """Tangent components (Ad, Bd) of P Q^T at the point with bases (A_L, B_R)."""
    return torch.ops.rlora_C.project_lr(*_up(a_l, b_r, p, q, like=p))


def retract_lr(left, right, rank: int):
    """SVD_rank(left right^T) as (A_L, B, B_R), B = B_R diag(s)."""
    return torch.ops.rlora_C.retract_lr(*_up(left, right), int(rank))


def ortho_lr(ad, bd, a_l, b_r, eps: float):
    """Polar factor of [Ad, A_L][B_R, Bd]^T as P Q^T, singular values below eps*s_max -> 0."""
    return torch.ops.rlora_C.ortho_lr(*_up(ad, bd, a_l, b_r), float(eps))


def _register_fakes() -> None:
    # Shapes only, so FakeTensor, torch.compile and opcheck can trace the rlora_C ops.
    def fake_thin_qr(a):
        k = a.shape[-1]
        return a.new_empty(a.shape), a.new_empty(*a.shape[:-2], k, k)

    def fake_thin_qr_ex(a, method):
        q, r = fake_thin_qr(a)
        return q, r, a.new_empty(a.shape[:-2], dtype=torch.int8)

    def fake_project(a_l, b_r, p, q):
        return p.new_empty(a_l.shape), p.new_empty(b_r.shape)

    def fake_retract(left, right, rank):
        return (left.new_empty(*left.shape[:-1], rank),
                right.new_empty(*right.shape[:-1], rank),
                right.new_empty(*right.shape[:-1], rank))

    def fake_ortho(ad, bd, a_l, b_r, eps):
        k = 2 * ad.shape[-1]
        return ad.new_empty(*ad.shape[:-1], k), bd.new_empty(*bd.shape[:-1], k)

    for name, fn in (("thin_qr", fake_thin_qr), ("thin_qr_ex", fake_thin_qr_ex),
                     ("project_lr", fake_project), ("retract_lr", fake_retract),
                     ("ortho_lr", fake_ortho)):
        torch.library.register_fake(f"rlora_C::{name}", fn)


if _ext is not None:
    _register_fakes()
