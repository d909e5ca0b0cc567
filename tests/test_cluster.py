"""A real cluster without Docker (scripts/cluster-up.sh): real kubelets and containerds, one node
per rank tier, the platform overlay applied, pods under their security settings, preflight.

Everything here runs against real processes: the API server, scheduler and controller-manager
place the pods, the kubelets start them through containerd and runc in real cgroups, CoreDNS
resolves Service names and kube-proxy routes Service IPs. Slow (the bring-up takes ~1-2 minutes).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import kfp_pods
import pytest
import yaml
from kube_apiserver import cache_bin
from real_cluster import NODES, RealCluster, host_paths, real_cluster_fixture  # noqa: F401  (registers the fixture)

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def kind_nodes() -> dict[str, tuple[dict[str, str], list[dict[str, str]]]]:
    """Tier -> (labels, taints) as manifests/kind/cluster.yaml declares its workers."""
    spec = yaml.safe_load((ROOT / "manifests" / "kind" / "cluster.yaml").read_text())
    out = {}
    for node in spec["nodes"]:
        if node["role"] != "worker":
            continue
        join = yaml.safe_load(node["kubeadmConfigPatches"][0])
        out[node["labels"]["hetlora.io/tier"]] = (node["labels"], join["nodeRegistration"]["taints"])
    return out


def test_one_ready_node_per_tier_labelled_and_tainted_as_the_kind_cluster(real_cluster: RealCluster) -> None:
    nodes = {n["metadata"]["name"]: n for n in real_cluster.get("nodes")["items"]}
    assert sorted(nodes) == sorted(f"hetlora-{n}" for n in NODES)
    for name, node in nodes.items():
        ready = {c["type"]: c["status"] for c in node["status"]["conditions"]}
        assert ready["Ready"] == "True", (name, node["status"]["conditions"])
        assert node["status"]["nodeInfo"]["containerRuntimeVersion"].startswith("containerd://")
    for tier, (labels, taints) in kind_nodes().items():
        node = nodes[f"hetlora-{tier}"]
        assert labels.items() <= node["metadata"]["labels"].items()
        got = [{k: t[k] for k in ("key", "value", "effect")} for t in node["spec"].get("taints", [])]
        assert got == taints, (tier, got)
    assert "taints" not in nodes["hetlora-platform"]["spec"]
    print(f"cluster up in {real_cluster.up_s:.0f} s")


def container_process(cmd_prefix: str) -> int:
    """The host PID of the one process whose command line starts with ``cmd_prefix``."""
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if cmd.startswith(cmd_prefix):
                found.append(int(d.name))
    assert len(found) == 1, (cmd_prefix, found)
    return found[0]


def effective_uid(pid: int) -> int:
    line = next(ln for ln in Path(f"/proc/{pid}/status").read_text().splitlines() if ln.startswith("Uid:"))
    return int(line.split()[2])


def root_is_read_only(pid: int) -> bool:
    for ln in Path(f"/proc/{pid}/mountinfo").read_text().splitlines():
        parts = ln.split()
        if parts[4] == "/":
            return "ro" in parts[5].split(",")
    raise AssertionError(f"no / mount for {pid}")


def cap_eff(pid: int) -> int:
    line = next(ln for ln in Path(f"/proc/{pid}/status").read_text().splitlines() if ln.startswith("CapEff:"))
    return int(line.split()[1], 16)


@pytest.mark.parametrize(("selector", "cmd", "uid"), [
    ("app.kubernetes.io/name=minio", "/usr/bin/minio server /data", 65532),
    ("app.kubernetes.io/name=pushgateway", "/bin/pushgateway ", 65534),
])
def test_platform_pods_run_ready_under_their_security_settings(real_cluster: RealCluster, selector: str, cmd: str,
                                                               uid: int) -> None:
    pods = real_cluster.get("pods", "-n", "hetlora", "-l", selector)["items"]
    assert len(pods) == 1
    pod = pods[0]
    assert pod["status"]["phase"] == "Running" and pod["spec"]["nodeName"] == "hetlora-platform"
    assert all(c["ready"] for c in pod["status"]["containerStatuses"])
    # What the kernel says of the container's process, not just what the spec asked for.
    pid = container_process(cmd)
    assert effective_uid(pid) == uid
    assert root_is_read_only(pid)
    assert cap_eff(pid) == 0  # capabilities: drop ALL
    cg = Path(f"/proc/{pid}/cgroup").read_text()
    assert "/hetlora-platform/" in cg, cg


def test_a_streaming_list_is_refused_up_front_so_clients_fall_back(real_cluster: RealCluster) -> None:
    """The etcd here (Debian 3.4) lacks RequestWatchProgress. With WatchList on, the API server answered
    a streaming list with a watch that failed at once, and Argo Workflows' controller retried it
    forever instead of listing: its pods finished while the workflow never saw them. cluster-up.sh
    turns WatchList off, so the request is refused before any watch starts and clients fall back."""
    res = subprocess.run([str(cache_bin() / "kubectl"), "--kubeconfig", real_cluster.kubeconfig, "get", "--raw",
                          "/api/v1/namespaces/default/pods?watch=1&sendInitialEvents=true&allowWatchBookmarks=true"
                          "&resourceVersionMatch=NotOlderThan&timeoutSeconds=5"], capture_output=True, text=True, timeout=60)
    assert res.returncode != 0 and "sendInitialEvents" in res.stderr, (res.returncode, res.stdout[-500:], res.stderr[-500:])
    assert "RequestWatchProgress" not in res.stdout + res.stderr
    plain = real_cluster.kubectl("get", "--raw", "/api/v1/namespaces/default/pods?watch=1&timeoutSeconds=1")
    assert "RequestWatchProgress" not in plain  # an ordinary watch works


def test_priority_classes_and_rbac_are_present(real_cluster: RealCluster) -> None:
    pcs = {p["metadata"]["name"]: p["value"] for p in real_cluster.get("priorityclasses")["items"]}
    assert {"hetlora-small", "hetlora-medium", "hetlora-large"} <= set(pcs)
    rbac = yaml.safe_load_all((ROOT / "manifests" / "base" / "rbac.yaml").read_text())
    for obj in filter(None, rbac):
        kind, name = obj["kind"].lower(), obj["metadata"]["name"]
        ns = obj["metadata"].get("namespace", "hetlora")
        assert real_cluster.get(kind, name, "-n", ns)["metadata"]["name"] == name


def run_probe(cluster: RealCluster, name: str, tier: str, script: str, timeout_s: float = 90) -> str:
    """A pod on ``tier``'s node (its selector and toleration, as a client task has them) that runs
    ``script`` in busybox sh; returns its log once it Succeeded."""
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "kubeflow"}, "spec": {
        "restartPolicy": "Never", "nodeSelector": {"hetlora.io/tier": tier},
        "tolerations": [{"key": "hetlora.io/tier", "operator": "Equal", "value": tier, "effect": "NoSchedule"}],
        "securityContext": {"runAsNonRoot": True, "runAsUser": 1000},
        "containers": [{"name": "probe", "image": "hetlora.local/toolbox:1", "imagePullPolicy": "Never",
                        "command": ["/bin/busybox", "sh", "-c", script],
                        "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}, "limits": {"memory": "32Mi"}}}]}}
    cluster.kubectl("apply", "-f", "-", stdin=json.dumps(pod))
    deadline = time.monotonic() + timeout_s
    phase = ""
    while time.monotonic() < deadline:
        p = cluster.get("pod", name, "-n", "kubeflow")
        phase = p["status"].get("phase", "")
        if phase in ("Succeeded", "Failed"):
            break
        time.sleep(1)
    logs = cluster.kubectl("logs", "-n", "kubeflow", name, check=False)
    assert phase == "Succeeded", f"{name}: {phase}\n{logs}\n{json.dumps(p['status'])[:1500]}"
    assert p["spec"]["nodeName"] == f"hetlora-{tier}"
    return logs


def test_store_reachable_by_service_name_from_a_tier_pod(real_cluster: RealCluster) -> None:
    real_cluster.kubectl("create", "namespace", "kubeflow", check=False)
    logs = run_probe(real_cluster, "store-probe", "small",
                     "busybox nslookup minio.hetlora.svc.cluster.local && "
                     "busybox wget -S -O /dev/null http://minio.hetlora.svc.cluster.local:9000/minio/health/ready 2>&1")
    svc = real_cluster.get("service", "minio", "-n", "hetlora")["spec"]["clusterIP"]
    assert f"Address: {svc}" in logs or f"Address 1: {svc}" in logs, logs  # CoreDNS answered with the Service IP
    assert re.search(r"HTTP/1.1 200", logs), logs  # kube-proxy routed it to MinIO on another node


def pod_cgroup_file(pod_uid: str, controller: str, name: str) -> str:
    """A cgroup file of a pod's cgroup on the host (cgroup v1 or v2), read from the kernel."""
    marker = "pod" + pod_uid  # cgroupfs driver: .../kubepods/<qos>/pod<uid>
    hits = [p for p in Path("/sys/fs/cgroup").glob(f"**/{marker}/{name}") if controller in str(p) or
            Path("/sys/fs/cgroup/cgroup.controllers").exists()]
    assert hits, (pod_uid, controller, name)
    return hits[0].read_text().strip()


