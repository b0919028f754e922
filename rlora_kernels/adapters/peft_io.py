"""Exchange with PEFT: export RiemannLoRA adapters as a standard PEFT LoRA adapter directory,
import a PEFT LoRA adapter onto the manifold, and convert an in-memory PEFT LoRA model.

All factorisations here run once per layer on thin factors (m x k, n x k), in float64 on the
CPU with the reference backend: I/O is not a hot path, and exactness matters more than speed.
"""

import json
import logging
import os
import re

import torch
from torch import nn

from .. import ops
from .inject import _is_linear, inject
from .layer import RiemannLoRALinear, base_weight, is_conv1d

log = logging.getLogger(__name__)

__all__ = ["export_peft", "import_peft", "convert_peft_model", "original_state_dict"]

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
# PeftModel wraps the base model as `base_model.model`; saved keys carry that prefix and no
# adapter name, e.g. `base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight`.
PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"(?P<module>.+)\.lora_(?P<factor>[AB])\.weight")
# Relative energy (sum of squared singular values) a truncation may drop before import warns.
# Float32-stored factors of a matrix of exact rank <= r leave tails of order eps32^2 ~ 1e-14;
# 1e-10 is well above that noise and far below any real loss.
_LOST_ENERGY_WARN = 1e-10


def _named_rlora(model: nn.Module) -> dict[str, RiemannLoRALinear]:
    """RiemannLoRA layers keyed by their path in `model` (not their stored name, which is
    relative to whatever module `inject` was called on)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, RiemannLoRALinear)}


def _has_offset(layer: RiemannLoRALinear) -> bool:
    return bool(layer.lora_offset_B.abs().max() > 0) and bool(layer.lora_offset_A.abs().max() > 0)


def _svd_thin(left: torch.Tensor, right: torch.Tensor, width: int):
    """SVD of left @ right^T (left m x k, right n x k) as (U m x width, s, V n x width),
    through QR of the thin factors and a small SVD; zero columns pad what the matrix lacks.

    Runs in float64 with the reference (Householder) backend: panels here are often rank
    deficient (zero offsets, padding, a freshly initialised PEFT adapter), which a Cholesky
    based fast QR would turn into NaN.
    """
    left, right = left.detach().cpu().double(), right.detach().cpu().double()
    m, n, k = left.shape[0], right.shape[0], left.shape[1]
    full = min(m, n)
    if k > full:
        # Wider than the matrix: thin QR needs tall panels, so compress through the dense
        # product (m n min(m, n) flops at most, since min(m, n) < k here).
        dense = left @ right.mT
        eye = torch.eye(full, dtype=dense.dtype)
        left, right = (eye, dense.mT) if m <= n else (dense, eye)
        k = full
    keep = min(width, full)
    if k < keep:
        # Zero columns add zero singular values but keep orthonormal bases of full width.
        left = torch.cat([left, left.new_zeros(m, keep - k)], 1)
        right = torch.cat([right, right.new_zeros(n, keep - k)], 1)
        k = keep
    with ops.use_backend("reference"):
        a_l, b, b_r = ops.retract_lr(left[None], right[None], k)
    # B = B_R diag(s) with orthonormal B_R, so s is the column norms of B.
    u, s, v = a_l[0][:, :keep], b[0].norm(dim=0)[:keep], b_r[0][:, :keep]
    if keep < width:
        u = torch.cat([u, u.new_zeros(m, width - keep)], 1)
        v = torch.cat([v, v.new_zeros(n, width - keep)], 1)
        s = torch.cat([s, s.new_zeros(width - keep)])
    return u, s, v


# ------------------------------------------------------------------------------- export
def original_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of the model before `inject` and LOI: adapter tensors dropped,
    `<layer>.base_layer.*` renamed to `<layer>.*`, and LOI's re-centring undone
    (W = W' + offset_A offset_B^T). Load it into a fresh instance of the architecture to
    get the original base model that an exported adapter applies to. Tensors are copies;
    modules trained outside the adapters (a classifier head) keep their trained values.
    """
    layers = _named_rlora(model)
    out = {}
    for key, value in model.state_dict().items():
        owner = next((p for p in layers if key.startswith(p + ".")), None)
        if owner is None:
            out[key] = value.detach().clone()
            continue
        rest = key[len(owner) + 1:]
        if not rest.startswith("base_layer."):
            continue  # lora_* parameters and buffers
        out[f"{owner}.{rest[len('base_layer.'):]}"] = value.detach().clone()
    for name, layer in layers.items():
        if _has_offset(layer):
            key = f"{name}.weight"
            w = out[key]
            off = (layer.lora_offset_A.double() @ layer.lora_offset_B.double().mT).to(w.device)
            if is_conv1d(layer.base_layer):
                off = off.mT
            out[key] = (w.double() + off).to(w.dtype)
    return out


