"""RiemannLoRA adapter layers, their injection into a model, and PEFT import/export."""

from .inject import inject, match_modules, rlora_layers
from .layer import RiemannLoRALinear
from .peft_io import convert_peft_model, export_peft, import_peft

__all__ = ["inject", "match_modules", "rlora_layers", "RiemannLoRALinear", "export_peft",
           "import_peft", "convert_peft_model"]
