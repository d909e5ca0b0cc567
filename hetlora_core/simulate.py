"""The in-process executor: every task of a round called directly, in this process.

It calls the components' own entry points (``hetlora_core.steps.*_task``) with the same JSON the
pipeline passes, so the simulation and the pipeline run the same code on the same bytes (tested
within 1e-5); only the process boundaries differ. The model and data load once per process.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import store as st
from .config import HetLoRAConfig
from .progress import Progress
from .run import RoundFailed, RoundRunner, local_config
from .steps.aggregate import aggregate_task
from .steps.evaluate import evaluate_task
from .steps.evaluate_client import evaluate_client_task
from .steps.plan import RoundPlan, load_plan
from .steps.prune import prune_task
from .steps.train import train_task


def execute_round(cfg: HetLoRAConfig, plan: RoundPlan, started_at: float = 0.0,
                  on_task: Callable[[str, str], None] | None = None, evaluate: bool = True) -> None:
    """Run every task of an already planned round: train + prune each client, aggregate
    (quorum, commit), then (``evaluate``) evaluate (folder data: each client, then the server;
    metrics pushed), in the order the pipelines run them (the round's, then the evaluation's).
    ``on_task(kind, status)`` hears each task start and end (the progress display)."""
    cfg_json, rnd = cfg.to_json(), plan.round
    note = on_task or (lambda _kind, _status: None)
    reports = []
    for c in plan.clients:
        note(f"train {c.tier}", "started")
        out = json.loads(train_task(cfg_json, rnd, c.client_id))
        note(f"train {c.tier}", "SUCCESS" if out["status"] == "trained" else "FAILURE")
        note(f"prune {c.tier}", "started")
        reports.append(prune_task(cfg_json, rnd, c.client_id))
        note(f"prune {c.tier}", "SUCCESS" if json.loads(reports[-1])["status"] != "failed" else "FAILURE")
    note("aggregate", "started")
    aggregate_task(cfg_json, rnd, reports)
    note("aggregate", "SUCCESS")
    if evaluate:
        execute_evaluation(cfg, rnd, started_at, note, plan.state)


def execute_evaluation(cfg: HetLoRAConfig, rnd: int, started_at: float = 0.0,
                   note: Callable[[str, str], None] | None = None, state: dict[str, dict[str, Any]] | None = None) -> None:
    """The evaluation of committed round ``rnd`` as the pipeline runs it: folder data first has
    every client of the run evaluate on its own data (``evaluate_client_task``), then the server
    combines their sums; Shakespeare is one central evaluate task. ``state``: every client's
    tier at the round's start (the plan's), only for the progress display's task names."""
    cfg_json, tell = cfg.to_json(), note or (lambda _kind, _status: None)
    if cfg.data.source == "folder":
        if state is None:
            state = load_plan(cfg, st.open_store(cfg.store), rnd).state
        for cid in sorted(state):
            kind = f"evaluate {state[cid].get('tier', '')}".rstrip()
            tell(kind, "started")
            out = json.loads(evaluate_client_task(cfg_json, rnd, cid))
            tell(kind, "SUCCESS" if out["status"] == "evaluated" else "FAILURE")
    tell("evaluate", "started")
    evaluate_task(cfg_json, rnd, started_at)
    tell("evaluate", "SUCCESS")


def execute_planned_round(cfg: HetLoRAConfig, rnd: int) -> None:
    """What the round pipeline runs (clients and aggregation, no evaluation: a pipeline of its
    own) for the plan the driver already wrote to the store: a stand-in pipeline backend's round."""
    execute_round(cfg, load_plan(cfg, st.open_store(cfg.store), rnd), evaluate=False)


class InProcessExecutor:
    """Every task in this process; a step's error fails the round (worded by the runner)."""

    name, command = "in-process", "hetlora simulate"
    local_key = True  # RoundRunner gives this run a server key of its own output directory (store/signing.py)
    on_task: Callable[[str, str], None] | None = None

    def run_round(self, cfg: HetLoRAConfig, plan: RoundPlan, started_at: float) -> None:
        try:
            execute_round(cfg, plan, started_at, self.on_task)
        except Exception as e:  # noqa: BLE001 - any step error fails this round; the store keeps what committed
            raise RoundFailed(f"failed: {type(e).__name__}: {e}") from e

    def evaluate(self, cfg: HetLoRAConfig, rnd: int, started_at: float = 0.0) -> None:
        try:
            execute_evaluation(cfg, rnd, started_at)
        except Exception as e:  # noqa: BLE001
            raise RoundFailed(f"failed: {type(e).__name__}: {e}") from e


def simulate(cfg: HetLoRAConfig, out_dir: str | Path, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) every round of ``cfg`` in-process; the store is a local directory under
    ``out_dir`` unless the config names an S3 store; results.json and the plot go to ``out_dir``."""
    cfg = local_config(cfg, out_dir)
    return RoundRunner(cfg, InProcessExecutor(), out_dir, Progress(cfg.federation.rounds) if progress else None).run()
