"""Wiring between ``LoraAdapter`` and peft: attach an adapter of any rank to a base model, read it
back after training, and export a standard peft adapter folder.

The one subtle point is the scale. peft scales by ``lora_alpha / r``; HetLoRA needs one scale ``s``
for every rank (HETLORA.md), so each module gets ``alpha = s * r_m`` through ``rank_pattern`` and
``alpha_pattern``. A client at rank r then computes exactly the global model truncated to r.

``LoraAdapter`` holds numpy arrays (the model-free steps load no torch); this module is where they
become torch tensors and back (``as_tensor`` in, ``.numpy()`` out).
"""

from __future__ import annotations

import json
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from .adapter import AdapterError, AdapterSpec, LoraAdapter

ADAPTER_NAME = "default"


def as_tensor(a: np.ndarray) -> torch.Tensor:
    """A zero-copy torch view of ``a`` for reading (adding or copying it into parameters).

    Arrays loaded from safetensors bytes are read-only; torch warns about those although nothing
    here writes to them, so that one warning is silenced instead of copying a whole model delta."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The given NumPy array is not writable", UserWarning)
        return torch.from_numpy(a)


def unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under a peft wrapper (the model itself when not wrapped)."""
    get = getattr(model, "get_base_model", None)
    base = get() if callable(get) else model
    return base if isinstance(base, torch.nn.Module) else model


def spec_from_model(model: torch.nn.Module, target_modules: str | tuple[str, ...]) -> AdapterSpec:
    """Every Linear layer (nn.Linear, GPT-2's Conv1D) whose last name part is one of the modules
    ``target_modules`` resolves to on ``model`` (``auto``, ``all-linear`` or names; targets.py), with its (out, in)."""
    from .targets import linear_classes, linear_shape, resolve_target_modules

    names, classes = set(resolve_target_modules(model, target_modules)), linear_classes()
    spec = {name: linear_shape(m) for name, m in model.named_modules()
            if isinstance(m, torch.nn.Module) and isinstance(m, classes) and name.rsplit(".", 1)[-1] in names}
    if not spec:
        raise AdapterError(f"no Linear layer named {sorted(names)} in the model; check model.target_modules")
    return dict(sorted(spec.items()))


def _fan_in_fan_out(model: torch.nn.Module, modules: list[str]) -> bool:
    """True when the targets are GPT-2-style Conv1D layers (weights stored (in, out)); peft needs
    to know to merge them the right way round, and warns when it has to guess."""
    from .targets import linear_classes

    conv = linear_classes()[1:]
    found = dict(model.named_modules())
    return bool(conv) and any(isinstance(found.get(m), conv) for m in modules)


def lora_config(adapter: LoraAdapter, fan_in_fan_out: bool = False) -> LoraConfig:
    """A peft LoraConfig whose per-module scaling equals ``adapter.scale`` at every module's rank."""
    ranks = adapter.ranks
    r0 = max(ranks.values())
    # Exact module names as patterns; peft matches rank_pattern keys against the module path.
    return LoraConfig(
        r=r0,
        # peft annotates lora_alpha as int but only divides it by r; HetLoRA's scale needs a float alpha.
        lora_alpha=adapter.scale * r0,  # type: ignore[arg-type]
        target_modules=sorted(ranks),
        rank_pattern={m: r for m, r in ranks.items() if r != r0},
        alpha_pattern={m: adapter.scale * r for m, r in ranks.items() if r != r0},
        lora_dropout=0.0,
        fan_in_fan_out=fan_in_fan_out,
        bias="none",
        init_lora_weights=True,
    )


def attach(model: torch.nn.Module, adapter: LoraAdapter, reuse: bool = False) -> PeftModel:
    """Wrap ``model`` with LoRA layers holding copies of ``adapter``'s tensors (trainable).

    Undo with ``detach``; the base weights are never modified. ``reuse``: keep the LoRA layers
    after ``detach`` (out of the model) and put them back at the next attach of the same shape,
    instead of peft's injection (~0.3 s of Python per call whatever the model's size, most of an
    in-process round on a GPU; benchmarks/bench_attach.py). Only for callers that never merge or save
    the returned model (a merged kept layer is dropped, not reused). Not thread-safe: one attach per
    process at a time, as every caller runs (the warm server forks processes, not threads)."""
    cfg = lora_config(adapter, _fan_in_fan_out(model, list(adapter.modules)))
    peft_model: PeftModel
    if not reuse:
        peft_model = get_peft_model(model, cfg)
    else:
        key = _shape_key(model, cfg)  # before get_peft_model, which rewrites cfg's target_modules
        peft_model = _reattach(model, key) or _remember(model, key, get_peft_model(model, cfg))
    try:
        load_into(peft_model, adapter)
    except BaseException:
        detach(peft_model)  # the caller gets no handle: leave the model clean, not attached for good
        raise
    return peft_model


