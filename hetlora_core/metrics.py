"""Prometheus metrics of a HetLoRA run, pushed to a Pushgateway.

Every KFP task is a short-lived batch job, so nothing is scraped from the tasks themselves: each task
pushes its outcome once to a Prometheus Pushgateway, which Prometheus scrapes with
``honor_labels: true`` (so the ``job``, ``run``, ``round`` and ``client`` labels below survive as
pushed). No KFP or Kubernetes imports here.

Conventions (https://prometheus.io/docs/practices/naming/):

* prefix ``hetlora_``, base units (seconds, bytes) and their suffixes;
* every value is a **gauge**: a task pushes the value of *its* round, which is not a monotonic
  counter, so no name carries ``_total`` (a run's total is a PromQL ``sum``, e.g.
  ``sum by (run) (hetlora_round_upload_bytes)``);
* grouping keys: ``{run, round, client}`` for a client task, ``{run, round}`` for a round and
  ``{run}`` for the run-level "last successful round" pair; the grouping-key values become labels.
  No ``instance`` label is ever pushed (the Pushgateway's empty ``instance`` is dropped by
  ``honor_labels``), so a retried task overwrites its own group instead of adding a series;
* the only label inside a group is ``tier`` on client metrics (bounded: one value per tier).

A client task's and a round's push is a ``PUT`` (``push_to_gateway``): it replaces the whole group,
so a retried task never leaves stale values from its failed attempt. Values known only later (the
aggregation weight, a client's held-out perplexity) are added to the client's group with a ``POST``
(:func:`add_client_metrics`), which keeps the rest of the group. Pushing is best effort: without a URL it is a no-op,
and a failed push logs a warning and returns ``False``; it never raises into the training code
(invalid label values, e.g. an empty tier, are a warning and no push, too).
At the end of a run :func:`delete_run_groups` deletes the per-round and per-client groups (the
values stay in Prometheus's TSDB; the Pushgateway would otherwise expose them forever) and keeps
the ``{run}`` group so "time since the last successful round" stays observable.

The Pushgateway URL comes from :class:`~hetlora_core.config.MetricsConfig` ``pushgateway_url``;
the environment variable ``HETLORA_PUSHGATEWAY_URL``, when set (even to the empty string, which
turns pushing off), overrides it. ``HETLORA_PUSHGATEWAY_TIMEOUT_S`` sets the HTTP timeout
(default 5 s).
"""

from __future__ import annotations

import logging
import os
import time
import urllib.parse
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Gauge, delete_from_gateway, push_to_gateway, pushadd_to_gateway

from hetlora_core.config import MetricsConfig

log = logging.getLogger(__name__)

ENV_URL = "HETLORA_PUSHGATEWAY_URL"
ENV_TIMEOUT = "HETLORA_PUSHGATEWAY_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 5.0

CLIENT_LABELS = ("tier",)


@dataclass(frozen=True)
class MetricDef:
    name: str
    help: str


def _m(name: str, help: str) -> MetricDef:
    return MetricDef(name, help)


# ---------------------------------------------------------------- client task, group {run, round, client}
CLIENT_TASK_DURATION = _m("hetlora_client_task_duration_seconds", "Wall-clock time of one client task (get global, train, put), seconds.")
CLIENT_TRAIN_LOSS = _m("hetlora_client_train_loss", "Mean training loss (cross-entropy, nats per token) of the client's local steps in this round.")
CLIENT_START_RANK = _m("hetlora_client_start_rank", "LoRA rank the client started the round with (the truncation of the global adapter).")
CLIENT_RANK = _m("hetlora_client_rank", "LoRA rank of the adapter the client uploaded, after its self-pruning decision.")
CLIENT_RANKS_PRUNED = _m("hetlora_client_ranks_pruned", "Number of rank components the client pruned in this round (start rank minus rank).")
CLIENT_UPLOAD_BYTES = _m("hetlora_client_upload_bytes", "Bytes the client uploaded to the store in this round (its adapter and manifest).")
CLIENT_DOWNLOAD_BYTES = _m("hetlora_client_download_bytes", "Bytes the client downloaded from the store in this round (the global adapter).")
CLIENT_AGG_WEIGHT = _m("hetlora_client_aggregation_weight", "Aggregation weight the server gave the client's update in this round.")
CLIENT_HELDOUT_PPL = _m("hetlora_client_heldout_perplexity", "Perplexity of the client's model on its own held-out text.")

