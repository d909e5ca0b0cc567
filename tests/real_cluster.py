"""A real Kubernetes cluster for tests: scripts/cluster-up.sh, torn down by scripts/cluster-down.sh.

    cluster = RealCluster(); cluster.up()      # control plane + one kubelet/containerd per tier node
    cluster.kubectl("get", "nodes")           # kubectl with the admin kubeconfig
    cluster.core                              # CoreV1Api for the same admin user
    cluster.down()

Needs root (namespaces, cgroups, containerd) and the binaries that ``scripts/setup.sh`` builds
(``scripts/build-apiserver.sh --cluster``, CoreDNS); ``real_cluster`` is the session fixture, skipped
(failed under CI=true) where those are missing. Its state lives in a directory of its own and its
network namespace has a name of its own, so a developer's cluster from cluster-up.sh is untouched.

One test cluster at a time per network namespace (cluster-up.sh's veth has a fixed name): ``claim()``
waits for another test run's cluster to go, and removes one left by a run that died.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kube_apiserver import cache_bin
from kubernetes import client as k8s
from kubernetes import config as k8s_config

ROOT = Path(__file__).resolve().parents[1]
NODES = ("platform", "small", "medium", "large")
VETH_HOST = "hlc-host"  # scripts/cluster-up.sh's host-side veth: one cluster per network namespace
# The test clusters' lock: an abstract Unix socket. Its names are per network namespace, the scope of
# the conflict (a CI job in another mount or PID namespace on the same host still sees it), and the
# kernel releases it when its holder dies, however it dies: a free lock beside a test cluster's veth
# means the run that made that cluster is gone.
LOCK_NAME = "\0hetlora-test-cluster"
TEST_NETNS_PREFIX = "hetlora-test-"
# Test clusters' state: on disk, not a tmpfs /tmp (node roots are hard links into the image seed under
# ~/.cache/hetlora where the filesystem is the same, full copies where not).
STATE_ROOT = Path(os.environ.get("HETLORA_TEST_CLUSTER_ROOT", "/var/tmp"))


def _try_lock() -> socket.socket | None:
    s = socket.socket(socket.AF_UNIX)
    try:
        s.bind(LOCK_NAME)
    except OSError as e:
        s.close()
        if e.errno != errno.EADDRINUSE:
            raise
        return None
    return s


def veth_peer_netns() -> str | None:
    """The network namespace of the cluster whose host veth exists here ('' if unnamed), None if none."""
    if not Path(f"/sys/class/net/{VETH_HOST}").exists():
        return None
    out = subprocess.run(["ip", "-o", "link", "show", VETH_HOST], capture_output=True, text=True).stdout
    words = out.split()
    return words[words.index("link-netns") + 1] if "link-netns" in words else ""


class RealCluster:
    """``images``: OCI layouts put on every node besides the small ones (HETLORA_CLUSTER_IMAGES)."""

    def __init__(self, images: tuple[str, ...] = ()) -> None:
        netns = f"{TEST_NETNS_PREFIX}{os.getpid()}"
        # The netns in the directory's name lets a later run find and remove both if this run dies.
        self.dir = Path(tempfile.mkdtemp(prefix=f"hetlora-cluster-{netns}-", dir=STATE_ROOT))
        self.env = {**os.environ, "HETLORA_CLUSTER_DIR": str(self.dir / "state"),
                    "HETLORA_CLUSTER_NETNS": netns, "HETLORA_CLUSTER_IMAGES": " ".join(images)}
        self.kubeconfig = str(self.dir / "state" / "admin.kubeconfig")
        self.up_s = 0.0
        self.log = ""
        self.host_before = host_paths()
        self.lock: socket.socket | None = None

    def claim(self, wait_s: float = 2400) -> str:
        """Take the test-cluster lock of this network namespace before ``up()``: '' when taken, else why
        not. Waits up to ``wait_s`` for another test run's cluster (a CI job beside this one); removes a
        test cluster whose run died (lock free, veth left); never touches a cluster that is not a test's
        (a developer's, from cluster-up.sh: the caller is told to stop it)."""
        deadline = time.monotonic() + wait_s
        while (lock := _try_lock()) is None:
            if time.monotonic() > deadline:
                return f"another test run has held its cluster for over {wait_s:.0f} s (the lock {LOCK_NAME[1:]!r})"
            time.sleep(5)
        peer = veth_peer_netns()
        if peer == "":
            lock.close()
            return (f"the veth {VETH_HOST} of scripts/cluster-up.sh exists but its network namespace has no name here "
                    f"(made in another mount namespace, or its /run/netns entry removed): if no cluster runs, remove it "
                    f"with 'ip link del {VETH_HOST}'")
        if peer is not None and not peer.startswith(TEST_NETNS_PREFIX):
            lock.close()
            return (f"a cluster from scripts/cluster-up.sh is running (its veth {VETH_HOST} exists, network namespace "
                    f"{peer}): stop it with scripts/cluster-down.sh")
        if peer is not None:
            remove_dead_test_cluster(peer)
        self.lock = lock
        return ""

    def up(self, timeout_s: int = 900) -> None:
        t0 = time.monotonic()
        res = subprocess.run(["bash", str(ROOT / "scripts" / "cluster-up.sh")], env=self.env, capture_output=True,
                             text=True, timeout=timeout_s)
        self.up_s, self.log = time.monotonic() - t0, res.stderr
        if res.returncode != 0:
            raise RuntimeError(f"cluster-up.sh failed ({res.returncode}):\n{res.stderr[-3000:]}\n{self.logs_tail()}")
        self.api_client = k8s_config.new_client_from_config(config_file=self.kubeconfig)
        self.core = k8s.CoreV1Api(self.api_client)

    def logs_tail(self, n: int = 15) -> str:
        logs = self.dir / "state" / "logs"
        if not logs.is_dir():
            return ""
        return "\n".join(f"--- {p.name}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-n:])
                         for p in sorted(logs.glob("*.log")))

    def kubectl(self, *args: str, check: bool = True, timeout: float = 120, stdin: str | None = None) -> str:
        res = subprocess.run([str(cache_bin() / "kubectl"), "--kubeconfig", self.kubeconfig, *args], input=stdin,
                             capture_output=True, text=True, timeout=timeout)
        if check and res.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)}: {res.stderr.strip()}")
        return res.stdout

    def get(self, *args: str) -> Any:
        return json.loads(self.kubectl("get", *args, "-o", "json"))

    def down(self) -> str:
        res = subprocess.run(["bash", str(ROOT / "scripts" / "cluster-down.sh")], env=self.env, capture_output=True,
                             text=True, timeout=300)
        shutil.rmtree(self.dir, ignore_errors=True)
        if self.lock is not None and not Path(f"/sys/class/net/{VETH_HOST}").exists():
            self.lock.close()  # kept if the cluster could not be removed: the next run then finds it dead
            self.lock = None
        return res.stderr


    @contextlib.contextmanager
    def port_forward(self, namespace: str, target: str, remote: int) -> Iterator[int]:
        """A ``kubectl port-forward`` to ``target``'s port ``remote``, open; yields the local port.
        Its output goes to a file (a pipe nobody reads would fill up and stall the forward)."""
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        log = self.dir / f"port-forward-{port}.log"
        with open(log, "w") as out:
            fwd = subprocess.Popen([str(cache_bin() / "kubectl"), "--kubeconfig", self.kubeconfig, "-n", namespace,
                                    "port-forward", target, f"{port}:{remote}"], stdout=out, stderr=subprocess.STDOUT)
        try:
            for _ in range(60):
                if fwd.poll() is not None:
                    break
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    time.sleep(0.5)
            else:
                raise RuntimeError(f"port-forward to {namespace}/{target}:{remote} never answered: {log.read_text()[-500:]}")
            if fwd.poll() is not None:
                raise RuntimeError(f"port-forward to {namespace}/{target}:{remote} exited: {log.read_text()[-500:]}")
            yield port
        finally:
            fwd.terminate()
            try:
                fwd.wait(10)
            except subprocess.TimeoutExpired:
                fwd.kill()
                fwd.wait(10)


