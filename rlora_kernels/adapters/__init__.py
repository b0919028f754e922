"""RiemannLoRA adapter layers, their injection into a model, and PEFT import/export."""

from .inject import inject, match_modules, rlora_layers
from .layer import RiemannLoRALinear

__all__ = ["inject", "match_modules", "rlora_layers", "RiemannLoRALinear"]
