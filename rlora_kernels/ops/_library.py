"""torch.library registration of the rlora ops: schemas, fake kernels and autograd.

Each op body asks `_dispatch.resolve` for the implementation serving the input's device,
so the backend choice stays out of the graph that torch.compile traces.
"""

import torch
from torch import Tensor

from . import _dispatch

_NS = "rlora"


def _impl(op: str, t: Tensor):
    return _dispatch.resolve(op, t.device.type)


def _as(t: Tensor, dtype: torch.dtype) -> Tensor:
    # Custom ops may not return an input (or a view of one) as an output.
    # Outputs are contiguous so fake kernels can promise their strides.
    t = t.to(dtype).contiguous()
    return t.clone() if t._base is not None else t


# ----------------------------------------------------------------------------- thin_qr
@torch.library.custom_op(f"{_NS}::thin_qr", mutates_args=())
def thin_qr_op(a: Tensor) -> tuple[Tensor, Tensor]:
    q, r = _impl("thin_qr", a)(a)
    return _as(q, a.dtype), _as(r, a.dtype)


@thin_qr_op.register_fake
def _(a):
    k = a.shape[-1]
    return a.new_empty(a.shape), a.new_empty(*a.shape[:-2], k, k)


# -------------------------------------------------------------------------- project_lr
@torch.library.custom_op(f"{_NS}::project_lr", mutates_args=())
def project_lr_op(a_l: Tensor, b_r: Tensor, p: Tensor, q: Tensor) -> tuple[Tensor, Tensor]:
    ad, bd = _impl("project_lr", p)(a_l, b_r, p, q)
    return _as(ad, p.dtype), _as(bd, p.dtype)


@project_lr_op.register_fake
def _(a_l, b_r, p, q):
    return p.new_empty(a_l.shape), p.new_empty(b_r.shape)


def _project_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _project_backward(ctx, d_ad, d_bd):
    # The projection is a polynomial in its inputs: differentiate the oracle itself.
    from .reference import project_lr as ref

    inputs = [t.detach().requires_grad_(need) for t, need in
              zip(ctx.saved_tensors, ctx.needs_input_grad)]
    wanted = [t for t in inputs if t.requires_grad]
    with torch.enable_grad():
        ad, bd = ref(*inputs)
        grads = iter(torch.autograd.grad((ad, bd), wanted, (d_ad, d_bd), allow_unused=True))
    return tuple(next(grads) if t.requires_grad else None for t in inputs)


project_lr_op.register_autograd(_project_backward, setup_context=_project_setup)


# -------------------------------------------------------------------------- retract_lr
@torch.library.custom_op(f"{_NS}::retract_lr", mutates_args=())
def retract_lr_op(left: Tensor, right: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    a_l, b, b_r = _impl("retract_lr", left)(left, right, rank)
    return _as(a_l, left.dtype), _as(b, left.dtype), _as(b_r, left.dtype)


@retract_lr_op.register_fake
def _(left, right, rank):
    lead = left.shape[:-1]
    return (left.new_empty(*lead, rank), right.new_empty(*right.shape[:-1], rank),
            right.new_empty(*right.shape[:-1], rank))


# ---------------------------------------------------------------------------- ortho_lr
@torch.library.custom_op(f"{_NS}::ortho_lr", mutates_args=())
def ortho_lr_op(ad: Tensor, bd: Tensor, a_l: Tensor, b_r: Tensor,
                eps: float) -> tuple[Tensor, Tensor]:
    p, q = _impl("ortho_lr", ad)(ad, bd, a_l, b_r, eps)
    return _as(p, ad.dtype), _as(q, ad.dtype)


@ortho_lr_op.register_fake
def _(ad, bd, a_l, b_r, eps):
    k = 2 * ad.shape[-1]
    return ad.new_empty(*ad.shape[:-1], k), bd.new_empty(*bd.shape[:-1], k)


# ---------------------------------------------------------------------- lowrank_linear
@torch.library.custom_op(f"{_NS}::lowrank_linear", mutates_args=())
def lowrank_linear_op(x: Tensor, weight: Tensor, bias: Tensor | None, u: Tensor,
                      v: Tensor) -> Tensor:
    return _as(_impl("lowrank_linear_fwd", x)(x, weight, bias, u, v), x.dtype)


@lowrank_linear_op.register_fake
def _(x, weight, bias, u, v):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def _lowrank_setup(ctx, inputs, output):
    x, weight, bias, u, v = inputs
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, weight, u, v)


@torch.library.custom_op(f"{_NS}::lowrank_linear_bwd", mutates_args=())
def lowrank_linear_bwd_op(dy: Tensor, x: Tensor, weight: Tensor, u: Tensor, v: Tensor,
                          need_dx: bool, need_dw: bool) -> tuple[Tensor, Tensor, Tensor,
                                                                  Tensor, Tensor]:
    # An op of its own so that torch.compile traces the backward through a fake kernel
    # instead of calling a backend launcher on fake tensors. Unwanted outputs are empty.
    dx, dw, db, du, dv = _impl("lowrank_linear_bwd", dy)(dy, x, weight, u, v, need_dx, need_dw)
    return (_as(dx, x.dtype) if need_dx else dy.new_empty(0),
            _as(dw, weight.dtype) if need_dw else dy.new_empty(0),
            _as(db, dy.dtype), _as(du, u.dtype), _as(dv, v.dtype))


@lowrank_linear_bwd_op.register_fake
def _(dy, x, weight, u, v, need_dx, need_dw):
    return (x.new_empty(x.shape) if need_dx else dy.new_empty(0),
            weight.new_empty(weight.shape) if need_dw else dy.new_empty(0),
            dy.new_empty(dy.shape[-1]), u.new_empty(u.shape), v.new_empty(v.shape))


def _lowrank_backward(ctx, dy):
    x, weight, u, v = ctx.saved_tensors
    need_x, need_w, need_b, need_u, need_v = ctx.needs_input_grad
    dx, dw, db, du, dv = lowrank_linear_bwd_op(dy, x, weight, u, v, need_x, need_w)
    return (dx if need_x else None, dw if need_w else None,
            db if (ctx.has_bias and need_b) else None,
            du if need_u else None, dv if need_v else None)


lowrank_linear_op.register_autograd(_lowrank_backward, setup_context=_lowrank_setup)
