"""``hetlora preflight``: can this cluster run the config? Checked before a submission.

* every tier's node selector and tolerations match at least one schedulable node (not cordoned,
  Ready, every NoSchedule/NoExecute taint tolerated) whose allocatable CPU, memory and
  ``nvidia.com/gpu`` cover the tier's requests (allocatable, not what running pods leave free);
* the store Secret ``kubeflow.store_secret`` exists in ``kubeflow.namespace`` with accesskey/secretkey;
* the store answers (``open_store`` + a list), with the environment's credentials, else the Secret's.

Small pure functions over the ``kubernetes`` client's model objects (V1Node, V1Taint, ...), so each
rule is testable without a cluster; ``run_preflight`` is the only one that calls the API.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

from kubernetes import client as k8s

from hetlora_core.config import HetLoRAConfig, TierConfig
from hetlora_core.store import StoreAuthError, StoreError, StoreUnavailable, open_store

GPU = "nvidia.com/gpu"
SECRET_KEYS = ("accesskey", "secretkey")
BLOCKING_EFFECTS = ("NoSchedule", "NoExecute")  # PreferNoSchedule only lowers the score
_SUFFIX = {"n": Decimal("1e-9"), "u": Decimal("1e-6"), "m": Decimal("1e-3"), "": Decimal(1),
           **{s: Decimal(1000) ** (i + 1) for i, s in enumerate("kMGTPE")},
           **{s + "i": Decimal(1024) ** (i + 1) for i, s in enumerate("KMGTPE")}}
_QUANTITY = re.compile(r"^([+-]?(?:\d+\.?\d*|\.\d+))(?:([eE][+-]?\d+)|(Ki|Mi|Gi|Ti|Pi|Ei|[numkMGTPE]))?$")


class PreflightError(RuntimeError):
    """The check itself could not run (API unreachable, not allowed to list nodes)."""


def parse_quantity(q: str | int | float) -> Decimal:
    """A Kubernetes quantity (``500m``, ``2``, ``1.5Gi``, ``512Mi``, ``1e3``) as a Decimal."""
    if isinstance(q, (int, float)) and not isinstance(q, bool):
        return Decimal(str(q))
    m = _QUANTITY.match(str(q).strip())
    if not m:
        raise ValueError(f"{q!r} is not a Kubernetes quantity (e.g. 500m, 2, 1.5Gi, 512Mi, 1e3)")
    number, exp, suffix = m.groups()
    try:
        return Decimal(number + (exp or "")) * _SUFFIX[suffix or ""]
    except InvalidOperation:
        raise ValueError(f"{q!r} is not a Kubernetes quantity") from None


def fmt_quantity(v: Decimal, resource: str) -> str:
    if resource == "memory":
        for unit in ("Gi", "Mi", "Ki"):
            if v >= _SUFFIX[unit]:
                return f"{(v / _SUFFIX[unit]).quantize(Decimal('0.1')).normalize():f}{unit}"
        return f"{v.normalize():f}"
    if resource == "cpu" and v != v.to_integral_value():
        return f"{(v * 1000).to_integral_value():f}m"
    return f"{v.normalize():f}"


# ---------------------------------------------------------------- scheduling rules


def tier_tolerations(tier: TierConfig) -> list[k8s.V1Toleration]:
    return [k8s.V1Toleration(key=t.get("key") or None, operator=t.get("operator") or "Equal",
                             value=t.get("value") or None, effect=t.get("effect") or None) for t in tier.tolerations]


def tolerates(tol: k8s.V1Toleration, taint: k8s.V1Taint) -> bool:
    """Kubernetes' ToleratesTaint: effect (empty = all), key (empty only with Exists = all), operator."""
    if tol.effect and tol.effect != taint.effect:
        return False
    op = tol.operator or "Equal"
    if tol.key != taint.key and not (not tol.key and op == "Exists"):
        return False
    if op == "Exists":
        return True
    if op == "Equal":
        return (tol.value or "") == (taint.value or "")
    if op in ("Gt", "Lt"):  # integer comparison of the taint's value against the toleration's
        try:
            a, b = int(taint.value or ""), int(tol.value or "")
        except ValueError:
            return False
        return a > b if op == "Gt" else a < b
    return False


