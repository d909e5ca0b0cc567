"""The prune component's body calls the prune step: run it directly on a planned round."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from hetlora_core import store as st
from hetlora_core.adapter import init_global
from hetlora_core.config import config_from_dict
from hetlora_core.steps.plan import plan_round

from .component import prune_client


def test_prune_client_writes_the_final_upload(tmp_path: Path) -> None:
    cfg = config_from_dict({"experiment": "p", "store": {"root": str(tmp_path)}, "data": {"num_clients": 2},
                            "federation": {"clients_per_round": 1}})
    store = st.open_store(cfg.store)
    cp = plan_round(cfg, store, ["a", "b"], 0).clients[0]
    trained = init_global({"q": (6, 5)}, cfg.ranks.r_max, cfg.model.lora_scale, 0).truncate(cp.rank)
    trained.B = {m: np.full_like(b, 0.5) for m, b in trained.B.items()}
    st.put_artifact(store, st.trained_prefix("p", 0, cp.client_id), trained.to_bytes(),
                    {"client_id": cp.client_id, "num_samples": 4, "rank_before": cp.rank, "received_ranks": trained.ranks})
    report = json.loads(prune_client(cfg.to_json(), 0, cp.client_id))
    assert report["status"] == "ok" and report["rank_before"] == cp.rank
    man = st.get_manifest(store, st.client_prefix("p", 0, cp.client_id))
    assert man is not None and man["sha256"] == report["sha256"] and man["pruned"] is False  # round 0: B was 0
    other = ({"a", "b"} - {cp.client_id}).pop()  # not selected: it has no trained update
    skipped = json.loads(prune_client(cfg.to_json(), 0, other))
    assert skipped["status"] == "skipped"
