"""The warm task server's warm-up: one tiny local update and one evaluation per LoRA shape, on
made-up tokens, in the server before it forks (hetlora_core/warm_server.py).

Why: a forked task inherits the server's memory, so what a model task pays once per process is paid
here once per run instead of once per task: the chunked loss's one-time check against the model's
own loss (lm_loss._agrees: two short forwards), peft's injection of the LoRA layers for a new shape
(peft_bridge keeps them per shape), and the first forward/backward's set-up. Two rounds at the paper's
work per client through kfp.local took 0.94x the time of the same server without its warm-up
(benchmarks/bench_pipeline_overhead.py --warm warm-up; docs/benchmarks.md).

What it must not do: start a thread (a fork copies none, and a lock held by one would hang the
child), change the base model, or leave the server's freed memory in its heap. Every call runs at one
torch thread (no OpenMP pool), the update takes no optimiser step on the base weights (LoRA only,
detached afterwards), and the freed heap is handed back to the OS (``malloc_trim``): a child writing
into pages the server had touched copies each one first (copy-on-write), which made warmed children
slower than cold ones until the trim (an ad-hoc measurement while this was built).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import time
from typing import Any

from .config import HetLoRAConfig, replace

WARM_CLIENT = "warm-up"
WARM_LEN = 32  # tokens per made-up window


def warm_ranks(cfg: HetLoRAConfig) -> list[int]:
    """The LoRA shapes a round's tasks attach first: each tier's rank (train, own-rank evaluation)
    and r_max (the global's evaluation). Other assignments draw ranks per client: r_max only."""
    tiers = {t.rank for t in cfg.ranks.tiers} if cfg.ranks.assignment == "tiers" else set()
    return sorted(tiers | {cfg.ranks.r_max})


def warm_up(cfg: HetLoRAConfig, model: Any) -> str:
    """Run the LoRA code paths once on ``model`` (the preloaded base model); returns what was done.

    Raises whatever training or evaluation raises: the caller then drops the preloaded model, so the
    tasks load their own rather than share one a failure may have left in an unknown state."""
    import torch

    from .client import train_lora
    from .data import ClientData
    from .evaluation import evaluate
    from .methods import method_for

    method = method_for(cfg)
    if not method.trains_lora:  # full fine-tuning: a step would cost an optimiser state of the whole model
        return "no warm-up (not a LoRA method)"
    t0 = time.perf_counter()
    # Short windows: the one-time costs do not grow with the length, the warm-up's own time does (a
    # model of a few billion parameters takes seconds per 32 tokens at one thread).
    n = min(cfg.data.seq_len, WARM_LEN)
    small = replace(cfg, **{"training.threads": 1, "training.local_steps": 1, "training.batch_size": 1,
                            "data.seq_len": n, "data.eval_max_tokens": n})
    # Made-up text (whatever the run's data format: only the code paths matter here): two training
    # windows and one held-out window of token ids every vocabulary has.
    ids = torch.arange(2 * n + 2) % 256
    client = ClientData(WARM_CLIENT, "", "", ids, ids.clone(), 0)
    glob = method_for(small).initial_global(method.model_spec(model))
    ranks = warm_ranks(cfg)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_lora(model, glob.truncate(ranks[0]), client, small, 0)
        for r in ranks:  # injects and keeps each shape (peft_bridge's reuse), and runs an evaluation forward
            evaluate(model, glob.truncate(r), [client], small)
    finally:
        torch.set_num_threads(threads)
    trimmed = release_free_heap()
    return (f"warmed up in {time.perf_counter() - t0:.2f} s (ranks {', '.join(map(str, ranks))})"
            + ("" if trimmed else "; free heap not released (no glibc malloc_trim)"))


def release_free_heap() -> bool:
    """Give the heap's free pages back to the OS (glibc ``malloc_trim(0)``); False where there is none."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        trim = getattr(libc, "malloc_trim", None)
    except OSError:
        trim = None
    if trim is None:
        return False
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    trim(0)
    return True
