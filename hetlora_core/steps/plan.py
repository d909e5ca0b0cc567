"""Plan step (server, model-free): which clients train in a round, and every client's rank/tier.

A client's rank persists in the ``clients`` section of each committed global manifest, so the plan
of round t is a function of the config, the client ids and the store: rerunning it gives the same
plan, and resuming after a crash is the normal path.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from .. import store as st
from ..config import HetLoRAConfig

MAX_PLAN_BYTES = 16 * 1024 * 1024


@dataclass
class ClientPlan:
    client_id: str
    tier: str
    rank: int  # the client's current (possibly pruned) rank
    module_ranks: dict[str, int] | None = None  # only with per-module pruning decisions


@dataclass
class RoundPlan:
    """Who trains in a round, and every client's state (rank, tier) at the round's start."""

    experiment: str
    round: int
    clients: list[ClientPlan]
    state: dict[str, dict[str, Any]]

    def by_tier(self) -> dict[str, list[str]]:
        """Selected client ids per tier, only non-empty tiers (a ParallelFor per entry)."""
        out: dict[str, list[str]] = {}
        for c in self.clients:
            out.setdefault(c.tier, []).append(c.client_id)
        return out

    def client(self, client_id: str) -> ClientPlan:
        for c in self.clients:
            if c.client_id == client_id:
                return c
        raise KeyError(f"client {client_id!r} is not selected in round {self.round} (selected: {[c.client_id for c in self.clients]})")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RoundPlan:
        # KFP may hand ints back as floats: coerce explicitly.
        cl = [ClientPlan(str(c["client_id"]), str(c["tier"]), int(c["rank"]),
                         {k: int(v) for k, v in c["module_ranks"].items()} if c.get("module_ranks") else None)
              for c in d["clients"]]
        state = {c: {**v, "rank": int(v["rank"])} for c, v in d["state"].items()}
        return cls(str(d["experiment"]), int(d["round"]), cl, state)


def initial_client_state(cfg: HetLoRAConfig, client_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Rank and tier of every client before any pruning (seeded, reproducible)."""
    ids = sorted(client_ids)
    r = cfg.ranks
    if r.assignment == "explicit":
        return {c: {"rank": r.explicit[i], "tier": f"rank-{r.explicit[i]}"} for i, c in enumerate(ids)}
    rng = random.Random(f"ranks-{cfg.federation.seed}")
    if r.assignment == "uniform":
        return {c: {"rank": rng.randint(r.r_min, r.r_max), "tier": "uniform"} for c in ids}
    shuffled = ids[:]
    rng.shuffle(shuffled)
    total = sum(t.fraction for t in r.tiers)
    bounds, acc = [], 0.0
    for t in r.tiers:  # cumulative share of clients per tier, in tier order
        acc += t.fraction / total
        bounds.append((round(acc * len(ids)), t))
    state, i = {}, 0
    for k, c in enumerate(shuffled):
        while i < len(bounds) - 1 and k >= bounds[i][0]:
            i += 1
        state[c] = {"rank": bounds[i][1].rank, "tier": bounds[i][1].name}
    return state


def client_state(cfg: HetLoRAConfig, store: st.Store, client_ids: Sequence[str], rnd: int) -> dict[str, dict[str, Any]]:
    """Client ranks as of the start of round ``rnd`` (from the previous committed global manifest)."""
    if rnd == 0:
        return initial_client_state(cfg, client_ids)
    man = st.signing.get_global_manifest(store, cfg.store, cfg.experiment, rnd - 1)  # the driver holds the key: verified
    if man is None:
        raise st.NotFound(f"round {rnd - 1} of {cfg.experiment} is not committed; cannot plan round {rnd}")
    state: dict[str, dict[str, Any]] = man["clients"]
    return state


def plan_round(cfg: HetLoRAConfig, store: st.Store, client_ids: Sequence[str], rnd: int) -> RoundPlan:
    """Select ``clients_per_round`` clients uniformly without replacement (seeded by run and round)
    and write the plan to the store, where every task of the round reads it."""
    state = client_state(cfg, store, client_ids, rnd)
    chosen = random.Random(f"select-{cfg.federation.seed}-{rnd}").sample(sorted(client_ids), cfg.federation.clients_per_round)
    plan = RoundPlan(cfg.experiment, rnd, [ClientPlan(c, state[c]["tier"], int(state[c]["rank"]), state[c].get("module_ranks"))
                                           for c in sorted(chosen)], state)
    doc, seal = plan.to_dict(), st.signing.sealer(cfg.store, "plan", cfg.experiment, rnd)
    # Security: signed by the server key, so aggregation cannot be handed a client list or ranks the driver never chose.
    store.put_bytes(st.plan_key(cfg.experiment, rnd), json.dumps(seal(doc) if seal else doc, indent=1).encode())
    return plan


def load_plan(cfg: HetLoRAConfig, store: st.Store, rnd: int) -> RoundPlan:
    """The plan the driver wrote for round ``rnd`` (JSON, parsed defensively), its server signature
    verified where this process holds the key (the driver, aggregate; not client tasks)."""
    key = st.plan_key(cfg.experiment, rnd)
    if not store.exists(key):
        raise st.NotFound(f"no plan for round {rnd} at {key}; the driver writes it before starting the round")
    try:
        doc = json.loads(store.get_bytes(key, max_bytes=MAX_PLAN_BYTES))
        if not isinstance(doc, dict):
            raise TypeError(f"a plan is a JSON object, got {type(doc).__name__}")
    except (ValueError, TypeError) as e:
        raise ValueError(f"{key}: malformed round plan: {e}") from None
    st.signing.check(cfg.store, doc, key, "plan", cfg.experiment, rnd)  # ForgedState naming the key
    try:
        plan = RoundPlan.from_dict(doc)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{key}: malformed round plan: {e}") from None
    if (plan.experiment, plan.round) != (cfg.experiment, rnd):  # also for unsigned plans: a copy from elsewhere
        raise st.ForgedState(f"{key} is the plan of round {plan.round} of {plan.experiment!r}, read as round {rnd} of "
                             f"{cfg.experiment!r}; delete it and rerun the same command to plan the round again")
    return plan
