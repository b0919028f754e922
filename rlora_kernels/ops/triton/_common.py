"""Shared pieces of the Triton backend: interpreter detection, dtype rules, block sizes.

Launch configurations are fixed functions of the shape and device, never autotuned: an
autotuner picks by timing, so two data-parallel ranks could pick different tilings and sum
in different orders, and the replicated LoRA factors must stay bitwise identical.
"""

import functools
import os

import torch

# Read once, when the kernels are defined: triton.jit builds interpreted kernels only when
# TRITON_INTERPRET=1 is set before the kernel modules are imported.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

HALF = (torch.float16, torch.bfloat16)
LOW_PRECISION = HALF + (torch.float32,)

# Smallest tile edge tl.dot accepts on NVIDIA GPUs.
MIN_DOT = 16
# Widest panel (columns) one program keeps in registers: k of thin_qr, 2r of the retraction.
MAX_PANEL = 256


def pow2(x: int, lo: int = MIN_DOT, hi: int | None = None) -> int:
    """Next power of two >= x, clamped to [lo, hi]."""
    p = lo
    while p < x:
        p *= 2
    return p if hi is None else min(p, hi)


def native_dot(*tensors: torch.Tensor) -> bool:
    """True when tl.dot may take the operands in their own 16-bit dtype.

    fp16 x fp16 and bf16 x bf16 products are exact in the fp32 accumulator, so this is the
    same arithmetic as converting to fp32 first, on the tensor cores. The interpreter gets
    bf16 arithmetic wrong, so there every operand is converted to fp32 after loading.
    """
    dtype = tensors[0].dtype
    return (not INTERPRET and dtype in HALF and all(t.dtype == dtype for t in tensors))


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def parallel_slots(device: torch.device) -> int:
    """How many programs keep the device busy: 2 per SM on a GPU, 1 when interpreting."""
    if device.type != "cuda" or INTERPRET:
        return 1
    return 2 * _sm_count(device.index if device.index is not None else
                         torch.cuda.current_device())


def dims3(t: torch.Tensor) -> tuple[int, int, int]:
    """Strides of a [L, rows, cols] tensor; a stride of 0 is kept (broadcast layers)."""
    return t.stride(0), t.stride(1), t.stride(2)
