"""The RiemannLoRA layer: a frozen linear map plus a point X = A_L B^T of the rank-r manifold.

Its forward is the doubled adapter [Z1, A_L] [B_R, B]^T at scale 1 with Z1 = 0, so it computes
W x + A_L B^T x, and one ordinary backward leaves G B_R in Z1.grad and G^T A_L in B.grad.
"""

import torch
from torch import nn

from .. import ops

__all__ = ["RiemannLoRALinear", "base_weight", "is_conv1d"]


def is_conv1d(module: nn.Module) -> bool:
    """HF's GPT-2 style Conv1D: weight stored [in, out], y = x W + b."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def base_weight(module: nn.Module) -> torch.Tensor:
    """The weight of a Linear or Conv1D as an [out, in] = [m, n] matrix (a view, no copy)."""
    return module.weight.t() if is_conv1d(module) else module.weight


class RiemannLoRALinear(nn.Module):
    """A linear layer adapted by a point of the fixed-rank manifold.

    Parameters: `lora_Z1` [m, r] (kept at zero; its gradient is G B_R) and `lora_B` [n, r]
    (the scale-carrying factor; its gradient is G^T A_L). Buffers: `lora_A` = A_L [m, r]
    with orthonormal columns, `lora_BR` = B_R [n, r], an orthonormal basis of B's columns,
    and the LOI offset (`lora_offset_A`, `lora_offset_B`) subtracted from the frozen weight,
    kept so an exported adapter is relative to the original pretrained weight.
    The tensors are usually views into a bucket's stacked storage (see `inject`).
    """

    def __init__(self, base: nn.Module, rank: int, name: str, slots: dict[str, torch.Tensor]):
        super().__init__()
        self.base_layer = base
        self.rank = rank
        self.layer_name = name
        self.out_features, self.in_features = base_weight(base).shape
        self.lora_Z1 = nn.Parameter(slots["Z1"])
        self.lora_B = nn.Parameter(slots["B"])
        for key in ("A", "BR", "offset_A", "offset_B"):
            self.register_buffer(f"lora_{key}", slots[key])
        self._tag_factors()
        self._probe: tuple[torch.Tensor, torch.Tensor] | None = None

    def _tag_factors(self) -> None:
        # Optimizers pair factors through the module, never by parameter order.
        for role, p in (("Z1", self.lora_Z1), ("B", self.lora_B)):
            p._rlora_layer = self
            p._rlora_role = role

    def __setstate__(self, state):
        # deepcopy and unpickling build new Parameter objects without our tags.
        super().__setstate__(state)
        self._tag_factors()

    @property
    def shape(self) -> tuple[int, int]:
        return self.out_features, self.in_features

    def delta_weight(self) -> torch.Tensor:
        """Dense X = A_L B^T (m x n); for inspection and tests only."""
        return self.lora_A @ self.lora_B.detach().mT

    def set_probe(self, u: torch.Tensor | None, v: torch.Tensor | None) -> None:
        """Replace the adapter by an arbitrary thin pair (u [m, k], v [n, k]) or restore it.

        LOI uses this to get products of the gradient with sketch matrices from a backward.
        """
        self._probe = None if u is None else (u, v)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        if self._probe is not None:
            u, v = self._probe
        else:
            u = torch.cat([self.lora_Z1, self.lora_A], dim=1)
            v = torch.cat([self.lora_BR, self.lora_B], dim=1)
        weight = base_weight(base)
        if x.dtype != u.dtype:
            u, v = u.to(x.dtype), v.to(x.dtype)
        return ops.lowrank_linear(x, weight, base.bias, u, v)

    def extra_repr(self) -> str:
        return f"{self.layer_name}: m={self.out_features}, n={self.in_features}, r={self.rank}"
