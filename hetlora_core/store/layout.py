"""Every key of the store layout, as functions of (experiment, round, client id).

This module is the only place that spells a layout key: the rest of the project calls these
functions (``tests/test_layout_ownership.py`` checks it), and README's layout block is
``layout_table()``, generated from the same functions. Rounds are zero-padded to four digits so
that keys sort in round order in every store listing.

Experiment names and client ids are single key segments: no '/', and ``validate_key``'s rules (no
'..', no control characters), so an id coming from a config or a plan cannot reach another
experiment's or client's keys.
"""

from __future__ import annotations

import re

from .artifacts import ADAPTER, MANIFEST
from .base import Store, validate_key

CONFIG = "config.json"
_ROUND = "round-"
_ROUND_DIGITS = 4

__all__ = [
    "baseline_key",
    "check_segment",
    "client_eval_key",
    "client_prefix",
    "config_key",
    "eval_key",
    "experiments",
    "global_prefix",
    "last_committed_round",
    "layout_table",
    "list_client_ids",
    "list_client_prefixes",
    "plan_key",
    "refusal_key",
    "round_name",
    "round_prefix",
    "trained_prefix",
]


def check_segment(value: str, what: str) -> str:
    """``value`` if it is one valid key segment, else ``ValueError`` naming ``what``."""
    # Security: a '/' would let an experiment name or client id address keys of another one.
    if not isinstance(value, str) or "/" in value:
        raise ValueError(f"{what} must be a string without '/', got {value!r}")
    return validate_key(value, what=what)


def _check_round(rnd: int) -> int:
    if not isinstance(rnd, int) or isinstance(rnd, bool) or rnd < 0:
        raise ValueError(f"round must be a non-negative integer, got {rnd!r}")
    return rnd


# ---------------------------------------------------------------- keys


def config_key(experiment: str) -> str:
    """``<exp>/config.json``: the run's config; resume refuses a different one."""
    return f"{check_segment(experiment, 'experiment')}/{CONFIG}"


def baseline_key(experiment: str) -> str:
    """``<exp>/baseline/metrics.json``: the base model's perplexity."""
    return f"{check_segment(experiment, 'experiment')}/baseline/metrics.json"


def round_name(rnd: int) -> str:
    """``round-0007``: a round's key segment (also fit for run and file names that mirror the store)."""
    return f"{_ROUND}{_check_round(rnd):0{_ROUND_DIGITS}d}"


def round_prefix(experiment: str, rnd: int) -> str:
    """``<exp>/round-0007``: everything of one round."""
    return f"{check_segment(experiment, 'experiment')}/{round_name(rnd)}"


def plan_key(experiment: str, rnd: int) -> str:
    """``<exp>/round-0007/plan.json``: selected clients, every client's rank/tier at round start."""
    return f"{round_prefix(experiment, rnd)}/plan.json"


def global_prefix(experiment: str, rnd: int) -> str:
    """``<exp>/round-0007/global``: the global adapter after the round; its manifest is the commit."""
    return f"{round_prefix(experiment, rnd)}/global"


def _clients_dir(experiment: str, rnd: int) -> str:
    return f"{round_prefix(experiment, rnd)}/clients"


def client_prefix(experiment: str, rnd: int, client_id: str) -> str:
    """``<exp>/round-0007/clients/<id>``: the client's upload (after self-pruning)."""
    return f"{_clients_dir(experiment, rnd)}/{check_segment(str(client_id), 'client_id')}"


def trained_prefix(experiment: str, rnd: int, client_id: str) -> str:
    """``<exp>/round-0007/clients/<id>/trained``: the client's trained adapter, before pruning."""
    return f"{client_prefix(experiment, rnd, client_id)}/trained"


def refusal_key(experiment: str, rnd: int) -> str:
    """``<exp>/round-0007/refused.json``: why the aggregate step refused the round (its quorum), for a
    driver that sees only "run failed" (Kubeflow). Text for a message; no state is read from it."""
    return f"{round_prefix(experiment, rnd)}/refused.json"


def eval_key(experiment: str, rnd: int) -> str:
    """``<exp>/round-0007/eval/metrics.json``: the round's held-out perplexity."""
    return f"{round_prefix(experiment, rnd)}/eval/metrics.json"


def client_eval_key(experiment: str, rnd: int, client_id: str) -> str:
    """``<exp>/round-0007/eval/clients/<id>.json``: one client's evaluation sums (federated
    evaluation of folder data: written by that client's own task; untrusted by the server)."""
    return f"{round_prefix(experiment, rnd)}/eval/clients/{check_segment(str(client_id), 'client_id')}.json"


# ---------------------------------------------------------------- queries


def last_committed_round(store: Store, experiment: str) -> int:
    """The highest round whose global manifest exists (the commit), or -1 when none.

    Only the commit counts, so the driver resumes from the store and a half-written round is redone."""
    exp = check_segment(experiment, "experiment")
    probe = global_prefix(exp, 0)  # the pattern is derived from the key functions, not spelled twice
    head, tail = probe.split(round_name(0), 1)
    pattern = re.compile(rf"^{re.escape(head + _ROUND)}(\d{{{_ROUND_DIGITS},}}){re.escape(tail)}/{re.escape(MANIFEST)}$")
    rounds = [int(m.group(1)) for k in store.list(exp) if (m := pattern.match(k))]
    return max(rounds, default=-1)


def list_client_ids(store: Store, experiment: str, rnd: int) -> list[str]:
    """Sorted ids of the clients of round ``rnd`` whose upload has a manifest (that have reported)."""
    base = _clients_dir(experiment, rnd) + "/"
    suffix = "/" + MANIFEST
    return sorted(k[len(base):-len(suffix)] for k in store.list(base)
                  if k.endswith(suffix) and k[len(base):].count("/") == 1)


def list_client_prefixes(store: Store, experiment: str, rnd: int) -> list[str]:
    """Sorted client prefixes of round ``rnd`` that have a manifest (that have reported)."""
    return [client_prefix(experiment, rnd, c) for c in list_client_ids(store, experiment, rnd)]


def experiments(store: Store) -> list[str]:
    """Sorted names of the experiments in ``store``: those with a ``config.json``."""
    names = []
    for key in store.list(""):
        exp, _, rest = key.partition("/")
        if rest == CONFIG:
            names.append(exp)
    return sorted(names)


# ---------------------------------------------------------------- documentation


def layout_table() -> str:
    """README's store layout block: each key pattern, built by the functions above, and what it holds."""
    exp, rnd, cid = "<experiment>", 7, "<id>"
    files = "{" + f"{ADAPTER},{MANIFEST}" + "}"
    rows = [
        (config_key(exp), "the run's config (resume refuses another)"),
        (baseline_key(exp), "base model perplexity"),
        (plan_key(exp, rnd), "selected clients; every client's rank and tier"),
        (f"{trained_prefix(exp, rnd, cid)}/{files}", "the client's trained adapter, before pruning"),
        (f"{client_prefix(exp, rnd, cid)}/{files}", "the client's upload (after self-pruning)"),
        (f"{global_prefix(exp, rnd)}/{files}", "global adapter; manifest written last = commit"),
        (refusal_key(exp, rnd), "aggregation's refusal (quorum), for messages"),
        (client_eval_key(exp, rnd, cid), "folder data: the client's own evaluation sums"),
        (eval_key(exp, rnd), "held-out perplexity: global and per client"),
    ]
    width = max(len(pattern) for pattern, _ in rows) + 2
    return "\n".join(f"{pattern:<{width}}{what}" for pattern, what in rows)
