"""Rounds of the federated loop as real pods in the real component image (issue 14, item 5).

The cluster of scripts/cluster-up.sh with the image of images/Dockerfile (scripts/build-image.sh,
no Docker engine) on every node; the project's own ``RoundRunner`` drives two rounds of
configs/cluster.yaml, every task a pod made from the compiled pipeline as Kubeflow's driver makes it
(tests/cluster_executor.py), against the in-cluster MinIO through its Service name. Round 1 must
equal ``hetlora simulate``'s; in round 2 one client's train pod is given a memory limit below
what it needs, the kernel OOM-kills it in its real cgroup, and the round commits without it.
Slow: the image is ~7 GB (built once, then only its project layers), a round takes ~1-2 minutes.
"""

from __future__ import annotations

import base64
import json
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from cluster_executor import PodExecutor, terminated
from hetlora_kfp.pipelines.platform import SECRET_KEYS
from hetlora_kfp.pipelines.round import CLIENT_RETRIES
from real_cluster import RealCluster, image_cluster_fixture  # noqa: F401  (registers the fixture)

from hetlora_core import store as st
from hetlora_core.adapter import LoraAdapter
from hetlora_core.config import config_from_dict
from hetlora_core.run import RoundRunner
from hetlora_core.simulate import simulate

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
NAMESPACE = "kubeflow"  # where Kubeflow (standalone) runs pipeline pods; the store Secret is copied there
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
IMAGE = f"ghcr.io/hetlora/hetlora:{VERSION}"  # what scripts/build-image.sh tags
OOM_LIMIT = "700Mi"  # far below what SmolLM2 and its rank need (`hetlora tiers measure`: 2816Mi in cluster.yaml)


def config(**over: Any) -> dict[str, Any]:
    cfg = yaml.safe_load((ROOT / "configs" / "cluster.yaml").read_text())
    # Two of three clients make a round: the one the test starves of memory is dropped, not fatal.
    cfg["federation"] = {**cfg["federation"], "rounds": 2, "quorum": 0.6}
    cfg["experiment"] = "cluster-round"
    # One torch thread in the pods and in the simulate it is compared with: on some CPUs (AMX) bf16 results
    # depend on the thread count, and a pod's CPU limit and this process' CPUs give different counts.
    cfg["training"] = {**cfg.get("training", {}), "threads": 1}
    return {**cfg, **over}


def tier_of(pod: dict[str, Any]) -> str:
    return str(pod["spec"].get("nodeSelector", {}).get("hetlora.io/tier", ""))


