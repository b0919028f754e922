"""Machinery shared by the Riemannian optimizers: factor pairing, bucketing, the finite-gradient
guard, layout-checked state dicts, and a plain AdamW for the groups that are not adapters.
"""

import logging
import math
from collections import defaultdict

import torch
from torch import nn

from .. import manifold
from ..adapters.inject import rlora_layers
from ..ops.reference import compute_dtype

log = logging.getLogger(__name__)


def _layer_of(p):
    return getattr(p, "_rlora_layer", None)


def adapter_param_groups(model: nn.Module, other_lr: float | None = None) -> list[dict]:
    """Groups for a model: its RiemannLoRA factors, then every other trainable parameter
    (stepped with AdamW, at `other_lr` when given)."""
    layers = rlora_layers(model)
    if not layers:
        raise ValueError("the model has no RiemannLoRA layers; call rlora_kernels.inject first")
    factors = [p for layer in layers for p in (layer.lora_Z1, layer.lora_B)]
    seen = {id(p) for p in factors}
    others = [p for p in model.parameters() if p.requires_grad and id(p) not in seen]
    groups = [{"params": factors}]
    if others:
        groups.append({"params": others, **({"lr": other_lr} if other_lr is not None else {})})
    return groups


def _stack(tensors):
    """One [L, ...] tensor over `tensors`: a view when they are consecutive slices of one
    stacked storage (the bucket layout), else a copy. Returns (stacked, is_view)."""
    first = tensors[0]
    if all(t.is_contiguous() for t in tensors):
        step = first.numel()
        base = first.untyped_storage().data_ptr()
        if all(t.untyped_storage().data_ptr() == base for t in tensors) and all(
                t.storage_offset() == first.storage_offset() + i * step
                for i, t in enumerate(tensors)):
            view = first.as_strided((len(tensors),) + tuple(first.shape),
                                    (step,) + tuple(first.stride()), first.storage_offset())
            return view, True
    return torch.stack(tensors), False


class Bucket:
    """Layers of one group with equal shape, rank, dtype and device, stepped together."""

    def __init__(self, layers):
        self.layers = layers
        self.a_l, self._a_view = _stack([l.lora_A for l in layers])
        self.b, self._b_view = _stack([l.lora_B.data for l in layers])
        self.b_r, self._br_view = _stack([l.lora_BR for l in layers])

    def grads(self):
        g_a = torch.stack([l.lora_Z1.grad if l.lora_Z1.grad is not None
                           else torch.zeros_like(l.lora_Z1) for l in self.layers])
        g_b = torch.stack([l.lora_B.grad for l in self.layers])
        return g_a, g_b

    def write_point(self, a_l, b, b_r):
        for dst, src, is_view, name in ((self.a_l, a_l, self._a_view, "lora_A"),
                                        (self.b, b, self._b_view, "lora_B"),
                                        (self.b_r, b_r, self._br_view, "lora_BR")):
            dst.copy_(src)
            if not is_view:
                for layer, row in zip(self.layers, dst):
                    getattr(layer, name).data.copy_(row)


