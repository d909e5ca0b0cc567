"""The test-side launcher's reading of a compiled round's DAG (tests/kfp_pods.py): what waits for what,
loops unrolled per client, and which task runs after failed upstream tasks (aggregation)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import kfp_pods

ROOT = Path(__file__).resolve().parents[1]


def test_round_dag_order_and_trigger_policy(tmp_path: Path) -> None:
    out = tmp_path / "round.yaml"
    res = subprocess.run([str(Path(sys.executable).parent / "hetlora"), "compile", "-c", str(ROOT / "configs" / "cluster.yaml"),
                          "--set", "federation.clients_per_round=5", "-o", str(out)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    ir, platform = kfp_pods.load(out)
    nodes = {n.key: n for n in kfp_pods.dag(ir, {"round_index": 0})}
    trains = [n for n in nodes.values() if n.task.startswith("train")]
    prunes = [n for n in nodes.values() if n.task.startswith("prune")]
    assert len(trains) == len(prunes) == 5
    assert len({n.params["client_id"] for n in trains}) == 5, "one train task per selected client"
    for t in trains:
        assert t.after == set() and not t.after_any_outcome
    for p in prunes:  # after its own client's train task, in the same loop iteration, and nothing else
        (dep,) = p.after
        assert nodes[dep].task.startswith("train") and nodes[dep].params["client_id"] == p.params["client_id"]
    (agg,) = [n for n in nodes.values() if n.task.startswith("aggregate")]
    assert agg.after == {n.key for n in trains + prunes}
    assert agg.after_any_outcome, "aggregation runs after failed client tasks (ignore_upstream_failure)"
    (ev,) = [n for n in nodes.values() if n.task.startswith("evaluate")]
    assert ev.after == {agg.key} and not ev.after_any_outcome
    # The pod of a train task carries its tier's selector and its own client's executor input.
    pod = kfp_pods.pod(ir, platform, trains[0].task, trains[0].executor, trains[0].params, name="x", namespace="ns")
    assert "hetlora.io/tier" in pod["spec"]["nodeSelector"]
    assert trains[0].params["client_id"] in " ".join(pod["spec"]["containers"][0]["args"])
