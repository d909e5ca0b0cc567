"""Turn what a run left in the store into ``results.json`` and a PNG plot.

Everything here is read back from the store (plans, client and global manifests, eval metrics),
so the simulation, the kfp.local run and a Kubeflow run produce the same report."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from . import store as st
from .config import HetLoRAConfig
from .steps.plan import MAX_PLAN_BYTES


def collect_results(cfg: HetLoRAConfig, store: st.Store) -> dict[str, Any]:
    """Config, baseline, and per round: selection, ranks, prune events, weights, bytes, perplexity."""
    exp = cfg.experiment
    last = st.last_committed_round(store, exp)
    rounds = []
    for rnd in range(last + 1):
        # Server state, verified where this process holds the server key (store/signing.py): ForgedState names the key.
        g = st.signing.get_global_manifest(store, cfg.store, exp, rnd) or {}
        ev = st.signing.get_signed_json(store, cfg.store, st.eval_key(exp, rnd), "eval", exp, rnd) or {}
        plan = st.signing.get_signed_json(store, cfg.store, st.plan_key(exp, rnd), "plan", exp, rnd, max_bytes=MAX_PLAN_BYTES) or {}
        reports = g.get("client_reports", {})
        rounds.append({
            "round": rnd,
            "selected": [c["client_id"] for c in plan.get("clients", [])],
            "participants": g.get("participants", []),
            "dropped": g.get("dropped", {}),
            "weights": g.get("weights", {}),
            "weight_fallback": g.get("weight_fallback", ""),
            "clipped": g.get("clipped", []),
            "client_ranks": {c: s["rank"] for c, s in g.get("clients", {}).items()},
            "prune_events": [{"client": c, "from": r["rank_before"], "to": r["rank_after"]}
                             for c, r in reports.items() if r.get("pruned")],
            "clients": reports,
            "train_loss": _mean(_nums(r.get("train_loss") for r in reports.values())),
            "bytes_up": sum(_nums(r.get("bytes_up") for r in reports.values())),
            "bytes_down": sum(_nums(r.get("bytes_down") for r in reports.values())),
            "train_seconds": sum(_nums(r.get("train_seconds") for r in reports.values())),
            "aggregate_seconds": g.get("aggregate_seconds"),
            "eval_seconds": ev.get("eval_seconds"),
            "global_ppl": ev.get("global", {}).get("ppl"),
            "personal_ppl": ev.get("personal", {}).get("ppl"),
            "per_client_ppl": ev.get("personal", {}).get("per_client", {}),
            # instruction folder data only (steps/evaluate_client.py): global adapter, greedy answers
            "rouge_l": (ev.get("rouge_l") or {}).get("mean"),
            "per_client_rouge_l": (ev.get("rouge_l") or {}).get("per_client", {}),
            # folder data: clients whose evaluation report was missing or invalid (left out of the metrics)
            **({"eval_dropped": ev["eval_dropped"]} if ev.get("eval_dropped") else {}),
        })
    base = st.signing.get_signed_json(store, cfg.store, st.baseline_key(exp), "baseline", exp, -1)
    return {"config": cfg.to_dict(), "experiment": exp, "store": store.describe(), "rounds_committed": last + 1,
            "baseline_ppl": base["global"]["ppl"] if base else None, "rounds": rounds, "precision": precisions(rounds)}


def precisions(rounds: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The distinct (device, dtype, quantize, reason) decisions the clients' train tasks made, each
    with how many client updates made it: read from the client manifests, so what is recorded is the
    decision taken where training ran (a Kubeflow GPU pod, not the driver)."""
    seen: dict[str, dict[str, Any]] = {}
    for r in rounds:
        for rep in r["clients"].values():
            if rep.get("precision"):
                row = seen.setdefault(json.dumps(rep["precision"], sort_keys=True), {**rep["precision"], "client_updates": 0})
                row["client_updates"] += 1
    return [v for _, v in sorted(seen.items())]


def _nums(xs: Iterable[Any]) -> list[Any]:
    """The finite numbers among ``xs``. Since issue 13 the aggregate step type-checks every client
    field before it enters a global manifest; a manifest committed before that may hold a string
    ``train_loss``, which used to break collection for the whole experiment: it is left out instead."""
    return [x for x in xs if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)]


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def write_results(results: dict[str, Any], out_dir: str | Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1, sort_keys=True))
    plot_results(results, out / "perplexity.png")
    return out / "results.json"


def plot_results(results: dict[str, Any], path: str | Path) -> None:
    """Held-out perplexity per round (global at r_max and at each client's rank) and client ranks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    rounds = [r for r in results["rounds"] if r["global_ppl"] is not None]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    xs = [r["round"] + 1 for r in rounds]
    base = results.get("baseline_ppl")
    ax.plot([0, *xs], [base, *[r["global_ppl"] for r in rounds]] if base else [None, *[r["global_ppl"] for r in rounds]],
            marker="o", label="global adapter (r_max)")
    ax.plot([0, *xs], [base, *[r["personal_ppl"] for r in rounds]] if base else [None, *[r["personal_ppl"] for r in rounds]],
            marker="s", ls="--", label="each client's own rank")
    ax.set_xlabel("rounds completed")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_ylabel("held-out perplexity")
    ax.set_title(f"{results['experiment']}: {results['config']['strategy']['name']}")
    ax.grid(alpha=0.3)
    rouge = [(r["round"] + 1, r["rouge_l"]) for r in rounds if r.get("rouge_l") is not None]
    if rouge:  # instruction folder data: ROUGE-L of the global adapter's greedy answers, right axis
        axr = ax.twinx()
        axr.plot([x for x, _ in rouge], [y for _, y in rouge], marker="^", color="tab:green", label="ROUGE-L (global)")
        axr.set_ylabel("ROUGE-L (F)")
        axr.set_ylim(0, max(1e-3, 1.25 * max(y for _, y in rouge)))  # from 0: small gains are not magnified
    handles, labels = ax.get_legend_handles_labels()
    if rouge:
        h2, l2 = axr.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    ax.legend(handles, labels)
    ranks = [sorted(r["client_ranks"].values()) for r in results["rounds"]]
    if ranks:
        ax2.boxplot(ranks, positions=[r["round"] + 1 for r in results["rounds"]])
    ax2.set_xlabel("after round")
    ax2.set_ylabel("client rank")
    ax2.set_title("client ranks (self-pruning)")
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