def untolerated_taints(node: k8s.V1Node, tolerations: list[k8s.V1Toleration]) -> list[k8s.V1Taint]:
    taints = (node.spec.taints if node.spec else None) or []
    return [t for t in taints if t.effect in BLOCKING_EFFECTS and not any(tolerates(tol, t) for tol in tolerations)]


def is_ready(node: k8s.V1Node) -> bool:
    conds = (node.status.conditions if node.status else None) or []
    return any(c.type == "Ready" and c.status == "True" for c in conds)


def tier_requests(tier: TierConfig) -> dict[str, Decimal]:
    try:
        return {"cpu": parse_quantity(tier.cpu_request), "memory": parse_quantity(tier.memory_request),
                GPU: Decimal(tier.gpu)}
    except ValueError as e:
        raise PreflightError(f"ranks.tiers[{tier.name}]: cpu_request/memory_request: {e}") from None


def allocatable(node: k8s.V1Node) -> dict[str, Decimal]:
    raw = (node.status.allocatable if node.status else None) or {}
    return {r: parse_quantity(raw.get(r, "0")) for r in ("cpu", "memory", GPU)}


@dataclass
class Problem:
    tag: str  # short: selector | taint | cordoned | not Ready | cpu | memory | nvidia.com/gpu
    text: str
    fix: str
    weight: int = 1  # how hard to fix; the closest node is the one with the least total weight


def node_problems(tier: TierConfig, node: k8s.V1Node, used: dict[str, Decimal] | None = None) -> list[Problem]:
    """Why a client pod of ``tier`` cannot run on ``node`` (empty: it can); ``used``: what the pods
    already on the node request (capacity.pod_requests), taken from its allocatable."""
    name, t = node.metadata.name, tier.name
    labels = node.metadata.labels or {}
    out = [Problem("selector", f"label {k}={v} missing" + (f" (has {labels[k]})" if k in labels else ""),
                   f"label it: kubectl label node {name} {k}={v} --overwrite  (or change ranks.tiers[{t}].node_selector)")
           for k, v in sorted(tier.node_selector.items()) if labels.get(k) != v]
    cordoned, ready = bool(node.spec and node.spec.unschedulable), is_ready(node)
    for taint in untolerated_taints(node, tier_tolerations(tier)):
        spec = f"{taint.key}{'=' + taint.value if taint.value else ''}:{taint.effect}"
        if (taint.key or "").startswith("node.kubernetes.io/"):  # set by Kubernetes from a node condition
            cond = taint.key.split("/", 1)[1]
            if not (cond == "unschedulable" and cordoned or cond in ("not-ready", "unreachable") and not ready):
                out.append(Problem("taint", f"taint {spec} (node condition {cond})", f"the node reports {cond}: "
                                   f"kubectl describe node {name}; the taint goes when the condition clears", 3))
            continue  # else reported below as cordoned / not Ready
        tol = (f"{{key: {taint.key}, operator: Equal, value: {taint.value}, effect: {taint.effect}}}" if taint.value
               else f"{{key: {taint.key}, operator: Exists, effect: {taint.effect}}}")
        out.append(Problem("taint", f"taint {spec} not tolerated",
                           f"add to ranks.tiers[{t}].tolerations: {tol}  (or untaint: kubectl taint node {name} {spec}-)"))
    if cordoned:
        out.append(Problem("cordoned", "cordoned", f"kubectl uncordon {name}"))
    if not ready:
        out.append(Problem("not Ready", "not Ready", f"not Ready: check its kubelet (kubectl describe node {name})", 3))
    alloc, want = allocatable(node), tier_requests(tier)
    have = {r: v - (used or {}).get(r, Decimal(0)) for r, v in alloc.items()}
    field_of = {"cpu": "cpu_request", "memory": "memory_request", GPU: "gpu"}
    for r, need in want.items():
        if r == GPU and need > 0 and alloc[r] == 0:  # a pool member without GPUs: usually no device plugin
            out.append(Problem(r, f"no allocatable {GPU}", f"no {GPU} is advertised: install the NVIDIA device plugin "
                               f"(or GPU operator) on the pool's GPU nodes (docs/deploy.md), or set ranks.tiers[{t}].gpu: 0", 3))
        elif need > have[r] and have[r] < alloc[r]:
            out.append(Problem(r, f"free {r} {fmt_quantity(have[r], r)} (of {fmt_quantity(alloc[r], r)} allocatable, the rest "
                               f"requested by its pods) < {fmt_quantity(need, r)}",
                               f"only {fmt_quantity(have[r], r)} {r} free: lower ranks.tiers[{t}].{field_of[r]}, "
                               f"free room on the node (kubectl describe node {name}) or add a node to the pool", 3))
        elif need > have[r]:
            out.append(Problem(r, f"allocatable {r} {fmt_quantity(have[r], r)} < {fmt_quantity(need, r)}",
                               f"only {fmt_quantity(have[r], r)} allocatable {r}: lower "
                               f"ranks.tiers[{t}].{field_of[r]} or add a larger node to the pool", 3))
    return out


