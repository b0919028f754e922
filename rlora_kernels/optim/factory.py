"""PEFT-style factory: one optimizer for a whole adapted model."""

from torch import nn

from ._base import adapter_param_groups
from .riemannion import Riemannion
from .sgd import RiemannSGD

__all__ = ["create_rlora_optimizer"]

_OPTIMIZERS = {"riemannion": Riemannion, "riemann_sgd": RiemannSGD}


def create_rlora_optimizer(model: nn.Module, optimizer: str = "riemannion", *, lr: float,
                           other_lr: float | None = None, **kwargs):
    """Riemannion (or RiemannSGD, `optimizer="riemann_sgd"`) over the model's RiemannLoRA
    factors, with AdamW for its other trainable parameters (a classifier head, say) at
    `other_lr` (default: `lr`). Keyword arguments go to the optimizer."""
    if optimizer not in _OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {sorted(_OPTIMIZERS)}, got {optimizer!r}")
    groups = adapter_param_groups(model, other_lr=other_lr)
    return _OPTIMIZERS[optimizer](groups, lr=lr, **kwargs)
