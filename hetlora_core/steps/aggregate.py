"""Aggregate step (server, model-free): verify the round's uploads, check the quorum, aggregate
with the method, and commit the new global (its manifest is written last: the commit).

Security: every upload is untrusted. It is read through its checksummed manifest, decoded by the
method's validation against the spec of the *committed* global (never one an upload imposes), its
rank may not exceed the client's planned rank, and its manifest fields are type- and range-checked.
A violation drops that client with a reason naming it (capped at ``MAX_REASON`` characters); nothing a
client uploads raises out of here. Robust aggregation (``robust.py``, a departure from the paper): a
client whose norms are far above the round's median is dropped after the first pass, and the new
global is checked finite and sane before it is committed (else ``RoundRejected``, nothing written).

Memory: two passes over the uploads. The first reads, verifies and validates each upload in turn
and keeps only what the weights need (``Method.summarise``: for the LoRA methods the ranks, the
sample count and the per-module delta norms, r x r Gram form), the manifest fields and the sha256
it validated. The second reads the valid uploads again, group by group (``Stream.groups``: equal
ranks, at most ``strategies.GROUP_BYTES`` of factors), checks each is still those bytes and adds
the group to the method's running sums. The step holds one upload plus one group, whatever the
number of clients, and pays for it by reading and hashing every valid upload twice. Unless
``strategy.keep_uploads_mb`` keeps the first pass's validated tensors (all of them, within that budget):
then the second pass adds those and reads nothing, and each group's tensors are let go once added.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from .. import robust
from .. import store as st
from ..adapter import AdapterError
from ..config import HetLoRAConfig
from ..faults import failpoint
from ..methods import ClientUpdate, Method, Spec, UploadError, method_for
from ..methods.base import Aggregated, State, Stream
from .common import config_of, load_global
from .plan import ClientPlan, RoundPlan, load_plan
from .upload_bounds import round0_bounds

MAX_REASON = 500  # characters of a drop reason kept: an upload's bytes (a tensor name) must not bloat the global manifest
MAX_NUM_SAMPLES = 10**12  # beyond any real client; bounds the float arithmetic of the weights
REPORT_FIELDS = ("rank_before", "rank_after", "pruned", "train_loss", "num_samples", "num_tokens", "train_seconds",
                 "bytes_up", "bytes_down")
PRECISION_KEYS = frozenset({"device", "dtype", "quantize", "reason"})  # hetlora_core.precision.Precision.as_dict


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
    p = man.get("precision")
    # Untrusted like every manifest field: only short strings under known keys pass into results.json.
    if p is not None:
        if not (isinstance(p, dict) and set(p) <= PRECISION_KEYS and all(isinstance(x, str) and len(x) <= 300 for x in p.values())):
            raise UploadError(f"{where}: manifest field precision has a bad value {str(p)[:60]!r}")
        out["precision"] = dict(p)
    return out


@dataclass
class _Upload:
    """The first pass's record of one valid upload: what the aggregation needs, its tensors only in
    ``state`` while ``strategy.keep_uploads_mb`` allows (a method that does not stream keeps its whole
    ``ClientUpdate`` in ``summary``)."""

    client_id: str
    prefix: str
    key: str  # the object its manifest names
    sha256: str  # of the bytes the first pass validated
    size: int  # their length (round 0: checked against the exact bound once the majority spec is known)
    max_rank: int  # the client's planned rank
    spec: Spec
    ranks: dict[str, int]
    report: dict[str, Any]
    summary: Any
    norms: dict[str, float]  # Method.update_norms: what robust.norm_outliers compares
    state: Any = None  # the validated tensors themselves, while strategy.keep_uploads_mb allows (else read again)


# What an upload can do wrong: its client is dropped with the message (StoreUnavailable is not here:
# the store, not the client, failed, and the task fails to be retried).
_CLIENT_FAULTS = (st.StoreError, AdapterError, UploadError, KeyError, ValueError, ArithmeticError)


def _why(e: Exception) -> str:
    """A drop reason of bounded length: messages quote what an upload holds (tensor names, values),
    and the global manifest, which lists every reason, has a size limit (a long one used to make the
    commit fail for everyone)."""
    msg = str(e)
    return msg if len(msg) <= MAX_REASON else f"{msg[:MAX_REASON]}... ({len(msg):,} characters)"


def _first_read(method: Method, store: st.Store, prefix: str, client: ClientPlan, spec: Spec | None, prev: State | None,
                round0_bound: int | None = None, keep: bool = False) -> _Upload:
    # The size bound comes from the global's spec; round 0 has none yet: its bound comes from the
    # peers' claims and store.max_upload_mb (upload_bounds), and the majority spec drops odd shapes.
    data, man = st.get_artifact(store, prefix, max_bytes=method.max_upload_bytes(spec, client.rank) if spec else round0_bound)
    state = method.decode(data, spec, where=prefix, max_rank=client.rank)
    n, report = _num_samples(man, prefix), _report(man, prefix)
    update = ClientUpdate(client.client_id, state, n)
    norms = method.update_norms(state)  # before summarise, which may reuse what it computed
    return _Upload(client.client_id, prefix, f"{prefix}/{man['object']}", man["sha256"], man["size"], client.rank, method.spec_of(state),
                   method.client_ranks(state), report, method.summarise(update, prev) if method.streams else update, norms,
                   state if keep and method.streams else None)


def _mean_rank(ranks: dict[str, int]) -> float:
    return sum(ranks.values()) / len(ranks) if ranks else 1.0


def _drop_outliers(cfg: HetLoRAConfig, method: Method, base: State, uploads: list[_Upload], dropped: dict[str, str]) -> None:
    """Robust aggregation (robust.py, a departure from the paper): a client whose norms are far above
    the round's median is dropped, from the first pass's numbers, before any weight is computed.
    ``base`` (the verified previous global, or round 0's seeded initial one) gives the floor of the
    reference, so clients cannot lower it (LoRA only: a full model's weights are not an update)."""
    ranks = {u.client_id: _mean_rank(u.ranks) for u in uploads}
    floor = None
    if method.trains_lora and cfg.strategy.norm_ratio is not None:
        per_component = math.sqrt(max(_mean_rank(method.client_ranks(base)), 1.0))
        floor = {k: v / per_component for k, v in method.update_norms(base).items()}
    out = robust.norm_outliers({u.client_id: u.norms for u in uploads}, ranks, cfg.strategy.norm_ratio, floor)
    for u in [u for u in uploads if u.client_id in out]:
        uploads.remove(u)
        dropped[u.client_id] = f"{u.prefix}: {out[u.client_id]}"


def _check_new_global(cfg: HetLoRAConfig, method: Method, rnd: int, agg: Aggregated, uploads: list[_Upload],
                      prev: State | None) -> None:
    """Nothing non-finite or absurd is committed (robust.check_global raises RoundRejected). The
    reference norm includes the previous global's: components no client of the round trained keep
    its values (untrained_components: keep), which the clients' own norms do not cover."""
    norm = method.update_norms(agg.state).get("update", 0.0)
    ref = max([u.norms.get("update", 0.0) for u in uploads] + ([method.update_norms(prev).get("update", 0.0)] if prev is not None else []))
    robust.check_global(rnd, method.arrays(agg.state), norm, ref, cfg.strategy.norm_ratio)


def _second_read(method: Method, store: st.Store, u: _Upload, spec: Spec) -> State:
    """The upload again, if it still is the bytes the first pass validated (decoded again: the
    state is rebuilt from those very bytes, so the validation cannot disagree)."""
    data = store.get_bytes(u.key, max_bytes=method.max_upload_bytes(spec, u.max_rank))
    got = hashlib.sha256(data).hexdigest()
    if got != u.sha256:
        raise st.ChecksumMismatch(f"{u.key}: changed between the aggregate step's two reads (sha256 {got}, validated "
                                  f"{u.sha256}); the client is dropped, not aggregated with bytes nobody validated")
    return method.decode(data, spec, where=u.prefix, max_rank=u.max_rank)


def _majority_spec(uploads: list[_Upload], dropped: dict[str, str]) -> Spec:
    """Round 0 has no committed global: the tensor names and shapes most uploads agree on win, and
    the others are dropped (so one client cannot impose its own and get the honest ones dropped)."""
    votes = Counter(tuple(sorted(u.spec.items())) for u in uploads)
    (winner, count), = votes.most_common(1)
    spec = dict(winner)
    for u in [u for u in uploads if u.spec != spec]:
        uploads.remove(u)
        theirs = u.spec
        dropped[u.client_id] = (
            f"{u.prefix}: modules or shapes differ from the {count} upload(s) that agree: "
            f"extra {sorted(set(theirs) - set(spec))}, missing {sorted(set(spec) - set(theirs))}, "
            f"other shape {sorted(m for m in set(spec) & set(theirs) if spec[m] != theirs[m])}")
    return spec


def _check_quorum(cfg: HetLoRAConfig, plan: RoundPlan, uploads: list[_Upload], dropped: dict[str, str]) -> None:
    need = max(1, math.ceil(cfg.federation.quorum * len(plan.clients) - 1e-9))
    if len(uploads) < need:
        # Counted from 1 as every message a user sees (the store's key name beside it).
        raise QuorumError(f"round {plan.round + 1}/{cfg.federation.rounds} ({st.round_name(plan.round)}): {len(uploads)} valid "
                          f"client uploads, quorum needs {need} of {len(plan.clients)} "
                          f"(federation.quorum={cfg.federation.quorum}); dropped: {dropped}. The global adapter is unchanged; "
                          "rerun the round or lower federation.quorum")


def _feed(method: Method, store: st.Store, spec: Spec, stream: Stream, uploads: list[_Upload]) -> tuple[int, str] | None:
    """Read every group and add it to ``stream``; (index, reason) of the first upload that fails."""
    for group in stream.groups:
        states = []  # the one group held at a time (rebinding frees the previous one)
        for i in group:
            try:
                # A kept first-pass state is the validated tensors themselves (no second read to check).
                kept = uploads[i].state
                states.append(kept if kept is not None else _second_read(method, store, uploads[i], spec))
            except st.StoreUnavailable:
                raise
            except _CLIENT_FAULTS as e:
                return i, _why(e)
        stream.add(group, states)
        for i in group:  # added: kept tensors are let go (a restart would read them again, checked by sha256)
            uploads[i].state = None
    return None


def _second_pass(cfg: HetLoRAConfig, store: st.Store, method: Method, base: State, spec: Spec, plan: RoundPlan,
                 uploads: list[_Upload], dropped: dict[str, str]) -> Aggregated:
    """Aggregate the valid uploads group by group; an upload that fails its second read is dropped.

    Dropping a client here changes every other client's weight: p_k is normalised over the clients
    that take part, the sparsity weights fall back to sample counts only if *all* of theirs are
    zero, and the quorum counts them. The partial sums already hold the old weights, so they
    are thrown away: the client is recorded in ``dropped``, the quorum checked again (QuorumError
    if it no longer holds, with nothing written), the weights recomputed from the first-pass
    summaries of the clients left, and the second pass restarts. Nothing has been written before it
    completes, so nothing aggregated with a dropped client is ever committed; every restart drops a
    client, so it ends. (The global is then exactly what these uploads alone give.)"""
    while True:
        stream = method.aggregate_stream(base, [u.summary for u in uploads])
        failed = _feed(method, store, spec, stream, uploads)
        if failed is None:
            return stream.result()
        i, why = failed
        dropped[uploads[i].client_id] = why
        del uploads[i]
        _check_quorum(cfg, plan, uploads, dropped)


def aggregate(cfg: HetLoRAConfig, store: st.Store, plan: RoundPlan) -> dict[str, Any]:
    """Aggregate round ``plan.round`` and commit it; returns the global manifest as written."""
    start = time.perf_counter()
    exp, rnd, method = cfg.experiment, plan.round, method_for(cfg)
    prev = load_global(cfg, store, rnd, None) if rnd > 0 else None
    spec = method.spec_of(prev) if prev is not None else None
    uploads: list[_Upload] = []
    dropped: dict[str, str] = {}
    bounds = round0_bounds(cfg, method, store, plan) if spec is None else {}
    # First pass: verify, validate, summarise. The decoded tensors are kept only within
    # strategy.keep_uploads_mb in all; past it none are (each upload is then read again, group by group).
    budget, kept = cfg.strategy.keep_uploads_mb * 2**20, 0
    for c in plan.clients:
        try:
            uploads.append(_first_read(method, store, st.client_prefix(exp, rnd, c.client_id), c, spec, prev,
                                          bounds.get(c.client_id), keep=kept <= budget and budget > 0))
        except st.StoreUnavailable:
            raise  # the store, not the client: fail the task so it is retried
        except _CLIENT_FAULTS as e:
            dropped[c.client_id] = _why(e)
            continue
        if uploads[-1].state is not None:
            kept += method.nbytes(uploads[-1].state)
            if kept > budget:  # over: let every kept state go (the second pass reads them all)
                for u in uploads:
                    u.state = None
    if spec is None and uploads:
        spec = _majority_spec(uploads, dropped)
        # Round 0 read each upload within the peers' bound only (no spec yet); the exact bound of the
        # client's planned rank now applies, before anything is aggregated, whether its tensors were kept
        # or are read again (the second read would refuse it too: both ways drop the same clients).
        for u in [u for u in uploads if u.size > method.max_upload_bytes(spec, u.max_rank)]:
            uploads.remove(u)
            dropped[u.client_id] = (f"{u.key}: {u.size:,} bytes, more than the {method.max_upload_bytes(spec, u.max_rank):,} "
                                    "an upload of this shape and rank can have")
    assert spec is not None or not uploads
    base = prev if prev is not None else method.initial_global(spec) if spec is not None else None
    if base is not None:
        _drop_outliers(cfg, method, base, uploads, dropped)
    _check_quorum(cfg, plan, uploads, dropped)
    assert spec is not None and base is not None
    try:
        if method.streams:
            agg = _second_pass(cfg, store, method, base, spec, plan, uploads, dropped)
        else:
            agg = method.aggregate(base, [u.summary for u in uploads])
    except robust.AGGREGATION_FAULTS as e:  # e.g. an SVD of overflowing sums: the round fails cleanly, naming it
        raise robust.RoundRejected(f"round {rnd}: aggregation failed ({type(e).__name__}: {_why(e)}); nothing is committed "
                                   "and the previous global is unchanged") from e
    _check_new_global(cfg, method, rnd, agg, uploads, prev)  # before anything is written: a rejected round commits nothing
    state = {c: dict(v) for c, v in plan.state.items()}
    for u in uploads:  # pruned ranks persist across rounds
        if u.ranks:
            entry: dict[str, Any] = {"rank": max(u.ranks.values()), "tier": state[u.client_id]["tier"]}
            if len(set(u.ranks.values())) > 1:
                entry["module_ranks"] = u.ranks
            state[u.client_id] = entry
    manifest = {
        "round": rnd, "strategy": method.name, "clients": state,
        "participants": [u.client_id for u in uploads], "dropped": dropped, "weights": agg.weights,
        "weight_fallback": agg.fallback, "clipped": agg.clipped or [], "aggregate_seconds": time.perf_counter() - start,
        "client_reports": {u.client_id: u.report for u in uploads},
    }
    return st.put_artifact(store, st.global_prefix(exp, rnd), method.encode(agg.state), manifest,
                           seal=st.signing.sealer(cfg.store, "global", exp, rnd))  # server-signed commit (store/signing.py)


def aggregate_task(config_json: str, round_index: int, reports: list[str]) -> str:
    """The aggregate component's body. ``reports`` (the clients' task outputs) are only
    cross-checked: the store's manifests and checksums are what counts, never a task's word."""
    cfg = config_of(config_json)
    rnd = int(round_index)
    store = st.open_store(cfg.store)
    plan = load_plan(cfg, store, rnd)
    reported = {json.loads(r)["client_id"] for r in reports if r}
    failpoint("aggregate_start", round=rnd)
    refused = st.refusal_key(cfg.experiment, rnd)
    with contextlib.suppress(st.StoreError):
        store.delete(refused)  # an earlier attempt's reason is not this one's
    try:
        man = aggregate(cfg, store, plan)
    except QuorumError as e:
        # A driver on Kubeflow sees only "run FAILED": leave it the reason. Best effort (the error
        # itself is what fails the task), and only text: nothing reads state from this key.
        with contextlib.suppress(st.StoreError):
            st.put_json(store, refused, {"round": rnd, "reason": str(e)[:2000]})
        raise
    failpoint("round_committed", round=rnd)
    return json.dumps(asdict(AggregateReport(rnd, man["participants"], man["dropped"],
                                             sorted({c.client_id for c in plan.clients} - reported) if reports else [])))
