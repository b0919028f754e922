"""Records the shape of every tensor that any aten op produces, including the ops run inside
the rlora custom ops' backends (a dispatch mode alone would only see the custom op)."""

import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from rlora_kernels.ops import _library


class ShapeSpy(TorchDispatchMode):
    def __init__(self, seen):
        super().__init__()
        self.seen = seen

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.seen.append(tuple(t.shape))
        return out


@contextlib.contextmanager
def record_shapes(monkeypatch):
    """Context yielding the list of output shapes seen while it is active."""
    seen = []
    original = _library._impl

    def spied(op, t):
        fn = original(op, t)

        def run(*args):
            with ShapeSpy(seen):
                return fn(*args)
        return run

    monkeypatch.setattr(_library, "_impl", spied)
    with ShapeSpy(seen):
        yield seen
