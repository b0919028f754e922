"""Backend selection for the rlora ops: which implementation serves a tensor's device.

A backend is a module exposing some of the functions of `ops.reference` under the same
names and signatures; an op a backend lacks falls through to the next one in the chain.
"""

import contextlib
import importlib
import logging
import os

log = logging.getLogger(__name__)

BACKENDS = ("reference", "cpu", "triton", "cuda")
_MODULES = {
    "reference": "rlora_kernels.ops.reference",
    "cpu": "rlora_kernels.ops.compiled",
    "cuda": "rlora_kernels.ops.compiled",
    "triton": "rlora_kernels.ops.triton",
}
# Fastest first. The compiled CPU kernels are only listed where they beat the reference.
_AUTO_CHAIN = {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpu", "reference")}

_forced: str | None = None
_loaded: dict[str, object | None] = {}


def _module(name: str):
    if name not in _loaded:
        try:
            _loaded[name] = importlib.import_module(_MODULES[name])
        except ImportError as exc:  # a missing build never breaks import
            log.warning("rlora backend %r unavailable (%s); falling back", name, exc)
            _loaded[name] = None
    return _loaded[name]


def backend_available(name: str, device_type: str) -> bool:
    """True when backend `name` can run ops on tensors of `device_type`.

    A backend module may define `available(backend_name, device_type) -> bool`.
    """
    mod = _module(name)
    if mod is None:
        return False
    check = getattr(mod, "available", None)
    return True if check is None else bool(check(name, device_type))


def get_backend() -> str:
    """The forced backend name, or "auto"."""
    env = os.environ.get("RLORA_BACKEND", "auto")
    return _forced or env


def set_backend(name: str | None) -> None:
    """Force one backend for every op ("reference", "cpu", "triton", "cuda"), or "auto"/None."""
    global _forced
    if name not in (None, "auto") and name not in BACKENDS:
        raise ValueError(f"unknown rlora backend {name!r}; choose from auto, {', '.join(BACKENDS)}")
    _forced = None if name == "auto" else name


@contextlib.contextmanager
def use_backend(name: str | None):
    """Context manager form of set_backend, restoring the previous choice on exit."""
    previous = _forced
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def check_backend_choice() -> str:
    """The current choice, or a ValueError when RLORA_BACKEND names no backend."""
    choice = get_backend()
    if choice != "auto" and choice not in BACKENDS:
        raise ValueError(f"RLORA_BACKEND={choice!r} is not one of auto, {', '.join(BACKENDS)}")
    return choice


def resolve(op: str, device_type: str):
    """The function implementing `op` for tensors on `device_type` under the current choice."""
    choice = get_backend()
    if choice != "auto":
        check_backend_choice()
        if not backend_available(choice, device_type):
            why = {"triton": "triton not installed, or CPU tensors without TRITON_INTERPRET=1",
                   "cuda": "needs CUDA tensors and a CUDA build of rlora_kernels._C",
                   "cpu": "rlora_kernels._C not built; see the README"}.get(choice, "")
            raise RuntimeError(f"rlora backend {choice!r} cannot run on {device_type} "
                               f"tensors here ({why})")
        chain = (choice, "reference")
    else:
        chain = _AUTO_CHAIN.get(device_type, ("reference",))
    for name in chain:
        if backend_available(name, device_type):
            mod = _module(name)
            # A module serving several backends may list which ops each one takes.
            served = getattr(mod, "OPS", {}).get(name)
            fn = getattr(mod, op, None)
            if fn is not None and (served is None or op in served):
                return fn
    return getattr(_module("reference"), op)
