"""Evaluate step (server): held-out perplexity of the committed global, and of the base model once.

The global at full rank on every client, and each client at its own (possibly pruned) rank; the
result goes to the round's eval key, and the round's metrics to the Pushgateway when configured.
It also records the base model's perplexity (the baseline) the first time it runs in a run, so a
round committed by a task that died before evaluating is completed by evaluating it again.

Folder data (``data.source: folder``) is evaluated federated: no task reads every client's data.
Each client's own evaluate-client task (``steps/evaluate_client.py``) evaluates the global on its
own eval split and uploads only sums; this step reads those reports from the store, checks them
(``eval_reports``: they are untrusted uploads) and combines them token-weighted, which equals one
central evaluation over all eval splits (tests/test_fed_eval.py). It opens no client folder and
loads no model. A bad or missing report is left out and named in the record (``eval_dropped``).
Shakespeare (the embedded demo) keeps its central evaluation, which its reference results used.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from typing import Any

from .. import eval_reports, warm
from .. import store as st
from ..config import HetLoRAConfig
from ..methods import method_for
from .common import config_of, load_global

REPORT_MAX_BYTES = 1 << 20  # a client's sums are a few hundred bytes (plus one number per client id)


@dataclass
class EvalReport:
    round: int
    global_ppl: float
    personal_ppl: float


def _as_dict(r: Any) -> dict[str, Any]:
    return {"ppl": r.ppl, "per_client": r.per_client, "tokens": r.tokens}


def evaluate_baseline(cfg: HetLoRAConfig, store: st.Store) -> dict[str, Any]:
    """Perplexity of the base model before any round (stored once per run)."""
    from .. import runtime
    from ..evaluation import evaluate as evaluate_model

    key = st.baseline_key(cfg.experiment)
    got = st.signing.get_signed_json(store, cfg.store, key, "baseline", cfg.experiment, -1)
    if got is not None:
        return got
    r = evaluate_model(runtime.model(cfg), None, runtime.all_client_data(cfg), cfg)
    out = {"round": -1, "global": _as_dict(r), "personal": _as_dict(r)}
    st.signing.put_signed_json(store, cfg.store, key, out, "baseline", cfg.experiment, -1)
    return out


def evaluate(cfg: HetLoRAConfig, store: st.Store, rnd: int) -> dict[str, Any]:
    """Evaluate committed round ``rnd`` (and the baseline if missing); writes the round's eval key."""
    start = time.perf_counter()
    gman = st.signing.get_global_manifest(store, cfg.store, cfg.experiment, rnd)
    if gman is None:
        raise st.NotFound(f"round {rnd} of {cfg.experiment} is not committed; nothing to evaluate")
    if cfg.data.source == "folder":
        return evaluate_federated(cfg, store, rnd, sorted(gman["clients"]), start)
    import torch

    from .. import runtime  # the model and the data: only the central (Shakespeare) path loads them
    from ..threads import task_threads

    torch.set_num_threads(task_threads(cfg.training.threads))  # the CPUs this task may use (threads.py), baseline included
    evaluate_baseline(cfg, store)
    method, model = method_for(cfg), runtime.model(cfg)
    glob = load_global(cfg, store, rnd + 1, method.model_spec(model))
    ranks = {c: (s.get("module_ranks") or int(s["rank"])) for c, s in gman["clients"].items()}
    full, own = method.evaluate(model, glob, runtime.all_client_data(cfg), ranks)
    out = {"round": rnd, "global": _as_dict(full), "personal": _as_dict(own), "eval_seconds": time.perf_counter() - start}
    st.signing.put_signed_json(store, cfg.store, st.eval_key(cfg.experiment, rnd), out, "eval", cfg.experiment, rnd)
    return out


def _read_report(store: st.Store, key: str) -> Any:
    """A client's report as stored: None when absent, the exception when unreadable (too large,
    not JSON, not an object): reasons for the record, never this task's failure."""
    try:
        return st.get_json(store, key, max_bytes=REPORT_MAX_BYTES)
    except st.InvalidJSON as e:
        return e


def evaluate_federated(cfg: HetLoRAConfig, store: st.Store, rnd: int, client_ids: list[str], start: float) -> dict[str, Any]:
    """Folder data: the round's metrics (and the baseline, while missing) from the clients' own
    reports. ``client_ids``: every client of the run (the committed global manifest's list), so a
    report under any other name is never read. ``NotFound`` when no client reported usable sums:
    the round stays committed but unevaluated, and evaluating it again (the runner does) retries."""
    # Security: client reports are untrusted uploads; eval_reports.check_all validates every one.
    raw = {c: _read_report(store, st.client_eval_key(cfg.experiment, rnd, c)) for c in client_ids}
    # A client's eval split gives at most eval_max_tokens answer tokens plus one sample (<= seq_len).
    good, dropped = eval_reports.check_all(raw, rnd, cfg.data.eval_max_tokens + cfg.data.seq_len, max(1, cfg.data.rouge_max_prompts))
    full, own = eval_reports.combine_mode(good, "global"), eval_reports.combine_mode(good, "personal")
    if full is None or own is None:
        raise st.NotFound(f"round {rnd} of {cfg.experiment}: no client reported usable evaluation sums ({dropped})")
    base_key = st.baseline_key(cfg.experiment)
    base = eval_reports.combine_mode(good, "base")
    if base is not None and not store.exists(base_key):
        st.signing.put_signed_json(store, cfg.store, base_key, {"round": -1, "global": base, "personal": base,
                                   "eval_clients": sorted(c for c in good if "base" in good[c])}, "baseline", cfg.experiment, -1)
    out: dict[str, Any] = {"round": rnd, "global": full, "personal": own, "federated": True,
                           "eval_missing": sorted(c for c, r in raw.items() if r is None), "eval_dropped": dropped}
    rouge = eval_reports.combine_rouge(good)
    if rouge is not None and cfg.data.rouge_max_prompts:
        out["rouge_l"] = rouge
    out["eval_seconds"] = time.perf_counter() - start
    st.signing.put_signed_json(store, cfg.store, st.eval_key(cfg.experiment, rnd), out, "eval", cfg.experiment, rnd)
    return out


def evaluate_task(config_json: str, round_index: int, round_started_at: float = 0.0) -> str:
    """The evaluate component's body: evaluates, then pushes the round's metrics when configured
    (in a forked child of the warm task server when a local run has one: hetlora_core/warm.py)."""
    if (out := warm.delegate("evaluate", config_json, round_index, round_started_at)) is not None:
        return out
    from ..reporting import push_round_outcome

    cfg = config_of(config_json)
    store = st.open_store(cfg.store)
    rnd = int(round_index)
    ev = evaluate(cfg, store, rnd)
    gman = st.signing.get_global_manifest(store, cfg.store, cfg.experiment, rnd) or {}
    duration = time.time() - round_started_at if round_started_at else float(gman.get("aggregate_seconds", 0.0))
    push_round_outcome(cfg, rnd, gman, ev, duration)
    return json.dumps(asdict(EvalReport(rnd, ev["global"]["ppl"], ev["personal"]["ppl"])))
