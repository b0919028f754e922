"""Pure-PyTorch reference backend: the oracle every fast path is tested against."""

from .linalg import compute_dtype, ortho_lr, project_lr, retract_lr, thin_qr
from .lowrank import lowrank_linear_bwd, lowrank_linear_fwd

__all__ = ["compute_dtype", "thin_qr", "project_lr", "retract_lr", "ortho_lr",
           "lowrank_linear_fwd", "lowrank_linear_bwd"]
