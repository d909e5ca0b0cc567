"""The matmul floor of a training step: its matrix products alone, replayed at their real shapes.

Why: model FLOP utilisation compares a step with the peak of large square matmuls. A step's
products are not square (tokens x 576 x 192 for a q/v projection, rank-16 LoRA factors, the
49152-wide output layer), and a CPU's matmul units reach a shape-dependent fraction of that peak
on them. Replaying exactly the products the step ran, with nothing else, gives the time the step
would take if every other operation (norms, activations, softmax, casts, the optimizer) were free:
``counted FLOPs / floor / peak`` is then the highest utilisation this step can reach on this
machine with these kernels. When that ceiling is below a target, no fusion of the rest reaches it.

How: a ``TorchDispatchMode`` sees the aten ops below autograd, so the backward's products are
recorded too (``linear`` arrives as ``mm``/``addmm``, eager attention as ``bmm``). Each distinct
(op, sizes, strides, dtype) is replayed on fresh tensors with the same strides (a transposed
operand takes another kernel path) and its best time multiplied by how often the step ran it.
Products of fused kernels (e.g. SDPA's flash attention) are not replayed; their count is reported.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
# op -> index of (first operand, second operand); addmm/baddbmm carry the bias first
_OPERANDS = {aten.mm.default: (0, 1), aten.bmm.default: (0, 1), aten.addmm.default: (1, 2), aten.baddbmm.default: (1, 2)}
_NOT_REPLAYED = ("_scaled_dot_product", "_flash_attention", "_efficient_attention")


@dataclass(frozen=True)
class Product:
    """One distinct matrix product of a step: the op, each operand's sizes and strides, the dtype."""

    op: str
    sizes: tuple[tuple[int, ...], ...]
    strides: tuple[tuple[int, ...], ...]
    dtype: torch.dtype

    @property
    def flops(self) -> int:
        """2 m k n (times the batch for bmm): multiply-adds counted as two, as FlopCounterMode does."""
        a, b = self.sizes[-2], self.sizes[-1]
        batch = a[0] if len(a) == 3 else 1
        return 2 * batch * a[-2] * a[-1] * b[-1]


class _Recorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.products: Counter[Product] = Counter()
        self.fused: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        where = _OPERANDS.get(func)
        if where is not None:
            ops = [args[i] for i in where]
            self.products[Product(str(func.overloadpacket.__name__), tuple(tuple(t.shape) for t in ops),
                                  tuple(tuple(t.stride()) for t in ops), ops[0].dtype)] += 1
        elif any(s in str(func) for s in _NOT_REPLAYED):
            self.fused[str(func)] += 1
        return func(*args, **(kwargs or {}))


def record(step: Callable[[], Any]) -> tuple[Counter[Product], Counter[str]]:
    """Run ``step`` once and return the products it ran (with counts) and the fused kernels it skipped."""
    rec = _Recorder()
    with rec:
        step()
    return rec.products, rec.fused


def _operand(sizes: tuple[int, ...], strides: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    # one random buffer viewed with the recorded strides: also right for broadcast (stride 0) operands
    span = 1 + sum((n - 1) * st for n, st in zip(sizes, strides, strict=True))
    return torch.randn(span).to(dtype).as_strided(sizes, strides)


def replay(products: Counter[Product], reps: int = 5) -> list[dict]:
    """Time each distinct product (best of ``reps`` after a warm-up) on fresh operands of its strides.

    Round-robin: every repetition times each product once, so a burst of load on a shared machine
    costs one sample of several products rather than every sample of one."""
    mms = {"mm": torch.mm, "addmm": torch.mm, "bmm": torch.bmm, "baddbmm": torch.bmm}  # the bias add is not a product
    ready = [(p, count, mms[p.op], [_operand(s, st, p.dtype) for s, st in zip(p.sizes, p.strides, strict=True)])
             for p, count in products.items()]
    best = [float("inf")] * len(ready)
    for _, _, fn, (a, b) in ready:
        fn(a, b)
    for _ in range(reps):
        for i, (_, _, fn, (a, b)) in enumerate(ready):
            t = time.perf_counter()
            fn(a, b)
            best[i] = min(best[i], time.perf_counter() - t)
    rows = [{"op": p.op, "sizes": [list(s) for s in p.sizes], "transposed": [st[-1] != 1 for st in p.strides],
             "dtype": str(p.dtype).removeprefix("torch."), "count": count, "seconds_each": t, "seconds": t * count,
             "flops": p.flops * count, "gflops": p.flops / t / 1e9} for (p, count, _, _), t in zip(ready, best, strict=True)]
    return sorted(rows, key=lambda r: -r["seconds"])


def floor(step: Callable[[], Any], reps: int = 10) -> dict:
    """The step's matmul floor: total replayed seconds, FLOPs, the per-shape rows and skipped fused kernels."""
    products, fused = record(step)
    rows = replay(products, reps)
    return {"seconds": sum(r["seconds"] for r in rows), "flops": sum(r["flops"] for r in rows),
            "products": rows, "fused_not_replayed": dict(fused)}