# ---------------------------------------------------------------- round, group {run, round}
ROUND_DURATION = _m("hetlora_round_duration_seconds", "Wall-clock time of one federated round from plan to commit, seconds.")
GLOBAL_HELDOUT_PPL = _m("hetlora_global_heldout_perplexity", "Perplexity of the round's global adapter on the pooled held-out text of all clients.")
ROUND_MEAN_TRAIN_LOSS = _m("hetlora_round_mean_train_loss", "Mean of the clients' training losses in this round.")
ROUND_CLIENTS = _m("hetlora_round_clients", "Number of client updates aggregated into this round's global adapter.")
ROUND_UPLOAD_BYTES = _m("hetlora_round_upload_bytes", "Bytes all clients of the round uploaded to the store.")
ROUND_DOWNLOAD_BYTES = _m("hetlora_round_download_bytes", "Bytes all clients of the round downloaded from the store.")
ROUND_RANKS_PRUNED = _m("hetlora_round_ranks_pruned", "Rank components pruned by all clients of the round.")

# ---------------------------------------------------------------- run, group {run}
LAST_SUCCESS_TS = _m("hetlora_last_successful_round_timestamp_seconds", "Unix time at which the run last committed a round.")
LAST_SUCCESS_ROUND = _m("hetlora_last_successful_round", "Index of the run's last committed round.")

CLIENT_METRICS = (CLIENT_TASK_DURATION, CLIENT_TRAIN_LOSS, CLIENT_START_RANK, CLIENT_RANK, CLIENT_RANKS_PRUNED,
                  CLIENT_UPLOAD_BYTES, CLIENT_DOWNLOAD_BYTES, CLIENT_AGG_WEIGHT, CLIENT_HELDOUT_PPL)
ROUND_ROUGE_L = _m("hetlora_round_rouge_l", "ROUGE-L F of the round's global adapter's greedy answers (instruction data only).")
ROUND_METRICS = (ROUND_DURATION, GLOBAL_HELDOUT_PPL, ROUND_ROUGE_L, ROUND_MEAN_TRAIN_LOSS, ROUND_CLIENTS, ROUND_UPLOAD_BYTES,
                 ROUND_DOWNLOAD_BYTES, ROUND_RANKS_PRUNED)
RUN_METRICS = (LAST_SUCCESS_TS, LAST_SUCCESS_ROUND)

#: Every metric name this module can push (the dashboard test checks its queries against it).
METRIC_NAMES: frozenset[str] = frozenset(m.name for m in CLIENT_METRICS + ROUND_METRICS + RUN_METRICS)

#: Labels a pushed series can carry besides ``__name__``: ``job`` and the grouping key, plus ``tier``.
LABEL_NAMES: frozenset[str] = frozenset({"job", "run", "round", "client", "tier"})


# ---------------------------------------------------------------- plumbing


def pushgateway_url(cfg: MetricsConfig) -> str:
    """The effective Pushgateway URL: ``$HETLORA_PUSHGATEWAY_URL`` if set, else the config's; '' = off."""
    env = os.environ.get(ENV_URL)
    return (env if env is not None else cfg.pushgateway_url).strip()


def redact(url: str, text: str | None = None) -> str:
    """``text`` (default: ``url``) with the URL's password replaced by ``***``.

    Security: a Pushgateway behind basic auth may be configured as ``http://user:secret@host``;
    warnings and errors go to logs that many people read, so the secret never appears in them."""
    out = url if text is None else text
    try:
        # prometheus_client accepts "user:pw@host:9091" and adds http://; parse it the same way.
        secret = urllib.parse.urlsplit(url if "://" in url else f"http://{url}").password
    except ValueError:  # a malformed URL: nothing to pick a password out of
        return out
    if not secret:
        return out
    for s in dict.fromkeys((secret, urllib.parse.unquote(secret))):  # as written and percent-decoded
        out = out.replace(f":{s}@", ":***@").replace(s, "***")
    return out


def _timeout() -> float:
    raw = os.environ.get(ENV_TIMEOUT, "")
    try:
        value = float(raw) if raw else DEFAULT_TIMEOUT_S
    except ValueError:
        log.warning("metrics: %s=%r is not a number; using %.0f s", ENV_TIMEOUT, raw, DEFAULT_TIMEOUT_S)
        return DEFAULT_TIMEOUT_S
    return value if value > 0 else DEFAULT_TIMEOUT_S


def _label(name: str, value: object) -> str:
    """A grouping-key or label value: a non-empty string (ValueError otherwise, which the public
    functions turn into a warning: a caller's bug must not fail the training either)."""
    s = str(value)
    if not s:
        raise ValueError(f"metrics: label {name!r} must be a non-empty string")
    return s


