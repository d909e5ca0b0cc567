"""A client task that dies hard under kfp.local (``os._exit(137)``: what an OOM kill or a preempted
pod looks like) is a dropped client when the quorum holds, and fails the round cleanly when it
does not. The compiled IR carries the setting that makes this so on Kubeflow too."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from tiny_round import tiny_round

from hetlora_core import store as st
from hetlora_core.config import config_from_dict, replace
from hetlora_core.datasource import client_ids
from hetlora_core.run import RoundFailed

CFG = tiny_round("hard", local_steps=1, quorum=0.6)


def test_compiled_aggregate_runs_after_every_client_task_whatever_their_outcome(tmp_path: Path) -> None:
    from hetlora_kfp.pipelines.round import AGGREGATE_RETRIES, compile_round

    from hetlora_core.steps.plan import ClientPlan, RoundPlan

    cfg = config_from_dict(CFG)
    plan = RoundPlan("hard", 0, [ClientPlan("a", "small", 2), ClientPlan("b", "large", 4)], {})
    path = tmp_path / "r.yaml"
    compile_round(cfg, plan, str(path))
    spec, _ = yaml.safe_load_all(path.read_text())
    tasks = spec["root"]["dag"]["tasks"]
    assert sorted(tasks) == ["aggregate-round", "exit-handler-1"]  # nothing after aggregation: evaluation is its own run
    agg = tasks["aggregate-round"]
    # The exit task of the group of client loops: it runs once they ended, whatever their outcome.
    assert agg.get("triggerPolicy", {}).get("strategy") == "ALL_UPSTREAM_TASKS_COMPLETED", agg
    assert agg["dependentTasks"] == ["exit-handler-1"]
    group = spec["components"][tasks["exit-handler-1"]["componentRef"]["name"]]["dag"]["tasks"]
    assert len(group) == 2 and all("parameterIterator" in t for t in group.values())  # both tiers' client loops
    # no data from the loops (a failed loop has none to give), so nothing can make it skip
    assert not {"tier_0", "tier_1"} & set(agg.get("inputs", {}).get("parameters", {}))
    assert agg["retryPolicy"]["maxRetryCount"] == AGGREGATE_RETRIES[0]  # an exit task keeps its retries


@pytest.mark.slow
def test_kfp_local_train_task_dying_hard_is_a_dropped_client(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from hetlora_kfp.pipelines import round as round_dag
    from hetlora_kfp.pipelines.runners import run_local

    # No KFP-level retries: every attempt would die the same way, and the backoff only costs time.
    monkeypatch.setattr(round_dag, "CLIENT_RETRIES", (0, "0s"))
    monkeypatch.setattr(round_dag, "AGGREGATE_RETRIES", (0, "0s"))
    cfg = config_from_dict(CFG)
    ids = client_ids(cfg)
    bad = ids[1]
    monkeypatch.setenv("HETLORA_FAILPOINTS", f"train_start@round=0@client={bad}:exit")  # inherited by the tasks

    res = run_local(cfg, tmp_path / "q06", progress=False)
    assert res["rounds_committed"] == 1
    man = st.get_manifest(st.LocalStore(tmp_path / "q06" / "store"), st.global_prefix("hard", 0))
    assert man is not None and sorted(man["participants"]) == sorted(c for c in ids if c != bad)
    assert list(man["dropped"]) == [bad] and "not committed" in man["dropped"][bad], man["dropped"]
    assert res["rounds"][0]["dropped"] == man["dropped"]

    # quorum 1.0: the same failure fails the round, cleanly: nothing committed, the reason given
    q1 = replace(cfg, **{"federation.quorum": 1.0})
    with pytest.raises(RoundFailed) as e:
        run_local(q1, tmp_path / "q10", progress=False)
    assert "aggregate" in str(e.value) and "0 round(s) committed" in str(e.value), str(e.value)
    store = st.LocalStore(tmp_path / "q10" / "store")
    assert st.last_committed_round(store, "hard") == -1 and st.get_manifest(store, st.global_prefix("hard", 0)) is None
    logs = "".join(p.read_text(errors="replace") for p in (tmp_path / "q10" / "logs").rglob("*") if p.is_file())
    assert "quorum" in logs and bad in logs