def _modules_to_save_tensors(model, modules_to_save, adapted):
    """Every tensor of the named modules, keyed as PEFT's ModulesToSaveWrapper saves them:
    the module's own state-dict keys, without the `modules_to_save.<adapter>.` infix."""
    tensors = {}
    for entry in modules_to_save:
        found = [(n, m) for n, m in model.named_modules() if n == entry or n.endswith("." + entry)]
        if not found:
            raise ValueError(f"modules_to_save entry {entry!r} matches no module of the model")
        for name, module in found:
            clash = [p for p in adapted if p == name or p.startswith(name + ".")]
            if clash:
                raise ValueError(f"modules_to_save entry {entry!r} selects {name!r}, which holds "
                                 f"RiemannLoRA layer {clash[0]!r}; PEFT cannot save a module both "
                                 "ways")
            for key, value in module.state_dict().items():
                # clone: safetensors refuses tensors that share storage (tied weights).
                tensors[f"{PREFIX}{name}.{key}"] = value.detach().cpu().clone().contiguous()
    return tensors


@torch.no_grad()
def export_peft(model: nn.Module, path, base_model_name_or_path=None, modules_to_save=None,
                task_type=None) -> dict:
    """Write the model's RiemannLoRA adapters as a PEFT LoRA adapter directory at `path`
    (`adapter_model.safetensors` + `adapter_config.json`).

    The adapter is the change relative to the ORIGINAL pretrained weights,
    `X - X0 = A_L B^T - offset_A offset_B^T` (X0 = 0 unless LOI re-centred the base), so it
    must be loaded onto a fresh copy of the original model, never onto this model's
    re-centred weights: `PeftModel.from_pretrained(original_model, path)`. Rebuild the
    original from this model with `original_state_dict(model)` when no copy is at hand.

    Factors are balanced (PEFT lora_B = U sqrt(S), lora_A = sqrt(S) V^T) with one PEFT rank
    for every layer: r, or 2r when any layer carries an LOI offset; `lora_alpha` equals that
    rank so PEFT's scale is 1. `modules_to_save` (e.g. ["classifier"]) saves whole modules
    the way PEFT does. Returns the written config as a dict.
    """
    layers = _named_rlora(model)
    if not layers:
        raise ValueError("export_peft: the model has no RiemannLoRA layers; call inject first")
    offsets = {name: _has_offset(layer) for name, layer in layers.items()}
    width = max((2 if offsets[n] else 1) * layer.rank for n, layer in layers.items())
    tensors = {}
    for name, layer in layers.items():
        left, right = layer.lora_A, layer.lora_B
        if offsets[name]:
            left = torch.cat([left, -layer.lora_offset_A], 1)
            right = torch.cat([right, layer.lora_offset_B], 1)
        u, s, v = _svd_thin(left, right, width)
        root = s.sqrt()
        dtype = layer.lora_B.dtype
        # PEFT's layout is [out, in] = [m, n] for Linear and Conv1D alike; fan_in_fan_out
        # only transposes the merged delta, never the factors.
        tensors[f"{PREFIX}{name}.lora_A.weight"] = (v * root).mT.to(dtype).contiguous()
        tensors[f"{PREFIX}{name}.lora_B.weight"] = (u * root).to(dtype).contiguous()
    tensors.update(_modules_to_save_tensors(model, modules_to_save or [], layers))
    config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "r": width,
        "lora_alpha": width,
        "use_rslora": False,
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": sorted(layers),
        "fan_in_fan_out": any(is_conv1d(layer.base_layer) for layer in layers.values()),
        "modules_to_save": list(modules_to_save) if modules_to_save else None,
        "init_lora_weights": True,
        "inference_mode": True,
        "use_dora": False,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, WEIGHTS_NAME), metadata={"format": "pt"})
    with open(os.path.join(path, CONFIG_NAME), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    log.info("exported %d RiemannLoRA layers as a rank-%d PEFT adapter to %s", len(layers),
             width, path)
    return config


# ------------------------------------------------------------------------------- import
def _pattern_value(patterns: dict, name: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: the first key matching the end of `name`."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _scale(alpha: float, rank: int, rslora: bool) -> float:
    return alpha / rank ** 0.5 if rslora else alpha / rank


def _restore_base(layer: RiemannLoRALinear) -> None:
    """Undo LOI's re-centring of one layer's frozen weight and zero its offset."""
    if _has_offset(layer):
        w = base_weight(layer.base_layer)
        w.add_((layer.lora_offset_A @ layer.lora_offset_B.mT).to(w.dtype))
    layer.lora_offset_A.zero_()
    layer.lora_offset_B.zero_()


def _set_point(layer: RiemannLoRALinear, left: torch.Tensor, right: torch.Tensor) -> float:
    """Make the layer's point the best rank-r approximation of left @ right^T, on the
    original base weight. Returns the relative energy the truncation dropped."""
    r = layer.rank
    u, s, v = _svd_thin(left, right, max(r, left.shape[1]))
    total = float(s.square().sum())
    _restore_base(layer)
    if total == 0.0:
        # A zero delta (e.g. a freshly initialised PEFT adapter): keep the injected random
        # bases, which give a better first step than the coordinate axes QR would return.
        layer.lora_B.data.zero_()
        return 0.0
    device, dtype = layer.lora_B.device, layer.lora_B.dtype
    for dst, value in ((layer.lora_A, u[:, :r]), (layer.lora_B.data, v[:, :r] * s[:r]),
                       (layer.lora_BR, v[:, :r])):
        dst.copy_(value.to(device=device, dtype=dtype))
    layer.lora_Z1.data.zero_()
    return float(s[r:].square().sum()) / total


def _warn_truncation(lost: dict[str, float]) -> None:
    bad = {n: e for n, e in lost.items() if e > _LOST_ENERGY_WARN}
    if bad:
        worst = max(bad, key=bad.get)
        log.warning("rank truncation dropped adapter energy in %d layer(s); worst %r loses "
                    "%.3g of its squared Frobenius norm (use a larger rank to keep it)",
                    len(bad), worst, bad[worst])


def _load_adapter_files(path):
    if not os.path.isdir(path):
        raise FileNotFoundError(f"PEFT adapter directory {path!r} does not exist")
    cfg_file, weights_file = os.path.join(path, CONFIG_NAME), os.path.join(path, WEIGHTS_NAME)
    if not os.path.isfile(cfg_file):
        raise FileNotFoundError(f"{cfg_file!r} not found: not a PEFT adapter directory")
    if not os.path.isfile(weights_file):
        raise FileNotFoundError(f"{weights_file!r} not found (only safetensors adapters are "
                                "read; re-save with save_pretrained(safe_serialization=True))")
    with open(cfg_file) as f:
        config = json.load(f)
    from safetensors.torch import load_file

    return config, load_file(weights_file)


def _check_lora_config(config: dict, where: str) -> None:
    kind = str(config.get("peft_type", "")).upper()
    if kind != "LORA":
        raise ValueError(f"{where} is a {kind or 'untyped'} PEFT adapter; only LoRA adapters "
                         "can become RiemannLoRA points")
    for flag, what in (("use_dora", "DoRA"), ("lora_bias", "LoRA bias terms")):
        if config.get(flag):
            raise NotImplementedError(f"{where}: {what} ({flag}=True) has no RiemannLoRA "
                                      "equivalent")


def _split_state(tensors: dict):
    """{module: (lora_A [p, n], lora_B [m, p])} and the remaining (modules_to_save) tensors."""
    pairs, others = {}, {}
    for key, value in tensors.items():
        key = key.removeprefix(PREFIX)
        hit = _LORA_KEY.fullmatch(key)
        if hit:
            pairs.setdefault(hit["module"], {})[hit["factor"]] = value
        elif ".lora_" in key:
            raise NotImplementedError(f"adapter tensor {key!r} is not a plain LoRA factor "
                                      "(embedding LoRA, DoRA or bias); cannot import it")
        else:
            others[key] = value
    incomplete = [n for n, f in pairs.items() if len(f) != 2]
    if incomplete:
        raise ValueError(f"adapter is missing lora_A or lora_B for {incomplete[:5]}")
    return {n: (f["A"], f["B"]) for n, f in pairs.items()}, others


def _check_targets(model, pairs, existing):
    """All checks before the model is touched: modules exist, are adaptable, shapes agree."""
    modules = dict(model.named_modules())
    missing = sorted(n for n in pairs if n not in modules)
    if missing:
        raise ValueError(f"the adapter targets modules the model lacks: {missing[:8]}"
                         + (f" and {len(missing) - 8} more" if len(missing) > 8 else ""))
    for name, (a, b) in pairs.items():
        mod = modules[name]
        if existing and name not in existing:
            raise ValueError(f"the adapter targets {name!r}, which is not a RiemannLoRA layer of "
                             "this already-injected model; inject it too or pass a fresh model")
        if not isinstance(mod, RiemannLoRALinear) and not _is_linear(mod):
            raise ValueError(f"the adapter targets {name!r}, a {type(mod).__name__}; only "
                             "Linear and Conv1D layers can be imported")
        shape = mod.shape if isinstance(mod, RiemannLoRALinear) else tuple(base_weight(mod).shape)
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1] \
                or (b.shape[0], a.shape[1]) != tuple(shape):
            raise ValueError(f"shape mismatch at layer {name!r}: the model's weight is "
                             f"{tuple(shape)} (out, in), the adapter has lora_B "
                             f"{tuple(b.shape)} and lora_A {tuple(a.shape)}")


def _check_others(model, others: dict) -> None:
    state = model.state_dict()
    unknown = sorted(k for k in others if k not in state)
    if unknown:
        raise ValueError(f"the adapter holds tensors the model lacks: {unknown[:8]}")
    for key, value in others.items():
        if tuple(state[key].shape) != tuple(value.shape):
            raise ValueError(f"shape mismatch at {key!r}: model {tuple(state[key].shape)}, "
                             f"adapter {tuple(value.shape)}")


def _load_others(model, others: dict) -> None:
    """Load modules_to_save tensors and leave those parameters trainable, as PEFT does."""
    state = model.state_dict(keep_vars=True)
    for key, value in others.items():
        dst = state[key]
        dst.data.copy_(value.to(device=dst.device, dtype=dst.dtype))
        if isinstance(dst, nn.Parameter):
            dst.requires_grad_(True)


def _exact_names(names) -> str:
    """A regex for `inject` that selects exactly these full module names."""
    return "|".join(re.escape(n) for n in sorted(names))


@torch.no_grad()
def import_peft(model: nn.Module, path, rank: int | None = None, *,
                dtype: torch.dtype | None = None, seed: int = 0) -> nn.Module:
    """Load the PEFT LoRA adapter at `path` into `model` as RiemannLoRA points; returns `model`.

    `model` is the original base model, either fresh (the adapter's layers are injected at
    `rank`, default: the adapter's largest rank) or already injected (its layers are reused
    at their rank; an LOI re-centring of their weights is undone first). Each layer's
    `scale * lora_B @ lora_A` (scale = lora_alpha / r, or / sqrt(r) with use_rslora) becomes
    the point: exact when the PEFT rank is <= r, else the best rank-r approximation, with
    one warning naming the worst loss. Offsets are zero afterwards. Tensors besides LoRA
    factors (modules_to_save) are loaded and left trainable. `dtype` and `seed` go to
    `inject` when it runs. An optimizer built before the import holds stale momentum.
    """
    # Limitation: keys are matched to module names as saved. An adapter that transformers v5
    # would re-lay out at load time (a checkpoint conversion mapping, e.g. fused MoE experts)
    # fails with the missing-module error that names the unmatched layers.
    config, tensors = _load_adapter_files(path)
    _check_lora_config(config, repr(path))
    pairs, others = _split_state(tensors)
    if not pairs:
        raise ValueError(f"{path!r} holds no lora_A/lora_B tensors")
    existing = _named_rlora(model)
    _check_targets(model, pairs, existing)
    _check_others(model, others)
    rslora = bool(config.get("use_rslora", False))
    factors = {}
    for name, (a, b) in pairs.items():
        r_cfg = _pattern_value(config.get("rank_pattern"), name, config.get("r", a.shape[0]))
        if int(r_cfg) != a.shape[0]:
            raise ValueError(f"layer {name!r}: adapter config says rank {r_cfg}, but lora_A "
                             f"has {a.shape[0]} rows")
        alpha = _pattern_value(config.get("alpha_pattern"), name, config.get("lora_alpha", r_cfg))
        factors[name] = (_scale(float(alpha), a.shape[0], rslora) * b.double(), a.double().mT)
    if not existing:
        target_rank = rank or max(a.shape[0] for a, _ in pairs.values())
        inject(model, _exact_names(pairs), target_rank, dtype=dtype, seed=seed)
        existing = _named_rlora(model)
    elif rank is not None and any(existing[n].rank != rank for n in pairs):
        raise ValueError(f"rank={rank} differs from the rank of the injected layers; pass "
                         "rank=None to reuse them or import into a fresh model")
    lost = {name: _set_point(existing[name], *factors[name]) for name in sorted(factors)}
    _warn_truncation(lost)
    _load_others(model, others)
    untouched = sorted(set(existing) - set(pairs))
    if untouched:
        log.warning("import_peft: %d RiemannLoRA layers are not in the adapter and keep their "
                    "current point, e.g. %r", len(untouched), untouched[0])
    log.info("imported %d PEFT LoRA layers from %s", len(pairs), path)
    return model


# ------------------------------------------------------------------------------ convert
def _check_peft_layer(name, module) -> None:
    from peft.tuners.lora import Linear as LoraLinear

    if not isinstance(module, LoraLinear):
        raise NotImplementedError(f"PEFT layer {name!r} is a {type(module).__name__}; only "
                                  "LoRA on Linear / Conv1D layers can be converted")
    for a in module.active_adapters:
        if module.use_dora.get(a) or getattr(module, "lora_variant", {}).get(a) is not None:
            raise NotImplementedError(f"PEFT layer {name!r}: adapter {a!r} is a LoRA variant "
                                      "(DoRA or similar) with no RiemannLoRA equivalent")
        if getattr(module, "lora_bias", {}).get(a):
            raise NotImplementedError(f"PEFT layer {name!r}: LoRA bias terms cannot be converted")


def _peft_layer_factors(module):
    """(left m x k, right n x k) with left @ right^T the summed delta of the active adapters,
    or None when no adapter is active."""
    if module.merged:
        module.unmerge()  # else unload would keep the delta inside the base weight
    active = [a for a in module.active_adapters if a in module.lora_A]
    if not active:
        return None
    left = torch.cat([module.scaling[a] * module.lora_B[a].weight.detach().double().cpu()
                      for a in active], 1)
    right = torch.cat([module.lora_A[a].weight.detach().double().cpu().mT for a in active], 1)
    return left, right


@torch.no_grad()
def convert_peft_model(peft_model, rank: int | None = None, *, dtype: torch.dtype | None = None,
                       seed: int = 0) -> nn.Module:
    """Turn an in-memory PEFT LoRA model into RiemannLoRA layers in place and return the
    underlying base model, ready for `Riemannion(model)`.

    Each layer's current delta (the sum over active adapters of scale * lora_B @ lora_A)
    becomes its point at `rank` (default: the largest PEFT rank), exactly as `import_peft`
    does. modules_to_save copies replace the originals and stay trainable. LoRA dropout is
    dropped. Do not use `peft_model` afterwards: its modules now belong to the result.
    """
    try:
        from peft import PeftModel
        from peft.tuners.lora import LoraLayer, LoraModel
        from peft.utils import ModulesToSaveWrapper
    except ImportError as exc:
        raise ImportError("convert_peft_model needs the peft package") from exc
    tuner = peft_model.base_model if isinstance(peft_model, PeftModel) else peft_model
    if not isinstance(tuner, LoraModel):
        raise ValueError(f"convert_peft_model expects a PEFT LoRA model, got a "
                         f"{type(tuner).__name__}")
    inner = tuner.model
    lora = [(n, m) for n, m in inner.named_modules() if isinstance(m, LoraLayer)]
    for name, module in lora:  # every check before anything changes
        _check_peft_layer(name, module)
    factors = {n: f for n, f in ((n, _peft_layer_factors(m)) for n, m in lora) if f is not None}
    if not factors:
        raise ValueError("the PEFT model has no active LoRA layers to convert")
    saved = [n for n, m in inner.named_modules() if isinstance(m, ModulesToSaveWrapper)]
    base = tuner.unload()
    rank = rank or max(left.shape[1] for left, _ in factors.values())
    layers = inject(base, _exact_names(factors), rank, dtype=dtype, seed=seed)
    named = {layer.layer_name: layer for layer in layers}
    _warn_truncation({n: _set_point(named[n], *f) for n, f in sorted(factors.items())})
    for name in saved:
        base.get_submodule(name).requires_grad_(True)
    log.info("converted %d PEFT LoRA layers to RiemannLoRA", len(factors))
    return base