@dataclass
class _Kept:
    """LoRA layers of one shape kept for one base model: where each sits (the parent's path, the
    parent, the attribute), the LoRA layer and the base layer it wraps. ``attached``: in the model now."""

    peft_model: PeftModel
    slots: list[tuple[str, torch.nn.Module, str, Any, torch.nn.Module]]  # Any: a peft LoRA layer
    peft_config: Any
    size: int = 0  # LoRA parameters held
    attached: bool = True


# Bounded: each entry holds its base model alive (so id(model) cannot be reused by another model)
# and a set of LoRA weights. Pruning shrinks ranks one client at a time, so a HetLoRA run meets tens
# of shapes (train and evaluate at each distinct rank): a count of 6 thrashed (on an H200, pruning
# runs took 1.6x the time of unpruned ones; an injection costs ~13x a re-insert, bench_attach.py). So the bound is
# memory: least recently used shapes go once a model's kept LoRA parameters pass KEPT_SHARE of its
# own parameter count (a count, not bytes: peft keeps adapters in float32 over a bf16 or 4-bit base).
# Entries of one model at a time: a new model's first kept attach drops the others' (else a model the
# runtime's cache let go would stay alive here).
_KEPT: OrderedDict[tuple[Any, ...], _Kept] = OrderedDict()
KEPT_MAX = 64
KEPT_SHARE = 0.25


def forget_kept() -> None:
    """Drop every kept LoRA layer set (and with it the base models they hold alive): for a process
    letting go of a model it may have left modified (warm_server, after a failed warm-up)."""
    _KEPT.clear()


def _shape_key(model: torch.nn.Module, cfg: LoraConfig) -> tuple[Any, ...]:
    p = next(model.parameters())  # LoRA layers are made on the base weights' device, their dtype from its
    return (id(model), str(p.device), str(p.dtype), tuple(sorted(cfg.target_modules or ())), cfg.r,
            float(cfg.lora_alpha), tuple(sorted((cfg.rank_pattern or {}).items())),
            tuple(sorted((cfg.alpha_pattern or {}).items())), cfg.fan_in_fan_out)


def _reattach(model: torch.nn.Module, key: tuple[Any, ...]) -> PeftModel | None:
    if any(k[0] == id(model) and e.attached for k, e in _KEPT.items()):
        raise RuntimeError("attach(reuse=True) on a model that already has LoRA layers attached; detach them first")
    kept = _KEPT.get(key)
    if kept is None:
        return None
    # The model must still hold the base layers where they were; anything else (a module or its parent
    # replaced since, or a kept layer merged) and the kept layers are dropped for a fresh injection.
    if any(getattr(parent, name, None) is not base or model.get_submodule(path) is not parent or getattr(lora, "merged", False)
           for path, parent, name, lora, base in kept.slots):
        del _KEPT[key]
        return None
    for _path, parent, name, lora, base in kept.slots:
        setattr(parent, name, lora)
        lora.train(base.training)
        for p in [*lora.lora_A.parameters(), *lora.lora_B.parameters()]:
            p.grad = None  # detach clears them too; here in case a caller stepped outside it
    model.peft_config = kept.peft_config
    kept.attached = True
    _KEPT.move_to_end(key)
    return kept.peft_model


def _remember(model: torch.nn.Module, key: tuple[Any, ...], peft_model: PeftModel) -> PeftModel:
    for k in [k for k, e in _KEPT.items() if k[0] != id(model) and not e.attached]:
        del _KEPT[k]
    slots = []
    for name, mod in list(model.named_modules()):
        if hasattr(mod, "lora_A") and hasattr(mod, "base_layer"):
            parent_name, _, attr = name.rpartition(".")
            slots.append((parent_name, model.get_submodule(parent_name), attr, mod, mod.base_layer))
    size = sum(p.numel() for *_, lora, _b in slots for p in [*lora.lora_A.parameters(), *lora.lora_B.parameters()])
    _KEPT[key] = _Kept(peft_model, slots, getattr(model, "peft_config", None), size)
    budget = KEPT_SHARE * (sum(p.numel() for p in model.parameters()) - size)  # the base model's (this entry is in it now)
    mine = [k for k in _KEPT if k[0] == id(model)]  # oldest first
    while len(mine) > 1 and sum(_KEPT[k].size for k in mine) > budget:
        del _KEPT[mine.pop(0)]
    while len(_KEPT) > KEPT_MAX:
        _KEPT.popitem(last=False)
    return peft_model


