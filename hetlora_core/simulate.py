"""In-process federated fine-tuning: the same round steps the pipeline runs, called directly.

A run lives in a store under ``<experiment>/``; ``simulate`` continues from the last committed
round, so interrupting it (Ctrl-C, a killed process) and starting it again resumes the run."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from . import rounds, runtime, tasks
from . import store as st
from .config import ConfigError, HetLoRAConfig, config_from_dict, replace
from .reporting import finish_run
from .results import collect_results, write_results


class RunConfigMismatch(RuntimeError):
    """The store already holds this experiment with a different configuration."""


def check_or_record_config(cfg: HetLoRAConfig, store: st.Store) -> None:
    """Resuming with a different config would silently mix two runs: refuse, say how to fix it.
    Only the number of rounds may grow (extending a finished run is a normal resume)."""
    key = f"{cfg.experiment}/config.json"
    mine = json.loads(cfg.to_json())  # JSON-normalised (tuples become lists) to compare like with like
    if store.exists(key):
        theirs = json.loads(store.get_bytes(key))
        try:  # fill settings added since that run was recorded with their defaults
            theirs = json.loads(config_from_dict(theirs).to_json())
        except ConfigError:
            pass  # not loadable by this version: compared as stored (and reported as different)
        a = {k: v for k, v in theirs.items() if k not in ("federation", "metrics", "kubeflow", "store")}
        b = {k: v for k, v in mine.items() if k not in ("federation", "metrics", "kubeflow", "store")}
        fa = {k: v for k, v in theirs.get("federation", {}).items() if k != "rounds"}
        fb = {k: v for k, v in mine["federation"].items() if k != "rounds"}
        if a != b or fa != fb:
            diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k)) + (["federation"] if fa != fb else [])
            raise RunConfigMismatch(f"{store.describe()}/{key} holds experiment {cfg.experiment!r} with a different config "
                                    f"(sections {diff}); use another experiment name or output directory to start fresh")
    store.put_bytes(key, json.dumps(mine, indent=1, sort_keys=True).encode())


def local_config(cfg: HetLoRAConfig, out_dir: str | Path) -> HetLoRAConfig:
    """A local store under OUT/store unless the config names an S3 store. The path is absolute
    because kfp.local's component subprocesses run in their own working directories."""
    if cfg.store.kind == "local":
        return replace(cfg, **{"store.root": str((Path(out_dir) / "store").resolve())})
    return cfg


def run_round(cfg: HetLoRAConfig, rnd: int, progress: tqdm | None = None) -> dict[str, Any]:
    """One whole round in-process through the components' own entry points (hetlora_core.tasks):
    plan, train + prune each client, aggregate (quorum), evaluate and push metrics."""
    store = st.open_store(cfg.store)
    plan = rounds.plan_round(cfg, store, runtime.client_ids(cfg), rnd)
    cfg_json, started = cfg.to_json(), time.time()
    reports = []
    for c in plan.clients:
        if progress is not None:
            progress.set_postfix_str(f"round {rnd} client {c.client_id} (rank {c.rank})")
        tasks.train_task(cfg_json, rnd, c.client_id)
        reports.append(tasks.prune_task(cfg_json, rnd, c.client_id))
        if progress is not None:
            progress.update(1)
    tasks.aggregate_task(cfg_json, rnd, reports)
    tasks.evaluate_task(cfg_json, rnd, started)
    return json.loads(store.get_bytes(f"{st.round_prefix(cfg.experiment, rnd)}/eval/metrics.json"))


def simulate(cfg: HetLoRAConfig, out_dir: str | Path, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) every round of ``cfg`` in-process; the store is a local directory under
    ``out_dir`` unless the config names an S3 store; results.json and the plot go to ``out_dir``."""
    out = Path(out_dir)
    cfg = local_config(cfg, out)
    store = st.open_store(cfg.store)
    check_or_record_config(cfg, store)
    t0 = time.perf_counter()
    runtime.evaluate_baseline(cfg, store)
    done = st.last_committed_round(store, cfg.experiment) + 1
    for rnd in range(done):  # a crash between commit and evaluation leaves a round unevaluated
        if not store.exists(f"{st.round_prefix(cfg.experiment, rnd)}/eval/metrics.json"):
            runtime.evaluate_round(cfg, store, rnd)
    todo = cfg.federation.rounds - done
    if done and todo > 0 and progress:
        print(f"resuming {cfg.experiment} at round {done} ({done} committed)", file=sys.stderr)
    bar = tqdm(total=todo * cfg.federation.clients_per_round, desc="client updates", unit="client",
               disable=not progress, file=sys.stderr)
    try:
        for rnd in range(done, cfg.federation.rounds):
            ev = run_round(cfg, rnd, bar)
            bar.write(f"round {rnd}: held-out perplexity global {ev['global']['ppl']:.2f}, "
                      f"own rank {ev['personal']['ppl']:.2f}", file=sys.stderr)
    finally:
        bar.close()
    results = collect_results(cfg, store)
    results["wall_seconds_this_invocation"] = time.perf_counter() - t0
    write_results(results, out)
    finish_run(cfg, results)
    return results