def pod_limits(pod_uid: str) -> tuple[int, int]:
    """(memory limit in bytes, CPU quota in microseconds per 100 ms) of a pod's cgroup, v1 or v2."""
    if Path("/sys/fs/cgroup/cgroup.controllers").exists():  # cgroup v2
        quota, period = pod_cgroup_file(pod_uid, "", "cpu.max").split()
        return int(pod_cgroup_file(pod_uid, "", "memory.max")), int(int(quota) * 100000 / int(period))
    return (int(pod_cgroup_file(pod_uid, "memory", "memory.limit_in_bytes")),
            int(pod_cgroup_file(pod_uid, "/cpu/", "cpu.cfs_quota_us")))


def test_tier_limits_are_enforced_by_the_real_cgroup(real_cluster: RealCluster) -> None:
    """A client task's limits are not advisory here: a pod that outgrows its memory limit on a tier
    node is OOM-killed by the kernel, and its pod cgroup carries the CPU and memory limits."""
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "oom-probe", "namespace": "kubeflow"}, "spec": {
        "restartPolicy": "Never", "nodeSelector": {"hetlora.io/tier": "medium"},
        "tolerations": [{"key": "hetlora.io/tier", "operator": "Equal", "value": "medium", "effect": "NoSchedule"}],
        "securityContext": {"runAsNonRoot": True, "runAsUser": 1000},
        # sort keeps its whole input (256 MiB, one line) in memory: far above the 48Mi limit
        "containers": [{"name": "probe", "image": "hetlora.local/toolbox:1", "imagePullPolicy": "Never",
                        "command": ["/bin/busybox", "sh", "-c", "sleep 2; busybox head -c 268435456 /dev/zero | busybox sort >/dev/null"],
                        "resources": {"requests": {"cpu": "250m", "memory": "48Mi"}, "limits": {"cpu": "500m", "memory": "48Mi"}}}]}}
    real_cluster.kubectl("create", "namespace", "kubeflow", check=False)
    real_cluster.kubectl("apply", "-f", "-", stdin=json.dumps(pod))
    deadline, limits_seen = time.monotonic() + 90, False
    while time.monotonic() < deadline:
        p = real_cluster.get("pod", "oom-probe", "-n", "kubeflow")
        if not limits_seen and p["status"].get("phase") == "Running":
            assert pod_limits(p["metadata"]["uid"]) == (48 * 2**20, 50000)  # 500m: 50 ms of every 100 ms
            limits_seen = True
        if p["status"].get("phase") in ("Succeeded", "Failed"):
            break
        time.sleep(0.5)
    term = p["status"]["containerStatuses"][0]["state"].get("terminated", {})
    assert p["status"]["phase"] == "Failed" and term.get("reason") == "OOMKilled", json.dumps(p["status"])[:1500]
    assert p["spec"]["nodeName"] == "hetlora-medium" and limits_seen


