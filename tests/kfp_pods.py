"""Pods for a compiled round, made from the pipeline's own IR the way Kubeflow's driver makes them.

A test-side launcher for tests/test_cluster.py (no Argo, no KFP backend): for every task of the
round's DAG (the ParallelFor loops unrolled over their raw items) it takes the executor's image,
command, args, env and resources from the IR's deployment spec, the kfp-kubernetes platform spec
(node selector, tolerations, Secret env, emptyDir mounts, security context, pod labels, deadline)
and writes the executor input as kfp.local does (``{{$}}`` in the args), so that what runs on the
cluster is what Kubeflow would run.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

# Where the executor writes its outputs inside the pod (an emptyDir /tmp in every task).
OUTPUTS = "/tmp/kfp/outputs"


@dataclass
class TaskPod:
    task: str  # the task's name in its DAG, e.g. train-client-2
    executor: str  # exec-train-client-2
    params: dict[str, Any]
    manifest: dict[str, Any]  # the Pod


def load(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(pipeline IR, kubernetes platform spec's executors) of a compiled pipeline file."""
    docs = [d for d in yaml.safe_load_all(Path(path).read_text()) if d]
    ir = docs[0]
    platform = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"] if len(docs) > 1 else {}
    return ir, platform


def _value(spec: dict[str, Any], scope: dict[str, Any]) -> Any:
    if "componentInputParameter" in spec:
        return scope[spec["componentInputParameter"]]
    if "runtimeValue" in spec:
        return spec["runtimeValue"]["constant"]
    raise ValueError(f"unsupported parameter source: {spec}")


@dataclass
class Node:
    """One container task of the DAG, loops unrolled: ``key`` is unique (a loop body's task carries
    its iteration), ``after`` the keys it waits for (a loop it depends on: every task in it)."""

    key: str
    task: str
    executor: str
    params: dict[str, Any]
    after: set[str]
    # triggerPolicy ALL_UPSTREAM_TASKS_COMPLETED (ignore_upstream_failure): runs whatever they ended as.
    after_any_outcome: bool
    retries: int = 0  # retryPolicy: attempts after the first, the first backoff and its growth factor
    backoff_s: float = 0.0
    backoff_factor: float = 1.0


def _seconds(duration: str) -> float:
    """A KFP duration such as ``30s`` in seconds."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)s", duration)
    if not m:
        raise ValueError(f"unsupported duration {duration!r}")
    return float(m.group(1))


def dag(ir: dict[str, Any], inputs: dict[str, Any]) -> list[Node]:
    """Every container task of the pipeline with what it waits for, in the IR's order."""
    defaults = {k: v.get("defaultValue") for k, v in ir["root"].get("inputDefinitions", {}).get("parameters", {}).items()}
    out: list[Node] = []
    leaves: dict[str, list[str]] = {}  # a task's key -> the container tasks it stands for

    def walk(d: dict[str, Any], scope: dict[str, Any], prefix: str) -> None:
        for name, t in d["tasks"].items():
            comp = ir["components"][t["componentRef"]["name"]]
            params = {k: _value(v, scope) for k, v in t.get("inputs", {}).get("parameters", {}).items()}
            key = prefix + name
            after = {prefix + a for a in t.get("dependentTasks", [])}
            if "executorLabel" in comp:
                policy = t.get("triggerPolicy", {}).get("strategy", "")
                retry = t.get("retryPolicy", {})
                out.append(Node(key, name, comp["executorLabel"], params, after, policy == "ALL_UPSTREAM_TASKS_COMPLETED",
                                int(retry.get("maxRetryCount", 0)), _seconds(retry.get("backoffDuration", "0s")),
                                float(retry.get("backoffFactor", 1.0))))
                leaves[key] = [key]
                continue
            it = t.get("parameterIterator")
            items = json.loads(it["items"]["raw"]) if it else [None]
            first = len(out)
            for i, item in enumerate(items):
                walk(comp["dag"], {**params, **({it["itemInput"]: item} if it else {})}, f"{key}[{i}]/")
            for n in out[first:]:
                n.after |= after  # what the loop (or sub-DAG) waits for, its body waits for too
            leaves[key] = [n.key for n in out[first:]]

    walk(ir["root"]["dag"], {**defaults, **inputs}, "")
    for n in out:
        n.after = {leaf for a in n.after for leaf in leaves[a]}
    return out


