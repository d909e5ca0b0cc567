"""Aggregate step (server, model-free): verify the round's uploads, check the quorum, aggregate
with the method, and commit the new global (its manifest is written last: the commit).

Security: every upload is untrusted. It is read through its checksummed manifest, decoded by the
method's validation against the spec of the *committed* global (never one an upload imposes), its
rank may not exceed the client's planned rank, and its manifest fields are type- and range-checked.
A violation drops that client with a reason naming it; nothing a client uploads raises out of here.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from .. import store as st
from ..adapter import AdapterError
from ..config import HetLoRAConfig
from ..faults import failpoint
from ..methods import ClientUpdate, Spec, UploadError, method_for
from .common import config_of, load_global
from .plan import RoundPlan, load_plan

MAX_NUM_SAMPLES = 10**12  # beyond any real client; bounds the float arithmetic of the weights
REPORT_FIELDS = ("rank_before", "rank_after", "pruned", "train_loss", "num_samples", "num_tokens", "train_seconds",
                 "bytes_up", "bytes_down")


class QuorumError(RuntimeError):
    """Too few valid client uploads to commit the round; the global stays unchanged."""


@dataclass
class AggregateReport:
    round: int
    participants: list[str]
    dropped: dict[str, str]
    unreported: list[str] = field(default_factory=list)


def _num_samples(man: dict[str, Any], where: str) -> int:
    n = man.get("num_samples")
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_NUM_SAMPLES:
        raise UploadError(f"{where}: manifest num_samples must be a positive integer, got {str(n)[:40]} "
                          f"(at most {MAX_NUM_SAMPLES} accepted)")
    return n


def _report(man: dict[str, Any], where: str) -> dict[str, Any]:
    """The manifest fields that go into the global manifest and results.json, type-checked, so a
    bad value drops its client here instead of breaking results collection later."""
    out: dict[str, Any] = {}
    for k in REPORT_FIELDS:
        if k not in man:
            continue
        v = man[k]
        ok = isinstance(v, bool) if k == "pruned" else (
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and abs(v) <= MAX_NUM_SAMPLES * 1e3)
        if not ok:
            raise UploadError(f"{where}: manifest field {k} has a bad value {str(v)[:40]!r}")
        out[k] = v
    return out


def _majority_spec(method: Any, updates: list[ClientUpdate], dropped: dict[str, str], prefix_of: Any) -> Spec:
    """Round 0 has no committed global: the tensor names and shapes most uploads agree on win, and
    the others are dropped (so one client cannot impose its own and get the honest ones dropped)."""
    votes = Counter(tuple(sorted(method.spec_of(u.state).items())) for u in updates)
    (winner, count), = votes.most_common(1)
    spec = dict(winner)
    for u in [u for u in updates if method.spec_of(u.state) != spec]:
        updates.remove(u)
        theirs = method.spec_of(u.state)
        dropped[u.client_id] = (
            f"{prefix_of(u.client_id)}: modules or shapes differ from the {count} upload(s) that agree: "
            f"extra {sorted(set(theirs) - set(spec))}, missing {sorted(set(spec) - set(theirs))}, "
            f"other shape {sorted(m for m in set(spec) & set(theirs) if spec[m] != theirs[m])}")
    return spec


def aggregate(cfg: HetLoRAConfig, store: st.Store, plan: RoundPlan) -> dict[str, Any]:
    """Aggregate round ``plan.round`` and commit it; returns the global manifest as written."""
    start = time.perf_counter()
    exp, rnd, method = cfg.experiment, plan.round, method_for(cfg)
    prev = load_global(cfg, store, rnd, None) if rnd > 0 else None
    spec = method.spec_of(prev) if prev is not None else None
    updates: list[ClientUpdate] = []
    dropped: dict[str, str] = {}
    manifests: dict[str, dict[str, Any]] = {}
    for c in plan.clients:
        prefix = st.client_prefix(exp, rnd, c.client_id)
        try:
            data, man = st.get_artifact(store, prefix)
            state = method.decode(data, spec, where=prefix, max_rank=c.rank)
            n, report = _num_samples(man, prefix), _report(man, prefix)
            updates.append(ClientUpdate(c.client_id, state, n))
            manifests[c.client_id] = report
        except st.StoreUnavailable:
            raise  # the store, not the client: fail the task so it is retried
        except (st.StoreError, AdapterError, UploadError, KeyError, ValueError) as e:
            dropped[c.client_id] = str(e)
    if spec is None and updates:
        spec = _majority_spec(method, updates, dropped, lambda cid: st.client_prefix(exp, rnd, cid))
        for cid in dropped:
            manifests.pop(cid, None)
    need = max(1, math.ceil(cfg.federation.quorum * len(plan.clients) - 1e-9))
    if len(updates) < need:
        raise QuorumError(f"round {rnd}: {len(updates)} valid client uploads, quorum needs {need} of {len(plan.clients)} "
                          f"(federation.quorum={cfg.federation.quorum}); dropped: {dropped}. The global adapter is unchanged; "
                          "rerun the round or lower federation.quorum")
    assert spec is not None
    agg = method.aggregate(prev if prev is not None else method.initial_global(spec), updates)
    state = {c: dict(v) for c, v in plan.state.items()}
    for u in updates:  # pruned ranks persist across rounds
        ranks = method.client_ranks(u.state)
        if ranks:
            entry: dict[str, Any] = {"rank": max(ranks.values()), "tier": state[u.client_id]["tier"]}
            if len(set(ranks.values())) > 1:
                entry["module_ranks"] = ranks
            state[u.client_id] = entry
    manifest = {
        "round": rnd, "strategy": method.name, "clients": state,
        "participants": [u.client_id for u in updates], "dropped": dropped, "weights": agg.weights,
        "weight_fallback": agg.fallback, "clipped": agg.clipped or [], "aggregate_seconds": time.perf_counter() - start,
        "client_reports": manifests,
    }
    return st.put_artifact(store, st.global_prefix(exp, rnd), method.encode(agg.state), manifest)


def aggregate_task(config_json: str, round_index: int, reports: list[str]) -> str:
    """The aggregate component's body. ``reports`` (the clients' task outputs) are only
    cross-checked: the store's manifests and checksums are what counts, never a task's word."""
    cfg = config_of(config_json)
    rnd = int(round_index)
    store = st.open_store(cfg.store)
    plan = load_plan(cfg, store, rnd)
    reported = {json.loads(r)["client_id"] for r in reports if r}
    failpoint("aggregate_start", round=rnd)
    man = aggregate(cfg, store, plan)
    failpoint("round_committed", round=rnd)
    return json.dumps(asdict(AggregateReport(rnd, man["participants"], man["dropped"],
                                             sorted({c.client_id for c in plan.clients} - reported))))
