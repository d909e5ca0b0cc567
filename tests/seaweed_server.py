"""A real SeaweedFS (Kubeflow's default object store since KFP 2.15) for tests, bound to 127.0.0.1 only.

    server = SeaweedServer()        # binary from find_weed(); temp data dir; random ports and S3 identity
    server.start()                  # waits until an authenticated S3 request is answered
    server.stop(); server.restart() # restart keeps the ports, the data dir and the identity
    server.close()                  # stop and delete the temp dir

The same attributes as ``MinioServer`` (``endpoint``, ``access_key``, ``secret_key``, ``bucket``,
``startup_s``, ...), so a test written against one runs against the other. One ``weed server``
process runs master, volume server, filer and the S3 gateway (what Kubeflow's SeaweedFS deployment
runs too); the WebDAV, SFTP, IAM, MQ, Iceberg and Lance side servers stay off.

Start, stop, restart and clean-up are ``ServerProcess``'s (tests/server_process.py), shared by both servers.

The binary is built by ``scripts/setup.sh tools`` into ``$HETLORA_CACHE/bin/weed``
(default ``~/.cache/hetlora/bin/weed``); a ``weed`` on PATH is used otherwise.
"""

from __future__ import annotations

import json
import os
import secrets
import urllib.error
import urllib.request
from pathlib import Path

from server_process import HOST, ServerProcess, cached_binary_path, distinct_ports, find_binary


def weed_binary_path() -> Path:
    """Where scripts/setup.sh puts the SeaweedFS binary."""
    return cached_binary_path("weed")


def find_weed() -> str | None:
    """The SeaweedFS ``weed`` binary, or None when it has not been built."""
    return find_binary("weed")


class SeaweedServer(ServerProcess):
    """One ``weed server -filer -s3`` process; ``endpoint``, ``access_key``, ``secret_key``, ``bucket`` for clients."""

    name, process_name = "SeaweedFS", "weed"
    # SIGTERM, then SIGKILL after 3 s: ``weed server`` stops its volume server before its filer,
    # whose last metadata-log flush then waits 15 s for a volume that is gone. What S3
    # acknowledged is on disk by then, so cutting that wait short loses nothing a test reads.
    stop_timeout_s = 3.0
    tls = False  # the TLS tests stay on MinIO (tests/test_store.py::test_s3_tls says why)
    # After a restart with data, SeaweedFS's master refuses volume assignments for 3 heartbeat
    # pulses (15 s, fixed: "master is warming up, topology is still loading"); the S3 gateway holds
    # PUTs meanwhile (reads work). start() waits this out; a client writing across a restart sees it.
    restart_write_pause_s = 15.0

    def __init__(self, binary: str | None = None, *, bucket: str = "hetlora-test") -> None:
        found = binary or find_weed()
        if not found:
            raise FileNotFoundError(f"SeaweedFS binary not found at {weed_binary_path()}: run scripts/setup.sh tools")
        super().__init__(workdir_prefix="hetlora-weed-", log_name="weed.log")
        self.binary, self.bucket = found, bucket
        (self.port, self.master_port, self.master_grpc, self.volume_port, self.volume_grpc,
         self.filer_port, self.filer_grpc, self.s3_grpc) = distinct_ports(8)
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

    def environment(self) -> dict[str, str]:
        # AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY in weed's environment would add a second admin
        # identity: the config file must be the only source of credentials.
        return {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "WEED_", "S3_"))}

    def spawn_cwd(self) -> Path:
        return self.workdir  # where weed finds master.toml

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
            self._wait_until(what, ok, deadline)