# Host paths the runtime writes by default (scripts/cluster-up.sh gives each node private copies).
HOST_PATHS = ("/run/containerd", "/run/netns", "/var/lib/cni", "/etc/cni/net.d", "/var/lib/kubelet", "/var/log/containers")


def host_paths() -> dict[str, list[str] | None]:
    """Each of HOST_PATHS: its entries, or None where it does not exist."""
    return {p: sorted(os.listdir(p)) if os.path.isdir(p) else None for p in HOST_PATHS}


def remove_dead_test_cluster(netns: str) -> None:
    """Remove the test cluster of network namespace ``netns`` whose run died (the caller holds the lock):
    cluster-down.sh with its state directory (named after the netns) kills what still runs there."""
    states = sorted(STATE_ROOT.glob(f"hetlora-cluster-{netns}-*/state")) or [
        STATE_ROOT / f"hetlora-cluster-{netns}-gone" / "state"]
    for state in states:
        env = {**os.environ, "HETLORA_CLUSTER_DIR": str(state), "HETLORA_CLUSTER_NETNS": netns}
        res = subprocess.run(["bash", str(ROOT / "scripts" / "cluster-down.sh")], env=env, capture_output=True,
                             text=True, timeout=300)
        if res.returncode != 0:
            raise RuntimeError(f"removing the dead test cluster {netns} ({state}) failed: {res.stderr[-2000:]}")
        shutil.rmtree(state.parent, ignore_errors=True)
    if Path(f"/sys/class/net/{VETH_HOST}").exists():
        raise RuntimeError(f"the dead test cluster {netns} left its veth {VETH_HOST} after cluster-down.sh")