def _round_label(rnd: int | float) -> str:  # KFP may hand 3.0 back for 3
    if isinstance(rnd, bool) or not isinstance(rnd, (int, float)) or float(rnd) != int(rnd) or rnd < 0:
        raise ValueError(f"metrics: round must be a non-negative integer, got {rnd!r}")
    return str(int(rnd))  # KFP may hand 3.0 back for 3


def _gauge(reg: CollectorRegistry, m: MetricDef, labels: Iterable[str] = ()) -> Gauge:
    return Gauge(m.name, m.help, labelnames=tuple(labels), registry=reg)


def _registry(values: Iterable[tuple[MetricDef, object]], tier: str | None = None) -> CollectorRegistry:
    """A fresh registry with one gauge per value that is not None (``tier`` label on client metrics).
    A value that is not a number raises ValueError/TypeError, which the callers turn into a warning."""
    reg = CollectorRegistry()
    for m, v in values:
        if v is None:
            continue
        value = float(v)  # type: ignore[arg-type]
        if tier is None:
            _gauge(reg, m).set(value)
        else:
            _gauge(reg, m, CLIENT_LABELS).labels(tier=tier).set(value)
    return reg


def _push(cfg: MetricsConfig, registry: CollectorRegistry, grouping_key: Mapping[str, str], what: str,
          *, replace_group: bool = True) -> bool:
    url = pushgateway_url(cfg)
    if not url:
        return False
    push = push_to_gateway if replace_group else pushadd_to_gateway  # PUT vs POST
    try:
        push(url, job=cfg.job, registry=registry, grouping_key=dict(grouping_key), timeout=_timeout())
    except Exception as e:  # noqa: BLE001 - metrics are best effort: never fail the training for them
        log.warning("metrics: could not push %s %s to %s: %s: %s", what, dict(grouping_key), redact(url), type(e).__name__,
                    redact(url, str(e)))
        return False
    return True


# ---------------------------------------------------------------- public API


def push_client_metrics(
    cfg: MetricsConfig,
    run: str,
    rnd: int,
    client: str,
    tier: str,
    *,
    duration_s: float,
    train_loss: float,
    rank_before: int,
    rank_after: int,
    bytes_up: int,
    bytes_down: int,
    weight: float | None = None,
    heldout_ppl: float | None = None,
) -> bool:
    """Push one client task's outcome to the group ``{run, round, client}`` (labels: ``tier``).

    ``weight`` and ``heldout_ppl`` are left out when ``None``; when they are known only later (after
    aggregation, in the evaluate task), add them with :func:`add_client_metrics`.
    This is a ``PUT``: it replaces the whole group, so a retried client task leaves nothing stale.
    Returns True if pushed, False if metrics are off or the push failed (logged as a warning).
    """
    try:
        key = {"run": _label("run", run), "round": _round_label(rnd), "client": _label("client", client)}
        tier = _label("tier", tier)
    except ValueError as e:
        log.warning("%s; not pushed", e)
        return False
    if not pushgateway_url(cfg):
        return False
    try:
        reg = _registry([
            (CLIENT_TASK_DURATION, duration_s),
            (CLIENT_TRAIN_LOSS, train_loss),
            (CLIENT_START_RANK, rank_before),
            (CLIENT_RANK, rank_after),
            (CLIENT_RANKS_PRUNED, rank_before - rank_after),
            (CLIENT_UPLOAD_BYTES, bytes_up),
            (CLIENT_DOWNLOAD_BYTES, bytes_down),
            (CLIENT_AGG_WEIGHT, weight),
            (CLIENT_HELDOUT_PPL, heldout_ppl),
        ], tier)
    except (TypeError, ValueError) as e:
        log.warning("metrics: client metrics of %s are not numbers (%s); not pushed", key, e)
        return False
    return _push(cfg, reg, key, "client metrics")


