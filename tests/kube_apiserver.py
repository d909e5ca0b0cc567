"""A real kube-apiserver (with its own etcd) for tests, bound to 127.0.0.1 only.

    server = KubeAPIServer(); server.start()   # temp dir, free ports, static bearer token, waits for /readyz
    server.core                                # CoreV1Api for the admin token (group system:masters)
    server.kubeconfig                          # a kubeconfig file for the same user (for the CLI)
    server.add_node("w1", labels={...}, taints=[...], cpu="4", memory="8Gi", gpu=0, ready=True)
    server.close()

Binaries: Debian's ``etcd`` (package etcd-server) and ``kube-apiserver`` built from the
k8s.io/kubernetes Go module by ``scripts/build-apiserver.sh`` into ``$HETLORA_CACHE/bin``
(default ``~/.cache/hetlora/bin``). No controller-manager and no kubelet run: a Node is exactly
what the test writes (labels, taints, unschedulable, allocatable, Ready condition).
``kube_apiserver`` is the session fixture; test modules import it.
"""

from __future__ import annotations

import atexit
import os
import secrets
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client as k8s

HOST = "127.0.0.1"


def cache_bin() -> Path:
    return Path(os.environ.get("HETLORA_CACHE") or os.path.expanduser("~/.cache/hetlora")) / "bin"


def find_binaries() -> tuple[str | None, str | None]:
    """(etcd, kube-apiserver), each None when missing."""
    apiserver = cache_bin() / "kube-apiserver"
    return shutil.which("etcd"), (str(apiserver) if os.access(apiserver, os.X_OK) else shutil.which("kube-apiserver"))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def lifecycle_taints(taints: list[dict[str, str]] | None, ready: bool, unschedulable: bool) -> list[dict[str, str]]:
    """A node's taints once Kubernetes' node lifecycle controller has seen its conditions."""
    out = list(taints or [])
    if not ready:
        out.append({"key": "node.kubernetes.io/not-ready", "effect": "NoSchedule"})
    if unschedulable:
        out.append({"key": "node.kubernetes.io/unschedulable", "effect": "NoSchedule"})
    return out


