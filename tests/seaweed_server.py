"""A real SeaweedFS (Kubeflow's default object store since KFP 2.15) for tests, bound to 127.0.0.1 only.

    server = SeaweedServer()        # binary from find_weed(); temp data dir; random ports and S3 identity
    server.start()                  # waits until an authenticated S3 request is answered
    server.stop(); server.restart() # restart keeps the ports, the data dir and the identity
    server.close()                  # stop and delete the temp dir

The same attributes as ``MinioServer`` (``endpoint``, ``access_key``, ``secret_key``, ``bucket``,
``startup_s``, ...), so a test written against one runs against the other. One ``weed server``
process runs master, volume server, filer and the S3 gateway (what Kubeflow's SeaweedFS deployment
runs too); the WebDAV, SFTP, IAM, MQ, Iceberg and Lance side servers stay off.

The binary is built by ``scripts/setup.sh tools`` into ``$HETLORA_CACHE/bin/weed``
(default ``~/.cache/hetlora/bin/weed``); a ``weed`` on PATH is used otherwise.
"""

from __future__ import annotations

import atexit
import json
import os
import secrets
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from minio_server import HOST, free_port


def weed_binary_path() -> Path:
    """Where scripts/setup.sh puts the SeaweedFS binary."""
    cache = os.environ.get("HETLORA_CACHE") or os.path.expanduser("~/.cache/hetlora")
    return Path(cache) / "bin" / "weed"


def find_weed() -> str | None:
    """The SeaweedFS ``weed`` binary, or None when it has not been built."""
    path = weed_binary_path()
    if path.is_file() and os.access(path, os.X_OK):
        return str(path)
    return shutil.which("weed")