# ---------------------------------------------------------------- report


@dataclass
class TierReport:
    tier: str
    rank: int
    requests: dict[str, Decimal]
    matching: list[str]
    problems: dict[str, list[Problem]] = field(default_factory=dict)  # node -> why not
    fixes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.matching)


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fixes: list[str] = field(default_factory=list)


@dataclass
class PreflightReport:
    tiers: list[TierReport]
    checks: list[Check]

    @property
    def ok(self) -> bool:
        return all(t.ok for t in self.tiers) and all(c.ok for c in self.checks)


def check_tier(tier: TierConfig, nodes: list[k8s.V1Node], used: dict[str, dict[str, Decimal]] | None = None) -> TierReport:
    probs = {n.metadata.name: node_problems(tier, n, (used or {}).get(n.metadata.name)) for n in nodes}
    rep = TierReport(tier.name, tier.rank, tier_requests(tier), sorted(n for n, p in probs.items() if not p),
                     {n: ps for n, ps in probs.items() if ps})
    if not rep.ok:
        if not nodes:
            rep.fixes = ["the cluster has no nodes: add nodes (kind: scripts/kind-up.sh)"]
        else:  # fixes for the node closest to fitting: a pool member (selector matches) first, then
            # the fewest/easiest problems, then a node whose labels relabelling would not take away
            best = min(probs, key=lambda n: (any(p.tag == "selector" for p in probs[n]), sum(p.weight for p in probs[n]),
                                             any(" (has " in p.text for p in probs[n]), n))
            rep.fixes = [f"node {best}: {p.fix}" for p in probs[best]]
    return rep


def secret_check(secret: k8s.V1Secret | None, namespace: str, name: str) -> Check:
    create = (f"kubectl -n {namespace} create secret generic {name} "
              "--from-literal=accesskey=ACCESS_KEY --from-literal=secretkey=SECRET_KEY")
    if secret is None:
        return Check("store secret", False, f"secret {namespace}/{name} not found",
                     [f"create it: {create}  (kubectl create namespace {namespace} first if it is missing)"])
    data = {**(secret.data or {}), **(secret.string_data or {})}
    missing = [k for k in SECRET_KEYS if not data.get(k)]
    if missing:
        return Check("store secret", False, f"secret {namespace}/{name} lacks key(s) {', '.join(missing)}",
                     [f"recreate it: kubectl -n {namespace} delete secret {name} && {create}"])
    return Check("store secret", True, f"{namespace}/{name} has accesskey, secretkey")


def secret_credentials(secret: k8s.V1Secret | None) -> tuple[str, str] | None:
    if secret is None or not secret.data:
        return None
    try:
        ak, sk = (base64.b64decode(secret.data.get(k) or "").decode() for k in SECRET_KEYS)
    except (ValueError, UnicodeDecodeError):
        return None
    return (ak, sk) if ak and sk else None