def tasks(ir: dict[str, Any], inputs: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """(task name, executor label, parameter values) for every container task, loops unrolled."""
    return [(n.task, n.executor, n.params) for n in dag(ir, inputs)]


def executor_input(params: dict[str, Any]) -> dict[str, Any]:
    """What kfp.local (and Kubeflow's launcher) hands the executor: the inputs and where the output goes."""
    return {"inputs": {"parameterValues": params},
            "outputs": {"parameters": {"Output": {"outputFile": f"{OUTPUTS}/Output"}},
                        "outputFile": f"{OUTPUTS}/output_metadata.json"}}


def pod(ir: dict[str, Any], platform: dict[str, Any], task: str, executor: str, params: dict[str, Any], *,
        name: str, namespace: str, pull_policy: str = "Never") -> dict[str, Any]:
    """The Pod for one task (``pull_policy`` Never: images come only from what was imported)."""
    c = ir["deploymentSpec"]["executors"][executor]["container"]
    p = platform.get(executor, {})
    args = [json.dumps(executor_input(params)) if a == "{{$}}" else a for a in c.get("args", [])]
    res = c.get("resources", {})
    resources = {kind: {k: res[f"resource{key}{kind.title()[:-1]}"] for k, key in (("cpu", "Cpu"), ("memory", "Memory"))
                        if f"resource{key}{kind.title()[:-1]}" in res} for kind in ("requests", "limits")}
    acc = res.get("accelerator", {})
    if acc.get("resourceType") or acc.get("type"):
        resources["limits"][acc.get("resourceType") or acc["type"]] = str(acc.get("resourceCount") or acc.get("count"))
    env = [{"name": e["name"], "value": e.get("value", "")} for e in c.get("env", [])]
    for s in p.get("secretAsEnv", []):
        for kv in s["keyToEnv"]:
            env = [e for e in env if e["name"] != kv["envVar"]]
            env.append({"name": kv["envVar"], "valueFrom": {"secretKeyRef": {
                "name": s["secretName"], "key": kv["secretKey"], "optional": bool(s.get("optional"))}}})
    volumes, mounts = [], []
    for m in p.get("emptyDirMounts", []):
        volumes.append({"name": m["volumeName"], "emptyDir": {k: m[k] for k in ("medium", "sizeLimit") if k in m}})
        mounts.append({"name": m["volumeName"], "mountPath": m["mountPath"]})
    sc = {k: (int(v) if re.fullmatch(r"\d+", str(v)) else v) for k, v in p.get("securityContext", {}).items()}
    spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "containers": [{"name": "main", "image": c["image"], "imagePullPolicy": pull_policy, "command": c["command"],
                        "args": args, "env": env, "resources": resources, "volumeMounts": mounts}],
        "volumes": volumes}
    if sc:
        spec["securityContext"] = sc
    if "nodeSelector" in p:
        spec["nodeSelector"] = p["nodeSelector"]["labels"]
    if "tolerations" in p:
        spec["tolerations"] = p["tolerations"]
    if "activeDeadlineSeconds" in p:
        spec["activeDeadlineSeconds"] = int(p["activeDeadlineSeconds"])
    meta = {"name": name, "namespace": namespace,
            "labels": {**p.get("podMetadata", {}).get("labels", {}), "hetlora.io/task": task}}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec}


def round_pods(path: str | Path, namespace: str, inputs: dict[str, Any] | None = None) -> list[TaskPod]:
    """Every task of the compiled round in ``path`` as a Pod in ``namespace``."""
    ir, platform = load(path)
    return [TaskPod(t, e, params, pod(ir, platform, t, e, params, name=f"{t}-{i}", namespace=namespace))
            for i, (t, e, params) in enumerate(tasks(ir, inputs or {}))]
