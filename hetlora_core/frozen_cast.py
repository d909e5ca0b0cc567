"""The frozen base's Linear weights held in the autocast dtype while a CPU client trains.

Why: autocast keeps no cast of a weight that does not require grad, so a bf16 LoRA step re-casts
every frozen float32 Linear weight of the base in every forward (read 4 bytes, write 2, per
parameter). The cast is the same rounding whoever makes it, so casting each weight
once per training call and swapping it in for the call's steps gives bit-identical results. The gain
is small: 0.985-0.996x a step in ``benchmarks/bench_flops.py`` (3 steps per call, the AVX512-BF16 EPYC).

Costs and limits: the casts live for one training call (2 bytes per frozen Linear parameter beside
the float32 weights), on CPU only. Not longer: a write through ``.data`` between calls (peft's merge
does one) changes neither the weight's version counter nor its address, so a process-wide cache
could not tell that a cast went stale. Weights
that train (full fine-tuning), weights an Embedding also uses (tied output layers: a lookup is not
autocast, so it must keep reading float32) and anything but a plain ``nn.Linear`` (e.g. 4-bit layers)
are left alone.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch.utils.weak import WeakIdKeyDictionary

from .peft_bridge import unwrapped

_casts: WeakIdKeyDictionary | None = None  # parameter -> its cast, by identity, inside held_in only


def _frozen_linear_weights(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    mods = list(unwrapped(model).modules())
    embedded = {id(m.weight) for m in mods if isinstance(m, torch.nn.Embedding)}
    found: dict[int, torch.nn.Parameter] = {}  # by identity: a weight shared by two Linears is swapped once
    for m in mods:
        w = m.weight if type(m) is torch.nn.Linear else None
        if isinstance(w, torch.nn.Parameter) and not w.requires_grad and w.dtype == torch.float32 and id(w) not in embedded:
            found.setdefault(id(w), w)
    return list(found.values())


def cast(p: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``p.to(dtype)``; inside ``held_in``, made once for a frozen CPU parameter (e.g. the tied output
    layer that lm_loss.py multiplies by in every step: an Embedding's weight, so never swapped in)."""
    if _casts is None or p.dtype == dtype or p.requires_grad or p.device.type != "cpu" or not isinstance(p, torch.nn.Parameter):
        return p.to(dtype)
    low = _casts.get(p)
    if low is None or low.dtype != dtype:
        low = _casts[p] = p.data.to(dtype)
    return low


@contextlib.contextmanager
def held_in(model: torch.nn.Module, dtype: torch.dtype, device: str) -> Iterator[None]:
    """Within the block, the frozen Linear weights of ``model`` are ``dtype`` copies (CPU, a
    dtype other than float32); the float32 weights are back afterwards, also after an error."""
    global _casts
    if device != "cpu" or dtype == torch.float32 or _casts is not None:  # not nested: the outer call holds them
        yield
        return
    _casts = WeakIdKeyDictionary()
    swapped: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
    try:
        for p in _frozen_linear_weights(model):
            low = cast(p, dtype)
            swapped.append((p, p.data))
            p.data = low
        yield
    finally:
        for p, full in reversed(swapped):
            p.data = full
        _casts = None
