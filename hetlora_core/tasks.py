"""JSON-in, JSON-out entry points for the pipeline's components (one per step).

A KFP component body only parses its parameters and calls one of these, so the same code runs
under kfp.local, in the cluster image, and in unit tests. Each task opens the store itself (KFP's
pipeline_root is not the federated store) with credentials from the environment only."""

from __future__ import annotations

import json
import time
from typing import Any

from . import rounds
from . import store as st
from .config import HetLoRAConfig, config_from_dict


def _cfg(config_json: str) -> HetLoRAConfig:
    return config_from_dict(json.loads(config_json))


def train_task(config_json: str, round_index: int, client_id: str) -> str:
    """Local training of one selected client; uploads ``.../clients/<id>/trained``."""
    from . import runtime  # heavy (transformers): only the training and evaluation tasks need it

    cfg = _cfg(config_json)
    store = st.open_store(cfg.store)
    plan = rounds.load_plan(cfg, store, int(round_index))
    man = runtime.train_client(cfg, store, int(round_index), plan.client(client_id))
    return json.dumps({"client_id": client_id, "train_loss": man["train_loss"], "rank": man["rank_before"]})


def prune_task(config_json: str, round_index: int, client_id: str) -> str:
    """Self-pruning: compare the tail as received and as trained; upload the client's final adapter."""
    cfg = _cfg(config_json)
    man = rounds.prune_client(cfg, st.open_store(cfg.store), int(round_index), client_id)
    return json.dumps({"client_id": client_id, "rank_before": man["rank_before"], "rank_after": man["rank_after"],
                       "sha256": man["sha256"]})


def aggregate_task(config_json: str, round_index: int, reports: list[str]) -> str:
    """Aggregate the round and commit it. ``reports`` (the clients' task outputs) are only
    cross-checked: the store's manifests and checksums are what counts, never a task's word."""
    cfg = _cfg(config_json)
    store = st.open_store(cfg.store)
    plan = rounds.load_plan(cfg, store, int(round_index))
    reported = {json.loads(r)["client_id"] for r in reports if r}
    man = rounds.aggregate_round(cfg, store, plan)
    return json.dumps({"round": int(round_index), "participants": man["participants"], "dropped": man["dropped"],
                       "unreported": sorted({c.client_id for c in plan.clients} - reported)})


def evaluate_task(config_json: str, round_index: int, round_started_at: float = 0.0) -> str:
    """Held-out perplexity of the committed global; pushes the round's metrics when configured."""
    from . import runtime
    from .reporting import push_round_outcome

    cfg = _cfg(config_json)
    store = st.open_store(cfg.store)
    rnd = int(round_index)
    if rnd == 0:
        runtime.evaluate_baseline(cfg, store)
    ev = runtime.evaluate_round(cfg, store, rnd)
    gman = st.get_manifest(store, st.global_prefix(cfg.experiment, rnd)) or {}
    duration = time.time() - round_started_at if round_started_at else float(gman.get("aggregate_seconds", 0.0))
    push_round_outcome(cfg, rnd, gman, ev, duration)
    return json.dumps({"round": rnd, "global_ppl": ev["global"]["ppl"], "personal_ppl": ev["personal"]["ppl"]})


def summary(out: str) -> dict[str, Any]:
    return json.loads(out)