def test_two_rounds_run_as_pods_in_the_real_image_and_equal_simulate(image_cluster: RealCluster, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    cluster = image_cluster
    cluster.kubectl("create", "namespace", NAMESPACE, check=False)
    secret = cluster.get("secret", "hetlora-store", "-n", "hetlora")
    secret["metadata"] = {"name": "hetlora-store", "namespace": NAMESPACE}
    cluster.kubectl("apply", "-f", "-", stdin=json.dumps(secret))
    for key, env in SECRET_KEYS.items():  # the driver uses the Secret's credentials, as the pods do
        monkeypatch.setenv(env, base64.b64decode(secret["data"][key]).decode())
    monkeypatch.delenv("HETLORA_SERVER_KEY", raising=False)

    raw = config()
    assert raw["kubeflow"]["image"] == IMAGE
    in_cluster = raw["store"]["endpoint"]
    # The IR's retry policy holds (CLIENT_RETRIES for a train task) with its 30 s backoff capped at 5 s.
    executor = PodExecutor(cluster, NAMESPACE, in_cluster, raw["metrics"]["pushgateway_url"], max_backoff_s=5)

    starved: dict[str, str] = {}  # client -> its pod's name (each attempt adds "-a<n>")

    def starve_one(rnd: int, node: Any, pod: dict[str, Any]) -> None:  # round 2's first train task: a limit below its need
        if rnd == 1 and node.task.startswith("train") and not starved:
            starved[node.params["client_id"]] = pod["metadata"]["name"]
            res = pod["spec"]["containers"][0]["resources"]
            res["requests"]["memory"] = res["limits"]["memory"] = OOM_LIMIT

    executor.patch = starve_one
    with cluster.port_forward("hetlora", "svc/minio", 9000) as port:
        driver = config_from_dict({**raw, "store": {**raw["store"], "endpoint": f"127.0.0.1:{port}"},
                                   "metrics": {**raw["metrics"], "pushgateway_url": ""}})
        results = RoundRunner(driver, executor, tmp_path / "cluster").run()
        s3 = st.open_store(driver.store)
        g0, man0 = st.get_artifact(s3, st.global_prefix(driver.experiment, 0))
        man1 = st.signing.get_global_manifest(s3, driver.store, driver.experiment, 1) or {}
    assert results["rounds_committed"] == 2, results

    # Every task ran in the image, on the node its platform spec selects, under its tier's limits.
    tiers = {t["name"]: t for t in raw["ranks"]["tiers"]}
    ran = executor.pods
    for name, (rnd, _, pod) in ran.items():
        end = terminated(pod)
        print(f"round {rnd + 1} {name:40} {pod['spec'].get('nodeName', '-'):17} {pod['status']['phase']:9} "
              f"{end.get('reason', '')} {end.get('startedAt', '')} -> {end.get('finishedAt', '')}")
    assert {node.task.split("-")[0] for _, node, _ in ran.values()} >= {"train", "prune", "aggregate", "evaluate"}
    oom = []
    for name, (_, node, pod) in ran.items():
        status = pod["status"]["containerStatuses"][0]
        assert status["image"].endswith(IMAGE), (name, status["image"])
        tier = tier_of(pod)
        assert pod["spec"]["nodeName"] == f"hetlora-{tier or 'platform'}", (name, pod["spec"]["nodeName"])
        if any(name.startswith(f"{stem}-a") for stem in starved.values()):
            oom.append((name, terminated(pod)))
            continue
        assert pod["status"]["phase"] == "Succeeded", (name, terminated(pod))
        if tier and node.task.startswith("train"):  # the limits `hetlora tiers measure` gave the tier hold
            assert pod["spec"]["containers"][0]["resources"]["limits"]["memory"] == tiers[tier]["memory_limit"]

    # The deliberately small limit does not: the kernel killed the task in its cgroup at each of its
    # attempts (the first and the IR's retries), and the round went on without that client.
    assert len(oom) == 1 + CLIENT_RETRIES[0] and all(end.get("reason") == "OOMKilled" for _, end in oom), oom
    dropped = man1.get("dropped", {})
    assert sorted(dropped) == sorted(starved) and len(man1["participants"]) == 2, man1

    # Round 1 as `hetlora simulate` computes it in this process, from the same config and seeds.
    local = config_from_dict({**raw, "federation": {**raw["federation"], "rounds": 1},
                              "store": {"kind": "local"}, "metrics": {"pushgateway_url": ""}})
    sim = simulate(local, tmp_path / "sim", progress=False)
    s0, sman0 = st.get_artifact(st.LocalStore(tmp_path / "sim" / "store"), st.global_prefix(local.experiment, 0))
    a, b = LoraAdapter.from_bytes(g0), LoraAdapter.from_bytes(s0)
    assert a.modules == b.modules
    worst = max(float(np.abs(x - y).max()) for m in a.modules for x, y in ((a.A[m], b.A[m]), (a.B[m], b.B[m])))
    assert worst <= 1e-5, f"cluster round 1 differs from simulate's by {worst:.3g}"
    assert float(max(np.abs(a.B[m]).max() for m in a.modules)) > 0, "round 1's global must be trained (B != 0)"
    assert man0["clients"] == sman0["clients"]
    assert results["rounds"][0]["client_ranks"] == sim["rounds"][0]["client_ranks"]
    assert [p["dtype"] for p in results["precision"]] == [p["dtype"] for p in sim["precision"]]  # both sides as the CPU decides
    print(f"cluster rounds: {len(ran)} pods, precision {results['precision']}; round 1 max |cluster - simulate| = {worst:.3g}; "
          f"round 2 dropped {dropped}; cluster up in {cluster.up_s:.0f} s"
          + "".join(f"\n  {ln}" for ln in cluster.log.splitlines() if "seed" in ln))
