"""The model's decoder layers compiled with ``torch.compile`` while a client trains (``training.compile``).

Why: with bf16 matmul units the products of a LoRA step are fast and the rest of the step (norms,
RoPE, SiLU, the attention softmax, casts: memory-bound elementwise work) dominates it. Inductor fuses
that work into a few generated kernels per layer. Measured with ``benchmarks/bench_flops.py`` (its
``defaults + compiled decoder layers`` row; SmolLM2, rank 16, batch 8 x 128, bf16, 1 thread, the 2-core
AMX Xeon, three runs): 0.59x-0.69x the defaults' step (1.64 vs 2.63 s, 1.94 vs 2.81 s, 1.65 vs 2.78 s),
0.29-0.36 of the bf16 peak instead of 0.19-0.22.

Cost: the compile, once per process and model: 38 s on that machine for SmolLM2 with an empty
inductor cache at one compile thread (24 s with two), 4.6 s when its on-disk cache (``TORCHINDUCTOR_CACHE_DIR``, default under /tmp) holds it. So it
pays for long local training (many steps per call, or many calls in one process such as ``hetlora
simulate``), not for the default config's three small steps per pipeline task, hence off by default.

What is compiled: the repeated block transformers names in the model's ``_no_split_modules`` (e.g.
``LlamaDecoderLayer``): one graph serves every layer, LoRA factors included; the embedding, the final
norm and the loss stay eager. A model that names no block trains eagerly, with a warning. Rank changes
(self-pruning, clients of other tiers in one process) recompile once, after which the rank is a
dynamic size. Where inductor cannot build (e.g. no C++ compiler for CPU code generation: the
component images have none) the layers train eagerly with a warning (once per process) instead of failing the client:
a small forward + backward is compiled first as a probe (once per process and device), because a
backward is compiled lazily, inside ``backward()``, where dynamo's own fallback does not reach.

Scope: switched on for one training call and off after it (``compiled_layers``), like attention.py's
kernel: evaluation and the next call without the option run the layers eagerly. Results agree with
the eager step to rounding (fused kernels sum in another order), not bit for bit; random ops (dropout)
draw eager's numbers (inductor's ``fallback_random``). Not tested with ``model.gradient_checkpointing``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch

from .peft_bridge import unwrapped

log = logging.getLogger(__name__)

_warned: set[tuple[str, str]] = set()  # (model class, reason): each fallback is logged once per process


def blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's repeated decoder blocks: modules whose class transformers lists in ``_no_split_modules``."""
    names = set(getattr(unwrapped(model), "_no_split_modules", None) or ())
    return [m for m in model.modules() if type(m).__name__ in names]


@functools.cache
def _compiled_call() -> Callable[..., Any]:
    """One compiled ``nn.Module._call_impl`` for every layer, the layer its first argument.

    Not ``layer.compile()`` per layer: that keeps a compiled bound method on each layer, which a
    ``deepcopy`` would carry to the copy (still calling the original) and a pickle cannot hold. Here
    a layer holds a ``partial`` only inside ``compiled_layers``. dynamo keeps one cache for the code
    object either way: a graph serves every layer of the same structure. dynamic=None: static shapes
    first; a size that changes (a LoRA rank) becomes dynamic on its recompile."""
    return torch.compile(torch.nn.Module._call_impl)


def _compile_settings() -> contextlib.AbstractContextManager[Any]:
    """Inductor's settings for a client's compile: its own threads (not one worker per CPU of the
    machine, which a task shares), eager's random numbers (dropout masks as in eager training) and
    dynamo's fallback to eager for a graph it cannot compile."""
    import torch._inductor.config as inductor

    stack = contextlib.ExitStack()
    stack.enter_context(inductor.patch(compile_threads=max(1, torch.get_num_threads()), fallback_random=True))
    stack.enter_context(torch._dynamo.config.patch(suppress_errors=True))
    return stack


@functools.cache
def unusable(device_type: str) -> str | None:
    """None when torch.compile builds a small forward and backward on ``device_type``, else why not."""
    try:
        x = torch.linspace(0, 1, 16, device=device_type, requires_grad=True)
        with _compile_settings():
            torch.compile(_probe, fullgraph=True)(x).backward()
    except Exception as e:  # any failure to build: the caller trains eagerly and says this
        return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"
    return None


def _probe(x: torch.Tensor) -> torch.Tensor:
    return (x.sin() * x).sum()


def _warn_once(model: torch.nn.Module, why: str) -> None:
    key = (type(unwrapped(model)).__name__, why)
    if key not in _warned:
        _warned.add(key)
        log.warning("training.compile: %s: %s: training runs eagerly", key[0], why)


@contextlib.contextmanager
def compiled_layers(model: torch.nn.Module, on: bool) -> Iterator[None]:
    """Inside: ``model``'s decoder blocks run compiled when ``on``; outside, as before."""
    layers = blocks(model) if on else []
    if on and not layers:
        _warn_once(model, "the model names no decoder block (_no_split_modules)")
    why = unusable(next(model.parameters()).device.type) if layers else None
    if why:
        _warn_once(model, f"torch.compile cannot build here ({why})")
        layers = []
    # nn.Module.__call__ runs _compiled_call_impl when set (what nn.Module.compile() sets); None is eager
    before = [layer._compiled_call_impl for layer in layers]
    try:
        for layer in layers:
            layer._compiled_call_impl = functools.partial(_compiled_call(), layer)
        with _compile_settings() if layers else contextlib.nullcontext():
            yield
    finally:
        for layer, call in zip(layers, before, strict=True):
            layer._compiled_call_impl = call
