"""Which attention kernel a training step runs: ``model.attention`` and its ``auto`` rule.

Why a choice at all: transformers loads a model with PyTorch's fused SDPA kernel. On CPU its backward
for short sequences was the largest cost of a LoRA step after the matmuls (the 2-core AVX512-BF16
EPYC, SmolLM2, bf16: a step of 8 x 128 tokens took 2.87 s with SDPA and 2.28 s with the eager
kernel, plain matmuls and a float32 softmax; 512 tokens 3.30 s against 2.74 s; but 1024 tokens
3.62 s against 4.97 s, where the eager kernel's sequence x sequence scores grow too large).
``benchmarks/bench_flops.py`` measures both on the machine at hand (its ``attention`` rows).
In float32 on the same CPU the two kernels tied (6.69 s against 6.51 s a step, within noise). So ``auto``
runs the eager kernel on CPU in bf16 for windows up to ``CPU_EAGER_MAX_LEN`` tokens and keeps the model's
own kernel everywhere else (float32 CPUs, such as the AVX2-only machines, train as before; on CUDA,
SDPA's flash and memory-efficient kernels win).

The kernel is switched for one training call and switched back (``using``): the base model is shared
by everything in the process, and evaluation keeps the model's own kernel. The two kernels agree to
rounding, not bit for bit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from .peft_bridge import unwrapped

CPU_EAGER_MAX_LEN = 512  # the longest window measured faster with the eager kernel (see above)


def choose(setting: str, device: str, dtype: str, seq_len: int) -> str | None:
    """The kernel to train with: ``"eager"``, ``"sdpa"``, or None for the model's own (``dtype``: the
    compute dtype's name, precision.py's decision)."""
    if setting != "auto":
        return setting
    return "eager" if device == "cpu" and dtype == "bfloat16" and seq_len <= CPU_EAGER_MAX_LEN else None


@contextlib.contextmanager
def using(model: torch.nn.Module, kernel: str | None) -> Iterator[None]:
    """Run the block with ``kernel`` (a transformers ``attn_implementation`` name) on ``model``,
    peft-wrapped or not; the model's own kernel again afterwards. A model that cannot switch keeps its own."""
    base = unwrapped(model)
    switch = getattr(base, "set_attn_implementation", None)
    config = getattr(base, "config", None)
    before = getattr(config, "_attn_implementation", None)
    if kernel is None or not callable(switch) or before is None or kernel == before:
        yield
        return
    switch(kernel)
    try:
        yield
    finally:
        switch(before)