def preflight(cluster: RealCluster, tmp_path: Path, *sets: str) -> subprocess.CompletedProcess[str]:
    args = [str(Path(sys.executable).parent / "hetlora"), "preflight", "-c", str(ROOT / "configs" / "cluster.yaml"),
            "--kubeconfig", cluster.kubeconfig]
    for s in sets:
        args += ["--set", s]
    return subprocess.run(args, capture_output=True, text=True, timeout=120, cwd=tmp_path)


def test_preflight_passes_on_the_cluster_and_names_the_fix_when_a_tier_cannot_fit(real_cluster: RealCluster,
                                                                                   tmp_path: Path) -> None:
    with real_cluster.port_forward("hetlora", "svc/minio", 9000) as port:
        ok = preflight(real_cluster, tmp_path, f"store.endpoint=127.0.0.1:{port}")
        assert ok.returncode == 0, ok.stdout + ok.stderr
        for t in ("small", "medium", "large"):
            assert re.search(rf"^{t}\s.*\shetlora-{t}\s+ok$", ok.stdout, re.M), ok.stdout
        assert "store:" in ok.stdout and "FAIL" not in ok.stdout
        # A tier asking for more CPU than its node has: FAIL with the node's allocatable and the fix.
        tiers = yaml.safe_load((ROOT / "configs" / "cluster.yaml").read_text())["ranks"]["tiers"]
        tiers[2]["cpu_request"] = tiers[2]["cpu_limit"] = "64"
        big = preflight(real_cluster, tmp_path, "ranks.tiers=" + json.dumps(tiers), f"store.endpoint=127.0.0.1:{port}")
        assert big.returncode == 1 and re.search(r"^large\s.*FAIL", big.stdout, re.M), big.stdout
        assert "cpu" in big.stdout.split("large", 1)[1]
        # The large tier at all of its node's 2 CPUs fits its node, but evaluate (which takes the largest
        # tier's requests) no longer fits beside the platform's own pods: FAIL with the free CPU.
        tiers = yaml.safe_load((ROOT / "configs" / "cluster.yaml").read_text())["ranks"]["tiers"]
        tiers[2]["cpu_request"] = "2"
        full = preflight(real_cluster, tmp_path, "ranks.tiers=" + json.dumps(tiers), f"store.endpoint=127.0.0.1:{port}")
        assert full.returncode == 1 and re.search(r"^large\s.*\shetlora-large\s+ok$", full.stdout, re.M), full.stdout
        assert "server tasks:  FAIL" in full.stdout and "node hetlora-platform: only" in full.stdout, full.stdout
        # A tier whose nodes do not exist: FAIL naming the selector.
        tiers = yaml.safe_load((ROOT / "configs" / "cluster.yaml").read_text())["ranks"]["tiers"]
        tiers[0]["node_selector"] = {"hetlora.io/tier": "xlarge"}
        none = preflight(real_cluster, tmp_path, "ranks.tiers=" + json.dumps(tiers), f"store.endpoint=127.0.0.1:{port}")
        assert none.returncode == 1 and re.search(r"^small\s.*FAIL", none.stdout, re.M), none.stdout


