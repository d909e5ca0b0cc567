"""The test-side launcher's reading of a compiled round's DAG (tests/kfp_pods.py): what waits for what,
loops unrolled per client, and which task runs after failed upstream tasks (aggregation)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import kfp_pods
import pytest
import yaml

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
    assert agg.after_any_outcome, "aggregation runs after failed client tasks (the exit task of their group)"
    assert len(nodes) == 11, "the round is clients and aggregation; evaluation is a pipeline of its own"
    # The pod of a train task carries its tier's selector and its own client's executor input.
    pod = kfp_pods.pod(ir, platform, trains[0].task, trains[0].executor, trains[0].params, name="x", namespace="ns")
    assert "hetlora.io/tier" in pod["spec"]["nodeSelector"]
    assert trains[0].params["client_id"] in " ".join(pod["spec"]["containers"][0]["args"])


class ScriptedCluster:
    """Beside the real cluster (tests/test_cluster_round.py): a stand-in whose pods end as a rule says,
    to check the launcher's order, retries and trigger policy in seconds."""

    def __init__(self, outcome: Callable[[dict[str, Any], int], str]) -> None:
        self.outcome, self.created, self.deleted = outcome, [], []  # type: ignore[var-annotated]
        self.attempts: dict[str, int] = {}

    def kubectl(self, *args: str, check: bool = True, stdin: str | None = None, **_: Any) -> str:
        if args[0] == "apply":
            pod = json.loads(stdin or "{}")
            stem = pod["metadata"]["name"].rsplit("-a", 1)[0]
            self.attempts[stem] = self.attempts.get(stem, -1) + 1
            self.created.append((pod, self.outcome(pod, self.attempts[stem])))
        elif args[0] == "delete":
            self.deleted += [a for a in args if a.startswith("t")]
        return ""

    def get(self, kind: str, name: str, *_: str) -> dict[str, Any]:
        (phase,) = [ph for p, ph in self.created if p["metadata"]["name"] == name]
        return {"status": {"phase": phase, "containerStatuses": []}}


def test_launcher_retries_then_drops_and_still_aggregates(tmp_path: Path) -> None:
    from cluster_executor import PodExecutor
    from hetlora_kfp.pipelines.round import CLIENT_RETRIES, compile_round

    from hetlora_core.config import config_from_dict
    from hetlora_core.run import PipelineFailed
    from hetlora_core.steps.plan import ClientPlan, RoundPlan

    raw = yaml.safe_load((ROOT / "configs" / "cluster.yaml").read_text())
    cfg = config_from_dict(raw)
    plan = RoundPlan(cfg.experiment, 0, [ClientPlan("a", "small", 2), ClientPlan("b", "medium", 8), ClientPlan("c", "large", 16)], {})

    def outcome(pod: dict[str, Any], attempt: int) -> str:
        args = " ".join(pod["spec"]["containers"][0]["args"])
        if '"client_id": "b"' in args and "train" in pod["metadata"]["name"]:
            return "Failed"  # b's train task fails at every attempt
        if '"client_id": "a"' in args and "train" in pod["metadata"]["name"] and attempt == 0:
            return "Failed"  # a's fails once, then its retry succeeds
        return "Succeeded"

    cluster = ScriptedCluster(outcome)
    ex = PodExecutor(cluster, "ns", "minio:9000", max_backoff_s=0)  # type: ignore[arg-type]
    with pytest.raises(PipelineFailed, match="train-client-2"):
        ex._run(0, lambda p: compile_round(cfg, plan, p), {"config_json": cfg.to_json(), "round_index": 0})
    order = [p["metadata"]["name"].split("-", 2)[2] for p, _ in cluster.created]
    n = CLIENT_RETRIES[0]  # b: the first attempt and every retry, no more
    assert [o for o in order if o.startswith("train-client-2")] == [f"train-client-2-a{i}" for i in range(n + 1)], order
    assert [o for o in order if o.startswith("train-client-a")] == ["train-client-a0", "train-client-a1"], order
    assert "prune-client-2-a0" not in order, "a task whose upstream failed is not started"
    assert order[-1] == "aggregate-round-a0", "aggregation runs last, after the failed client tasks too"
    assert sorted(cluster.deleted) == sorted(p["metadata"]["name"] for p, _ in cluster.created), "every pod is cleaned up"
