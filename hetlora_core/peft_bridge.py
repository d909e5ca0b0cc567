"""Wiring between ``LoraAdapter`` and peft: attach an adapter of any rank to a base model, read it
back after training, and export a standard peft adapter folder.

The one subtle point is the scale. peft scales by ``lora_alpha / r``; HetLoRA needs one scale ``s``
for every rank (HETLORA.md), so each module gets ``alpha = s * r_m`` through ``rank_pattern`` and
``alpha_pattern``. A client at rank r then computes exactly the global model truncated to r.
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model

from .adapter import LoraAdapter

ADAPTER_NAME = "default"


def lora_config(adapter: LoraAdapter) -> LoraConfig:
    """A peft LoraConfig whose per-module scaling equals ``adapter.scale`` at every module's rank."""
    ranks = adapter.ranks
    r0 = max(ranks.values())
    # Exact module names as patterns; peft matches rank_pattern keys against the module path.
    return LoraConfig(
        r=r0,
        lora_alpha=adapter.scale * r0,
        target_modules=sorted(ranks),
        rank_pattern={m: r for m, r in ranks.items() if r != r0},
        alpha_pattern={m: adapter.scale * r for m, r in ranks.items() if r != r0},
        lora_dropout=0.0,
        bias="none",
        init_lora_weights=True,
    )


def attach(model: torch.nn.Module, adapter: LoraAdapter) -> PeftModel:
    """Wrap ``model`` with LoRA layers holding copies of ``adapter``'s tensors (trainable).

    Undo with ``detach``; the base weights are never modified."""
    peft_model = get_peft_model(model, lora_config(adapter))
    load_into(peft_model, adapter)
    return peft_model


def _lora_layers(peft_model: PeftModel) -> dict[str, torch.nn.Module]:
    prefix = "base_model.model."
    out = {}
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
            layer.lora_A[ADAPTER_NAME].weight.copy_(adapter.A[m])
            layer.lora_B[ADAPTER_NAME].weight.copy_(adapter.B[m])
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
    return ({m: l.lora_A[ADAPTER_NAME].weight for m, l in layers.items()},
            {m: l.lora_B[ADAPTER_NAME].weight for m, l in layers.items()})


def extract(peft_model: PeftModel, scale: float) -> LoraAdapter:
    """Detached float32 copies of the current LoRA tensors."""
    A, B = lora_tensors(peft_model)
    return LoraAdapter({m: t.detach().float().clone() for m, t in A.items()},
                       {m: t.detach().float().clone() for m, t in B.items()}, scale)


def detach(peft_model: PeftModel) -> torch.nn.Module:
    """Remove the LoRA layers and return the untouched base model."""
    return peft_model.unload()


def save_peft_folder(model: torch.nn.Module, adapter: LoraAdapter, out_dir: str | Path) -> Path:
    """Write ``adapter`` as a standard peft adapter folder (``PeftModel.from_pretrained`` loads it)."""
    peft_model = attach(model, adapter)
    try:
        peft_model.save_pretrained(str(out_dir), safe_serialization=True)
    finally:
        detach(peft_model)
    return Path(out_dir)
