"""A real MinIO server process for tests, bound to 127.0.0.1 only.

    server = MinioServer()          # binary from find_minio(); temp data dir; random ports and root user
    server.start()                  # waits for /minio/health/live (and /ready)
    server.stop(); server.restart() # restart keeps the port and the data dir (tests stop MinIO mid-round)
    server.close()                  # stop and delete the temp dir

Start, stop, restart and clean-up are ``ServerProcess``'s (tests/server_process.py), shared by both servers.

The binary is built by ``scripts/setup.sh tools`` into ``$HETLORA_CACHE/bin/minio``
(default ``~/.cache/hetlora/bin/minio``); a ``minio`` on PATH is used otherwise.
"""

from __future__ import annotations

import os
import secrets
import shutil
import ssl
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

from server_process import HOST, ServerProcess, cached_binary_path, distinct_ports, find_binary, free_port

__all__ = ["HOST", "MinioServer", "find_minio", "free_port", "minio_binary_path"]  # HOST, free_port: older imports


def minio_binary_path() -> Path:
    """Where scripts/setup.sh puts the MinIO server binary."""
    return cached_binary_path("minio")


def find_minio() -> str | None:
    """The MinIO server binary, or None when it has not been built."""
    return find_binary("minio")


class MinioServer(ServerProcess):
    """One MinIO process; ``endpoint``, ``access_key``, ``secret_key``, ``bucket`` for clients."""

    name = process_name = "MinIO"
    stop_timeout_s = 15.0
    # restart_write_pause_s = 0: MinIO takes writes as soon as it is ready (cf. SeaweedServer)

    def __init__(self, binary: str | None = None, *, tls: bool = False, bucket: str = "hetlora-test") -> None:
        found = binary or find_minio()
        if not found:
            raise FileNotFoundError(f"MinIO server binary not found at {minio_binary_path()}: run scripts/setup.sh tools")
        super().__init__(workdir_prefix="hetlora-minio-", log_name="minio.log")
        self.binary, self.tls, self.bucket = found, tls, bucket
        self.certs_dir = self.workdir / "certs"
        self.certs_dir.mkdir()  # explicit, so MinIO never picks up ~/.minio/certs
        self.port, self.console_port = distinct_ports(2)
        self.access_key = "hl" + secrets.token_hex(6)
        self.secret_key = secrets.token_urlsafe(24)
        self._last_status = 0
        if tls:
            self._make_cert()

    def _make_cert(self) -> None:
        """A self-signed certificate for 127.0.0.1; its public.crt doubles as the CA bundle."""
        if not shutil.which("openssl"):
            raise FileNotFoundError("openssl is needed to make a test TLS certificate")
        crt, key = self.certs_dir / "public.crt", self.certs_dir / "private.key"
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", str(key), "-out", str(crt), "-days", "2", "-subj", f"/CN={HOST}",
             "-addext", f"subjectAltName=IP:{HOST}", "-addext", "basicConstraints=critical,CA:TRUE"],
            check=True, capture_output=True)
        self.ca_file = str(crt)

    def command(self) -> list[str]:
        return [self.binary, "server", str(self.data_dir), "--address", f"{HOST}:{self.port}",
                "--console-address", f"{HOST}:{self.console_port}", "--certs-dir", str(self.certs_dir)]

    def environment(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MINIO_")}
        env.update(MINIO_ROOT_USER=self.access_key, MINIO_ROOT_PASSWORD=self.secret_key,
                   MINIO_UPDATE="off", MINIO_BROWSER="off")
        return env

    def _get(self, path: str) -> int:
        ctx = ssl.create_default_context(cafile=self.ca_file) if self.tls else None
        try:
            with urllib.request.urlopen(self.url + path, timeout=1.0, context=ctx) as r:
                status = r.status
        except urllib.error.HTTPError as e:
            status = e.code
        except (OSError, urllib.error.URLError):
            status = 0
        self._last_status = status
        return status

    def _wait_ready(self, deadline: float) -> None:
        self._wait_until("/minio/health/live", lambda: self._get("/minio/health/live") == 200, deadline)
        # An older MinIO without /ready answers 404 there: live is all we get.
        self._wait_until("/minio/health/ready", lambda: self._get("/minio/health/ready") in (200, 404), deadline)

    def _not_ready_detail(self, what: str) -> str:
        return f"{what} -> {self._last_status}"
