"""Running ``hetlora bench paper``'s (method, seed) runs: one after another, or spread over
worker processes that share one accelerator, with a deadline for starting new runs.

Why processes: a run of the in-process simulation on a GPU is bound by Python and kernel-launch
overhead (SmolLM2 steps of 8 x 128 tokens are a few milliseconds of GPU work each), so one process
leaves the GPU mostly idle; several processes, each with the model loaded once, keep it busy. On a
CPU, processes only help when there are idle cores.

Why a deadline: a device call has a hard time limit. Runs are queued seed by seed (every method of
seed 0 first), so when time runs out the finished runs still form a complete comparison of the first
seeds; a run that would start after the deadline is skipped and the report says how many ran.
Nothing here is method-specific: each job is a config, a run folder and the record's metadata.
"""

from __future__ import annotations

import functools
import json
import multiprocessing as mp
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import HetLoRAConfig


@dataclass(frozen=True)
class Job:
    """One (method, seed) run: its config, its folder, and what its record says about it."""

    cfg: HetLoRAConfig
    run_dir: Path
    meta: dict[str, Any]
    deadline: float | None = None  # its own latest start (Unix time), when its duration is known; else run_jobs'


def _worker_init(threads: int, verbose: bool = False, workers: int = 1) -> None:
    """Each worker process: its share of the CPU threads (the model loads on its first job) and,
    unless ``verbose``, the libraries' warnings and progress bars off as in the parent's console.

    The runs' training and evaluation set their own thread count (threads.task_threads): told
    that ``workers`` tasks share the machine, each takes its share of the CPUs, not every CPU (two
    workers each with 2 threads on 2 cores took ~2.8x the CPU time of one thread each)."""
    from .quiet import quiet_libraries
    from .threads import CONCURRENT_TASKS_ENV

    quiet_libraries(verbose)
    os.environ[CONCURRENT_TASKS_ENV] = str(workers)
    if threads > 0:
        import torch

        torch.set_num_threads(threads)


def _run_in_worker(cfg_json: str, run_dir: str, meta: dict[str, Any], deadline: float | None) -> dict[str, Any] | None:
    """A job inside a worker; ``None`` when the deadline passed before it could start."""
    from .bench_paper import run_one
    from .config import config_from_dict

    if deadline is not None and time.time() > deadline and not (Path(run_dir) / "bench.json").is_file():
        return None
    return run_one(config_from_dict(json.loads(cfg_json)), Path(run_dir), meta, log=_worker_log)


def _earliest(a: float | None, b: float | None) -> float | None:
    """The earlier of two optional deadlines: a job's own never loosens the general one."""
    return b if a is None else a if b is None else min(a, b)


def _none() -> None:
    return None


def _worker_log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run_jobs(jobs: Sequence[Job], workers: int, log: Callable[[str], None], deadline: float | None = None,
             threads: int = 0, verbose: bool = False) -> tuple[list[dict[str, Any]], list[str]]:
    """(every finished job's record in the order of ``jobs``, one line per job that failed or was
    skipped).

    ``workers <= 1`` runs in this process (the model loads once for all runs); more spreads the
    jobs over that many spawned processes (spawn: CUDA cannot be forked). ``deadline`` is a Unix
    time after which no job starts. A job that raises is logged with its run folder and the error and
    the others go on: on a one-shot device call, one broken run must not lose the rest. The report
    lists what is missing, so a comparison with a hole in it is never silent."""
    from .bench_paper import run_one

    results: dict[int, dict[str, Any]] = {}
    missing: list[str] = []

    def settle(i: int, get: Callable[[], dict[str, Any] | None]) -> None:
        j = jobs[i]
        name = f"{j.meta.get('method')} seed {j.meta.get('seed')}"
        try:
            rec = get()
        except Exception as e:  # noqa: BLE001 - one run's failure is reported, not fatal (see above)
            missing.append(f"{name}: failed ({type(e).__name__}: {str(e)[:300]}) in {j.run_dir}")
            log(f"FAILED {name} in {j.run_dir}: {type(e).__name__}: {e}")
            return
        if rec is None:
            missing.append(f"{name}: not started (deadline)")
            log(f"skip {name}: the deadline passed before it could start")
        else:
            results[i] = rec
            log(f"finished {name} ({len(results) + len(missing)}/{len(jobs)})")

    if workers <= 1:
        for i, j in enumerate(jobs):
            dl = _earliest(j.deadline, deadline)
            late = dl is not None and time.time() > dl and not (j.run_dir / "bench.json").is_file()
            settle(i, _none if late else functools.partial(run_one, j.cfg, j.run_dir, j.meta, log))
    else:
        ctx = mp.get_context("spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_worker_init,
                                 initargs=(threads, verbose, min(workers, len(jobs)))) as pool:
            futs: dict[Future[dict[str, Any] | None], int] = {
                pool.submit(_run_in_worker, j.cfg.to_json(), str(j.run_dir), j.meta, _earliest(j.deadline, deadline)): i
                for i, j in enumerate(jobs)}
            pending = set(futs)
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for f in done:
                    settle(futs[f], f.result)
    return [results[i] for i in sorted(results)], missing