def _distinct_ports(n: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < n:
        if (p := free_port()) not in ports:
            ports.append(p)
    return ports


class SeaweedServer:
    """One ``weed server -filer -s3`` process; ``endpoint``, ``access_key``, ``secret_key``, ``bucket`` for clients."""

    tls = False  # the TLS tests stay on MinIO (tests/test_store.py::test_s3_tls says why)
    ca_file: str | None = None
    # After a restart with data, SeaweedFS's master refuses volume assignments for 3 heartbeat
    # pulses (15 s, fixed: "master is warming up, topology is still loading"); the S3 gateway holds
    # PUTs meanwhile (reads work). start() waits this out; a client writing across a restart sees it.
    restart_write_pause_s = 15.0

    def __init__(self, binary: str | None = None, *, bucket: str = "hetlora-test") -> None:
        found = binary or find_weed()
        if not found:
            raise FileNotFoundError(f"SeaweedFS binary not found at {weed_binary_path()}: run scripts/setup.sh tools")
        self.binary, self.bucket = found, bucket
        self.workdir = Path(tempfile.mkdtemp(prefix="hetlora-weed-"))
        self.data_dir = self.workdir / "data"
        self.data_dir.mkdir()
        self.log_path = self.workdir / "weed.log"
        (self.port, self.master_port, self.master_grpc, self.volume_port, self.volume_grpc,
         self.filer_port, self.filer_grpc, self.s3_grpc) = _distinct_ports(8)
        self.access_key = "hl" + secrets.token_hex(6)
        self.secret_key = secrets.token_urlsafe(24)
        # Security: with no identities SeaweedFS's S3 gateway lets anyone in (anonymous admin), so the
        # config names exactly one identity and no "anonymous" one: unsigned requests are refused.
        # The file holds the secret, so it is private to this user.
        self.config_path = self.workdir / "s3.json"
        fd = os.open(self.config_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"identities": [{"name": "hetlora-test", "credentials": [
                {"accessKey": self.access_key, "secretKey": self.secret_key}],
                "actions": ["Admin", "Read", "List", "Tagging", "Write"]}]}, f)
        # weed reads master.toml from its working directory first: grow 1 volume per collection
        # (bucket), not 7, so a test's fresh bucket takes its first write in milliseconds.
        (self.workdir / "master.toml").write_text("[master.volume_growth]\ncopy_1 = 1\n")
        self.proc: subprocess.Popen[bytes] | None = None
        self.startup_s: list[float] = []  # seconds from spawn to ready, per start
        atexit.register(self.close)

    @property
    def endpoint(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.endpoint}"

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def command(self) -> list[str]:
        return [
            self.binary, "server", f"-dir={self.data_dir}", f"-ip={HOST}", f"-ip.bind={HOST}",
            f"-master.port={self.master_port}", f"-master.port.grpc={self.master_grpc}",
            "-master.telemetry=false",  # no reporting home (and no network in tests anyway)
            "-master.electionTimeout=1s",  # one master: no need to wait 10 s for a raft election after a restart
            # Every bucket is a collection with volumes of its own: small sparse ones (a tmp dir, not
            # a disk), one per bucket (master.toml below), room for the session's hundreds of buckets.
            "-master.volumeSizeLimitMB=64", "-volume.max=500",
            f"-volume.port={self.volume_port}", f"-volume.port.grpc={self.volume_grpc}",
            "-volume.preStopSeconds=0",  # stop at once: tests stop it mid-round
            "-filer", f"-filer.port={self.filer_port}", f"-filer.port.grpc={self.filer_grpc}",
            f"-filer.localSocket={self.workdir / 'filer.sock'}",
            "-s3", f"-s3.port={self.port}", f"-s3.port.grpc={self.s3_grpc}", f"-s3.config={self.config_path}",
            f"-s3.localSocket={self.workdir / 's3.sock'}", "-s3.port.iceberg=0", "-s3.port.lance=0",
        ]

    def start(self, timeout: float = 60.0) -> float:
        """Spawn ``weed server`` and wait until it serves S3; returns the startup time in seconds."""
        if self.running():
            return 0.0
        # AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY in weed's environment would add a second admin
        # identity: the config file must be the only source of credentials.
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "WEED_", "S3_"))}
        t0 = time.monotonic()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.command(), env=env, cwd=self.workdir, stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=subprocess.STDOUT)
        self._wait_ready(t0 + timeout)
        took = time.monotonic() - t0
        self.startup_s.append(took)
        return took

    def _get(self, url: str, timeout: float = 1.0) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, b""
        except (OSError, urllib.error.URLError):
            return 0, b""

    def _volume_server_joined(self) -> bool:
        status, body = self._get(f"http://{HOST}:{self.master_port}/dir/status")
        return status == 200 and f"{HOST}:{self.volume_port}".encode() in body

    def _master_warm(self) -> bool:
        # A lookup of a volume that does not exist: 503 while the master warms up, 404 after (no side effect).
        return self._get(f"http://{HOST}:{self.master_port}/dir/lookup?volumeId=4000000000")[0] == 404

    def _can_allocate(self) -> bool:
        # A fresh master holds its first volume allocation for ~4 s (a confirm pulse); an assign (a
        # file id, no data) waits it out here instead of in the first test's first PUT.
        return self._get(f"http://{HOST}:{self.master_port}/dir/assign", timeout=15.0)[0] == 200

    def _wait_ready(self, deadline: float) -> None:
        """Ready = the S3 gateway answers, the volume server has joined the master (else the first
        PUT fails with "no writable volumes"), the master has warmed up (after a restart: PUTs hang
        until then) and allocates volumes, and an unsigned request is refused (auth is on)."""
        checks = [("S3 /healthz", lambda: self._get(self.url + "/healthz")[0] == 200),
                  ("volume server joined", self._volume_server_joined),
                  ("master warmed up", self._master_warm),
                  ("volume allocation", self._can_allocate),
                  ("anonymous refused", lambda: self._get(self.url + "/")[0] == 403)]
        for what, ok in checks:
            while not ok():
                if not self.running():
                    raise RuntimeError(f"weed exited with {self.proc.returncode if self.proc else '?'}:\n{self.log_tail()}")
                if time.monotonic() > deadline:
                    self.stop()
                    raise TimeoutError(f"SeaweedFS at {self.url} not ready ({what}):\n{self.log_tail()}")
                time.sleep(0.05)

    def stop(self, timeout: float = 3.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout``: ``weed server`` stops its volume server before its
        filer, whose last metadata-log flush then waits 15 s for a volume that is gone. What S3
        acknowledged is on disk by then, so cutting that wait short loses nothing a test reads."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def restart(self, timeout: float = 60.0) -> float:
        """Stop and start again on the same ports with the same data dir and identity."""
        self.stop()
        return self.start(timeout)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def __enter__(self) -> SeaweedServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
