"""Torch threads per kfp.local task, as the wall time of the same kfp.local round, interleaved
repetition by repetition, in three variants:

* ``loop``: what the project does: a tier's loop runs up to two of its clients at once (kfp.local's
  cap), so a task gets floor(CPUs / tasks of its loop running at once), every CPU when its tier has
  one client in the round (pipelines/round.py ``loop_share``); evaluate runs alone: every CPU;
* ``halves``: the previous setting: every client task floor(CPUs / 2), whatever ran beside it;
* ``default``: torch's default, every task one thread per core (oversubscribed when two run at once).

    .venv/bin/python benchmarks/bench_threads.py            # default config (SmolLM2), 1 round
    .venv/bin/python benchmarks/bench_threads.py --quick    # configs/smoke.yaml (tiny model)
    .venv/bin/python benchmarks/bench_threads.py --set federation.clients_per_round=4 --reps 2

All variants run the same config and seeds and must commit the same global adapter bytes when
training.threads pins the training threads; here the thread counts differ on purpose, so only the
wall time is compared (results within float noise are expected, not checked)."""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from pathlib import Path
from unittest import mock

from _common import ROOT, median, table, write
from hetlora_kfp.pipelines import round as round_module
from hetlora_kfp.pipelines.runners import KfpLocalExecutor

from hetlora_core import runtime
from hetlora_core.cli import parse_sets
from hetlora_core.config import HetLoRAConfig, load_config
from hetlora_core.run import RoundRunner, local_config
from hetlora_core.threads import available_cpus


def one_round(cfg: HetLoRAConfig, concurrent: int | None, halves: bool = False, keep: Path | None = None) -> float:
    """Wall seconds of one kfp.local round; ``keep``: a folder that keeps the run (its task logs)."""
    if keep is not None:
        keep.mkdir(parents=True)
    with (contextlib.nullcontext(str(keep)) if keep is not None else tempfile.TemporaryDirectory()) as tmp, \
            mock.patch.object(round_module, "loop_share", lambda n, _k: n) if halves else contextlib.nullcontext():
        c = local_config(cfg, tmp)
        t = time.perf_counter()
        RoundRunner(c, KfpLocalExecutor(Path(tmp) / "pipeline-root", concurrent_tasks=concurrent), tmp).run()
        return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="configs/smoke.yaml, 2 clients (CI smoke)")
    ap.add_argument("--reps", type=int, default=1, help="repetitions of each variant (interleaved)")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--out", default=None, help="folder for the JSON (default bench-out/)")
    ap.add_argument("--keep", type=Path, default=None,
                    help="keep every run (task logs under its pipeline-root) in KEEP/<variant>-<rep> instead of a temporary folder")
    a = ap.parse_args()
    over = {"federation.rounds": 1, **({"federation.clients_per_round": 2, "data.num_clients": 4} if a.quick else {})}
    cfg = load_config(str(ROOT / "configs/smoke.yaml") if a.quick else None, {**over, **parse_sets(tuple(a.sets))})
    runtime.model(cfg)  # model and tokens cached on disk before timing: neither variant pays the conversion
    runtime.clients(cfg)
    loop, halves, default = [], [], []
    def keep(variant: str, rep: int) -> Path | None:
        return a.keep / f"{variant}-{rep}" if a.keep else None

    for rep in range(a.reps):
        default.append(one_round(cfg, None, keep=keep("default", rep)))  # each task: torch's default threads (all CPUs)
        halves.append(one_round(cfg, 2, halves=True, keep=keep("halves", rep)))  # each client task: floor(CPUs / 2) threads
        loop.append(one_round(cfg, 2, keep=keep("loop", rep)))  # each task: its share of the CPUs among its loop's running tasks
    cpus = available_cpus()
    print(table(["variant", "threads per model task", "round wall s (median)"],
                [["torch default", int(cpus), median(default)],
                 ["CPUs / 2 for every client task (before)", max(1, int(cpus // 2)), median(halves)],
                 ["CPUs / tasks of its loop at once (now)", f"{max(1, int(cpus // 2))}..{int(cpus)}", median(loop)]]))
    ratio, ratio_halves = median(loop) / median(default), median(loop) / median(halves)
    print(f"\nratio now / torch default = {ratio:.3f}, now / before = {ratio_halves:.3f} (< 1: now is faster)")
    write("threads-quick" if a.quick else "threads", {"default_s": default, "halves_s": halves, "loop_s": loop, "ratio": ratio,
                                                      "ratio_vs_halves": ratio_halves, "cpus": cpus, "config": cfg.to_dict()}, a.out)


if __name__ == "__main__":
    main()
