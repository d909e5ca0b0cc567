"""JSON-in, JSON-out entry points for the pipeline's components (one per step).

A KFP component body only parses its parameters and calls one of these, so the same code runs
under kfp.local, in the cluster image, and in unit tests. Each task opens the store itself (KFP's
pipeline_root is not the federated store) with credentials from the environment only."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from . import rounds
from . import store as st
from .adapter import AdapterError
from .config import HetLoRAConfig, config_from_dict
from .faults import failpoint

log = logging.getLogger("hetlora")


def _cfg(config_json: str) -> HetLoRAConfig:
    return config_from_dict(json.loads(config_json))


def train_task(config_json: str, round_index: int, client_id: str) -> str:
    """Local training of one selected client; uploads ``.../clients/<id>/trained``.

    A client-level failure (diverged loss, its timeout, a crash inside training) does not fail the
    task: the client simply has no upload, the round goes on, and aggregation decides by quorum.
    Store outages and bad configs still fail the task (a retry or a human must act)."""
    from . import runtime  # heavy (transformers): only the training and evaluation tasks need it

    cfg = _cfg(config_json)
    rnd = int(round_index)
    store = st.open_store(cfg.store)
    plan = rounds.load_plan(cfg, store, rnd)
    try:
        # Inside the try: a `raise` here is a client-side crash (soft, the quorum decides); `exit` kills the task.
        failpoint("train_start", round=rnd, client=client_id)
        man = runtime.train_client(cfg, store, rnd, plan.client(client_id))
    except (st.StoreError, KeyError):
        raise
    except Exception as e:  # noqa: BLE001 - any client-side failure drops this client only
        log.warning("client %s failed in round %d: %s", client_id, rnd, e)
        return json.dumps({"client_id": client_id, "status": "failed", "reason": f"{type(e).__name__}: {e}"})
    failpoint("train_uploaded", round=rnd, client=client_id)
    return json.dumps({"client_id": client_id, "status": "trained", "train_loss": man["train_loss"], "rank": man["rank_before"]})


def prune_task(config_json: str, round_index: int, client_id: str) -> str:
    """Self-pruning: compare the tail as received and as trained; upload the client's final adapter.
    Skipped (not failed) when the client produced no trained adapter this round."""
    cfg = _cfg(config_json)
    rnd = int(round_index)
    store = st.open_store(cfg.store)
    if st.get_manifest(store, st.client_prefix(cfg.experiment, rnd, client_id) + "/trained") is None:
        return json.dumps({"client_id": client_id, "status": "skipped", "reason": "no trained adapter"})
    try:
        man = rounds.prune_client(cfg, store, rnd, client_id)
    except (AdapterError, st.ChecksumMismatch) as e:  # a corrupt upload drops the client, not the round
        return json.dumps({"client_id": client_id, "status": "failed", "reason": str(e)})
    failpoint("prune_done", round=rnd, client=client_id)
    return json.dumps({"client_id": client_id, "status": "ok", "rank_before": man["rank_before"],
                       "rank_after": man["rank_after"], "sha256": man["sha256"]})


def aggregate_task(config_json: str, round_index: int, reports: list[str]) -> str:
    """Aggregate the round and commit it. ``reports`` (the clients' task outputs) are only
    cross-checked: the store's manifests and checksums are what counts, never a task's word."""
    cfg = _cfg(config_json)
    store = st.open_store(cfg.store)
    plan = rounds.load_plan(cfg, store, int(round_index))
    reported = {json.loads(r)["client_id"] for r in reports if r}
    failpoint("aggregate_start", round=int(round_index))
    man = rounds.aggregate_round(cfg, store, plan)
    failpoint("round_committed", round=int(round_index))
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
