"""The steps of one federated round over an artifact store: plan, train, prune, aggregate, evaluate.

These are what the KFP components call and what ``simulate`` calls in-process, so the pipeline and
the simulation run the same code on the same bytes. State lives only in the store:

* a client's rank persists in the ``clients`` section of each committed global manifest;
* a round is committed by its global manifest (written last), so the next round number is always
  ``last_committed_round + 1`` and resuming after a crash is the normal path.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from . import store as st
from .adapter import AdapterError, AdapterSpec, LoraAdapter, init_global, read_safetensors_metadata
from .config import HetLoRAConfig
from .pruning import self_prune
from .strategies import ClientUpdate, aggregate, average_tensors

FULL_FORMAT = "hetlora-full-delta/1"


class QuorumError(RuntimeError):
    """Too few valid client uploads to commit the round; the global adapter stays unchanged."""


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


# ---------------------------------------------------------------------------- planning


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
    man = st.get_manifest(store, st.global_prefix(cfg.experiment, rnd - 1))
    if man is None:
        raise st.NotFound(f"round {rnd - 1} of {cfg.experiment} is not committed; cannot plan round {rnd}")
    return man["clients"]


def plan_round(cfg: HetLoRAConfig, store: st.Store, client_ids: Sequence[str], rnd: int | None = None) -> RoundPlan:
    """Select ``clients_per_round`` clients uniformly without replacement (seeded by run and round)."""
    if rnd is None:
        rnd = st.last_committed_round(store, cfg.experiment) + 1
    state = client_state(cfg, store, client_ids, rnd)
    chosen = random.Random(f"select-{cfg.federation.seed}-{rnd}").sample(sorted(client_ids), cfg.federation.clients_per_round)
    plan = RoundPlan(cfg.experiment, rnd, [ClientPlan(c, state[c]["tier"], int(state[c]["rank"]), state[c].get("module_ranks"))
                                           for c in sorted(chosen)], state)
    store.put_bytes(plan_key(cfg.experiment, rnd), json.dumps(plan.to_dict(), indent=1).encode())
    return plan


def plan_key(experiment: str, rnd: int) -> str:
    return f"{st.round_prefix(experiment, rnd)}/plan.json"


def load_plan(cfg: HetLoRAConfig, store: st.Store, rnd: int) -> RoundPlan:
    """The plan the driver wrote for round ``rnd`` (JSON, parsed defensively)."""
    key = plan_key(cfg.experiment, rnd)
    if not store.exists(key):
        raise st.NotFound(f"no plan for round {rnd} at {key}; the driver writes it before starting the round")
    try:
        return RoundPlan.from_dict(json.loads(store.get_bytes(key, max_bytes=16 * 1024 * 1024)))
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{key}: malformed round plan: {e}") from None


# ---------------------------------------------------------------------------- global state


def load_global(cfg: HetLoRAConfig, store: st.Store, rnd: int, spec: AdapterSpec) -> LoraAdapter:
    """The global adapter clients receive in round ``rnd``: the seeded init at round 0."""
    if rnd == 0:
        return init_global(spec, cfg.ranks.r_max, cfg.model.lora_scale, cfg.federation.seed)
    data, _ = st.get_artifact(store, st.global_prefix(cfg.experiment, rnd - 1))
    return LoraAdapter.from_bytes(data, spec, 1, cfg.ranks.r_max, cfg.model.lora_scale, where=f"global of round {rnd - 1}")


def load_global_full(cfg: HetLoRAConfig, store: st.Store, rnd: int, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full fine-tuning's global state: a delta over every parameter (zeros at round 0)."""
    if rnd == 0:
        return {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    data, _ = st.get_artifact(store, st.global_prefix(cfg.experiment, rnd - 1))
    return decode_full(data, {n: tuple(p.shape) for n, p in model.named_parameters()}, f"global of round {rnd - 1}")


def decode_full(data: bytes, shapes: dict[str, tuple[int, ...]], where: str) -> dict[str, torch.Tensor]:
    meta = read_safetensors_metadata(data, where)  # framing checks first (pickle, truncation, header size)
    if meta.get("format") != FULL_FORMAT:
        raise AdapterError(f"{where}: not a full-weight delta (format {meta.get('format')!r})")
    t = st_load(data)
    if {k: tuple(v.shape) for k, v in t.items()} != shapes:
        raise AdapterError(f"{where}: tensor names or shapes differ from the base model's")
    if not all(torch.isfinite(v).all() for v in t.values()):
        raise AdapterError(f"{where}: contains NaN or Inf")
    return t


def encode_full(delta: dict[str, torch.Tensor]) -> bytes:
    return st_save({k: v.contiguous() for k, v in delta.items()}, metadata={"format": FULL_FORMAT})


def spec_of(adapter: LoraAdapter) -> AdapterSpec:
    return {m: (adapter.B[m].shape[0], adapter.A[m].shape[1]) for m in adapter.modules}


# ---------------------------------------------------------------------------- aggregation


def aggregate_round(cfg: HetLoRAConfig, store: st.Store, plan: RoundPlan, spec: AdapterSpec | None = None) -> dict[str, Any]:
    """Verify the round's client uploads, check the quorum, aggregate, and commit the global.

    Invalid uploads (missing manifest, checksum mismatch, bad tensors) are dropped and recorded;
    the global manifest is written last, so a crash here leaves the round uncommitted."""
    start = time.perf_counter()
    exp, rnd, r_max = cfg.experiment, plan.round, cfg.ranks.r_max
    updates, dropped, manifests = [], {}, {}
    full = cfg.strategy.name == "full_ft"
    if spec is None and not full and rnd > 0:
        # Modules and shapes come from the committed global, never from an upload: otherwise the
        # first client of the plan could impose its own and get every honest client dropped.
        spec = spec_of(load_global(cfg, store, rnd, None))  # type: ignore[arg-type]
    for c in plan.clients:
        prefix = st.client_prefix(exp, rnd, c.client_id)
        try:
            data, man = st.get_artifact(store, prefix)
            if full:
                obj: Any = st_load(data)
                if not all(torch.isfinite(v).all() for v in obj.values()):
                    raise AdapterError("contains NaN or Inf")
            else:
                obj = LoraAdapter.from_bytes(data, spec, cfg.ranks.r_min, r_max, cfg.model.lora_scale, where=prefix)
            n = man.get("num_samples")
            if not isinstance(n, int) or isinstance(n, bool) or n < 1:
                raise ValueError(f"{prefix}: manifest num_samples must be a positive integer, got {n!r}")
            updates.append(ClientUpdate(c.client_id, obj, n))
            manifests[c.client_id] = man
        except (st.StoreError, AdapterError, KeyError, ValueError, SafetensorError) as e:
            if isinstance(e, st.StoreUnavailable):
                raise
            dropped[c.client_id] = str(e)
    if spec is None and not full and updates:
        # Round 0 has no committed global: the modules and shapes most uploads agree on win.
        votes = Counter(tuple(sorted(spec_of(u.adapter).items())) for u in updates)
        spec = dict(votes.most_common(1)[0][0])
        for u in [u for u in updates if spec_of(u.adapter) != spec]:
            updates.remove(u)
            manifests.pop(u.client_id)
            theirs = spec_of(u.adapter)
            dropped[u.client_id] = (
                f"{st.client_prefix(exp, rnd, u.client_id)}: modules or shapes differ from the {votes.most_common(1)[0][1]} "
                f"upload(s) that agree: extra {sorted(set(theirs) - set(spec))}, missing {sorted(set(spec) - set(theirs))}, "
                f"other shape {sorted(m for m in set(spec) & set(theirs) if spec[m] != theirs[m])}")
    need = max(1, math.ceil(cfg.federation.quorum * len(plan.clients) - 1e-9))
    if len(updates) < need:
        raise QuorumError(f"round {rnd}: {len(updates)} valid client uploads, quorum needs {need} of {len(plan.clients)} "
                          f"(federation.quorum={cfg.federation.quorum}); dropped: {dropped}. The global adapter is unchanged; "
                          "rerun the round or lower federation.quorum")
    state = {c: dict(v) for c, v in plan.state.items()}
    if full:
        new_bytes = encode_full(average_tensors([u.adapter for u in updates], [u.num_samples for u in updates]))
        weights: dict[str, float] = {u.client_id: u.num_samples / sum(x.num_samples for x in updates) for u in updates}
        fallback, clipped = "", []
    else:
        assert spec is not None
        prev = load_global(cfg, store, rnd, spec)
        new, info = aggregate(prev, updates, cfg.strategy, r_max)
        new_bytes, weights, fallback, clipped = new.to_bytes(), info.client_weights, info.fallback, info.clipped
        for u in updates:  # pruned ranks persist across rounds
            ranks = u.adapter.ranks
            entry = {"rank": max(ranks.values()), "tier": state[u.client_id]["tier"]}
            if len(set(ranks.values())) > 1:
                entry["module_ranks"] = ranks
            state[u.client_id] = entry
    manifest = {
        "round": rnd, "strategy": cfg.strategy.name, "clients": state,
        "participants": [u.client_id for u in updates], "dropped": dropped, "weights": weights,
        "weight_fallback": fallback, "clipped": clipped, "aggregate_seconds": time.perf_counter() - start,
        "client_reports": {c: {k: m[k] for k in ("rank_before", "rank_after", "pruned", "train_loss", "num_samples", "num_tokens",
                                                  "train_seconds", "bytes_up", "bytes_down") if k in m} for c, m in manifests.items()},
    }
    return st.put_artifact(store, st.global_prefix(exp, rnd), new_bytes, manifest)


# ---------------------------------------------------------------------------- client side


def prune_client(cfg: HetLoRAConfig, store: st.Store, rnd: int, client_id: str) -> dict[str, Any]:
    """The self-pruning step: needs only the adapter as received and as trained, no model."""
    exp = cfg.experiment
    data, man = st.get_artifact(store, st.client_prefix(exp, rnd, client_id) + "/trained")
    if cfg.strategy.name == "full_ft":
        return st.put_artifact(store, st.client_prefix(exp, rnd, client_id), data, {**man, "rank_after": 0, "pruned": False, "bytes_up": len(data)})
    trained = LoraAdapter.from_bytes(data, None, cfg.ranks.r_min, cfg.ranks.r_max, cfg.model.lora_scale, where=f"client {client_id}")
    spec = spec_of(trained)
    received = load_global(cfg, store, rnd, spec).truncate({k: int(v) for k, v in man["received_ranks"].items()})
    prune_on = cfg.strategy.name == "hetlora" and cfg.pruning.enabled
    pcfg = cfg.pruning if prune_on else type(cfg.pruning)(enabled=False, gamma=cfg.pruning.gamma)
    final, d = self_prune(received, trained, pcfg, cfg.ranks.r_min)
    payload = final.to_bytes()
    return st.put_artifact(store, st.client_prefix(exp, rnd, client_id), payload, {
        **man, "rank_after": final.rank, "module_ranks": final.ranks if len(set(final.ranks.values())) > 1 else None,
        "pruned": d.pruned, "components_pruned": d.components_pruned, "score_before": d.score_before,
        "score_after": d.score_after, "bytes_up": len(payload)})
