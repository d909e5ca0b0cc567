"""Train step (client): one selected client's local update, uploaded to ``.../clients/<id>/trained``.

A client-level failure (diverged loss, its timeout, a crash inside training) does not fail the
task: the client simply has no upload, the round goes on, and aggregation decides by quorum. Store
outages, a bad config and a client that is not in the plan still fail the task (a retry or a human
must act).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass

from .. import store as st
from .. import warm
from ..config import ConfigError, HetLoRAConfig
from ..faults import failpoint
from ..methods import method_for
from .common import config_of, load_global
from .plan import load_plan

log = logging.getLogger("hetlora")


@dataclass
class TrainReport:
    client_id: str
    status: str  # "trained" | "failed"
    reason: str = ""
    train_loss: float | None = None
    rank: int | None = None


def train(cfg: HetLoRAConfig, store: st.Store, rnd: int, client_id: str) -> TrainReport:
    """Read the global, send it through the method (LoRA: truncate to the client's rank), train on
    this client's data, upload the trained state and its manifest."""
    from .. import runtime  # the model and the data: only the model-side steps load them
    from ..precision import resolve

    cp = load_plan(cfg, store, rnd).client(client_id)  # KeyError: not in the plan -> the task fails
    try:
        # Inside the try: a `raise` here is a client-side crash (soft, the quorum decides); `exit` kills the task.
        failpoint("train_start", round=rnd, client=client_id)
        prec = resolve(cfg)  # a machine that cannot serve model.device/dtype/quantize: ConfigError, the task fails
        method, model = method_for(cfg), runtime.model(cfg)
        client = runtime.client_data(cfg, client_id)
        received = method.receive(load_global(cfg, store, rnd, method.model_spec(model)), cp.module_ranks or cp.rank)
        trained, res = method.train(model, received, client, rnd)
        man = st.put_artifact(store, st.trained_prefix(cfg.experiment, rnd, client_id), method.encode(trained), {
            "client_id": client_id, "round": rnd, "tier": cp.tier, "rank_before": cp.rank,
            "received_ranks": method.client_ranks(received), "num_samples": res.num_samples, "num_tokens": res.num_tokens,
            "train_loss": res.train_loss, "reg_loss": res.reg_loss, "train_seconds": res.seconds,
            "bytes_down": method.nbytes(received), "precision": prec.as_dict(),
            # instruction data longer than data.seq_len: what was cut (prompt side first), never silent
            **({"data_cut": client.cut} if client.cut else {})})
    except (st.StoreError, KeyError, ConfigError):
        raise
    except Exception as e:  # noqa: BLE001 - any client-side failure drops this client only
        log.warning("client %s failed in round %d: %s", client_id, rnd, e)
        return TrainReport(client_id, "failed", f"{type(e).__name__}: {e}")
    failpoint("train_uploaded", round=rnd, client=client_id)
    return TrainReport(client_id, "trained", train_loss=man["train_loss"], rank=man["rank_before"])


def train_task(config_json: str, round_index: int, client_id: str) -> str:
    """The train component's body: JSON config in, JSON report out. Under a local run with a warm
    task server (hetlora_core/warm.py) the step runs in a forked child of that server instead."""
    if (out := warm.delegate("train", config_json, round_index, client_id)) is not None:
        return out
    cfg = config_of(config_json)
    return json.dumps(asdict(train(cfg, st.open_store(cfg.store), int(round_index), client_id)))