class RiemannianOptimizer(torch.optim.Optimizer):
    """Base class: subclasses implement `_step_bucket(group, bucket, states)`.

    Groups made only of RiemannLoRA factors (`lora_Z1`, `lora_B` of the same layers) take
    the Riemannian step; groups with no factor take AdamW (`betas`, `eps`, `weight_decay`).
    """

    def __init__(self, params, defaults):
        if isinstance(params, nn.Module):
            params = adapter_param_groups(params)
        defaults = {"betas": (0.9, 0.999), "eps": 1e-8, **defaults}
        super().__init__(params, defaults)
        self.skipped_steps = 0
        self._buckets: dict[int, list[list]] = {}
        for group in self.param_groups:
            self._classify(group)

    # -- groups ------------------------------------------------------------------------
    def _classify(self, group):
        params = group["params"]
        owners = [_layer_of(p) for p in params]
        if all(o is None for o in owners):
            group["kind"] = "euclidean"
            group["layout"] = [list(p.shape) for p in params]
            return
        if any(o is None for o in owners):
            raise ValueError("a parameter group mixes RiemannLoRA factors with other "
                             "parameters; put the others in a group of their own")
        ids = {id(p) for p in params}
        for layer in dict.fromkeys(owners):
            if id(layer.lora_Z1) not in ids or id(layer.lora_B) not in ids:
                raise ValueError(f"layer {layer.layer_name!r}: lora_Z1 and lora_B must be "
                                 "in the same parameter group")
        group["kind"] = "riemannian"
        group["layout"] = [[o.layer_name, p._rlora_role, *o.shape, o.rank]
                           for p, o in zip(params, owners)]

    def _plan(self, group):
        key = id(group)
        if key not in self._buckets:
            by_shape = defaultdict(list)
            for p in group["params"]:
                layer = _layer_of(p)
                if p._rlora_role == "B":
                    by_shape[(layer.shape, layer.rank, p.dtype, p.device)].append(layer)
            self._buckets[key] = list(by_shape.values())
        return self._buckets[key]

    # -- state dict --------------------------------------------------------------------
    def state_dict(self):
        sd = super().state_dict()
        sd["rlora"] = {"skipped_steps": self.skipped_steps}
        return sd

    def load_state_dict(self, state_dict):
        saved = state_dict["param_groups"]
        if len(saved) != len(self.param_groups):
            raise ValueError(f"optimizer state has {len(saved)} parameter groups, this "
                             f"optimizer has {len(self.param_groups)}: it comes from another "
                             "model or set-up")
        for i, (old, new) in enumerate(zip(saved, self.param_groups)):
            if old.get("layout") != new["layout"]:
                raise ValueError(f"optimizer state group {i} was saved for other layers or "
                                 f"shapes ({_describe(old.get('layout'))}) than this model's "
                                 f"({_describe(new['layout'])})")
        extra = state_dict.get("rlora", {})
        state_dict = {k: v for k, v in state_dict.items() if k != "rlora"}
        super().load_state_dict(state_dict)
        self.skipped_steps = int(extra.get("skipped_steps", 0))
        self._buckets.clear()

    # -- step --------------------------------------------------------------------------
    def _grads_finite(self) -> bool:
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not grads:
            return True
        norms = torch._foreach_norm(grads)
        return bool(torch.isfinite(torch.stack([n.float().cpu() for n in norms])).all())

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        finite_loss = loss is None or bool(torch.isfinite(torch.as_tensor(loss)).all())
        if not finite_loss or not self._grads_finite():
            self.skipped_steps += 1
            log.warning("non-finite %s: optimizer step skipped (%d so far); parameters and "
                        "state unchanged", "loss" if not finite_loss else "gradient",
                        self.skipped_steps)
            return loss
        for group in self.param_groups:
            if group["kind"] == "euclidean":
                self._adamw(group)
                continue
            for layers in self._plan(group):
                active = [l for l in layers if l.lora_B.grad is not None]
                if active:
                    self._step_bucket(group, Bucket(active), self._states(active))
        return loss

    def _states(self, layers):
        return [self.state[layer.lora_B] for layer in layers]

    def _step_bucket(self, group, bucket, states):
        raise NotImplementedError

    @staticmethod
    def _compute(bucket):
        cd = compute_dtype(bucket.b.dtype)
        return cd, bucket.a_l.to(cd), bucket.b.to(cd), bucket.b_r.to(cd)

    @staticmethod
    def _gradient(bucket, cd, a_l):
        """Tangent components (Ad_g, Bd_g) of the gradient, from the doubled adapter's grads."""
        g_a, g_b = (g.to(cd) for g in bucket.grads())
        return manifold.riemannian_gradient(a_l, g_a, g_b)

    @staticmethod
    def _transported_momentum(states, cd, a_l, b_r):
        """The stored momentum re-projected at the current point, or None before the first
        step that stored one."""
        mom_a = stacked_state(states, "momentum_A")
        if mom_a is None:
            return None
        mom_b = stacked_state(states, "momentum_B")
        return manifold.transport(a_l, b_r, mom_a.to(cd), mom_b.to(cd))

    @staticmethod
    def _store_momentum(states, dtype, a_l, b_r, ad, bd):
        """Keep the tangent vector (Ad, Bd) in ambient factored form [Ad, A_L] [B_R, Bd]^T."""
        new_state(states, "momentum_A", torch.cat([ad, a_l], -1).to(dtype))
        new_state(states, "momentum_B", torch.cat([b_r, bd], -1).to(dtype))

    @staticmethod
    def _advance_step(states):
        """Increment and return the per-layer step counters."""
        step = stacked_state(states, "step")
        step = (step + 1) if step is not None else torch.ones(len(states), dtype=torch.float32)
        new_state(states, "step", step)
        return step

    def _adamw(self, group):
        beta1, beta2 = group["betas"]
        for p in group["params"]:
            if p.grad is None:
                continue
            st = self.state[p]
            if not st:
                st["step"] = torch.zeros((), dtype=torch.float32)
                st["exp_avg"] = torch.zeros_like(p)
                st["exp_avg_sq"] = torch.zeros_like(p)
            st["step"] += 1
            t = float(st["step"])
            p.mul_(1 - group["lr"] * group["weight_decay"])
            st["exp_avg"].lerp_(p.grad, 1 - beta1)
            st["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
            denom = (st["exp_avg_sq"] / (1 - beta2 ** t)).sqrt_().add_(group["eps"])
            p.addcdiv_(st["exp_avg"], denom, value=-group["lr"] / (1 - beta1 ** t))


def stacked_state(states, key):
    """The [L, ...] tensor of state `key` across a bucket, re-stacked into one storage when
    needed (after load_state_dict) so later steps work in place. None when absent."""
    present = [key in st for st in states]
    if not any(present):
        return None
    if not all(present):
        raise RuntimeError(f"optimizer state {key!r} exists for some layers of a bucket only")
    tensors = [st[key] for st in states]
    stacked, is_view = _stack(tensors)
    if not is_view:
        for st, row in zip(states, stacked):
            st[key] = row
    return stacked


def new_state(states, key, stacked):
    """Store `stacked` [L, ...] as per-layer views under `key`."""
    for st, row in zip(states, stacked):
        st[key] = row


def _describe(layout):
    if not layout:
        return "none"
    names = sorted({str(entry[0]) for entry in layout})
    return f"{len(layout)} tensors, e.g. {', '.join(names[:3])}" + (
        f" ... {len(names)} in all" if len(names) > 3 else "")


def finite_float(name, value, low=0.0):
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= low):
        raise ValueError(f"{name} must be a finite number >= {low}, got {value!r}")
    return float(value)
