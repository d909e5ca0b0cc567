"""Torch threads per kfp.local task: shared CPUs (floor(CPUs / 2) threads, since kfp.local runs two
tasks at once) against the previous setting (every task takes torch's default, one thread per core),
as the wall time of the same kfp.local round, interleaved repetition by repetition.

    .venv/bin/python benchmarks/bench_threads.py            # default config (SmolLM2), 1 round
    .venv/bin/python benchmarks/bench_threads.py --quick    # configs/smoke.yaml (tiny model)
    .venv/bin/python benchmarks/bench_threads.py --set federation.clients_per_round=4 --reps 2

Both variants run the same config and seeds and must commit the same global adapter bytes when
training.threads pins the training threads; here the thread counts differ on purpose, so only the
wall time is compared (results within float noise are expected, not checked)."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from _common import ROOT, median, table, write
from hetlora_kfp.pipelines.runners import KfpLocalExecutor

from hetlora_core import runtime
from hetlora_core.cli import parse_sets
from hetlora_core.config import HetLoRAConfig, load_config
from hetlora_core.run import RoundRunner, local_config
from hetlora_core.threads import available_cpus


def one_round(cfg: HetLoRAConfig, concurrent: int | None) -> float:
    with tempfile.TemporaryDirectory() as tmp:
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
    a = ap.parse_args()
    over = {"federation.rounds": 1, **({"federation.clients_per_round": 2, "data.num_clients": 4} if a.quick else {})}
    cfg = load_config(str(ROOT / "configs/smoke.yaml") if a.quick else None, {**over, **parse_sets(tuple(a.sets))})
    runtime.model(cfg)  # model and tokens cached on disk before timing: neither variant pays the conversion
    runtime.clients(cfg)
    shared, default = [], []
    for _ in range(a.reps):
        default.append(one_round(cfg, None))  # each task: torch's default threads (all CPUs)
        shared.append(one_round(cfg, 2))  # each task: floor(CPUs / 2) threads
    ratio = median(shared) / median(default)
    print(table(["variant", "threads per model task", "round wall s (median)"],
                [["torch default (before)", int(available_cpus()), median(default)],
                 ["CPUs / 2 concurrent tasks", max(1, int(available_cpus() // 2)), median(shared)]]))
    print(f"\nratio shared / default = {ratio:.3f} (< 1: sharing is faster)")
    write("threads-quick" if a.quick else "threads", {"default_s": default, "shared_s": shared, "ratio": ratio,
                                                      "cpus": available_cpus(), "config": cfg.to_dict()}, a.out)


if __name__ == "__main__":
    sys.exit(main())
