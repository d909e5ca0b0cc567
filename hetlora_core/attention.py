"""Which attention kernel a training step runs: ``model.attention`` and its ``auto`` rule.

Why a choice at all: transformers loads a model with PyTorch's fused SDPA kernel. On CPU in bf16 its
backward is slow for short windows, and the eager kernel (plain matmuls and a float32 softmax) trains
faster there; for long windows the eager kernel's window x window scores cost more. Measured with
``benchmarks/bench_flops.py`` (its "eager attention only" row against the old path; SmolLM2, 1 thread,
the 2-core AVX512-BF16 EPYC): 8 x 128 tokens 0.86x a step (``--reps 5``), 2 x 512 tokens 0.905x
(``--seq 512 --batch 2 --reps 1``), 1 x 1024 tokens 1.30x (``--seq 1024 --batch 1 --reps 1``); in
float32 a tie (``--dtype fp32 --reps 2``: 1.03x, within noise). So ``auto`` runs the eager kernel on
CPU in bf16 for windows up to ``CPU_EAGER_MAX_LEN`` tokens and keeps the model's own kernel everywhere
else (float32 CPUs, such as the AVX2-only machines, train as before; on CUDA, SDPA's flash and
memory-efficient kernels win). Rerun those commands to check the limit on another CPU.

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
