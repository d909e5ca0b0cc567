"""Translate a committed round (global manifest + eval metrics) into Prometheus pushes.

Kept apart from ``metrics`` (which only knows metric names and pushing) so the pipeline's
aggregation/evaluation components and the simulation report a round identically."""

from __future__ import annotations

from typing import Any

from . import metrics
from .config import HetLoRAConfig


def push_round_outcome(cfg: HetLoRAConfig, rnd: int, gman: dict[str, Any], ev: dict[str, Any], duration_s: float) -> None:
    """Push per-client and per-round metrics; a no-op without a Pushgateway URL."""
    if not metrics.pushgateway_url(cfg.metrics):
        return
    reports = gman.get("client_reports", {})
    per_client_ppl = ev.get("personal", {}).get("per_client", {})
    for cid, r in reports.items():
        metrics.push_client_metrics(
            cfg.metrics, cfg.experiment, rnd, cid, gman["clients"].get(cid, {}).get("tier", ""),
            duration_s=float(r.get("train_seconds", 0.0)), train_loss=float(r.get("train_loss", float("nan"))),
            rank_before=int(r.get("rank_before", 0)), rank_after=int(r.get("rank_after", 0)),
            bytes_up=int(r.get("bytes_up", 0)), bytes_down=int(r.get("bytes_down", 0)),
            weight=gman.get("weights", {}).get(cid), heldout_ppl=per_client_ppl.get(cid))
    losses = [float(r["train_loss"]) for r in reports.values() if "train_loss" in r]
    metrics.push_round_metrics(
        cfg.metrics, cfg.experiment, rnd, duration_s=duration_s, global_ppl=float(ev["global"]["ppl"]),
        mean_train_loss=sum(losses) / len(losses) if losses else float("nan"), clients=len(reports),
        bytes_up=sum(int(r.get("bytes_up", 0)) for r in reports.values()),
        bytes_down=sum(int(r.get("bytes_down", 0)) for r in reports.values()),
        ranks_pruned=sum(int(r.get("rank_before", 0)) - int(r.get("rank_after", 0)) for r in reports.values()),
        rouge_l=(ev.get("rouge_l") or {}).get("mean"))


def finish_run(cfg: HetLoRAConfig, results: dict[str, Any]) -> None:
    """At run end, delete the run's stale round/client groups (keeps the run-level group with the
    last successful round), unless ``metrics.delete_groups_at_end`` is off."""
    if not metrics.pushgateway_url(cfg.metrics) or not cfg.metrics.delete_groups_at_end:
        return
    rounds = results.get("rounds", [])
    metrics.delete_run_groups(cfg.metrics, cfg.experiment, len(rounds),
                              {r["round"]: list(r.get("clients", {})) for r in rounds})
