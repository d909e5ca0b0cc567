"""The kustomize manifests: every overlay builds, validates strictly against Kubernetes' schemas,
and holds the security properties the deployment promises (asserted on the built YAML)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from hetlora_core.config import RankConfig

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = ROOT / "manifests"
OVERLAYS = ("kind", "production", "cluster")
BUILDS = ("base", *OVERLAYS)
# Kubernetes versions to validate against: kind's node image (manifests/kind/cluster.yaml) and an
# older release still common in production clusters.
K8S_VERSIONS = ("1.37.0", "1.33.0")
# Custom resources have no schema in kubernetes-validate (it ships the built-in API only), so they
# are skipped in the schema validation and checked field by field below instead. Listed
# explicitly: any other unknown kind fails the test.
CRD_API_VERSIONS = {"monitoring.coreos.com/v1"}
WORKLOAD_KINDS = {"Pod", "Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job", "CronJob"}
TIERS = tuple(t.name for t in RankConfig().tiers)  # small, medium, large


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def kustomize_bin() -> str:
    cache_dir = os.environ.get("HETLORA_CACHE") or os.path.expanduser("~/.cache/hetlora")
    path = Path(cache_dir) / "bin" / "kustomize"
    found = str(path) if path.is_file() else shutil.which("kustomize")
    if found is None:
        reason = f"kustomize not found at {path}: run scripts/setup.sh tools"
        if in_ci():
            pytest.fail(f"{reason} (CI=true: failing instead of skipping)", pytrace=False)
        pytest.skip(reason)
    return found


@cache
def _build(path: str, kustomize: str) -> tuple[dict[str, Any], ...]:
    out = subprocess.run([kustomize, "build", path], capture_output=True, text=True, check=False)
    assert out.returncode == 0, f"kustomize build {path} failed:\n{out.stderr}"
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


def build(name: str) -> list[dict[str, Any]]:
    path = MANIFESTS / ("base" if name == "base" else f"overlays/{name}")
    return list(_build(str(path), kustomize_bin()))


def find(docs: list[dict], kind: str, name: str | None = None) -> list[dict]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def one(docs: list[dict], kind: str, name: str) -> dict:
    found = find(docs, kind, name)
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def pod_spec(doc: dict) -> dict:
    if doc["kind"] == "Pod":
        return doc["spec"]
    if doc["kind"] == "CronJob":
        return doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return doc["spec"]["template"]["spec"]


# ---------------------------------------------------------------- build + schema


@pytest.mark.parametrize("name", BUILDS)
def test_builds_and_validates_strictly(name: str) -> None:
    import kubernetes_validate as kv

    docs = build(name)
    assert len(docs) >= 10
    validated = 0
    for doc in docs:
        where = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
        if doc["apiVersion"] in CRD_API_VERSIONS:
            continue  # no schema for custom resources: checked in test_servicemonitor_*
        for version in K8S_VERSIONS:
            try:
                kv.validate(doc, version, strict=True)
            except kv.SchemaNotFoundError:
                pytest.fail(f"{name}: {where}: no schema for {doc['apiVersion']} in Kubernetes {version}; "
                            "if it is a custom resource, add its apiVersion to CRD_API_VERSIONS and check it here")
            except kv.ValidationError as e:
                pytest.fail(f"{name}: {where} is invalid for Kubernetes {version} at "
                            f"{'.'.join(map(str, e.path))}: {e.message}")
        validated += 1
    assert validated >= 10


def test_the_schema_check_can_fail() -> None:
    import kubernetes_validate as kv

    bad = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x"},
           "spec": {"selector": {}, "template": {"spec": {"containers": [{"name": "c", "imagee": "x"}]}}}}
    with pytest.raises(kv.ValidationError):
        kv.validate(bad, K8S_VERSIONS[0], strict=True)


@pytest.mark.parametrize("name", BUILDS)
def test_namespaced_objects_have_a_namespace_and_names_are_unique(name: str) -> None:
    docs = build(name)
    cluster_scoped = {"Namespace", "PriorityClass", "ClusterRole", "ClusterRoleBinding",
                      "CustomResourceDefinition"}
    ids = []
    for d in docs:
        ns = d["metadata"].get("namespace")
        if d["kind"] in cluster_scoped:
            assert ns is None, f"{d['kind']}/{d['metadata']['name']} is cluster-scoped"
        else:
            assert ns, f"{d['kind']}/{d['metadata']['name']} has no namespace"
        ids.append((d["apiVersion"], d["kind"], ns, d["metadata"]["name"]))
    assert len(ids) == len(set(ids))


# ---------------------------------------------------------------- pod security


@pytest.mark.parametrize("name", BUILDS)
def test_every_workload_is_locked_down(name: str) -> None:
    docs = build(name)
    workloads = [d for d in docs if d["kind"] in WORKLOAD_KINDS]
    assert len(workloads) >= (1 if name == "production" else 2), "no workloads: the check would be vacuous"
    for w in workloads:
        where = f"{name}: {w['kind']}/{w['metadata']['name']}"
        spec = pod_spec(w)
        psc = spec.get("securityContext", {})
        assert psc.get("runAsNonRoot") is True, f"{where}: pod runAsNonRoot"
        assert psc.get("seccompProfile", {}).get("type") == "RuntimeDefault", f"{where}: pod seccompProfile"
        assert psc.get("runAsUser", 1) != 0, f"{where}: runAsUser 0"
        for flag in ("hostNetwork", "hostPID", "hostIPC"):
            assert not spec.get(flag), f"{where}: {flag}"
        for vol in spec.get("volumes", []):
            assert "hostPath" not in vol, f"{where}: hostPath volume {vol['name']}"
        assert spec.get("automountServiceAccountToken") is False, f"{where}: needs no API token"
        assert spec.get("serviceAccountName") not in (None, "default"), f"{where}: own ServiceAccount"
        containers = spec.get("initContainers", []) + spec["containers"]
        for c in containers:
            cw = f"{where} container {c['name']}"
            sc = c.get("securityContext", {})
            assert sc.get("allowPrivilegeEscalation") is False, f"{cw}: allowPrivilegeEscalation"
            assert sc.get("readOnlyRootFilesystem") is True, f"{cw}: readOnlyRootFilesystem"
            assert sc.get("privileged", False) is False, f"{cw}: privileged"
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], f"{cw}: capabilities.drop"
            assert not sc.get("capabilities", {}).get("add"), f"{cw}: capabilities.add"
            assert sc.get("runAsNonRoot", psc.get("runAsNonRoot")) is True, f"{cw}: runAsNonRoot"
            assert sc.get("seccompProfile", psc.get("seccompProfile", {})).get("type") == "RuntimeDefault", cw
            res = c.get("resources", {})
            for kind in ("requests", "limits"):
                for r in ("cpu", "memory"):
                    assert r in res.get(kind, {}), f"{cw}: resources.{kind}.{r}"
            image = c["image"]
            assert re.search(r":[\w][\w.-]{0,127}$|@sha256:[0-9a-f]{64}$", image), f"{cw}: image {image} not pinned"
            assert not image.endswith(":latest"), f"{cw}: image {image} uses :latest"
            # a read-only root needs somewhere to write: every workload here mounts its scratch space
            assert c.get("volumeMounts"), f"{cw}: no writable volume for a read-only root filesystem"


def test_namespace_enforces_the_restricted_pod_security_standard() -> None:
    ns = one(build("base"), "Namespace", "hetlora")
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


# ---------------------------------------------------------------- network, scheduling, RBAC, secrets


def _allowed_from(policy: dict) -> list[tuple[set[str], set[int]]]:
    out = []
    for rule in policy["spec"].get("ingress", []):
        namespaces: set[str] = set()
        for peer in rule.get("from", []):
            for expr in peer.get("namespaceSelector", {}).get("matchExpressions", []):
                if expr["key"] == "kubernetes.io/metadata.name" and expr["operator"] == "In":
                    namespaces |= set(expr["values"])
            if peer.get("namespaceSelector", {}).get("matchLabels", {}).get("kubernetes.io/metadata.name"):
                namespaces.add(peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"])
        out.append((namespaces, {p["port"] for p in rule.get("ports", [])}))
    return out


@pytest.mark.parametrize("name", BUILDS)
def test_network_policies(name: str) -> None:
    docs = build(name)
    policies = find(docs, "NetworkPolicy")
    deny = one(docs, "NetworkPolicy", "default-deny-ingress")
    assert deny["spec"]["podSelector"] == {} and deny["spec"]["policyTypes"] == ["Ingress"]
    assert "ingress" not in deny["spec"]
    pg = one(docs, "NetworkPolicy", "allow-pushgateway")
    assert pg["spec"]["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "pushgateway"}
    rules = _allowed_from(pg)
    assert any({"hetlora", "kubeflow", "monitoring"} <= ns and ports == {9091} for ns, ports in rules), rules
    has_minio = bool(find(docs, "StatefulSet", "minio"))
    if has_minio:
        mp = one(docs, "NetworkPolicy", "allow-minio")
        assert any({"hetlora", "kubeflow"} <= ns and ports == {9000} for ns, ports in _allowed_from(mp))
    # every pod selected by an allow policy exists (a typo would leave the service unreachable)
    pod_labels = [d["spec"]["template"]["metadata"]["labels"] for d in docs
                  if d["kind"] in {"Deployment", "StatefulSet"}]
    for p in policies:
        sel = p["spec"]["podSelector"].get("matchLabels", {})
        if sel:
            assert any(sel.items() <= labels.items() for labels in pod_labels), f"{p['metadata']['name']} selects nothing"


def test_services_select_their_pods() -> None:
    docs = build("base")
    for svc in find(docs, "Service"):
        sel = svc["spec"]["selector"]
        targets = [d for d in docs if d["kind"] in {"Deployment", "StatefulSet"}
                   and sel.items() <= d["spec"]["template"]["metadata"]["labels"].items()]
        assert len(targets) == 1, f"Service {svc['metadata']['name']} selects {len(targets)} workloads"
        ports = {p["name"] for c in pod_spec(targets[0])["containers"] for p in c.get("ports", [])}
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in ports, f"Service {svc['metadata']['name']}: no container port {port}"


@pytest.mark.parametrize("name", BUILDS)
def test_one_priority_class_per_tier(name: str) -> None:
    docs = build(name)
    classes = {d["metadata"]["name"]: d for d in find(docs, "PriorityClass")}
    assert set(classes) == {f"hetlora-{t}" for t in TIERS}
    values = [classes[f"hetlora-{t}"]["value"] for t in ("small", "medium", "large")]
    assert values == sorted(values) and len(set(values)) == 3
    for pc in classes.values():
        assert pc.get("globalDefault") is False
        assert 0 < pc["value"] < 1_000_000_000  # below the system-* classes
        assert pc.get("preemptionPolicy") == "Never"


@pytest.mark.parametrize("name,secret,namespace", [("base", "hetlora-store", "hetlora"),
                                                   ("kind", "hetlora-store", "hetlora"),
                                                   ("production", "mlpipeline-minio-artifact", "kubeflow")])
def test_driver_rbac_is_least_privilege(name: str, secret: str, namespace: str) -> None:
    docs = build(name)
    assert not find(docs, "ClusterRole") and not find(docs, "ClusterRoleBinding"), "no cluster-wide rights"
    role = one(docs, "Role", "hetlora-driver")
    assert role["metadata"]["namespace"] == namespace
    for rule in role["rules"]:
        for field in ("apiGroups", "resources", "verbs"):
            assert "*" not in rule[field], f"wildcard in {field}: {rule}"
        assert not {"delete", "deletecollection", "patch", "update", "escalate", "bind", "impersonate"} \
            & set(rule["verbs"]), rule
    secrets = [r for r in role["rules"] if "secrets" in r["resources"]]
    assert secrets == [{"apiGroups": [""], "resources": ["secrets"], "resourceNames": [secret], "verbs": ["get"]}]
    core = [r for r in role["rules"] if "" in r["apiGroups"]]
    assert core == secrets, "the driver needs no other core resources (pods, exec, configmaps...)"
    kfp = {res: set(r["verbs"]) for r in role["rules"] if r["apiGroups"] == ["pipelines.kubeflow.org"]
           for res in r["resources"]}
    assert kfp == {"runs": {"create", "get", "list"}, "experiments": {"create", "get", "list"}}
    binding = one(docs, "RoleBinding", "hetlora-driver")
    assert binding["metadata"]["namespace"] == namespace
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "hetlora-driver"}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "hetlora-driver", "namespace": namespace}]
    one(docs, "ServiceAccount", "hetlora-driver")


@pytest.mark.parametrize("name", BUILDS)
def test_no_secret_is_shipped(name: str) -> None:
    assert not find(build(name), "Secret"), "credentials are created out of band (see minio/secret.template.yaml)"


def test_secret_template_holds_placeholders_only() -> None:
    path = MANIFESTS / "base" / "minio" / "secret.template.yaml"
    doc = yaml.safe_load(path.read_text())
    assert doc["kind"] == "Secret" and doc["metadata"]["name"] == "hetlora-store"
    assert set(doc["stringData"]) == {"accesskey", "secretkey"}
    assert all(v.startswith("REPLACE_") for v in doc["stringData"].values())
    assert "data" not in doc
    kustomization = yaml.safe_load((MANIFESTS / "base" / "kustomization.yaml").read_text())
    assert not [r for r in kustomization["resources"] if "secret" in r], "the template must never be applied"


# ---------------------------------------------------------------- monitoring objects


@pytest.mark.parametrize("name", BUILDS)
def test_servicemonitor_scrapes_the_pushgateway_with_honor_labels(name: str) -> None:
    docs = build(name)
    sm = one(docs, "ServiceMonitor", "hetlora-pushgateway")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(sm["spec"]) <= {"selector", "namespaceSelector", "endpoints", "jobLabel"}
    svc = one(docs, "Service", "pushgateway")
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert sm["spec"]["namespaceSelector"] == {"matchNames": [svc["metadata"]["namespace"]]}
    (ep,) = sm["spec"]["endpoints"]
    assert ep["honorLabels"] is True
    assert ep["port"] in {p["name"] for p in svc["spec"]["ports"]}
    assert re.fullmatch(r"\d+[smh]", ep["interval"])
    if name == "production":
        assert sm["metadata"]["labels"]["release"], "kube-prometheus-stack selects ServiceMonitors by release"


def test_scrape_config_is_valid_for_prometheus(tmp_path: Path) -> None:
    cm = one(build("base"), "ConfigMap", "hetlora-prometheus-scrape-config")
    jobs = yaml.safe_load(cm["data"]["scrape-config.yaml"])
    assert len(jobs) == 1 and jobs[0]["honor_labels"] is True
    assert jobs[0]["static_configs"][0]["targets"] == ["pushgateway.hetlora.svc.cluster.local:9091"]
    promtool = shutil.which("promtool")
    if promtool is None:
        if in_ci():
            pytest.fail("promtool not found (Debian package prometheus)", pytrace=False)
        pytest.skip("promtool not found: run scripts/setup.sh tools (Debian package prometheus)")
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump({"global": {"scrape_interval": "15s"}, "scrape_configs": jobs}))
    out = subprocess.run([promtool, "check", "config", str(config)], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    config.write_text(yaml.safe_dump({"scrape_configs": [{**jobs[0], "honor_labels": "maybe"}]}))
    bad = subprocess.run([promtool, "check", "config", str(config)], capture_output=True, text=True, check=False)
    assert bad.returncode != 0, "promtool accepted a broken config: the check above proves nothing"


# ---------------------------------------------------------------- overlays


def test_kind_overlay_is_small() -> None:
    for name, most in (("kind", 5), ("base", 1000)):
        sts = one(build(name), "StatefulSet", "minio")
        (claim,) = sts["spec"]["volumeClaimTemplates"]
        size = claim["spec"]["resources"]["requests"]["storage"]
        assert size.endswith("Gi") and int(size[:-2]) <= most, (name, size)
    kind_sts = one(build("kind"), "StatefulSet", "minio")
    base_sts = one(build("base"), "StatefulSet", "minio")
    assert kind_sts["spec"]["volumeClaimTemplates"] != base_sts["spec"]["volumeClaimTemplates"]


def test_production_switches_to_kubeflows_object_store() -> None:
    docs = build("production")
    for kind, name in (("StatefulSet", "minio"), ("Service", "minio"), ("Service", "minio-headless"),
                       ("NetworkPolicy", "allow-minio"), ("ServiceAccount", "minio")):
        assert not find(docs, kind, name), f"production still ships {kind}/{name}"
    ep = one(docs, "ConfigMap", "hetlora-endpoints")["data"]
    assert ep["HETLORA_STORE_ENDPOINT"] == "minio-service.kubeflow.svc.cluster.local:9000"
    assert ep["HETLORA_STORE_SECRET"] == "mlpipeline-minio-artifact"
    assert ep["HETLORA_PUSHGATEWAY_URL"] == "http://pushgateway.hetlora.svc.cluster.local:9091"
    pg = one(docs, "Deployment", "pushgateway")
    (vol,) = [v for v in pod_spec(pg)["volumes"] if v["name"] == "data"]
    assert vol == {"name": "data", "persistentVolumeClaim": {"claimName": "pushgateway-data"}}
    one(docs, "PersistentVolumeClaim", "pushgateway-data")
    base_ep = one(build("base"), "ConfigMap", "hetlora-endpoints")["data"]
    assert base_ep["HETLORA_STORE_ENDPOINT"] == "minio.hetlora.svc.cluster.local:9000"


def test_endpoints_name_real_services() -> None:
    docs = build("base")
    ep = one(docs, "ConfigMap", "hetlora-endpoints")["data"]
    for value in (ep["HETLORA_PUSHGATEWAY_URL"], ep["HETLORA_STORE_ENDPOINT"]):
        m = re.search(r"(?:https?://)?([a-z0-9-]+)\.([a-z0-9-]+)\.svc\.cluster\.local:(\d+)$", value)
        assert m, value
        svc = one(docs, "Service", m.group(1))
        assert svc["metadata"]["namespace"] == m.group(2)
        assert int(m.group(3)) in {p["port"] for p in svc["spec"]["ports"]}
    # the env var the metrics code reads
    from hetlora_core import metrics

    assert metrics.ENV_URL in ep


# ---------------------------------------------------------------- kind cluster


def test_kind_cluster_has_one_tainted_worker_per_tier() -> None:
    cfg = yaml.safe_load((MANIFESTS / "kind" / "cluster.yaml").read_text())
    assert cfg["kind"] == "Cluster" and cfg["apiVersion"] == "kind.x-k8s.io/v1alpha4"
    roles = [n["role"] for n in cfg["nodes"]]
    assert roles.count("control-plane") == 1 and roles.count("worker") == len(TIERS)
    seen = []
    for node in cfg["nodes"]:
        if node["role"] != "worker":
            continue
        tier = node["labels"]["hetlora.io/tier"]
        patches = [yaml.safe_load(p) for p in node["kubeadmConfigPatches"]]
        (join,) = [p for p in patches if p["kind"] == "JoinConfiguration"]
        assert join["nodeRegistration"]["taints"] == [
            {"key": "hetlora.io/tier", "value": tier, "effect": "NoSchedule"}]
        seen.append(tier)
    assert sorted(seen) == sorted(TIERS)
    (cp,) = [n for n in cfg["nodes"] if n["role"] == "control-plane"]
    (init,) = [yaml.safe_load(p) for p in cp["kubeadmConfigPatches"]]
    assert init["kind"] == "InitConfiguration" and init["nodeRegistration"]["taints"] == []
    images = {n.get("image") for n in cfg["nodes"]}
    assert len(images) == 1 and re.fullmatch(r"kindest/node:v\d+\.\d+\.\d+(@sha256:[0-9a-f]{64})?", images.pop())


def test_cluster_overlay_is_kind_with_local_images() -> None:
    """overlays/cluster (scripts/cluster-up.sh) changes only the images and never pulls."""
    kind, local = build("kind"), build("cluster")
    assert sorted((d["kind"], d["metadata"]["name"]) for d in kind) == sorted((d["kind"], d["metadata"]["name"]) for d in local)
    for k, name, image in (("StatefulSet", "minio", one(kind, "StatefulSet", "minio")), ("Deployment", "pushgateway", None)):
        (c,) = pod_spec(one(local, k, name))["containers"]
        assert c["imagePullPolicy"] == "Never"
        if image is not None:  # MinIO keeps its name: cluster-up.sh builds it from the same module version
            assert c["image"] == pod_spec(image)["containers"][0]["image"]
        else:
            assert c["image"] == "hetlora.local/pushgateway:debian"
