"""Rounds of the real federated loop (``RoundRunner``) run as pods on the cluster of scripts/cluster-up.sh.

A test-side stand-in for Kubeflow's backend (no Argo, no KFP API server here): each round (and
evaluation) is compiled exactly as ``hetlora submit`` compiles it, and every task of its DAG becomes
the pod Kubeflow's driver would make (``kfp_pods``: the executor's command and input, the platform
spec's selector, tolerations, Secret env, limits), started once the tasks it waits for ended, with
the IR's trigger policy (aggregation runs after failed client tasks too) and retry policy (a failed
pod is made again after its backoff, up to maxRetryCount). These semantics are read from the IR and
modelled here; Argo's own scheduling (e.g. a DAG's fail-fast) is not what runs. The driver side (planning,
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
                 timeout_s: float = 900, max_backoff_s: float = float("inf")) -> None:
        self.cluster, self.namespace, self.timeout_s = cluster, namespace, timeout_s
        self.max_backoff_s = max_backoff_s  # a cap on the IR's retry backoff (a test need not wait 30 s + 60 s)
        self.endpoint, self.pushgateway_url = store_endpoint, pushgateway_url
        self.on_task: Callable[[str, str], None] | None = None
        # Called with (round, task, pod manifest) before a pod is made: a test may change it.
        self.patch: Callable[[int, kfp_pods.Node, dict[str, Any]], None] | None = None
        self.pods: dict[str, tuple[int, kfp_pods.Node, dict[str, Any]]] = {}  # name -> (round, task, pod as it ended), every attempt
        self._seq = 0

    def _in_cluster(self, cfg: HetLoRAConfig) -> HetLoRAConfig:
        """What the pods get: the store and the Pushgateway by their Service names."""
        return dataclasses.replace(cfg, store=dataclasses.replace(cfg.store, endpoint=self.endpoint),
                                   metrics=dataclasses.replace(cfg.metrics, pushgateway_url=self.pushgateway_url))

    def run_round(self, cfg: HetLoRAConfig, plan: RoundPlan, started_at: float) -> None:
        cfg = self._in_cluster(cfg)
        self._run(plan.round, lambda p: compile_round(cfg, plan, p), {"config_json": cfg.to_json(), "round_index": plan.round})

    def evaluate(self, cfg: HetLoRAConfig, rnd: int, started_at: float = 0.0) -> None:
        cfg = self._in_cluster(cfg)
        self._run(rnd, lambda p: compile_evaluate(cfg, rnd, p),
                  {"config_json": cfg.to_json(), "round_index": rnd, "round_started_at": started_at})

    def _run(self, rnd: int, compile_to: Callable[[str], Any], inputs: dict[str, Any]) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "pipeline.yaml"
            compile_to(str(path))
            ir, platform = kfp_pods.load(path)
        nodes = {n.key: n for n in kfp_pods.dag(ir, inputs)}
        self._seq += 1
        stem = {k: re.sub(r"[^a-z0-9-]", "-", f"t{self._seq}-{i}-{n.task}")[:58].rstrip("-") for i, (k, n) in enumerate(nodes.items())}
        manifests: dict[str, dict[str, Any]] = {}  # key -> its pod (patched once: a retry is the same pod)
        attempt: dict[str, int] = {}
        retry_at: dict[str, float] = {}  # key -> when its next attempt may start
        ended: dict[str, str] = {}  # key -> Succeeded | Failed | Skipped
        running: dict[str, str] = {}  # key -> pod name
        made: list[str] = []
        deadline = time.monotonic() + self.timeout_s
        try:
            while len(ended) < len(nodes):
                if time.monotonic() > deadline:
                    raise PipelineFailed(f"pods still running after {self.timeout_s:.0f} s: {sorted(running.values())}")
                for key, n in nodes.items():
                    if key in ended or key in running or not n.after <= ended.keys() or retry_at.get(key, 0) > time.monotonic():
                        continue
                    if not n.after_any_outcome and any(ended[a] != "Succeeded" for a in n.after):
                        ended[key] = "Skipped"  # KFP does not start a task whose upstream failed
                        continue
                    if key not in manifests:
                        manifests[key] = kfp_pods.pod(ir, platform, n.task, n.executor, n.params, name=stem[key],
                                                      namespace=self.namespace)
                        if self.patch:
                            self.patch(rnd, n, manifests[key])
                    attempt[key] = attempt.get(key, -1) + 1
                    name = f"{stem[key]}-a{attempt[key]}"
                    manifest = {**manifests[key], "metadata": {**manifests[key]["metadata"], "name": name}}
                    self.cluster.kubectl("apply", "-f", "-", stdin=json.dumps(manifest))
                    made.append(name)
                    running[key] = name
                for key, name in sorted(running.items()):
                    p = self.cluster.get("pod", name, "-n", self.namespace)
                    waiting = [c["state"].get("waiting", {}).get("reason") for c in p["status"].get("containerStatuses", [])]
                    if set(waiting) & STUCK:  # would wait forever: fail now, saying why
                        raise PipelineFailed(f"pod {name} cannot start: {waiting}")
                    phase = p["status"].get("phase", "")
                    if phase not in ("Succeeded", "Failed"):
                        continue
                    del running[key]
                    self.pods[name] = (rnd, nodes[key], p)
                    n = nodes[key]
                    if phase == "Failed" and attempt[key] < n.retries:  # retryPolicy: the same pod again, after its backoff
                        wait = n.backoff_s * n.backoff_factor ** attempt[key]
                        retry_at[key] = time.monotonic() + min(wait, self.max_backoff_s)
                    else:
                        ended[key] = phase
                time.sleep(1)
            failed = sorted(running.get(k, stem[k]) for k, v in ended.items() if v != "Succeeded")
            if failed:
                logs = {m: self.cluster.kubectl("logs", "-n", self.namespace, m, check=False)[-1500:] for m in made
                        if m in self.pods and self.pods[m][2]["status"].get("phase") == "Failed"}
                raise PipelineFailed(f"tasks did not succeed: {failed}; logs: {json.dumps(logs)[:6000]}")
        finally:  # the pods' outcomes are kept in self.pods; their nodes' room is needed by the next run
            if made:
                self.cluster.kubectl("delete", "pod", "-n", self.namespace, "--wait=false", "--ignore-not-found", *made, check=False)


# A container waiting for one of these never starts on its own (no registry here, a missing Secret key).
STUCK = {"ErrImageNeverPull", "InvalidImageName", "CreateContainerConfigError", "CreateContainerError"}


def terminated(pod: dict[str, Any]) -> dict[str, Any]:
    """The main container's terminated state (reason, exitCode) of an ended pod."""
    return pod["status"]["containerStatuses"][0]["state"].get("terminated", {})
