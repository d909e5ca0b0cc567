"""``hetlora preflight``: node/tier matching, the store Secret, the store, the CLI.

The scenario tests run twice through the ``cluster`` fixture: on the kubernetes client's model
objects behind a small fake CoreV1Api ("models"), and on a real kube-apiserver + etcd
("apiserver", tests/kube_apiserver.py; skipped - failed under CI=true - when the binaries from
scripts/build-apiserver.sh are missing). The rule tests (quantities, taints/tolerations) are pure.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner
from kube_apiserver import (  # noqa: F401  (kube_apiserver_fixture: imported to register the kube_apiserver fixture)
    KubeAPIServer,
    cache_bin,
    dry_run_create,
    find_binaries,
    free_port,
    kube_apiserver_fixture,
    lifecycle_taints,
)
from kubernetes import client as k8s

from hetlora_core.config import StoreConfig, load_config, replace
from pipelines import preflight as pf
from pipelines.cli import main

ROOT = Path(__file__).resolve().parents[1]
TIER_KEY = "hetlora.io/tier"


def taint(tier: str, effect: str = "NoSchedule") -> dict[str, str]:
    return {"key": TIER_KEY, "value": tier, "effect": effect}


def tier(name: str, rank: int, *, tolerate: bool = True, memory: str = "1Gi", cpu: str = "500m", gpu: int = 0) -> dict:
    t: dict[str, Any] = {"name": name, "rank": rank, "node_selector": {TIER_KEY: name}, "cpu_request": cpu,
                         "memory_request": memory, "memory_limit": "16Gi", "gpu": gpu}
    if tolerate:
        t["tolerations"] = [{"key": TIER_KEY, "operator": "Equal", "value": name, "effect": "NoSchedule"}]
    return t


def make_cfg(tiers: list[dict], namespace: str = "kubeflow", **extra: Any):
    return load_config(None, {"ranks.r_min": 1, "ranks.r_max": 16, "ranks.tiers": tiers,
                              "kubeflow.namespace": namespace, **extra})


# ---------------------------------------------------------------- pure rules


@pytest.mark.parametrize("q,want", [("500m", "0.5"), ("2", "2"), ("1.5Gi", str(3 * 2**29)), ("512Mi", str(2**29)),
                                    ("1e3", "1000"), ("1E3", "1000"), ("100k", "100000"), ("1M", "1000000"),
                                    ("0.5", "0.5"), ("129e6", "129000000"), ("1Ki", "1024"), ("2.5e-3", "0.0025"),
                                    ("1E", str(10**18)), ("250u", "0.00025"), (".5", "0.5"), (3, "3")])
def test_parse_quantity(q: Any, want: str) -> None:
    assert pf.parse_quantity(q) == Decimal(want)


@pytest.mark.parametrize("bad", ["", "abc", "1.5.5", "12Gb", "1 Gi", "Gi", "1e", "nan", "inf", "1KiB"])
def test_parse_quantity_rejects(bad: str) -> None:
    with pytest.raises(ValueError, match="quantity"):
        pf.parse_quantity(bad)


def T(key: str | None, op: str | None, value: str | None = None, effect: str | None = None) -> k8s.V1Toleration:
    return k8s.V1Toleration(key=key, operator=op, value=value, effect=effect)


@pytest.mark.parametrize("tol,ok", [
    (T("k", "Equal", "v", "NoSchedule"), True),
    (T("k", None, "v", "NoSchedule"), True),  # operator defaults to Equal
    (T("k", "Equal", "other", "NoSchedule"), False),
    (T("k", "Equal", "v", "NoExecute"), False),  # effect differs
    (T("k", "Equal", "v", None), True),  # empty effect matches every effect
    (T("k", "Exists", None, "NoSchedule"), True),
    (T("other", "Exists", None, None), False),
    (T(None, "Exists", None, None), True),  # empty key + Exists tolerates everything
    (T("", "Exists", None, "NoExecute"), False),  # ... but only the given effect
    (T(None, "Equal", "v", None), False),  # empty key needs Exists
    (T("k", "Gt", "3", None), True), (T("k", "Lt", "3", None), False),  # vs. numeric taint value below
    (T("k", "Bogus", "v", None), False),
])
def test_tolerates(tol: k8s.V1Toleration, ok: bool) -> None:
    value = "5" if tol.operator in ("Gt", "Lt") else "v"
    assert pf.tolerates(tol, k8s.V1Taint(key="k", value=value, effect="NoSchedule")) is ok


def test_prefer_no_schedule_does_not_block() -> None:
    node = k8s.V1Node(metadata=k8s.V1ObjectMeta(name="n"), spec=k8s.V1NodeSpec(taints=[
        k8s.V1Taint(key="a", effect="PreferNoSchedule"), k8s.V1Taint(key="b", value="x", effect="NoExecute"),
        k8s.V1Taint(key="c", effect="NoSchedule")]))
    left = pf.untolerated_taints(node, [T("c", "Exists")])
    assert [t.key for t in left] == ["b"]


# ---------------------------------------------------------------- two backends


class FakeCoreV1Api:
    """The two CoreV1Api calls preflight makes, over model objects (pages of 2 nodes, to exercise
    ``continue``)."""

    def __init__(self) -> None:
        self.nodes: dict[str, k8s.V1Node] = {}
        self.secrets: dict[tuple[str, str], k8s.V1Secret] = {}
        self.pods: list[k8s.V1Pod] = []

    def list_pod_for_all_namespaces(self, field_selector: str = "", **_: Any) -> k8s.V1PodList:
        done = {"Succeeded", "Failed"} if "status.phase!=Succeeded" in field_selector else set()
        return k8s.V1PodList(items=[p for p in self.pods if p.status.phase not in done])

    def list_node(self, limit: int | None = None, _continue: str | None = None, **_: Any) -> k8s.V1NodeList:
        names = sorted(self.nodes)
        start = int(_continue or 0)
        nxt = str(start + 2) if start + 2 < len(names) else None
        return k8s.V1NodeList(items=[self.nodes[n] for n in names[start:start + 2]], metadata=k8s.V1ListMeta(_continue=nxt))

    def read_namespaced_secret(self, name: str, namespace: str, **_: Any) -> k8s.V1Secret:
        if (namespace, name) not in self.secrets:
            raise k8s.ApiException(status=404, reason="Not Found")
        return self.secrets[(namespace, name)]


BUSY_NS = "busy"


def busy_pod(name: str, node: str, cpu: str, memory: str, phase: str) -> k8s.V1Pod:
    """A pod already bound to ``node`` (another workload holding its requests)."""
    return k8s.V1Pod(metadata=k8s.V1ObjectMeta(name=name, namespace=BUSY_NS), spec=k8s.V1PodSpec(
        node_name=node, containers=[k8s.V1Container(name="c", image="x", resources=k8s.V1ResourceRequirements(
            requests={"cpu": cpu, "memory": memory}))]), status=k8s.V1PodStatus(phase=phase))


class ModelCluster:
    kind = "models"
    kubeconfig = None

    def __init__(self) -> None:
        self.core = FakeCoreV1Api()

    def add_node(self, name: str, *, labels: dict | None = None, taints: list | None = None, cpu: str = "4",
                 memory: str = "8Gi", gpu: int = 0, ready: bool = True, unschedulable: bool = False) -> None:
        alloc = {"cpu": cpu, "memory": memory, "pods": "110"} | ({"nvidia.com/gpu": str(gpu)} if gpu else {})
        self.core.nodes[name] = k8s.V1Node(
            metadata=k8s.V1ObjectMeta(name=name, labels=labels or {}),
            spec=k8s.V1NodeSpec(taints=[k8s.V1Taint(**t) for t in lifecycle_taints(taints, ready, unschedulable)] or None,
                                unschedulable=unschedulable or None),
            status=k8s.V1NodeStatus(allocatable=alloc, conditions=[
                k8s.V1NodeCondition(type="Ready", status="True" if ready else "False")]))

    def add_pod(self, name: str, node: str, cpu: str, memory: str, phase: str = "Running") -> None:
        self.core.pods.append(busy_pod(name, node, cpu, memory, phase))

    def put_secret(self, namespace: str, name: str, data: dict[str, str]) -> None:
        import base64

        self.core.secrets[(namespace, name)] = k8s.V1Secret(
            metadata=k8s.V1ObjectMeta(name=name, namespace=namespace),
            data={k: base64.b64encode(v.encode()).decode() for k, v in data.items()})


class RealCluster:
    kind = "apiserver"

    def __init__(self, server: KubeAPIServer) -> None:
        self.server, self.core, self.kubeconfig = server, server.core, server.kubeconfig
        server.clear_nodes()
        server.ensure_namespace(BUSY_NS)
        # No kubelet here to finish a graceful delete: remove the previous test's pods at once.
        self.core.delete_collection_namespaced_pod(BUSY_NS, grace_period_seconds=0)

    def add_node(self, name: str, **kw: Any) -> None:
        self.server.add_node(name, **kw)

    def add_pod(self, name: str, node: str, cpu: str, memory: str, phase: str = "Running") -> None:
        pod = self.core.create_namespaced_pod(BUSY_NS, busy_pod(name, node, cpu, memory, phase))
        pod.status = k8s.V1PodStatus(phase=phase)
        self.core.replace_namespaced_pod_status(name, BUSY_NS, pod)

    def put_secret(self, namespace: str, name: str, data: dict[str, str]) -> None:
        self.server.put_secret(namespace, name, data)


@pytest.fixture(params=["models", "apiserver"])
def cluster(request: pytest.FixtureRequest):
    if request.param == "models":
        return ModelCluster()
    return RealCluster(request.getfixturevalue("kube_apiserver"))


@pytest.fixture
def ns() -> str:
    return f"t-{uuid.uuid4().hex[:8]}"  # a fresh namespace per test (no namespace controller to delete them)


def three_pools(c: Any, large_memory: str = "8Gi") -> None:
    """A kind-like cluster: an untainted platform node and one labelled + tainted node per tier."""
    c.add_node("platform", labels={"hetlora.io/role": "platform"}, memory="16Gi")
    for name, mem in (("small", "4Gi"), ("medium", "4Gi"), ("large", large_memory)):
        c.add_node(f"w-{name}", labels={TIER_KEY: name}, taints=[taint(name)], memory=mem)


# ---------------------------------------------------------------- scenarios (both backends)


def test_matching_nodes_pass(cluster: Any, ns: str) -> None:
    three_pools(cluster)
    cluster.put_secret(ns, "hetlora-store", {"accesskey": "a", "secretkey": "b"})
    cfg = make_cfg([tier("small", 2), tier("medium", 8), tier("large", 16, memory="6Gi")], ns)
    rep = pf.run_preflight(cfg, cluster.core, skip_store=True)
    assert rep.ok, pf.render(rep)
    assert {t.tier: t.matching for t in rep.tiers} == {"small": ["w-small"], "medium": ["w-medium"], "large": ["w-large"]}
    out = pf.render(rep)
    assert "all checks passed" in out and "large   16    cpu=500m mem=6Gi" in out


def test_untolerated_taint_fails_with_fix(cluster: Any, ns: str) -> None:
    three_pools(cluster)
    cluster.put_secret(ns, "hetlora-store", {"accesskey": "a", "secretkey": "b"})
    cfg = make_cfg([tier("small", 2), tier("large", 16, tolerate=False)], ns)
    rep = pf.run_preflight(cfg, cluster.core, skip_store=True)
    assert not rep.ok
    small, large = rep.tiers
    assert small.ok and not large.ok and large.matching == []
    assert any("taint hetlora.io/tier=large:NoSchedule not tolerated" in p.text for p in large.problems["w-large"])
    out = pf.render(rep)
    assert "add to ranks.tiers[large].tolerations: {key: hetlora.io/tier, operator: Equal, value: large, effect: NoSchedule}" in out
    assert "kubectl taint node w-large hetlora.io/tier=large:NoSchedule-" in out
    assert "preflight: FAILED" in out


def test_too_little_memory_fails(cluster: Any, ns: str) -> None:
    three_pools(cluster, large_memory="1536Mi")
    cluster.put_secret(ns, "hetlora-store", {"accesskey": "a", "secretkey": "b"})
    rep = pf.run_preflight(make_cfg([tier("large", 16, memory="2Gi")], ns), cluster.core, skip_store=True)
    (large,) = rep.tiers
    assert not large.ok
    assert [p.text for p in large.problems["w-large"]] == ["allocatable memory 1.5Gi < 2Gi"]
    assert "only 1.5Gi allocatable memory: lower ranks.tiers[large].memory_request" in pf.render(rep)


def test_gpu_and_cpu_requests(cluster: Any, ns: str) -> None:
    cluster.add_node("gpu-1", labels={TIER_KEY: "large"}, cpu="7500m", gpu=1)
    cluster.add_node("gpu-2", labels={TIER_KEY: "large"}, cpu="2", gpu=2)
    cluster.put_secret(ns, "hetlora-store", {"accesskey": "a", "secretkey": "b"})
    rep = pf.run_preflight(make_cfg([tier("large", 16, cpu="4", gpu=2)], ns), cluster.core, skip_store=True)
    (large,) = rep.tiers
    assert not large.ok
    assert [p.text for p in large.problems["gpu-1"]] == ["allocatable nvidia.com/gpu 1 < 2"]
    assert [p.text for p in large.problems["gpu-2"]] == ["allocatable cpu 2 < 4"]
    rep = pf.run_preflight(make_cfg([tier("large", 16, cpu="7.5", gpu=1)], ns), cluster.core, skip_store=True)
    assert rep.tiers[0].matching == ["gpu-1"]


def test_gpu_tier_on_a_pool_without_advertised_gpus(cluster: Any, ns: str) -> None:
    """A GPU tier whose pool nodes advertise no nvidia.com/gpu (no device plugin) fails, saying so."""
    cluster.add_node("gpu-no-plugin", labels={TIER_KEY: "large"}, cpu="8")
    cluster.add_node("gpu-ok", labels={"hetlora.io/tier": "other"}, cpu="8", gpu=1)
    cluster.put_secret(ns, "hetlora-store", {"accesskey": "a", "secretkey": "b"})
    rep = pf.run_preflight(make_cfg([tier("large", 16, gpu=1)], ns), cluster.core, skip_store=True)
    (large,) = rep.tiers
    assert not large.ok and not rep.ok
    assert [p.text for p in large.problems["gpu-no-plugin"]] == ["no allocatable nvidia.com/gpu"]
    assert any("install the NVIDIA device plugin" in f for f in large.fixes), large.fixes
    assert large.fixes[0].startswith("node gpu-no-plugin:")  # the pool member, not the relabel candidate


def test_cordoned_or_not_ready_node_does_not_count(cluster: Any, ns: str) -> None:
    cluster.add_node("w-large-1", labels={TIER_KEY: "large"}, taints=[taint("large")], unschedulable=True)
    cluster.add_node("w-large-2", labels={TIER_KEY: "large"}, taints=[taint("large")], ready=False)
    cluster.put_secret(ns, "hetlora-store", {"accesskey": "a", "secretkey": "b"})
    rep = pf.run_preflight(make_cfg([tier("large", 16)], ns), cluster.core, skip_store=True)
    (large,) = rep.tiers
    assert not large.ok
    assert [p.text for p in large.problems["w-large-1"]] == ["cordoned"]
    assert [p.text for p in large.problems["w-large-2"]] == ["not Ready"]
    assert "kubectl uncordon w-large-1" in pf.render(rep)  # the easier fix of the two is offered


def test_missing_label_suggests_labelling_a_node(cluster: Any, ns: str) -> None:
    cluster.add_node("w-big", labels={}, memory="32Gi")
    cluster.add_node("w-tiny", labels={}, memory="1Gi")
    cluster.put_secret(ns, "hetlora-store", {"accesskey": "a", "secretkey": "b"})
    rep = pf.run_preflight(make_cfg([tier("large", 16, memory="8Gi")], ns), cluster.core, skip_store=True)
    assert "kubectl label node w-big hetlora.io/tier=large --overwrite" in pf.render(rep)


def test_missing_secret_fails(cluster: Any, ns: str) -> None:
    three_pools(cluster)
    rep = pf.run_preflight(make_cfg([tier("small", 2)], ns), cluster.core, skip_store=True)
    assert rep.tiers[0].ok and not rep.ok
    sec, server = rep.checks
    assert server.name == "server tasks" and server.ok, server
    assert not sec.ok and sec.detail == f"secret {ns}/hetlora-store not found"
    assert (f"kubectl -n {ns} create secret generic hetlora-store --from-literal=accesskey=ACCESS_KEY "
            "--from-literal=secretkey=SECRET_KEY") in pf.render(rep)


def test_secret_without_secretkey_fails(cluster: Any, ns: str) -> None:
    cluster.put_secret(ns, "creds", {"accesskey": "a", "password": "b"})
    rep = pf.run_preflight(make_cfg([tier("small", 2)], ns, **{"kubeflow.store_secret": "creds"}), cluster.core,
                           skip_store=True)
    assert rep.checks[0].detail == f"secret {ns}/creds lacks key(s) secretkey"


def test_unreachable_store_fails(cluster: Any, ns: str, monkeypatch: pytest.MonkeyPatch) -> None:
    three_pools(cluster)
    cluster.put_secret(ns, "hetlora-store", {"accesskey": "a", "secretkey": "b"})
    monkeypatch.setenv("HETLORA_S3_ACCESS_KEY", "x")
    monkeypatch.setenv("HETLORA_S3_SECRET_KEY", "y")
    endpoint = f"127.0.0.1:{free_port()}"  # nothing listens here
    cfg = make_cfg([tier("small", 2)], ns, store={"kind": "s3", "endpoint": endpoint, "retry_deadline_s": 0.5})
    rep = pf.run_preflight(cfg, cluster.core)
    store = rep.checks[1]
    assert not store.ok and store.detail.startswith(f"cannot reach {endpoint}")
    assert f"is store.endpoint ({endpoint}) right" in pf.render(rep)


@pytest.mark.minio
def test_store_answers_with_the_secrets_credentials(cluster: Any, ns: str, minio_store_config: StoreConfig,
                                                     minio_server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    three_pools(cluster)
    for var in ("HETLORA_S3_ACCESS_KEY", "HETLORA_S3_SECRET_KEY"):
        monkeypatch.delenv(var)  # only the Secret has them now
    cluster.put_secret(ns, "hetlora-store", {"accesskey": minio_server.access_key, "secretkey": minio_server.secret_key})
    cfg = replace(make_cfg([tier("small", 2)], ns), store=dataclasses.asdict(minio_store_config))
    rep = pf.run_preflight(cfg, cluster.core)
    assert rep.ok, pf.render(rep)
    assert "credentials from the store secret" in rep.checks[1].detail
    cluster.put_secret(ns, "hetlora-store", {"accesskey": minio_server.access_key, "secretkey": "wrong-secret"})
    rep = pf.run_preflight(cfg, cluster.core)
    assert not rep.checks[1].ok and "rejected the credentials" in rep.checks[1].detail


def test_local_store_fails(cluster: Any, ns: str) -> None:
    rep = pf.run_preflight(make_cfg([tier("small", 2)], ns), cluster.core)
    assert not rep.checks[1].ok and "--set store.kind=s3" in rep.checks[1].fixes[0]


# ---------------------------------------------------------------- the CLI


def cli_config(tmp_path: Path, ns: str) -> str:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({"ranks": {"r_min": 1, "r_max": 16, "tiers": [tier("small", 2), tier("large", 16, tolerate=False)]},
                                    "kubeflow": {"namespace": ns}}))
    return str(path)


def test_cli_exits_nonzero_with_table(cluster: Any, ns: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    three_pools(cluster)
    if cluster.kubeconfig is None:
        monkeypatch.setattr(pf, "core_api", lambda kubeconfig, context: cluster.core)
    args = ["preflight", "-c", cli_config(tmp_path, ns), "--skip-store"]
    args += ["--kubeconfig", cluster.kubeconfig, "--context", "test"] if cluster.kubeconfig else []
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 1, res.output
    lines = res.output.splitlines()
    assert lines[0].split() == ["tier", "rank", "requests", "matching", "nodes", "status"]
    assert lines[2].split() == ["small", "2", "cpu=500m", "mem=1Gi", "w-small", "ok"]
    assert lines[3].split()[:4] == ["large", "16", "cpu=500m", "mem=1Gi"] and lines[3].endswith("FAIL")
    assert "none of 4 (selector x3, taint x3)" in lines[3]
    assert f"store secret:  FAIL  secret {ns}/hetlora-store not found" in res.output
    assert "kubectl taint node w-large hetlora.io/tier=large:NoSchedule-" in res.output
    assert "Traceback" not in res.output and isinstance(res.exception, SystemExit)  # sys.exit(1), not a crash


def test_cli_bad_quantity_in_config_is_a_clear_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pf, "core_api", lambda kubeconfig, context: FakeCoreV1Api())
    res = CliRunner().invoke(main, ["preflight", "-c", cli_config(tmp_path, "x"), "--set", "ranks.tiers=" + json.dumps(
        [tier("small", 2, memory="2GB")]), "--skip-store"])
    assert res.exit_code == 1 and "error: ranks.tiers[small]: cpu_request/memory_request: '2GB' is not a Kubernetes" in res.output


def test_cli_api_unreachable_is_a_clear_message(tmp_path: Path) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "x",
        "clusters": [{"name": "x", "cluster": {"server": f"https://127.0.0.1:{free_port()}", "insecure-skip-tls-verify": True}}],
        "users": [{"name": "u", "user": {"token": "t"}}], "contexts": [{"name": "x", "context": {"cluster": "x", "user": "u"}}]}))
    res = CliRunner().invoke(main, ["preflight", "--kubeconfig", str(kubeconfig), "--skip-store"])
    assert res.exit_code == 1
    assert "error: cannot reach the Kubernetes API at https://127.0.0.1:" in res.output
    assert "is the cluster up?" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(main, ["preflight", "--kubeconfig", str(tmp_path / "missing"), "--skip-store"])
    assert res.exit_code == 1 and "error: cannot load Kubernetes credentials" in res.output


# ---------------------------------------------------------------- manifests, server-side


def test_kind_overlay_server_side_dry_run(kube_apiserver: KubeAPIServer) -> None:
    overlay, kustomize = ROOT / "manifests" / "overlays" / "kind", cache_bin() / "kustomize"
    if not overlay.is_dir() or not kustomize.exists():
        pytest.skip(f"needs {overlay} and {kustomize} (scripts/setup.sh tools)")
    built = subprocess.run([str(kustomize), "build", str(overlay)], capture_output=True, text=True, check=True).stdout
    objs = [o for o in yaml.safe_load_all(built) if o]
    done, skipped = dry_run_create(kube_apiserver.api_client, objs)
    assert len(done) + len(skipped) == len(objs)
    assert {"Namespace", "Deployment"} <= {d.split()[0] for d in done} or {"Namespace", "StatefulSet"} <= {d.split()[0] for d in done}
    print(f"dry-run accepted {len(done)} objects; not served here (CRDs): {skipped}")


def test_build_script_is_idempotent() -> None:
    if find_binaries()[1] is None:
        pytest.skip("kube-apiserver not built")
    res = subprocess.run(["bash", str(ROOT / "scripts" / "build-apiserver.sh")], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "cached" in res.stderr, res.stderr


def test_dry_run_rejects_a_bad_manifest(kube_apiserver: KubeAPIServer) -> None:
    """The server-side check bites: an unknown field (strict validation) and a bad quantity."""
    dep = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "bad", "namespace": "default"},
           "spec": {"selector": {"matchLabels": {"a": "b"}}, "template": {"metadata": {"labels": {"a": "b"}}, "spec": {
               "containers": [{"name": "c", "image": "x", "resources": {"requests": {"memory": "12Gb"}}}]}}}}
    with pytest.raises(k8s.ApiException) as e:
        dry_run_create(kube_apiserver.api_client, [dep])
    assert e.value.status == 400 and "quantities must match the regular expression" in str(e.value.body)
    dep["spec"]["template"]["spec"]["containers"][0]["resources"] = {"requests": {"memory": "1Gi"}, "bogus": 1}
    with pytest.raises(k8s.ApiException) as e:
        dry_run_create(kube_apiserver.api_client, [dep])
    assert 'unknown field "spec.template.spec.containers[0].resources.bogus"' in json.loads(e.value.body)["message"]
    dep["spec"]["template"]["spec"]["containers"][0]["resources"] = {"requests": {"memory": "1Gi"}}
    assert dry_run_create(kube_apiserver.api_client, [dep]) == (["Deployment default/bad"], [])
    with pytest.raises(k8s.ApiException) as e:  # dry run: nothing was stored
        kube_apiserver.api_client.call_api("/apis/apps/v1/namespaces/default/deployments/bad", "GET", auth_settings=["BearerToken"])
    assert e.value.status == 404


def test_server_tasks_need_free_room_on_an_untainted_node(cluster: Any, ns: str) -> None:
    """evaluate takes the largest tier's requests and runs on an untainted node (CPU): what the pods
    already on that node request counts, finished pods do not."""
    three_pools(cluster)  # platform: 4 CPUs, untainted
    cluster.put_secret(ns, "hetlora-store", {"accesskey": "a", "secretkey": "b"})
    cfg = make_cfg([tier("small", 2), tier("large", 16, cpu="3", memory="6Gi")], ns)
    server = pf.run_preflight(cfg, cluster.core, skip_store=True).checks[-1]
    assert server.ok and "fits on platform (free)" in server.detail, server
    cluster.add_pod("done", "platform", cpu="3", memory="1Gi", phase="Succeeded")
    cluster.add_pod("store", "platform", cpu="1500m", memory="1Gi")
    rep = pf.run_preflight(cfg, cluster.core, skip_store=True)
    server = rep.checks[-1]
    assert all(t.ok for t in rep.tiers) and not server.ok and not rep.ok
    assert "the largest tier large's requests) fits on no untainted node (free)" in server.detail
    out = pf.render(rep)
    assert "node platform: only 2500m cpu free: lower ranks.tiers[large].cpu_request" in out, out
    assert "server tasks:  FAIL" in out


def test_server_tasks_without_any_untainted_node(cluster: Any, ns: str) -> None:
    for name in ("small", "large"):
        cluster.add_node(f"w-{name}", labels={TIER_KEY: name}, taints=[taint(name)])
    rep = pf.run_preflight(make_cfg([tier("small", 2), tier("large", 16)], ns), cluster.core, skip_store=True)
    server = rep.checks[-1]
    assert all(t.ok for t in rep.tiers) and not server.ok
    assert "no untainted node" in server.detail and "add a node without taints" in pf.render(rep)


def test_gpus_in_use_are_not_a_missing_device_plugin() -> None:
    """A GPU node whose one GPU a pod holds: 'free 0 < 1', not 'install the device plugin'."""
    from decimal import Decimal as D

    t = make_cfg([tier("g", 16, gpu=1)], "x").ranks.tiers[0]
    node = k8s.V1Node(metadata=k8s.V1ObjectMeta(name="n1", labels={TIER_KEY: "g"}), spec=k8s.V1NodeSpec(
        taints=[k8s.V1Taint(**taint("g"))]), status=k8s.V1NodeStatus(
        allocatable={"cpu": "16", "memory": "64Gi", pf.GPU: "1"}, conditions=[k8s.V1NodeCondition(type="Ready", status="True")]))
    probs = pf.node_problems(t, node, {"cpu": D(0), "memory": D(0), pf.GPU: D(1)})
    assert [p.tag for p in probs] == [pf.GPU] and probs[0].text.startswith("free nvidia.com/gpu 0 "), probs
    assert "device plugin" not in probs[0].fix
    assert pf.node_problems(t, node, {"cpu": D(0), "memory": D(0), pf.GPU: D(0)}) == []
