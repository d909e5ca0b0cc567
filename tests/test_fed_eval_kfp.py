"""Federated evaluation under kfp.local: a folder-data round runs one evaluate-client task per
client (each a subprocess reading its own folder) and the evaluate task combines their reports."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from hetlora_kfp.pipelines.runners import run_local
from test_client_isolation import folder_config, make_folders
from test_fed_eval import forget_evaluation

from hetlora_core import runtime
from hetlora_core import store as st
from hetlora_core.config import config_from_dict
from hetlora_core.evaluation import evaluate
from hetlora_core.run import local_config

pytestmark = pytest.mark.slow

CLIENTS = ("alice", "bob")


def test_kfp_local_folder_round_reports_perplexity_from_client_tasks(tmp_path: Path) -> None:
    make_folders(tmp_path / "data", CLIENTS)
    base = folder_config(tmp_path / "data", tmp_path / "unused").to_dict()
    cfg = config_from_dict({**base, "experiment": "fedkfp",
                            "data": {**base["data"], "num_clients": 2, "rouge_max_prompts": 1, "rouge_max_new_tokens": 4},
                            "federation": {**base["federation"], "clients_per_round": 2}})
    res = run_local(cfg, tmp_path / "kfp", progress=False)
    assert res["rounds_committed"] == 1
    store = st.open_store(local_config(cfg, tmp_path / "kfp").store)
    reports = {c: st.get_json(store, st.client_eval_key("fedkfp", 0, c)) for c in CLIENTS}
    assert all(r is not None and r["global"]["tokens"] > 0 for r in reports.values())  # written by the client tasks
    # The round's pipeline trains and aggregates; its evaluation pipeline runs one task per client.
    logs = sorted(p.name for p in (tmp_path / "kfp" / "logs" / st.round_name(0)).iterdir())
    assert not [n for n in logs if "evaluate" in n], logs
    logs = sorted(p.name for p in (tmp_path / "kfp" / "logs" / f"{st.round_name(0)}-evaluate").iterdir())
    assert sum("evaluate-client" in n for n in logs) == len(CLIENTS), logs
    ev = st.get_json(store, st.eval_key("fedkfp", 0))
    assert ev is not None and ev["federated"] and ev["eval_dropped"] == {}
    central = evaluate(runtime.model(cfg), runtime.global_adapter(cfg, store, 0), runtime.all_client_data(cfg), cfg)
    assert abs(ev["global"]["ppl"] - central.ppl) <= 1e-6 * central.ppl
    assert res["rounds"][0]["global_ppl"] == pytest.approx(ev["global"]["ppl"], rel=1e-12) and math.isfinite(res["baseline_ppl"])
    assert ev["rouge_l"]["prompts"] == len(CLIENTS)

    # the evaluation pipeline on a resume (a round committed but never evaluated) runs every client's task too
    forget_evaluation(store, "fedkfp", CLIENTS)
    for old in (tmp_path / "kfp" / "logs" / f"{st.round_name(0)}-evaluate").iterdir():
        old.unlink()
    again = run_local(cfg, tmp_path / "kfp", progress=False)
    assert all(store.exists(st.client_eval_key("fedkfp", 0, c)) for c in CLIENTS)
    redone = st.get_json(store, st.eval_key("fedkfp", 0))
    assert redone is not None and redone["global"] == ev["global"] and again["rounds"][0]["global_ppl"] == ev["global"]["ppl"]
    evaluate_logs = sorted(p.name for p in (tmp_path / "kfp" / "logs" / f"{st.round_name(0)}-evaluate").iterdir())
    assert sum("evaluate-client" in n for n in evaluate_logs) == len(CLIENTS), evaluate_logs
