"""The frozen base's Linear weights held in the autocast dtype while a CPU client trains.

Why: autocast keeps no cast of a weight that does not require grad, so a bf16 LoRA step re-casts
every frozen float32 Linear weight of the base in every forward (read 4 bytes, write 2, per
parameter): on the 2-core AVX512-BF16 EPYC that copy traffic was a visible share of a step
(benchmarks/bench_flops.py). The cast is the same rounding whoever makes it, so casting each weight
once per process and swapping it in for a training call gives bit-identical results.

Costs and limits: the casts are kept for the process (2 bytes per frozen Linear parameter beside the
float32 weights), so this is done on CPU only, where memory is plentiful next to a GPU's. Weights
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

_casts = WeakIdKeyDictionary()  # parameter -> (stamp, its cast), by identity (a tensor's == is elementwise)


def _frozen_linear_weights(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    mods = list(unwrapped(model).modules())
    embedded = {id(m.weight) for m in mods if isinstance(m, torch.nn.Embedding)}
    return [m.weight for m in mods if type(m) is torch.nn.Linear and isinstance(m.weight, torch.nn.Parameter)
            and not m.weight.requires_grad and m.weight.dtype == torch.float32 and id(m.weight) not in embedded]


def cast(p: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``p.to(dtype)``, kept for the process when ``p`` is a frozen CPU parameter (the output layer
    that lm_loss.py multiplies by in every step: an Embedding's weight, so never swapped in)."""
    if p.dtype == dtype or p.requires_grad or p.device.type != "cpu" or not isinstance(p, torch.nn.Parameter):
        return p.to(dtype)
    # Keyed on the weight's memory and version counter too: an in-place change (a merge, full
    # fine-tuning's temporary delta) or new data makes a new cast, never a stale one.
    stamp = (p.data_ptr(), p._version, dtype)
    kept = _casts.get(p)
    if kept is None or kept[0] != stamp:
        kept = _casts[p] = (stamp, p.data.to(dtype))
    low: torch.Tensor = kept[1]
    return low


@contextlib.contextmanager
def held_in(model: torch.nn.Module, dtype: torch.dtype, device: str) -> Iterator[None]:
    """Within the block, the frozen Linear weights of ``model`` are ``dtype`` copies (CPU, a
    dtype other than float32); the float32 weights are back afterwards, also after an error."""
    if device != "cpu" or dtype == torch.float32:
        yield
        return
    swapped: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
    try:
        for p in _frozen_linear_weights(model):
            low = cast(p, dtype)
            swapped.append((p, p.data))
            p.data = low
        yield
    finally:
        for p, full in swapped:
            p.data = full
