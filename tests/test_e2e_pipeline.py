"""End to end: two rounds, three tiers, through kfp.local with the real MinIO, must give the same
global adapter (within 1e-5) as `hetlora simulate` with the same config and seeds."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hetlora_kfp.pipelines.runners import run_local

from hetlora_core import store as st
from hetlora_core.adapter import LoraAdapter
from hetlora_core.config import config_from_dict
from hetlora_core.simulate import simulate

pytestmark = pytest.mark.slow

CFG = {
    "experiment": "e2e",
    "model": {"name": "tiny", "tiny_hidden": 32, "tiny_layers": 1},
    "data": {"num_clients": 6, "max_chars": 6000, "seq_len": 32, "eval_max_tokens": 128},
    "ranks": {"r_min": 2, "r_max": 8, "tiers": [{"name": "small", "rank": 2}, {"name": "medium", "rank": 4},
                                                {"name": "large", "rank": 8}]},
    # a high lambda and gamma 0.5 make self-pruning happen, so persisted ranks are exercised too
    "pruning": {"lam": 5.0, "gamma": 0.5},
    "training": {"local_steps": 2, "batch_size": 2, "lr": 0.01, "bf16": False, "threads": 1},
    "federation": {"rounds": 2, "clients_per_round": 4, "seed": 7},
}


def test_kfp_local_with_minio_equals_simulate(tmp_path, minio_store_config):
    sim_cfg = config_from_dict(CFG)
    sim = simulate(sim_cfg, tmp_path / "sim", progress=False)
    s3_cfg = config_from_dict({**CFG, "store": {"kind": "s3", "endpoint": minio_store_config.endpoint,
                                                "bucket": minio_store_config.bucket}})
    res = run_local(s3_cfg, tmp_path / "kfp")
    assert res["rounds_committed"] == 2 and sim["rounds_committed"] == 2
    tiers = {c["tier"] for r in range(2) for c in json.loads(
        st.open_store(s3_cfg.store).get_bytes(st.plan_key("e2e", r)))["clients"]}
    assert tiers == {"small", "medium", "large"}, "the test should exercise all three tiers"

    s3 = st.open_store(s3_cfg.store)
    local = st.LocalStore(tmp_path / "sim" / "store")
    a_bytes, a_man = st.get_artifact(s3, st.global_prefix("e2e", 1))
    b_bytes, b_man = st.get_artifact(local, st.global_prefix("e2e", 1))
    a, b = LoraAdapter.from_bytes(a_bytes), LoraAdapter.from_bytes(b_bytes)
    assert a.modules == b.modules
    for m in a.modules:
        assert np.allclose(a.A[m], b.A[m], atol=1e-5) and np.allclose(a.B[m], b.B[m], atol=1e-5)
    assert float(max(np.abs(a.B[m]).max() for m in a.modules)) > 0, "round 2 global must be trained (B != 0)"
    assert a_man["clients"] == b_man["clients"]  # same ranks persisted, same selection
    assert [r["client_ranks"] for r in res["rounds"]] == [r["client_ranks"] for r in sim["rounds"]]
    assert res["rounds"][1]["global_ppl"] == pytest.approx(sim["rounds"][1]["global_ppl"], rel=1e-4)
    assert (tmp_path / "kfp" / "results.json").is_file() and (tmp_path / "kfp" / "perplexity.png").is_file()
