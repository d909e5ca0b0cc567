"""Evaluate step (server): held-out perplexity of the committed global, and of the base model once.

The global at full rank on every client, and each client at its own (possibly pruned) rank; the
result goes to the round's eval key, and the round's metrics to the Pushgateway when configured.
It also records the base model's perplexity (the baseline) the first time it runs in a run, so a
round committed by a task that died before evaluating is completed by evaluating it again.

Folder data (``data.source: folder``) is evaluated client by client (``per_client``): each
client's eval split is read through its own isolated reader, evaluated, and reduced to its sums
(negative log-likelihood and token count); the round's perplexity combines those sums
token-weighted, which equals one central evaluation over all eval splits (tests/test_fed_eval.py)
while never holding two clients' data at once. Every client is evaluated every round.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from .. import store as st
from ..config import HetLoRAConfig
from ..methods import method_for
from .common import config_of, load_global


@dataclass
class EvalReport:
    round: int
    global_ppl: float
    personal_ppl: float


def _as_dict(r: Any) -> dict[str, Any]:
    return {"ppl": r.ppl, "per_client": r.per_client, "tokens": r.tokens}


def per_client(cfg: HetLoRAConfig, fn: Callable[[list[Any]], tuple[Any, ...]]) -> tuple[Any, ...]:
    """``fn`` over every client's data, one client at a time, its results combined token-weighted.

    Shakespeare: ``fn`` once over all clients (the central evaluation the reference results were
    made with). Folder data: ``fn([client])`` per client through ``runtime.client_data`` (only that
    client's folder is read), then each result's per-client sums are combined: exp(sum log(ppl_k) n_k
    / sum n_k) = exp(sum nll_k / sum n_k), the central token-weighted perplexity."""
    from .. import runtime
    from ..evaluation import EvalResult

    if cfg.data.source != "folder":
        return fn(runtime.all_client_data(cfg))
    parts = [fn([runtime.client_data(cfg, cid)]) for cid in runtime.client_ids(cfg)]
    return tuple(EvalResult.combine({k: v for p in parts for k, v in p[i].per_client.items()},
                                    {k: v for p in parts for k, v in p[i].per_client_tokens.items()})
                 for i in range(len(parts[0])))


def evaluate_baseline(cfg: HetLoRAConfig, store: st.Store) -> dict[str, Any]:
    """Perplexity of the base model before any round (stored once per run)."""
    from .. import runtime
    from ..evaluation import evaluate as evaluate_model

    key = st.baseline_key(cfg.experiment)
    got = st.get_json(store, key)
    if got is not None:
        return got
    model = runtime.model(cfg)
    (r,) = per_client(cfg, lambda cs: (evaluate_model(model, None, cs, cfg),))
    out = {"round": -1, "global": _as_dict(r), "personal": _as_dict(r)}
    st.put_json(store, key, out)
    return out


def evaluate(cfg: HetLoRAConfig, store: st.Store, rnd: int) -> dict[str, Any]:
    """Evaluate committed round ``rnd`` (and the baseline if missing); writes the round's eval key."""
    from .. import runtime

    evaluate_baseline(cfg, store)
    start = time.perf_counter()
    gman = st.get_manifest(store, st.global_prefix(cfg.experiment, rnd))
    if gman is None:
        raise st.NotFound(f"round {rnd} of {cfg.experiment} is not committed; nothing to evaluate")
    import torch

    from ..threads import task_threads

    torch.set_num_threads(task_threads(cfg.training.threads))  # the CPUs this task may use (threads.py)
    method, model = method_for(cfg), runtime.model(cfg)
    glob = load_global(cfg, store, rnd + 1, method.model_spec(model))
    ranks = {c: (s.get("module_ranks") or int(s["rank"])) for c, s in gman["clients"].items()}
    full, own = per_client(cfg, lambda cs: method.evaluate(model, glob, cs, ranks))
    out = {"round": rnd, "global": _as_dict(full), "personal": _as_dict(own), "eval_seconds": time.perf_counter() - start}
    rouge = _rouge(cfg, model, glob)
    if rouge is not None:
        out["rouge_l"] = rouge
        out["eval_seconds"] = time.perf_counter() - start
    st.put_json(store, st.eval_key(cfg.experiment, rnd), out)
    return out


def _rouge(cfg: HetLoRAConfig, model: Any, glob: Any) -> dict[str, Any] | None:
    """ROUGE-L of the global adapter (r_max) on folder instruction data, client by client
    (rouge.py); None for text data, Shakespeare, full fine-tuning or rouge_max_prompts: 0."""
    from .. import peft_bridge, runtime
    from ..adapter import LoraAdapter
    from ..rouge import client_rouge

    if cfg.data.source != "folder" or cfg.data.rouge_max_prompts == 0 or not isinstance(glob, LoraAdapter):
        return None
    tok, sums, counts = runtime.tokenizer(cfg), {}, {}
    pm = peft_bridge.attach(model, glob)
    try:
        for cid in runtime.client_ids(cfg):
            c = runtime.client_data(cfg, cid)  # one client's folder at a time (isolated reader)
            if c.eval_prompts:
                sums[cid], counts[cid] = client_rouge(pm, tok, c, cfg.data.rouge_max_new_tokens)
    finally:
        peft_bridge.detach(pm)
    if not counts:
        return None
    n = sum(counts.values())
    return {"mean": sum(sums.values()) / n, "per_client": {c: sums[c] / counts[c] for c in sums}, "prompts": n}


def evaluate_task(config_json: str, round_index: int, round_started_at: float = 0.0) -> str:
    """The evaluate component's body: evaluates, then pushes the round's metrics when configured."""
    from ..reporting import push_round_outcome

    cfg = config_of(config_json)
    store = st.open_store(cfg.store)
    rnd = int(round_index)
    ev = evaluate(cfg, store, rnd)
    gman = st.get_manifest(store, st.global_prefix(cfg.experiment, rnd)) or {}
    duration = time.time() - round_started_at if round_started_at else float(gman.get("aggregate_seconds", 0.0))
    push_round_outcome(cfg, rnd, gman, ev, duration)
    return json.dumps(asdict(EvalReport(rnd, ev["global"]["ppl"], ev["personal"]["ppl"])))
