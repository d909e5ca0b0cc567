"""Whole runs: one round pipeline per round, sequenced by a driver that only reads the store.

KFP v2 has no data-carrying loop across iterations, so the driver plans round t from the store
(last committed round, persisted client ranks), builds the round's DAG, runs it (kfp.local) or
submits it (Kubeflow) and waits. Both paths resume from the last committed round by design."""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hetlora_core import rounds, runtime
from hetlora_core import store as st
from hetlora_core.config import HetLoRAConfig
from hetlora_core.reporting import finish_run
from hetlora_core.results import collect_results, write_results
from hetlora_core.simulate import check_or_record_config, local_config

from .round import build_round_pipeline, compile_round, tier_groups


class RoundFailed(RuntimeError):
    """A round's pipeline run did not commit; the message carries the run's link when there is one."""


def _log(msg: str) -> None:
    print(f"[hetlora] {msg}", file=sys.stderr, flush=True)


def run_local(cfg: HetLoRAConfig, out_dir: str | Path, on_round: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Run (or resume) every round through kfp.local's SubprocessRunner; write results.json."""
    from kfp import local

    out = Path(out_dir).resolve()
    cfg = local_config(cfg, out)
    store = st.open_store(cfg.store)
    check_or_record_config(cfg, store)
    root = out / "pipeline-root"
    root.mkdir(parents=True, exist_ok=True)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root), raise_on_error=True)
    ids = runtime.client_ids(cfg)
    done = st.last_committed_round(store, cfg.experiment) + 1
    if done:
        _log(f"resuming {cfg.experiment}: {done} round(s) committed in {store.describe()}")
    for rnd in range(done, cfg.federation.rounds):
        t0 = time.time()
        plan = rounds.plan_round(cfg, store, ids, rnd)
        tiers = ", ".join(f"{t.name}: {len(c)}" for t, c in tier_groups(cfg, plan))
        _log(f"round {rnd + 1}/{cfg.federation.rounds}: {len(plan.clients)} clients ({tiers})")
        pipeline = build_round_pipeline(cfg, plan)
        try:
            pipeline(config_json=cfg.to_json(), round_index=rnd, round_started_at=t0)
        except RuntimeError as e:
            raise RoundFailed(f"round {rnd} failed under kfp.local: {e}; logs above; rerun to resume at round {rnd}") from None
        if st.last_committed_round(store, cfg.experiment) < rnd:
            raise RoundFailed(f"round {rnd} finished without committing its global adapter; rerun to resume")
        ev = _eval(store, cfg, rnd)
        _log(f"round {rnd + 1} committed in {time.time() - t0:.1f} s; held-out perplexity {ev}")
        if on_round:
            on_round(rnd)
    results = collect_results(cfg, store)
    write_results(results, out)
    finish_run(cfg, results)
    return results


def _eval(store: st.Store, cfg: HetLoRAConfig, rnd: int) -> str:
    import json

    key = f"{st.round_prefix(cfg.experiment, rnd)}/eval/metrics.json"
    if not store.exists(key):
        return "n/a"
    m = json.loads(store.get_bytes(key))
    return f"{m['global']['ppl']:.2f} (own rank {m['personal']['ppl']:.2f})"


# v2beta1 run states that end a run. kfp.Client.wait_for_run_completion stops only on
# SUCCEEDED/FAILED/SKIPPED/ERROR: a run canceled in the UI would be polled until the timeout.
TERMINAL_STATES = {"SUCCEEDED", "FAILED", "SKIPPED", "ERROR", "CANCELED", "CANCELING"}  # PAUSED may resume: keep waiting


def wait_for_run(client: Any, run_id: str, link: str, timeout_s: float, poll_s: float = 10.0) -> str:
    """Poll ``client.get_run`` until the run reaches a terminal state; returns that state.
    A run still going after ``timeout_s`` is a failed round with its link (not a bare TimeoutError)."""
    deadline = time.monotonic() + timeout_s
    while True:
        state = str(getattr(client.get_run(run_id), "state", "") or "").upper().removeprefix("RUNTIMESTATE.")
        if state in TERMINAL_STATES:
            return state
        if time.monotonic() >= deadline:
            raise RoundFailed(f"run still {state or 'without a state'} after {timeout_s:.0f} s: {link}; raise --timeout, "
                              "or cancel it and rerun `hetlora submit` to resume")
        time.sleep(min(poll_s, max(0.0, deadline - time.monotonic())))


def submit_run(cfg: HetLoRAConfig, host: str, client: Any = None, timeout_s: int = 6 * 3600,
               wait: bool = True, poll_s: float = 10.0) -> list[str]:
    """Submit one KFP run per round to Kubeflow at ``host``, wait for each, stop on failure.

    The driver needs the store (to plan and to resume) with credentials from its environment;
    the pipeline tasks get theirs from the Secret ``kubeflow.store_secret``. ``client`` may be
    injected (tests); by default ``kfp.Client(host=host, namespace=kubeflow.namespace)``."""
    if client is None:
        import kfp

        client = kfp.Client(host=host, namespace=cfg.kubeflow.namespace)
    store = st.open_store(cfg.store)
    check_or_record_config(cfg, store)
    ids = runtime.client_ids(cfg)
    run_ids: list[str] = []
    done = st.last_committed_round(store, cfg.experiment) + 1
    for rnd in range(done, cfg.federation.rounds):
        plan = rounds.plan_round(cfg, store, ids, rnd)
        with tempfile.TemporaryDirectory() as tmp:
            path = compile_round(cfg, plan, os.path.join(tmp, f"round-{rnd:04d}.yaml"))
            run = client.create_run_from_pipeline_package(
                path, arguments={"config_json": cfg.to_json(), "round_index": rnd, "round_started_at": time.time()},
                run_name=f"{cfg.experiment}-round-{rnd:04d}", experiment_name=cfg.kubeflow.experiment,
                namespace=cfg.kubeflow.namespace, enable_caching=False)
        run_ids.append(run.run_id)
        link = f"{host.rstrip('/')}/#/runs/details/{run.run_id}"
        _log(f"round {rnd + 1}/{cfg.federation.rounds} submitted: {link}")
        if not wait:
            break
        state = wait_for_run(client, run.run_id, link, timeout_s, poll_s)
        if state != "SUCCEEDED":
            raise RoundFailed(f"round {rnd} run ended {state}: {link}; fix and rerun `hetlora submit` to resume")
        if st.last_committed_round(store, cfg.experiment) < rnd:
            raise RoundFailed(f"round {rnd} run succeeded but round {rnd} is not committed in {store.describe()}: {link}")
    return run_ids