def _lora_layers(peft_model: PeftModel) -> dict[str, Any]:
    """peft's LoRA layers by module name. Any: their per-adapter sub-layers (``lora_A[name].weight``,
    ``scaling[name]``) are only typed through nn.Module.__getattr__ (Tensor | Module)."""
    prefix = "base_model.model."
    out: dict[str, Any] = {}
    for name, mod in peft_model.named_modules():
        if hasattr(mod, "lora_A") and ADAPTER_NAME in getattr(mod, "lora_A", {}):
            out[name[len(prefix):] if name.startswith(prefix) else name] = mod
    return out


def load_into(peft_model: PeftModel, adapter: LoraAdapter) -> None:
    layers = _lora_layers(peft_model)
    if set(layers) != set(adapter.modules):
        raise ValueError(f"peft model modules differ from the adapter's: {sorted(set(layers) ^ set(adapter.modules))[:3]}")
    with torch.no_grad():
        for m, layer in layers.items():
            layer.lora_A[ADAPTER_NAME].weight.copy_(as_tensor(adapter.A[m]))
            layer.lora_B[ADAPTER_NAME].weight.copy_(as_tensor(adapter.B[m]))
            s = layer.scaling[ADAPTER_NAME]
            if abs(s - adapter.scale) > 1e-9 * adapter.scale:
                raise AssertionError(f"{m}: peft scaling {s} != adapter scale {adapter.scale}")


def lora_parameters(peft_model: PeftModel) -> list[torch.nn.Parameter]:
    """The trainable LoRA tensors in a fixed order (A then B per module, modules sorted)."""
    layers = _lora_layers(peft_model)
    params = []
    for m in sorted(layers):
        params += [layers[m].lora_A[ADAPTER_NAME].weight, layers[m].lora_B[ADAPTER_NAME].weight]
    return params


def lora_tensors(peft_model: PeftModel) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Live (differentiable) A and B tensors per module, for the regulariser."""
    layers = _lora_layers(peft_model)
    return ({m: layer.lora_A[ADAPTER_NAME].weight for m, layer in layers.items()},
            {m: layer.lora_B[ADAPTER_NAME].weight for m, layer in layers.items()})


def extract(peft_model: PeftModel, scale: float) -> LoraAdapter:
    """Float32 numpy copies of the current LoRA tensors (independent of the live parameters)."""
    A, B = lora_tensors(peft_model)
    return LoraAdapter({m: t.detach().cpu().float().numpy().copy() for m, t in A.items()},
                       {m: t.detach().cpu().float().numpy().copy() for m, t in B.items()}, scale)


def detach(peft_model: PeftModel) -> torch.nn.Module:
    """Remove the LoRA layers and return the untouched base model (layers attached with
    ``reuse`` are taken out and kept for the next attach of their shape)."""
    kept = next((e for e in _KEPT.values() if e.peft_model is peft_model and e.attached), None)
    if kept is None:
        return peft_model.unload()
    for _path, parent, name, lora, base in kept.slots:
        setattr(parent, name, base)
        for p in [*lora.lora_A.parameters(), *lora.lora_B.parameters()]:
            p.grad = None  # a kept layer's last gradients would double its memory until its next attach
    model: torch.nn.Module = peft_model.base_model.model  # type: ignore[assignment]
    if hasattr(model, "peft_config"):
        del model.peft_config  # as peft's unload does: a later get_peft_model would warn about it
    kept.attached = False
    return model


def save_peft_folder(model: torch.nn.Module, adapter: LoraAdapter, out_dir: str | Path,
                     base_model_name_or_path: str | None = None) -> Path:
    """Write ``adapter`` as a standard peft adapter folder that ``AutoPeftModelForCausalLM.from_pretrained``
    loads: adapter_config.json records the base model (``base_model_name_or_path``: a folder or a hub
    id) and ``task_type: CAUSAL_LM``. Training wraps without a task type (plain ``PeftModel``), so
    only the exported config gets them."""
    peft_model = attach(model, adapter)
    try:
        peft_model.save_pretrained(str(out_dir), safe_serialization=True)
    finally:
        detach(peft_model)
    cfg_path = Path(out_dir) / "adapter_config.json"
    meta = json.loads(cfg_path.read_text())
    meta["base_model_name_or_path"] = base_model_name_or_path
    meta["task_type"] = "CAUSAL_LM"
    cfg_path.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return Path(out_dir)