def add_client_metrics(
    cfg: MetricsConfig,
    run: str,
    rnd: int,
    client: str,
    tier: str,
    *,
    weight: float | None = None,
    heldout_ppl: float | None = None,
) -> bool:
    """Add values known only after the client task (the aggregation weight, a held-out perplexity
    from the evaluate task) to the client's group ``{run, round, client}``.

    Unlike :func:`push_client_metrics` this is a ``POST``: it replaces only the metrics it pushes
    and keeps the ones the client task pushed. Returns True if pushed (False: off, nothing to add,
    or failed with a warning).
    """
    try:
        key = {"run": _label("run", run), "round": _round_label(rnd), "client": _label("client", client)}
        tier = _label("tier", tier)
    except ValueError as e:
        log.warning("%s; not pushed", e)
        return False
    if not pushgateway_url(cfg) or (weight is None and heldout_ppl is None):
        return False
    try:
        reg = _registry([(CLIENT_AGG_WEIGHT, weight), (CLIENT_HELDOUT_PPL, heldout_ppl)], tier)
    except (TypeError, ValueError) as e:
        log.warning("metrics: client metrics of %s are not numbers (%s); not pushed", key, e)
        return False
    return _push(cfg, reg, key, "client metrics (add)", replace_group=False)


def push_round_metrics(
    cfg: MetricsConfig,
    run: str,
    rnd: int,
    *,
    duration_s: float,
    global_ppl: float | None,
    mean_train_loss: float | None,
    clients: int,
    bytes_up: int,
    bytes_down: int,
    ranks_pruned: int | None = None,
    committed_at: float | None = None,
    rouge_l: float | None = None,
) -> bool:
    """Push a committed round's outcome to ``{run, round}`` and mark it as the run's last
    successful round in ``{run}`` (``committed_at``: Unix time, default now).

    Call it only after the round's global manifest is committed. Returns True if both pushes
    succeeded.
    """
    try:
        key = {"run": _label("run", run), "round": _round_label(rnd)}
    except ValueError as e:
        log.warning("%s; not pushed", e)
        return False
    if not pushgateway_url(cfg):
        return False
    try:
        reg = _registry([
            (ROUND_DURATION, duration_s),
            (GLOBAL_HELDOUT_PPL, global_ppl),
            (ROUND_ROUGE_L, rouge_l),  # None (not pushed) unless the data has completions
            (ROUND_MEAN_TRAIN_LOSS, mean_train_loss),
            (ROUND_CLIENTS, clients),
            (ROUND_UPLOAD_BYTES, bytes_up),
            (ROUND_DOWNLOAD_BYTES, bytes_down),
            (ROUND_RANKS_PRUNED, ranks_pruned),
        ])
        run_reg = _registry([(LAST_SUCCESS_TS, time.time() if committed_at is None else committed_at),
                             (LAST_SUCCESS_ROUND, int(key["round"]))])
    except (TypeError, ValueError) as e:
        log.warning("metrics: round metrics of %s are not numbers (%s); not pushed", key, e)
        return False
    ok = _push(cfg, reg, key, "round metrics")
    return _push(cfg, run_reg, {"run": key["run"]}, "last successful round") and ok


def delete_run_groups(
    cfg: MetricsConfig,
    run: str,
    rounds: int,
    clients_by_round: Mapping[int, Iterable[str]],
) -> int:
    """Delete the run's ``{run, round}`` and ``{run, round, client}`` groups; keep ``{run}``.

    Rounds ``0 .. rounds-1`` and every key of ``clients_by_round`` are deleted (deleting a group that
    does not exist is harmless). Returns the number of groups deleted; a failure is a warning and
    stops the deletion (the gateway is then unreachable; the groups stay until the next cleanup).
    """
    url = pushgateway_url(cfg)
    if not url:
        return 0
    try:
        run = _label("run", run)
        # Keys may come back from JSON/KFP as "3" or 3.0: normalise them to ints.
        by_round: dict[int, list[str]] = {}
        for r, clients in clients_by_round.items():
            by_round.setdefault(int(_round_label(float(r))), []).extend(clients)
        keys: list[dict[str, str]] = []
        for r in sorted(set(range(int(rounds))) | set(by_round)):
            for c in dict.fromkeys(by_round.get(r, ())):
                keys.append({"run": run, "round": str(r), "client": _label("client", c)})
            keys.append({"run": run, "round": str(r)})
    except (ValueError, TypeError) as e:
        log.warning("%s; no group deleted", e)
        return 0
    deleted = 0
    timeout = _timeout()
    for key in keys:
        try:
            delete_from_gateway(url, job=cfg.job, grouping_key=key, timeout=timeout)
        except Exception as e:  # noqa: BLE001 - best effort, like pushing
            # Deleting a group that does not exist succeeds, so a failure means the gateway is
            # unreachable or broken: stop instead of waiting out one timeout per remaining group.
            log.warning("metrics: could not delete group %s at %s (%d of %d groups left undeleted): %s: %s",
                        key, redact(url), len(keys) - deleted, len(keys), type(e).__name__, redact(url, str(e)))
            break
        deleted += 1
    return deleted

