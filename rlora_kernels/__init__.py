"""Riemannian LoRA: fixed-rank manifold ops with fast backends, adapter layers, the
Riemannion and RiemannSGD optimizers, and the LOI initialisation."""

from . import manifold, ops
from .adapters import (RiemannLoRALinear, convert_peft_model, export_peft, import_peft, inject,
                       rlora_layers)
from .optim import Riemannion, RiemannSGD, adapter_param_groups, create_rlora_optimizer, loi_init

__version__ = "0.1.0"

__all__ = ["ops", "manifold", "inject", "rlora_layers", "RiemannLoRALinear", "export_peft",
           "import_peft", "convert_peft_model", "Riemannion",
           "RiemannSGD", "create_rlora_optimizer", "adapter_param_groups", "loi_init"]