class KubeAPIServer:
    def __init__(self, etcd: str, apiserver: str) -> None:
        self.etcd_bin, self.apiserver_bin = etcd, apiserver
        self.dir = Path(tempfile.mkdtemp(prefix="hetlora-kube-"))
        self.etcd_port, self.peer_port, self.port = free_port(), free_port(), free_port()
        self.token = secrets.token_hex(16)
        self.procs: list[subprocess.Popen[bytes]] = []
        self.startup_s = 0.0
        atexit.register(self.close)

    @property
    def url(self) -> str:
        return f"https://{HOST}:{self.port}"

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        log = open(self.dir / f"{name}.log", "wb")  # noqa: SIM115 - lives as long as the process
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=self.dir, start_new_session=True)
        self.procs.append(proc)
        return proc

    def log_tail(self, name: str, n: int = 30) -> str:
        p = self.dir / f"{name}.log"
        return "\n".join(p.read_text(errors="replace").splitlines()[-n:]) if p.exists() else ""

    def start(self, timeout_s: float = 90.0) -> None:
        t0 = time.monotonic()
        etcd_url, peer = f"http://{HOST}:{self.etcd_port}", f"http://{HOST}:{self.peer_port}"
        self._spawn("etcd", [self.etcd_bin, "--name", "t", "--data-dir", str(self.dir / "etcd"),
                             "--listen-client-urls", etcd_url, "--advertise-client-urls", etcd_url,
                             "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                             "--initial-cluster", f"t={peer}", "--log-level", "warn"])
        sa_key = self.dir / "sa.key"
        subprocess.run(["openssl", "genrsa", "-out", str(sa_key), "2048"], check=True, capture_output=True)
        (self.dir / "tokens.csv").write_text(f"{self.token},admin,admin,system:masters\n")
        certs = self.dir / "certs"
        self._spawn("kube-apiserver", [
            self.apiserver_bin, f"--etcd-servers={etcd_url}", f"--bind-address={HOST}", f"--advertise-address={HOST}",
            f"--secure-port={self.port}", f"--cert-dir={certs}", f"--token-auth-file={self.dir / 'tokens.csv'}",
            "--authorization-mode=RBAC", f"--service-account-key-file={sa_key}",
            f"--service-account-signing-key-file={sa_key}", "--service-account-issuer=https://kubernetes.default.svc",
            "--service-cluster-ip-range=10.96.0.0/16", "--disable-admission-plugins=ServiceAccount",
            "--endpoint-reconciler-type=none", "--enable-priority-and-fairness=false", "--profiling=false", "--v=1"])
        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE  # the cert is made at startup; CA set below
        last = ""
        while time.monotonic() - t0 < timeout_s:
            for name, proc in zip(("etcd", "kube-apiserver"), self.procs, strict=True):
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode}:\n{self.log_tail(name)}")
            req = urllib.request.Request(f"{self.url}/readyz", headers={"Authorization": f"Bearer {self.token}"})
            try:
                with urllib.request.urlopen(req, timeout=2, context=ctx) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, OSError) as e:
                last = str(e)
            time.sleep(0.25)
        else:
            raise RuntimeError(f"kube-apiserver not ready after {timeout_s}s ({last}):\n{self.log_tail('kube-apiserver')}")
        self.startup_s = time.monotonic() - t0
        self.ca_file = str(certs / "apiserver.crt")  # self-signed, includes 127.0.0.1
        self.kubeconfig = str(self.dir / "kubeconfig")
        Path(self.kubeconfig).write_text(
            "apiVersion: v1\nkind: Config\ncurrent-context: test\n"
            f"clusters:\n- name: test\n  cluster:\n    server: {self.url}\n    certificate-authority: {self.ca_file}\n"
            f"users:\n- name: admin\n  user:\n    token: {self.token}\n"
            "contexts:\n- name: test\n  context: {cluster: test, user: admin}\n")
        conf = k8s.Configuration(host=self.url, api_key={"authorization": self.token}, api_key_prefix={"authorization": "Bearer"})
        conf.ssl_ca_cert = self.ca_file
        self.api_client = k8s.ApiClient(conf)
        self.core = k8s.CoreV1Api(self.api_client)

    # ---------------------------------------------------------------- objects

    def add_node(self, name: str, *, labels: dict[str, str] | None = None, taints: list[dict[str, str]] | None = None,
                 cpu: str = "4", memory: str = "8Gi", gpu: int = 0, ready: bool = True,
                 unschedulable: bool = False) -> k8s.V1Node:
        """A Node as a kubelet would report it; status is written through the status subresource."""
        body = k8s.V1Node(metadata=k8s.V1ObjectMeta(name=name, labels=labels or {}),
                          spec=k8s.V1NodeSpec(taints=[k8s.V1Taint(**t) for t in taints or []] or None,
                                              unschedulable=unschedulable or None))
        node = self.core.create_node(body)
        alloc = {"cpu": cpu, "memory": memory, "pods": "110"} | ({"nvidia.com/gpu": str(gpu)} if gpu else {})
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        node.status = k8s.V1NodeStatus(capacity=alloc, allocatable=alloc, conditions=[k8s.V1NodeCondition(
            type="Ready", status="True" if ready else "False", reason="KubeletReady" if ready else "KubeletNotReady",
            last_heartbeat_time=now, last_transition_time=now)])
        self.core.replace_node_status(name, node)
        # The API server's TaintNodesByCondition admission put node.kubernetes.io/not-ready on the new
        # Node; without a node lifecycle controller, set the taints that controller would leave.
        return self.core.patch_node(name, {"spec": {"taints": lifecycle_taints(taints, ready, unschedulable) or None}})

    def clear_nodes(self) -> None:
        self.core.delete_collection_node()

    def ensure_namespace(self, name: str) -> None:
        try:
            self.core.create_namespace(k8s.V1Namespace(metadata=k8s.V1ObjectMeta(name=name)))
        except k8s.ApiException as e:
            if e.status != 409:
                raise

    def put_secret(self, namespace: str, name: str, data: dict[str, str]) -> None:
        self.ensure_namespace(namespace)
        try:
            self.core.delete_namespaced_secret(name, namespace)
        except k8s.ApiException as e:
            if e.status != 404:
                raise
        self.core.create_namespaced_secret(namespace, k8s.V1Secret(
            metadata=k8s.V1ObjectMeta(name=name), string_data=data))

    def close(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.procs.clear()
        shutil.rmtree(self.dir, ignore_errors=True)


# Registered as "kube_apiserver" under another attribute name: a test module imports the function
# to register the fixture, and its tests' ``kube_apiserver`` parameters then do not shadow the import.
@pytest.fixture(scope="session", name="kube_apiserver")
def kube_apiserver_fixture() -> Iterator[KubeAPIServer]:
    from conftest import skip_or_fail

    etcd, apiserver = find_binaries()
    if not etcd or not apiserver or not shutil.which("openssl"):
        skip_or_fail(f"real API server unavailable (etcd: {etcd}, kube-apiserver: {apiserver}, openssl: "
                     f"{shutil.which('openssl')}): run scripts/build-apiserver.sh")
    server = KubeAPIServer(etcd, apiserver)  # type: ignore[arg-type]
    try:
        server.start()
        yield server
    finally:
        server.close()


def dry_run_create(api_client: Any, objs: list[dict[str, Any]]) -> tuple[list[str], list[str]]:
    """Server-side dry-run create (strict field validation) of each object; Namespaces are created
    for real first so namespaced objects have somewhere to go. Returns (created, skipped kinds
    the server does not serve, e.g. CRDs such as ServiceMonitor); raises on the first rejection."""
    from kubernetes.dynamic import DynamicClient
    from kubernetes.dynamic.exceptions import ResourceNotFoundError

    dyn = DynamicClient(api_client)
    done, skipped = [], []
    for obj in sorted(objs, key=lambda o: o["kind"] != "Namespace"):
        try:
            res = dyn.resources.get(api_version=obj["apiVersion"], kind=obj["kind"])
        except ResourceNotFoundError:
            skipped.append(f"{obj['apiVersion']}/{obj['kind']} {obj['metadata']['name']}")
            continue
        ns = obj["metadata"].get("namespace") if res.namespaced else None
        if res.namespaced and not ns:
            ns = "default"
        params: dict[str, Any] = {"query_params": [("fieldValidation", "Strict")]}
        if obj["kind"] == "Namespace":
            try:
                res.create(body=obj, **params)
            except Exception as e:  # noqa: BLE001 - already exists is fine
                if getattr(e, "status", None) != 409:
                    raise
        else:
            res.create(body=obj, namespace=ns, dry_run="All", **params)
        done.append(f"{obj['kind']} {ns + '/' if ns else ''}{obj['metadata']['name']}")
    return done, skipped
