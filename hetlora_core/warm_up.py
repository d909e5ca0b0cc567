"""The warm task server's warm-up: one tiny local update and one evaluation on made-up tokens, and
peft's LoRA layers kept for each shape a round starts with, in the server before it forks
(hetlora_core/warm_server.py).

Why: a forked task inherits the server's memory, so what a model task pays once per process is paid
here once per run instead of once per task: the chunked loss's one-time check against the model's
own loss (lm_loss._agrees: two short forwards), peft's injection of the LoRA layers for a new shape
(peft_bridge keeps them per shape), and the first forward/backward's set-up. Two rounds of the default
config through kfp.local took 0.95x the time of the same server without its warm-up, in two runs; at
the paper's work per client the difference was within the noise (benchmarks/bench_pipeline_overhead.py
--warm warm-up; docs/benchmarks.md).

What it must not do: start a thread (a fork copies none, and a lock held by one would hang the
child), change the base model, change what a task computes, or leave the server's freed memory in its
heap. Every call runs at one torch thread (no OpenMP pool); no warm-up where a GPU device is present
(the first backward of a process starts one autograd thread per GPU it can see, and a child forked
after that fails its own backward); the update takes no optimiser step on the base weights (LoRA only,
detached afterwards); dropout draws from a generator seeded per client (client._loop), so a child
that finds its LoRA layers kept here trains as a task that injects them; fault-injection points are
off meanwhile (a test's ``train_step:exit`` must hit a task, not the server). The server hands its
freed heap back to the OS after its last collection (``release_free_heap``): a child writing into
pages the server had touched copies each one first (copy-on-write), which made warmed children slower
than cold ones until the trim (an ad-hoc measurement while this was built).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import time
from collections.abc import Iterator
from typing import Any

from .config import HetLoRAConfig, replace

WARM_CLIENT = "warm-up"
WARM_LEN = 32  # tokens per made-up window
# Above this many parameters the warm-up is skipped: at one thread its few short forwards and one
# backward take longer than a run of such a model on a CPU (if anyone runs one) would save.
WARM_MAX_PARAMS = 2_000_000_000
WARM_MAX_SHAPES = 8  # LoRA shapes kept ahead (each a peft injection: benchmarks/bench_attach.py)


def warm_ranks(cfg: HetLoRAConfig) -> list[int]:
    """The LoRA shapes a round's tasks attach first: the tiers' (or the explicit list's) ranks (train,
    own-rank evaluation) and r_max (the global's evaluation); at most WARM_MAX_SHAPES, r_max kept.
    Uniform ranks are drawn per client: r_max only."""
    a = cfg.ranks
    listed = {t.rank for t in a.tiers} if a.assignment == "tiers" else set(a.explicit) if a.assignment == "explicit" else set()
    return sorted(sorted(listed - {a.r_max})[:WARM_MAX_SHAPES - 1] + [a.r_max])


@contextlib.contextmanager
def _no_failpoints() -> Iterator[None]:
    saved = os.environ.pop("HETLORA_FAILPOINTS", None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ["HETLORA_FAILPOINTS"] = saved


def warm_up(cfg: HetLoRAConfig, model: Any) -> str:
    """Run the LoRA code paths once on ``model`` (the preloaded base model); returns what was done.

    The caller has checked that no GPU device is present (warm_server.preload_model). Raises whatever
    training or evaluation raises: the caller then drops the preloaded model, so the tasks load their
    own rather than share one a failure may have left in an unknown state."""
    import torch

    from . import peft_bridge
    from .client import train_lora
    from .data import ClientData
    from .evaluation import evaluate
    from .methods import method_for

    # Short windows: the one-time costs do not grow with the length, the warm-up's own time does.
    n = min(cfg.data.seq_len, WARM_LEN)
    # training.compile off: inductor starts compile worker threads/processes, which must not exist before
    # the fork, and would compile for shapes no task uses
    small = replace(cfg, **{"training.threads": 1, "training.local_steps": 1, "training.batch_size": 1,
                            "data.seq_len": n, "data.eval_max_tokens": n, "training.compile": False})
    method = method_for(small)
    if not method.trains_lora:  # full fine-tuning: a step would cost an optimiser state of the whole model
        return "no warm-up (not a LoRA method)"
    params = sum(p.numel() for p in model.parameters())
    if params > WARM_MAX_PARAMS:
        return f"no warm-up ({params / 1e9:.1f}B parameters: slower at one thread than what it saves)"
    t0 = time.perf_counter()
    # Made-up text (whatever the run's data format: only the code paths matter here): two training
    # windows and one held-out window of token ids the model's vocabulary has.
    ids = torch.arange(2 * n + 2) % min(256, int(model.get_input_embeddings().num_embeddings))
    client = ClientData(WARM_CLIENT, "", "", ids, ids.clone(), 0)
    glob = method.initial_global(method.model_spec(model))
    ranks = warm_ranks(cfg)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with _no_failpoints():
            train_lora(model, glob.truncate(ranks[0]), client, small, 0)
            evaluate(model, glob.truncate(ranks[-1]), [client], small)
            for r in ranks[1:-1]:  # the other shapes: injected and kept (peft_bridge's reuse), no forward
                peft_bridge.detach(peft_bridge.attach(model, glob.truncate(r), reuse=True))
    finally:
        torch.set_num_threads(threads)
    return f"warmed up in {time.perf_counter() - t0:.2f} s (ranks {', '.join(map(str, ranks))})"


def release_free_heap() -> bool:
    """Give the heap's free pages back to the OS (glibc ``malloc_trim(0)``, looked up in the C library
    this process already loaded); False where there is none (musl, macOS)."""
    try:
        trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    except OSError:
        trim = None
    if trim is None:
        return False
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    trim(0)
    return True
