"""Replace a model's linear layers by RiemannLoRA layers, grouped into stacked buckets.

Layers of equal (m, n, dtype, device) share one stacked tensor per factor; each layer's
parameters and buffers are views into it, so an optimizer step works on whole buckets.
"""

import re
from collections import defaultdict

import torch
from torch import nn

from .. import ops
from .layer import RiemannLoRALinear, base_weight, is_conv1d

__all__ = ["inject", "rlora_layers", "match_modules"]


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def match_modules(model: nn.Module, target_modules) -> list[tuple[str, nn.Module]]:
    """Linear/Conv1D modules selected PEFT-style: a regex string matched against the full
    name, or a list of names matched against the full name or its last components."""
    candidates = [(name, mod) for name, mod in model.named_modules()
                  if _is_linear(mod) and not isinstance(mod, RiemannLoRALinear)]
    candidates = [(n, m) for n, m in candidates if not n.endswith("base_layer")]
    if isinstance(target_modules, str):
        pattern = re.compile(target_modules)
        chosen = [(n, m) for n, m in candidates if pattern.fullmatch(n)]
    else:
        targets = list(target_modules)
        chosen = [(n, m) for n, m in candidates
                  if any(n == t or n.endswith("." + t) for t in targets)]
    if not chosen:
        leaves = sorted({n.split(".")[-1] for n, _ in candidates})
        raise ValueError(f"target_modules={target_modules!r} matched no Linear/Conv1D layer; "
                         f"available names: {', '.join(leaves) or '(none)'}")
    return chosen


def rlora_layers(model: nn.Module) -> list[RiemannLoRALinear]:
    """All RiemannLoRA layers of a model, in module order."""
    return [m for m in model.modules() if isinstance(m, RiemannLoRALinear)]


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _bucket_slots(count, m, n, rank, dtype, device, generator):
    """Stacked storage for one bucket; A_L and B_R start as random orthonormal bases."""
    def orthonormal(rows):
        g = torch.randn(count, rows, rank, generator=generator, dtype=torch.float64)
        return ops.thin_qr(g)[0].to(device=device, dtype=dtype)

    zeros = dict(device=device, dtype=dtype)
    return {
        "Z1": torch.zeros(count, m, rank, **zeros),
        "B": torch.zeros(count, n, rank, **zeros),
        "A": orthonormal(m),
        "BR": orthonormal(n),
        "offset_A": torch.zeros(count, m, rank, **zeros),
        "offset_B": torch.zeros(count, n, rank, **zeros),
    }


def inject(model: nn.Module, target_modules, rank: int, *, dtype: torch.dtype | None = None,
           seed: int = 0, freeze_base: bool = True) -> list[RiemannLoRALinear]:
    """Adapt the selected layers of `model` in place and return the new layers.

    The adapters start at X = 0 (B = 0, random orthonormal A_L), like LoRA; call
    `loi_init` afterwards for the gradient-informed start. `dtype` is the adapters' dtype
    (default: float32, or float64 for a float64 model). With `freeze_base` every other
    parameter of the model stops requiring gradients.
    """
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    chosen = match_modules(model, target_modules)
    for name, mod in chosen:
        m, n = base_weight(mod).shape
        if 2 * rank > min(m, n):
            raise ValueError(f"rank {rank} is too large for layer {name!r} of shape ({m}, {n}): "
                             "Riemannian LoRA needs 2 * rank <= min(m, n)")
    if freeze_base:
        for p in model.parameters():
            p.requires_grad_(False)
    groups = defaultdict(list)
    for name, mod in chosen:
        w = base_weight(mod)
        adapter_dtype = dtype or (torch.float64 if w.dtype == torch.float64 else torch.float32)
        groups[(tuple(w.shape), adapter_dtype, w.device)].append((name, mod))
    generator = torch.Generator().manual_seed(seed)
    layers = []
    for ((m, n), adapter_dtype, device), members in groups.items():
        slots = _bucket_slots(len(members), m, n, rank, adapter_dtype, device, generator)
        for i, (name, mod) in enumerate(members):
            mod.requires_grad_(False)
            layer = RiemannLoRALinear(mod, rank, name, {k: v[i] for k, v in slots.items()})
            _set_submodule(model, name, layer)
            layers.append(layer)
    order = {name: i for i, (name, _) in enumerate(chosen)}
    return sorted(layers, key=lambda layer: order[layer.layer_name])
