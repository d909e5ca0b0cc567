"""Room on the nodes for what a round runs besides the client tasks, and what is already taken.

``hetlora preflight`` checks every tier against its node pool. The server tasks need room too: the
evaluate task runs the model at r_max and so gets the largest tier's requests, and on CPU it is not
placed on a pool (pipelines/platform.py), so it needs an untainted node with that much *free*: on
small nodes the platform's own pods (the store, the Pushgateway, DNS) can leave less than a tier's
node has (found on the 2-CPU nodes of scripts/cluster-up.sh, where such a task stays Pending).
"""

from __future__ import annotations

import dataclasses
from decimal import Decimal
from typing import Any

from kubernetes import client as k8s

from hetlora_core.config import HetLoRAConfig

from .preflight import GPU, Check, check_tier, fmt_quantity, parse_quantity, untolerated_taints


def pod_requests(api: Any) -> dict[str, dict[str, Decimal]] | None:
    """Node -> the CPU, memory and GPUs its pods request (pods that still hold them: not Succeeded
    or Failed); None when the API will not list pods (then only allocatable is checked)."""
    try:
        pods = api.list_pod_for_all_namespaces(field_selector="status.phase!=Succeeded,status.phase!=Failed",
                                               _request_timeout=(5, 20)).items or []
    except Exception:  # noqa: BLE001 - RBAC without pod listing, an old fake: fall back to allocatable
        return None
    used: dict[str, dict[str, Decimal]] = {}
    for pod in pods:
        node = pod.spec.node_name if pod.spec else None
        if not node:
            continue
        acc = used.setdefault(node, {"cpu": Decimal(0), "memory": Decimal(0), GPU: Decimal(0)})
        for c in pod.spec.containers or []:
            res = c.resources or k8s.V1ResourceRequirements()
            req, lim = res.requests or {}, res.limits or {}
            for r in acc:
                q = req.get(r, lim.get(r))  # a limit alone is also the request
                if q is not None:
                    acc[r] += parse_quantity(q)
    return used


def server_check(cfg: HetLoRAConfig, nodes: list[k8s.V1Node], used: dict[str, dict[str, Decimal]] | None) -> Check:
    """Whether the evaluate task (the largest tier's requests) fits on some node it may use."""
    largest = max(cfg.ranks.tiers, key=lambda t: t.rank)
    if largest.gpu:
        return Check("server tasks", True, f"evaluate runs on tier {largest.name}'s nodes (checked above)")
    ev = dataclasses.replace(largest, name="evaluate", node_selector={}, tolerations=())
    # The server tasks tolerate nothing: only untainted nodes are candidates (a tier node's taint is
    # meant to keep them off, so "tolerate it" would be the wrong fix).
    open_nodes = [n for n in nodes if not untolerated_taints(n, [])]
    if not open_nodes:
        return Check("server tasks", False, "no untainted node: prune, aggregate and evaluate tolerate no taint",
                     ["add a node without taints for the platform and the server tasks (kind: the control plane; "
                      "scripts/cluster-up.sh: hetlora-platform)"])
    rep = check_tier(ev, open_nodes, used)
    want = f"cpu={fmt_quantity(rep.requests['cpu'], 'cpu')} mem={fmt_quantity(rep.requests['memory'], 'memory')}"
    basis = "free" if used is not None else "allocatable (pods not readable)"
    if rep.ok:
        return Check("server tasks", True, f"evaluate ({want}, tier {largest.name}'s requests) fits on "
                     f"{', '.join(rep.matching[:3])} ({basis})")
    fixes = [f.replace(f"ranks.tiers[{ev.name}]", f"ranks.tiers[{largest.name}]") for f in rep.fixes]
    return Check("server tasks", False, f"evaluate ({want}, the largest tier {largest.name}'s requests) fits on no untainted "
                 f"node ({basis})", fixes + [f"evaluate takes the largest tier's requests: lower ranks.tiers[{largest.name}]"
                                             ".cpu_request/memory_request, or add an untainted node with that much free"])