def store_check(cfg: HetLoRAConfig, creds: tuple[str, str] | None = None,
                opener: Callable[..., Any] = open_store) -> Check:
    s = cfg.store
    if s.kind == "local":
        return Check("store", False, f"store.kind is local ({s.root}): pods in the cluster cannot share it",
                     ["use the cluster's S3 store: --set store.kind=s3 --set store.endpoint=HOST:PORT (e.g. minio.hetlora:9000)"])
    quiet = contextlib.ExitStack()
    store_log = logging.getLogger("hetlora.store")  # its retry warnings: the Check says it all
    quiet.callback(store_log.setLevel, store_log.level)
    store_log.setLevel(logging.ERROR)
    # The Secret's credentials are used only when this environment has none of its own; they are
    # handed to the store object, never written to os.environ (nothing else in the process sees them).
    env_has = any(os.environ.get(v) for v in ("HETLORA_S3_ACCESS_KEY", "AWS_ACCESS_KEY_ID"))
    use = None if env_has else creds
    source = "the store secret" if use else "environment"
    with quiet:
        try:
            opener(s, credentials=use).list(cfg.experiment)
        except StoreAuthError as e:
            return Check("store", False, f"{s.endpoint} rejected the credentials from {source}: {e}",
                         [f"make accesskey/secretkey in {cfg.kubeflow.namespace}/{cfg.kubeflow.store_secret} (and "
                          "HETLORA_S3_ACCESS_KEY/HETLORA_S3_SECRET_KEY here) match a user of the store"])
        except StoreUnavailable as e:
            return Check("store", False, f"cannot reach {s.endpoint}: {e}", [
                f"is store.endpoint ({s.endpoint}) right, and is the store running? (kubectl get pods,svc -A | grep -i minio)",
                "a cluster-internal endpoint is not reachable from outside: kubectl -n NS port-forward svc/SERVICE "
                "9000:9000, then rerun with --set store.endpoint=127.0.0.1:9000"]
                + (["store.secure is on: check TLS (HETLORA_S3_CA_BUNDLE names a private CA)"] if s.secure else []))
        except (StoreError, ValueError) as e:
            return Check("store", False, f"store error: {e}", ["check the store section of the config"])
    return Check("store", True, f"bucket {s.bucket} at {s.endpoint} answers (credentials from {source})")


# ---------------------------------------------------------------- the API calls


def _api_error(e: Exception, what: str, api: Any) -> PreflightError:
    host = getattr(getattr(getattr(api, "api_client", None), "configuration", None), "host", "the API server")
    if isinstance(e, k8s.ApiException):
        if e.status in (401, 403):
            return PreflightError(f"the API server at {host} refused to {what} (HTTP {e.status} {e.reason}): "
                                  "check the kubeconfig's user and its RBAC (kubectl auth can-i)")
        return PreflightError(f"the API server at {host} failed to {what}: HTTP {e.status} {e.reason}")
    return PreflightError(f"cannot reach the Kubernetes API at {host} to {what}: {type(e).__name__}: "
                          f"{str(e).splitlines()[0][:300] if str(e) else ''} (is the cluster up? right --kubeconfig/--context?)")


def list_nodes(api: Any, timeout: float = 20.0) -> list[k8s.V1Node]:
    nodes: list[k8s.V1Node] = []
    cont: str | None = None
    try:
        while True:
            kw: dict[str, str] = {"_continue": cont} if cont else {}
            resp = api.list_node(limit=500, _request_timeout=(5, timeout), **kw)
            nodes += resp.items or []
            cont = resp.metadata._continue if resp.metadata else None
            if not cont:
                return nodes
    except Exception as e:  # noqa: BLE001 - every failure here becomes one readable message
        raise _api_error(e, "list nodes", api) from e


def read_secret(api: Any, namespace: str, name: str) -> k8s.V1Secret | None:
    try:
        return api.read_namespaced_secret(name, namespace, _request_timeout=(5, 20))
    except Exception as e:  # noqa: BLE001 - 404 is an answer; the rest become one readable message
        if isinstance(e, k8s.ApiException) and e.status == 404:
            return None
        raise _api_error(e, f"read secret {namespace}/{name}", api) from e


