"""The adapted Linear shapes of real architectures, and weightless stand-in models built from
them, so an optimizer step over every adapter can be timed without downloading any weights.

The frozen weights are stride-0 views of one zero (no memory, real CPU tensors); the adapter
factors, gradients and optimizer state are real tensors of the true shapes.
"""

from __future__ import annotations

import torch
from torch import nn

# (name, out_features m, in_features n) per block, and the number of blocks.
ARCHS = {
    "minilm-l6": (6, [("query", 384, 384), ("key", 384, 384), ("value", 384, 384),
                      ("attn_out", 384, 384), ("intermediate", 1536, 384),
                      ("output", 384, 1536)]),
    "smollm2-135m": (30, [("q_proj", 576, 576), ("k_proj", 192, 576), ("v_proj", 192, 576),
                          ("o_proj", 576, 576), ("gate_proj", 1536, 576),
                          ("up_proj", 1536, 576), ("down_proj", 576, 1536)]),
    "llama3-8b": (32, [("q_proj", 4096, 4096), ("k_proj", 1024, 4096),
                       ("v_proj", 1024, 4096), ("o_proj", 4096, 4096),
                       ("gate_proj", 14336, 4096), ("up_proj", 14336, 4096),
                       ("down_proj", 4096, 14336)]),
}


def layer_shapes(arch: str, blocks: int | None = None) -> list[tuple[int, int]]:
    count, block = ARCHS[arch]
    return [(m, n) for _ in range(blocks or count) for _, m, n in block]


def target_names(arch: str) -> list[str]:
    return [name for name, _, _ in ARCHS[arch][1]]


def _weightless_linear(m: int, n: int) -> nn.Linear:
    layer = nn.Linear(n, m, bias=False, device="meta")
    layer.weight = nn.Parameter(torch.zeros(()).expand(m, n), requires_grad=False)
    return layer


def shape_model(arch: str, blocks: int | None = None) -> nn.Module:
    """blocks x {name: Linear(n -> m)} with weightless frozen weights."""
    count, block = ARCHS[arch]
    return nn.ModuleList(
        nn.ModuleDict({name: _weightless_linear(m, n) for name, m, n in block})
        for _ in range(blocks or count))


def custom_model(shapes: list[tuple[int, int]]) -> nn.Module:
    """One block per shape, each with a single Linear named `proj`."""
    return nn.ModuleList(nn.ModuleDict({"proj": _weightless_linear(m, n)}) for m, n in shapes)


def adapter_size(shapes, rank: int) -> int:
    """Total adapter parameters sum (m + n) r (the x-axis of the scaling benchmark)."""
    return sum((m + n) * rank for m, n in shapes)


def riemannion_step_cost(shapes, rank: int, itemsize: int = 4) -> tuple[float, float]:
    """(FLOPs, bytes) of one Riemannion step, counting the O((m + n) r^2) terms.

    Per layer with k = 2r: the gradient projection 4mr^2; two projections of 2r-wide
    pairs 2 x (12m + 8n) r^2; two pairs of thin QRs with Q formed, about 4 rows k^2 each,
    so 2 x 16 (m + n) r^2; rotations Q U of the 2r-wide bases 8 (m + n) r^2 (ortho) and
    4 (m + n) r^2 (retraction). Bytes: the panels read and written once (A_L, g_A,
    momentum, new A_L on the m side; B, B_R, g_B, momentum, new B, B_R on the n side).
    """
    flops = sum((4 + 24 + 32 + 8 + 4) * m * rank**2 + (16 + 32 + 8 + 4) * n * rank**2
                for m, n in shapes)
    nbytes = sum((7 * m + 9 * n) * rank * itemsize for m, n in shapes)
    return float(flops), float(nbytes)


def adamw_step_cost(shapes, rank: int, itemsize: int = 4) -> tuple[float, float]:
    """(FLOPs, bytes) of AdamW on plain LoRA factors: ~12 flops and 7 tensor passes/elem."""
    elems = adapter_size(shapes, rank)
    return 12.0 * elems, 7.0 * elems * itemsize


def fake_grads(params, seed: int = 0, scale: float = 1e-3) -> None:
    """Fill `.grad` of every parameter with small Gaussian noise."""
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = scale * torch.randn(p.shape, generator=gen, dtype=p.dtype)


def lora_factors(shapes, rank: int, seed: int = 0) -> list[torch.Tensor]:
    """Plain LoRA factors (A: r x n, B: m x r) per layer, with gradients, for AdamW."""
    gen = torch.Generator().manual_seed(seed)
    params = []
    for m, n in shapes:
        params.append(nn.Parameter(torch.randn(rank, n, generator=gen) / n**0.5))
        params.append(nn.Parameter(torch.zeros(m, rank)))
    fake_grads(params, seed)
    return params
