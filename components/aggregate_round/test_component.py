"""The aggregate component's body calls the aggregate step; the store, not the client tasks, decides."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from hetlora_core import store as st
from hetlora_core.adapter import init_global
from hetlora_core.config import config_from_dict
from hetlora_core.steps.plan import plan_round

from .component import aggregate_round


def test_aggregate_round_commits_what_the_store_holds(tmp_path: Path) -> None:
    cfg = config_from_dict({"experiment": "g", "store": {"root": str(tmp_path)}, "data": {"num_clients": 3},
                            "federation": {"clients_per_round": 3, "quorum": 0.6}})
    store = st.open_store(cfg.store)
    plan = plan_round(cfg, store, ["a", "b", "c"], 0)
    g = init_global({"q": (6, 5)}, cfg.ranks.r_max, cfg.model.lora_scale, 0)
    for i, cp in enumerate(plan.clients):
        up = g.truncate(cp.rank)
        up.B = {m: np.full_like(b, 0.1 * (i + 1)) for m, b in up.B.items()}
        st.put_artifact(store, st.client_prefix("g", 0, cp.client_id), up.to_bytes(), {"num_samples": 2})
    store.delete_prefix(st.client_prefix("g", 0, "c"))  # c's task died before its upload was committed
    out = json.loads(aggregate_round(cfg.to_json(), 0))
    assert sorted(out["participants"]) == ["a", "b"] and list(out["dropped"]) == ["c"]
    assert st.last_committed_round(store, "g") == 0