def core_api(kubeconfig: str | None = None, context: str | None = None) -> k8s.CoreV1Api:
    """A CoreV1Api from the kubeconfig (given, $KUBECONFIG or ~/.kube/config), else in-cluster."""
    from kubernetes import config as kc

    conf = k8s.Configuration()
    default = os.path.expanduser(kc.kube_config.KUBE_CONFIG_DEFAULT_LOCATION)
    try:
        if kubeconfig or context or os.environ.get("KUBECONFIG") or os.path.exists(default):
            kc.load_kube_config(config_file=kubeconfig, context=context, client_configuration=conf, persist_config=False)
        elif not os.environ.get("KUBERNETES_SERVICE_HOST"):
            raise PreflightError(f"no kubeconfig ({default} is missing) and not running inside a cluster: "
                                 "pass --kubeconfig FILE [--context NAME] or set KUBECONFIG")
        else:
            kc.load_incluster_config(client_configuration=conf)
    except PreflightError:
        raise
    except Exception as e:  # noqa: BLE001 - ConfigException, OSError, YAML errors: one message
        raise PreflightError(f"cannot load Kubernetes credentials ({type(e).__name__}: {e}); pass --kubeconfig "
                             "FILE [--context NAME], set KUBECONFIG, or run inside the cluster") from None
    return k8s.CoreV1Api(k8s.ApiClient(conf))


def run_preflight(cfg: HetLoRAConfig, api: Any, *, skip_store: bool = False,
                  opener: Callable[..., Any] = open_store) -> PreflightReport:
    """All checks against ``api`` (a CoreV1Api); ``PreflightError`` only when the API cannot answer."""
    from .capacity import pod_requests, server_check

    nodes, used = list_nodes(api), pod_requests(api)
    tiers = [check_tier(t, nodes, used) for t in cfg.ranks.tiers]
    ns, name = cfg.kubeflow.namespace, cfg.kubeflow.store_secret
    secret = read_secret(api, ns, name)
    checks = [secret_check(secret, ns, name)]
    if not skip_store:
        checks.append(store_check(cfg, secret_credentials(secret), opener))
    checks.append(server_check(cfg, nodes, used))
    return PreflightReport(tiers, checks)


def render(rep: PreflightReport) -> str:
    def req(r: dict[str, Decimal]) -> str:
        s = f"cpu={fmt_quantity(r['cpu'], 'cpu')} mem={fmt_quantity(r['memory'], 'memory')}"
        return s + (f" gpu={r[GPU]}" if r[GPU] else "")

    def nodes(t: TierReport) -> str:
        if t.matching:
            return ", ".join(t.matching[:3]) + (f" (+{len(t.matching) - 3})" if len(t.matching) > 3 else "")
        why = Counter(p.tag for ps in t.problems.values() for p in {p.tag: p for p in ps}.values())
        return f"none of {len(t.problems)}" + (" (" + ", ".join(f"{k} x{v}" for k, v in why.most_common()) + ")" if why else "")

    rows = [("tier", "rank", "requests", "matching nodes", "status")]
    rows += [(t.tier, str(t.rank), req(t.requests), nodes(t), "ok" if t.ok else "FAIL") for t in rep.tiers]
    w = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w[i]) if i < 4 else c for i, c in enumerate(r)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * x for x in w) + "  ------")
    lines.append("")
    lines += [f"{c.name + ':':<14} {'ok' if c.ok else 'FAIL'}  {c.detail}" for c in rep.checks]
    fixes = [f"tier {t.tier}: {f}" for t in rep.tiers for f in t.fixes] + [f"{c.name}: {f}" for c in rep.checks
                                                                             if not c.ok for f in c.fixes]
    if fixes:
        lines += ["", "To fix:"] + [f"  - {f}" for f in fixes]
    lines += ["", "preflight: " + ("all checks passed" if rep.ok else "FAILED")]
    return "\n".join(lines)