def missing_prerequisites() -> str:
    """Why a real cluster cannot start here, or ''."""
    if os.geteuid() != 0:
        return "needs root (network/mount namespaces, cgroups, containerd)"
    need = [cache_bin() / c for c in ("kubelet", "kube-apiserver", "kube-controller-manager", "kube-scheduler",
                                       "kube-proxy", "kubectl", "coredns", "minio", "kustomize")]
    absent = [p.name for p in need if not os.access(p, os.X_OK)]
    absent += [c for c in ("containerd", "runc", "etcd", "nsenter", "iptables", "prometheus-pushgateway") if not shutil.which(c)]
    return f"missing {', '.join(absent)}: run scripts/setup.sh (it builds and installs them)" if absent else ""


def started(image: bool = False) -> Iterator[RealCluster]:
    """The body of a cluster fixture: skip (fail under CI) where a cluster cannot start here, else one
    cluster, torn down at the end; ``image``: with the component image on every node."""
    from conftest import skip_or_fail

    if why := missing_prerequisites():
        skip_or_fail(f"real cluster unavailable: {why}")
    cluster = RealCluster()
    try:
        why = cluster.claim()
    except BaseException:
        shutil.rmtree(cluster.dir, ignore_errors=True)
        raise
    if why:
        shutil.rmtree(cluster.dir, ignore_errors=True)
        skip_or_fail(f"real cluster unavailable: {why}")
    try:
        if image:  # built under the lock: the build rewrites the layout another run's cluster may be reading
            cluster.env["HETLORA_CLUSTER_IMAGES"] = component_image()
        cluster.up(timeout_s=1800 if image else 900)  # a new image is unpacked once into the nodes' seed
        yield cluster
    finally:
        cluster.down()


# Module scope: tests/test_cluster.py ends by tearing it down and checking that nothing is left.
@pytest.fixture(scope="module", name="real_cluster")
def real_cluster_fixture() -> Iterator[RealCluster]:
    yield from started()


@pytest.fixture(scope="module", name="image_cluster")
def image_cluster_fixture() -> Iterator[RealCluster]:
    """A real cluster whose every node has the component image (tests/test_cluster_round.py)."""
    yield from started(image=True)


IMAGE_OCI = Path(os.environ.get("HETLORA_IMAGE_DIR", str(cache_bin().parent / "image"))) / "oci"


def component_image() -> str:
    """The component image of ``images/Dockerfile`` as an OCI layout, brought up to date with this
    checkout by ``scripts/build-image.sh`` (cached by its inputs: after a code change only the
    project's layers are rebuilt, ~1.5 minutes). Outside CI a machine that never built it skips
    instead of starting a first ~5-minute build (scripts/setup.sh builds it where it runs as root)."""
    from conftest import in_ci, skip_or_fail

    if not in_ci() and not (IMAGE_OCI / "index.json").is_file():
        skip_or_fail(f"the component image was never built here ({IMAGE_OCI}): run scripts/build-image.sh (as root)")
    res = subprocess.run(["bash", str(ROOT / "scripts" / "build-image.sh")], capture_output=True, text=True, timeout=3600)
    if res.returncode != 0:
        raise RuntimeError(f"scripts/build-image.sh failed ({res.returncode}):\n{res.stderr[-3000:]}")
    return res.stdout.strip().splitlines()[-1]
