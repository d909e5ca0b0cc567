"""Evaluate-client step (client, folder data): one client evaluates the committed global on its own
eval split, inside its own task, and uploads only sums (``hetlora_core.eval_reports``).

No task needs every client's data: the server's evaluate step combines these reports
token-weighted (``steps/evaluate.py``). Every client evaluates every round, so each round's metrics
cover the same clients. The sums: the global at r_max, the global truncated to the client's rank
(the rank the round's global manifest records for it), the base model while the run has no
baseline yet (so the baseline too is combined from clients' sums), and ROUGE-L when the client's
data has completions.

A client-side failure (its folder gone, a broken record) does not fail the task: the client just
has no report and the server names it as missing. Store outages and a round that is not committed
fail the task.
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any

from .. import store as st
from .. import warm
from ..config import ConfigError, HetLoRAConfig
from ..eval_reports import sums
from ..methods import method_for
from .common import config_of, load_global

log = logging.getLogger("hetlora")


def _sums_of(r: Any, cid: str) -> dict[str, Any]:
    """One client's sums from an ``EvalResult`` over that client alone (ppl = exp(nll / tokens))."""
    n = int(r.per_client_tokens[cid])
    return sums(math.log(r.per_client[cid]) * n, n)


def evaluate_client(cfg: HetLoRAConfig, store: st.Store, rnd: int, client_id: str) -> dict[str, Any]:
    """Evaluate committed round ``rnd`` on ``client_id``'s eval split only; writes and returns its report."""
    from .. import peft_bridge, runtime
    from ..adapter import LoraAdapter
    from ..evaluation import evaluate as evaluate_model
    from ..rouge import client_rouge
    from ..threads import task_threads

    cid = st.check_segment(str(client_id), "client_id")
    gman = st.signing.get_global_manifest(store, cfg.store, cfg.experiment, rnd)  # verified only where the key is held
    if gman is None:
        raise st.NotFound(f"round {rnd} of {cfg.experiment} is not committed; nothing to evaluate")
    if cid not in gman["clients"]:
        raise KeyError(f"client {cid!r} is not in round {rnd}'s global manifest")
    s = gman["clients"][cid]
    rank = s.get("module_ranks") or int(s["rank"])
    import torch

    torch.set_num_threads(task_threads(cfg.training.threads))  # the CPUs this task may use (threads.py)
    method, model = method_for(cfg), runtime.model(cfg)
    glob = load_global(cfg, store, rnd + 1, method.model_spec(model))
    client = runtime.client_data(cfg, cid)  # this client's folder only (isolated reader)
    full, own = method.evaluate(model, glob, [client], {cid: rank})
    out: dict[str, Any] = {"client_id": cid, "round": rnd, "global": _sums_of(full, cid), "personal": _sums_of(own, cid)}
    if not store.exists(st.baseline_key(cfg.experiment)):
        out["base"] = _sums_of(evaluate_model(model, None, [client], cfg), cid)
    if cfg.data.rouge_max_prompts and isinstance(glob, LoraAdapter) and client.eval_prompts:
        pm = peft_bridge.attach(model, glob, reuse=True)
        try:
            total, count = client_rouge(pm, runtime.tokenizer(cfg), client, cfg.data.rouge_max_new_tokens)
        finally:
            peft_bridge.detach(pm)
        out["rouge"] = {"sum": float(total), "prompts": int(count)}
    st.put_json(store, st.client_eval_key(cfg.experiment, rnd, cid), out)
    return out


def evaluate_client_task(config_json: str, round_index: int, client_id: str) -> str:
    """The evaluate-client component's body: JSON config in, a short JSON status out (the sums go
    to the store; the server reads them there, not from this output). In a forked child of the
    warm task server when a local run has one (hetlora_core/warm.py)."""
    if (out := warm.delegate("evaluate_client", config_json, round_index, client_id)) is not None:
        return out
    cfg = config_of(config_json)
    rnd = int(round_index)
    try:
        evaluate_client(cfg, st.open_store(cfg.store), rnd, client_id)
    except (st.StoreError, KeyError, ConfigError):
        raise
    except Exception as e:  # noqa: BLE001 - a client-side failure leaves this client out of the round's metrics only
        log.warning("client %s could not evaluate round %d: %s", client_id, rnd, e)
        return json.dumps({"client_id": str(client_id), "round": rnd, "status": "failed", "reason": f"{type(e).__name__}: {e}"})
    return json.dumps({"client_id": str(client_id), "round": rnd, "status": "evaluated"})