def wait_sandboxes(cluster: RealCluster, names: list[str], timeout_s: float = 90) -> dict[str, Any]:
    """Each pod once it is bound to a node and its container waits on its image (the sandbox, its
    cgroup and network are up); the pods by name."""
    deadline = time.monotonic() + timeout_s
    got: dict[str, Any] = {}
    while time.monotonic() < deadline and len(got) < len(names):
        for name in names:
            p = cluster.get("pod", name, "-n", "kubeflow")
            waiting = [c["state"].get("waiting", {}) for c in p["status"].get("containerStatuses", [])]
            if p["spec"].get("nodeName") and waiting and waiting[0].get("reason") == "ErrImageNeverPull":
                got[name] = p
        time.sleep(1)
    missing = {n: cluster.get("pod", n, "-n", "kubeflow")["status"] for n in names if n not in got}
    assert not missing, json.dumps(missing)[:2000]
    return got


def test_compiled_round_tasks_land_on_their_tier_nodes_under_their_limits(real_cluster: RealCluster, tmp_path: Path) -> None:
    """Every task of a compiled round as a real pod, made from the IR and the platform spec as
    Kubeflow's driver makes it: train on its tier's node with the tier's limits in its pod cgroup,
    the server steps (prune, aggregate, evaluate) on the untainted platform node. This cluster has no
    component image (tests/test_cluster_round.py runs the tasks in it), so the containers stop at their
    image (ErrImageNeverPull): placement, Secret env, cgroups and sandboxes are what is checked here."""
    ir = tmp_path / "round.yaml"
    res = subprocess.run([str(Path(sys.executable).parent / "hetlora"), "compile", "-c", str(ROOT / "configs" / "cluster.yaml"),
                          "-o", str(ir)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    real_cluster.kubectl("create", "namespace", "kubeflow", check=False)
    secret = real_cluster.get("secret", "hetlora-store", "-n", "hetlora")
    secret["metadata"] = {"name": "hetlora-store", "namespace": "kubeflow"}
    real_cluster.kubectl("apply", "-f", "-", stdin=json.dumps(secret))
    pods = kfp_pods.round_pods(ir, "kubeflow")
    assert sorted(p.task for p in pods) == sorted(["aggregate-round"] + [
        f"{k}-client{s}" for k in ("train", "prune") for s in ("", "-2", "-3")])
    tiers = {t["name"]: t for t in yaml.safe_load((ROOT / "configs" / "cluster.yaml").read_text())["ranks"]["tiers"]}
    by_exec = {"exec-train-client": "small", "exec-train-client-2": "medium", "exec-train-client-3": "large"}
    # Two waves, as the DAG runs them (the platform node has room for one wave's server steps).
    for wave in ([p for p in pods if not p.task.startswith("prune")], [p for p in pods if p.task.startswith("prune")]):
        for tp in wave:
            real_cluster.kubectl("apply", "-f", "-", stdin=json.dumps(tp.manifest))
        placed = wait_sandboxes(real_cluster, [tp.manifest["metadata"]["name"] for tp in wave])
        for tp in wave:
            p = placed[tp.manifest["metadata"]["name"]]
            tier = by_exec.get(tp.executor)
            assert p["spec"]["nodeName"] == f"hetlora-{tier or 'platform'}", (tp.task, p["spec"]["nodeName"])
            env = {e["name"]: e for e in p["spec"]["containers"][0]["env"]}
            assert env["HETLORA_S3_SECRET_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "hetlora-store"
            if tier:
                mem = tiers[tier]["memory_limit"]
                assert mem.endswith("Mi")
                assert pod_limits(p["metadata"]["uid"]) == (int(mem[:-2]) * 2**20, int(float(tiers[tier]["cpu_limit"]) * 100000))
        real_cluster.kubectl("delete", "pods", "-n", "kubeflow", "-l", "hetlora.io/task", "--wait=true", timeout=180)


def test_cluster_down_leaves_nothing_behind(real_cluster: RealCluster) -> None:
    netns = real_cluster.env["HETLORA_CLUSTER_NETNS"]
    state = Path(real_cluster.env["HETLORA_CLUSTER_DIR"])
    real_cluster.down()
    assert not Path(f"/run/netns/{netns}").exists()
    assert not state.exists()
    assert not list(Path("/sys/fs/cgroup").glob("*/hetlora-small")) and not Path("/sys/fs/cgroup/hetlora-small").exists()
    left = subprocess.run(["pgrep", "-f", str(state)], capture_output=True, text=True).stdout.split()
    assert left == [], left
    assert os.system("ip link show hlc-host >/dev/null 2>&1") != 0
    assert host_paths() == real_cluster.host_before  # the kubelets' and runtimes' default host paths untouched


# A run that holds a cluster, prints where it is once up, then waits to be killed.
HOLDER = """
import time
from real_cluster import RealCluster
c = RealCluster()
assert not c.claim(wait_s=60)
c.up()
print(c.env["HETLORA_CLUSTER_NETNS"], c.dir, flush=True)
time.sleep(900)
"""


def test_a_cluster_left_by_a_killed_run_is_removed_by_the_next_and_a_live_one_is_waited_for() -> None:
    """The failure this guards against: a test run killed mid-cluster (a CI job stopped at its time
    limit) left its veth, netns and node cgroups, and every later run on that host failed at set-up."""
    from real_cluster import VETH_HOST, missing_prerequisites

    if why := missing_prerequisites():
        pytest.skip(why)  # the fixture above already failed under CI for the same reason
    holder = subprocess.Popen([sys.executable, "-c", HOLDER], cwd=ROOT / "tests", stdout=subprocess.PIPE, text=True)
    other = RealCluster()
    try:
        assert holder.stdout is not None
        netns, held_dir = holder.stdout.readline().split()
        assert "another test run" in other.claim(wait_s=1)  # a live run's cluster is not removed...
        assert Path(f"/run/netns/{netns}").exists()
        left: list[bool] = []

        def kill() -> None:
            holder.kill()
            holder.wait(30)
            left.append(Path(f"/sys/class/net/{VETH_HOST}").exists())  # before claim()'s next poll (5 s)

        killer = threading.Timer(8, kill)  # ...but waited for: the holder dies during the wait
        killer.start()
        t0 = time.monotonic()
        assert other.claim(wait_s=120) == ""
        assert time.monotonic() - t0 >= 7
        assert left == [True]  # the killed run left its cluster behind; claim() removed it
        assert not Path(f"/run/netns/{netns}").exists() and not Path(f"/sys/class/net/{VETH_HOST}").exists()
        assert not Path(held_dir).exists()
        assert not list(Path("/sys/fs/cgroup").glob("*/hetlora-small")) and not Path("/sys/fs/cgroup/hetlora-small").exists()
        running = subprocess.run(["pgrep", "-f", held_dir], capture_output=True, text=True).stdout.split()
        assert running == [], running
    finally:
        holder.kill()
        other.down()
