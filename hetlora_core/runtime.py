"""The steps that need the model and the data: client training and evaluation over the store.

The base model and the tokenised clients are loaded once per process (cached), so a simulation
or a long-lived worker pays for them once; a KFP task pays once per task.
"""

from __future__ import annotations

import functools
import json
import time
from typing import Any

import torch

from . import store as st
from . import vocab
from .adapter import LoraAdapter, spec_from_model
from .client import train_full, train_lora
from .config import DataConfig, HetLoRAConfig, ModelConfig
from .data import ClientData, build_clients
from .evaluation import EvalResult, evaluate, evaluate_full
from .models import load_base_model, load_tokenizer
from .rounds import ClientPlan, encode_full, load_global, load_global_full


@functools.lru_cache(maxsize=2)
def _model(mcfg: ModelConfig, dcfg: DataConfig | None) -> torch.nn.Module:
    """The shared base model; with ``model.vocab: corpus`` a private copy cut to the kept tokens
    (``dcfg`` is only part of the key then: the kept set includes the run's client tokens)."""
    if mcfg.vocab == "full" or dcfg is None:
        return load_base_model(mcfg)[0]
    return vocab.restrict_model(load_base_model(mcfg, fresh=True)[0], _keep(mcfg, dcfg))


@functools.lru_cache(maxsize=4)
def _raw_clients(mcfg: ModelConfig, dcfg: DataConfig) -> tuple[ClientData, ...]:
    return tuple(build_clients(dcfg, load_tokenizer()))


@functools.lru_cache(maxsize=4)
def _keep(mcfg: ModelConfig, dcfg: DataConfig) -> torch.Tensor:
    return vocab.keep_ids(load_tokenizer(), _raw_clients(mcfg, dcfg))


@functools.lru_cache(maxsize=4)
def _clients(mcfg: ModelConfig, dcfg: DataConfig) -> tuple[ClientData, ...]:
    raw = _raw_clients(mcfg, dcfg)
    if mcfg.vocab == "full":
        return raw
    return tuple(vocab.remap_clients(raw, _keep(mcfg, dcfg), len(load_tokenizer())))


def model(cfg: HetLoRAConfig) -> torch.nn.Module:
    return _model(cfg.model, cfg.data if cfg.model.vocab == "corpus" else None)


def clients(cfg: HetLoRAConfig) -> dict[str, ClientData]:
    return {c.client_id: c for c in _clients(cfg.model, cfg.data)}


def client_ids(cfg: HetLoRAConfig) -> list[str]:
    return sorted(clients(cfg))


def train_client(cfg: HetLoRAConfig, store: st.Store, rnd: int, plan: ClientPlan) -> dict[str, Any]:
    """Get the global, truncate it to the client's rank, train, and upload the trained adapter
    to ``.../clients/<id>/trained`` (the prune step reads it and writes the client's final upload)."""
    m, data = model(cfg), clients(cfg)
    if plan.client_id not in data:
        raise KeyError(f"client {plan.client_id!r} is not in this run's data (data.num_clients={cfg.data.num_clients})")
    client = data[plan.client_id]
    if cfg.strategy.name == "full_ft":
        g = load_global_full(cfg, store, rnd, m)
        res = train_full(m, g, client, cfg, rnd)
        assert res.full_delta is not None
        payload, ranks, down = encode_full(res.full_delta), {}, sum(t.nbytes for t in g.values())
    else:
        ranks = plan.module_ranks or plan.rank
        g = load_global(cfg, store, rnd, spec_from_model(m, cfg.model.target_modules))
        received = g.truncate(ranks)
        res = train_lora(m, received, client, cfg, rnd)
        assert res.adapter is not None
        payload, ranks, down = res.adapter.to_bytes(), received.ranks, received.nbytes()
    return st.put_artifact(store, st.client_prefix(cfg.experiment, rnd, plan.client_id) + "/trained", payload, {
        "client_id": plan.client_id, "round": rnd, "tier": plan.tier, "rank_before": plan.rank, "received_ranks": ranks,
        "num_samples": res.num_samples, "num_tokens": res.num_tokens, "train_loss": res.train_loss,
        "reg_loss": res.reg_loss, "train_seconds": res.seconds, "bytes_down": down})


def _eval_dict(r: EvalResult) -> dict[str, Any]:
    return {"ppl": r.ppl, "per_client": r.per_client, "tokens": r.tokens}


def evaluate_round(cfg: HetLoRAConfig, store: st.Store, rnd: int) -> dict[str, Any]:
    """Held-out perplexity after round ``rnd``: the global at r_max on every client, and each
    client's own rank (only clients below r_max need a separate pass). Writes eval/metrics.json."""
    start = time.perf_counter()
    m, data = model(cfg), list(clients(cfg).values())
    gman = st.get_manifest(store, st.global_prefix(cfg.experiment, rnd))
    if gman is None:
        raise st.NotFound(f"round {rnd} of {cfg.experiment} is not committed; nothing to evaluate")
    if cfg.strategy.name == "full_ft":
        glob = evaluate_full(m, load_global_full(cfg, store, rnd + 1, m), data, cfg)
        personal = glob
    else:
        g = load_global(cfg, store, rnd + 1, spec_from_model(m, cfg.model.target_modules))
        glob = evaluate(m, g, data, cfg)
        state = gman["clients"]
        ranks = {c: (s.get("module_ranks") or int(s["rank"])) for c, s in state.items()}
        low = [c for c in data if not (isinstance(ranks[c.client_id], int) and ranks[c.client_id] >= g.rank)]
        own = evaluate(m, g, low, cfg, ranks) if low else None
        per = {**glob.per_client, **(own.per_client if own else {})}
        personal = EvalResult.combine(per, glob.per_client_tokens)
    out = {"round": rnd, "global": _eval_dict(glob), "personal": _eval_dict(personal), "eval_seconds": time.perf_counter() - start}
    store.put_bytes(f"{st.round_prefix(cfg.experiment, rnd)}/eval/metrics.json", json.dumps(out, indent=1).encode())
    return out


def evaluate_baseline(cfg: HetLoRAConfig, store: st.Store) -> dict[str, Any]:
    """Perplexity of the base model before any federated round (stored once per run)."""
    key = f"{cfg.experiment}/baseline/metrics.json"
    if store.exists(key):
        return json.loads(store.get_bytes(key))
    r = evaluate(model(cfg), None, list(clients(cfg).values()), cfg)
    out = {"round": -1, "global": _eval_dict(r), "personal": _eval_dict(r)}
    store.put_bytes(key, json.dumps(out, indent=1).encode())
    return out


def global_adapter(cfg: HetLoRAConfig, store: st.Store, rnd: int) -> LoraAdapter:
    """The committed global adapter after round ``rnd`` (for export and inspection)."""
    return load_global(cfg, store, rnd + 1, spec_from_model(model(cfg), cfg.model.target_modules))


def load_base_model_tokenizer(cfg: HetLoRAConfig):  # noqa: ANN201 - transformers tokenizer type
    """The tokenizer that goes with the base model (for export)."""
    return load_tokenizer()
