"""Riemannian optimizers (Riemannion, RiemannSGD) and the LOI initialisation."""

from ._base import RiemannianOptimizer, adapter_param_groups
from .factory import create_rlora_optimizer
from .loi import loi_init
from .riemannion import Riemannion
from .sgd import RiemannSGD

__all__ = ["Riemannion", "RiemannSGD", "RiemannianOptimizer", "adapter_param_groups",
           "create_rlora_optimizer", "loi_init"]
