"""Rounds of the real federated loop (``RoundRunner``) run as pods on the cluster of scripts/cluster-up.sh.

A test-side stand-in for Kubeflow's backend (no Argo, no KFP API server here): each round (and
evaluation) is compiled exactly as ``hetlora submit`` compiles it, and every task of its DAG becomes
the pod Kubeflow's driver would make (``kfp_pods``: the executor's command and input, the platform
spec's selector, tolerations, Secret env, limits), started once the tasks it waits for ended, with
the IR's trigger policy (aggregation runs after failed client tasks too). The driver side (planning,
resuming, results) is the project's own ``RoundRunner`` in the test process.

The driver reaches the store through a port-forward, the pods through its Service name: ``store``
is a section a run may change, so each side gets the endpoint it can reach.
"""

from __future__ import annotations

import dataclasses
import json
import re
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import kfp_pods
from hetlora_kfp.pipelines.round import compile_evaluate, compile_round
from real_cluster import RealCluster

from hetlora_core.config import HetLoRAConfig
from hetlora_core.run import PipelineFailed
from hetlora_core.steps.plan import RoundPlan


class PodExecutor:
    """The ``Executor`` of ``hetlora_core.run`` for the real cluster (see the module docstring)."""

    name, command = "cluster pods", "the test's PodExecutor"
    loads_model_here = False  # the pods load the model from the image's prebuilt cache
    local_key = False  # like Kubeflow: the server key (none here) comes from the environment

    def __init__(self, cluster: RealCluster, namespace: str, store_endpoint: str, pushgateway_url: str = "",
                 timeout_s: float = 900) -> None:
        self.cluster, self.namespace, self.timeout_s = cluster, namespace, timeout_s
        self.endpoint, self.pushgateway_url = store_endpoint, pushgateway_url
        self.on_task: Callable[[str, str], None] | None = None
        # Called with (round, task, pod manifest) before a pod is made: a test may change it.
        self.patch: Callable[[int, kfp_pods.Node, dict[str, Any]], None] | None = None
        self.pods: dict[str, tuple[int, kfp_pods.Node, dict[str, Any]]] = {}  # name -> (round, task, pod as it ended)
        self._seq = 0

    def _in_cluster(self, cfg: HetLoRAConfig) -> HetLoRAConfig:
        """What the pods get: the store and the Pushgateway by their Service names."""
        return dataclasses.replace(cfg, store=dataclasses.replace(cfg.store, endpoint=self.endpoint),
                                   metrics=dataclasses.replace(cfg.metrics, pushgateway_url=self.pushgateway_url))

    def run_round(self, cfg: HetLoRAConfig, plan: RoundPlan, started_at: float) -> None:
        cfg = self._in_cluster(cfg)
        self._run(plan.round, lambda p: compile_round(cfg, plan, p),
                  {"config_json": cfg.to_json(), "round_index": plan.round, "round_started_at": started_at})

    def evaluate(self, cfg: HetLoRAConfig, rnd: int) -> None:
        cfg = self._in_cluster(cfg)
        self._run(rnd, lambda p: compile_evaluate(cfg, rnd, p), {"config_json": cfg.to_json(), "round_index": rnd})

    def _run(self, rnd: int, compile_to: Callable[[str], Any], inputs: dict[str, Any]) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "pipeline.yaml"
            compile_to(str(path))
            ir, platform = kfp_pods.load(path)
        nodes = {n.key: n for n in kfp_pods.dag(ir, inputs)}
        names: dict[str, str] = {}
        for n in nodes.values():
            self._seq += 1
            names[n.key] = re.sub(r"[^a-z0-9-]", "-", f"t{self._seq}-{n.task}")[:63].rstrip("-")
        ended: dict[str, str] = {}  # key -> Succeeded | Failed | Skipped
        running: set[str] = set()
        deadline = time.monotonic() + self.timeout_s
        while len(ended) < len(nodes):
            if time.monotonic() > deadline:
                raise PipelineFailed(f"pods still running after {self.timeout_s:.0f} s: {sorted(names[k] for k in running)}")
            for key, n in nodes.items():
                if key in ended or key in running or not n.after <= ended.keys():
                    continue
                if not n.after_any_outcome and any(ended[a] != "Succeeded" for a in n.after):
                    ended[key] = "Skipped"  # KFP does not start a task whose upstream failed
                    continue
                manifest = kfp_pods.pod(ir, platform, n.task, n.executor, n.params, name=names[key], namespace=self.namespace)
                if self.patch:
                    self.patch(rnd, n, manifest)
                self.cluster.kubectl("apply", "-f", "-", stdin=json.dumps(manifest))
                running.add(key)
            for key in sorted(running):
                p = self.cluster.get("pod", names[key], "-n", self.namespace)
                phase = p["status"].get("phase", "")
                if phase in ("Succeeded", "Failed"):
                    running.discard(key)
                    ended[key] = phase
                    self.pods[names[key]] = (rnd, nodes[key], p)
            time.sleep(1)
        failed = sorted(names[k] for k, v in ended.items() if v != "Succeeded")
        if failed:
            logs = {n: self.cluster.kubectl("logs", "-n", self.namespace, n, check=False)[-1500:] for n in failed
                    if n in self.pods}
            raise PipelineFailed(f"tasks did not succeed: {failed}; logs: {json.dumps(logs)[:6000]}")


def terminated(pod: dict[str, Any]) -> dict[str, Any]:
    """The main container's terminated state (reason, exitCode) of an ended pod."""
    return pod["status"]["containerStatuses"][0]["state"].get("terminated", {})
