"""A real MinIO server process for tests, bound to 127.0.0.1 only.

    server = MinioServer()          # binary from find_minio(); temp data dir; random ports and root user
    server.start()                  # waits for /minio/health/live (and /ready)
    server.stop(); server.restart() # restart keeps the port and the data dir (tests stop MinIO mid-round)
    server.close()                  # stop and delete the temp dir

The binary is built by ``scripts/setup.sh tools`` into ``$HETLORA_CACHE/bin/minio``
(default ``~/.cache/hetlora/bin/minio``); a ``minio`` on PATH is used otherwise.
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
from pathlib import Path

HOST = "127.0.0.1"  # never bind anything else


def minio_binary_path() -> Path:
    """Where scripts/setup.sh puts the MinIO server binary."""
    cache = os.environ.get("HETLORA_CACHE") or os.path.expanduser("~/.cache/hetlora")
    return Path(cache) / "bin" / "minio"


def find_minio() -> str | None:
    """The MinIO server binary, or None when it has not been built."""
    path = minio_binary_path()
    if path.is_file() and os.access(path, os.X_OK):
        return str(path)
    return shutil.which("minio")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class MinioServer:
    """One MinIO process; ``endpoint``, ``access_key``, ``secret_key``, ``bucket`` for clients."""

    def __init__(self, binary: str | None = None, *, tls: bool = False, bucket: str = "hetlora-test") -> None:
        found = binary or find_minio()
        if not found:
            raise FileNotFoundError(f"MinIO server binary not found at {minio_binary_path()}: run scripts/setup.sh tools")
        self.binary, self.tls, self.bucket = found, tls, bucket
        self.workdir = Path(tempfile.mkdtemp(prefix="hetlora-minio-"))
        self.data_dir, self.certs_dir = self.workdir / "data", self.workdir / "certs"
        self.data_dir.mkdir()
        self.certs_dir.mkdir()  # explicit, so MinIO never picks up ~/.minio/certs
        self.log_path = self.workdir / "minio.log"
        self.port = free_port()
        self.console_port = free_port()
        while self.console_port == self.port:
            self.console_port = free_port()
        self.access_key = "hl" + secrets.token_hex(6)
        self.secret_key = secrets.token_urlsafe(24)
        self.ca_file: str | None = None
        if tls:
            self._make_cert()
        self.proc: subprocess.Popen[bytes] | None = None
        self.startup_s: list[float] = []  # seconds from spawn to ready, per start
        self.restart_write_pause_s = 0.0  # MinIO takes writes as soon as it is ready (cf. SeaweedServer)
        atexit.register(self.close)

    @property
    def endpoint(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.endpoint}"

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

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 60.0) -> float:
        """Spawn MinIO and wait until it serves; returns the startup time in seconds."""
        if self.running():
            return 0.0
        env = {k: v for k, v in os.environ.items() if not k.startswith("MINIO_")}
        env.update(MINIO_ROOT_USER=self.access_key, MINIO_ROOT_PASSWORD=self.secret_key,
                   MINIO_UPDATE="off", MINIO_BROWSER="off")
        cmd = [self.binary, "server", str(self.data_dir), "--address", f"{HOST}:{self.port}",
               "--console-address", f"{HOST}:{self.console_port}", "--certs-dir", str(self.certs_dir)]
        t0 = time.monotonic()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        self._wait_ready(t0 + timeout)
        took = time.monotonic() - t0
        self.startup_s.append(took)
        return took

    def _get(self, path: str) -> int:
        ctx = ssl.create_default_context(cafile=self.ca_file) if self.tls else None
        try:
            with urllib.request.urlopen(self.url + path, timeout=1.0, context=ctx) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code
        except (OSError, urllib.error.URLError):
            return 0

    def _wait_ready(self, deadline: float) -> None:
        for path in ("/minio/health/live", "/minio/health/ready"):
            while (status := self._get(path)) != 200:
                if not self.running():
                    raise RuntimeError(f"MinIO exited with {self.proc.returncode if self.proc else '?'}:\n{self.log_tail()}")
                if path.endswith("ready") and status == 404:
                    break  # an older MinIO without /ready: live is all we get
                if time.monotonic() > deadline:
                    self.stop()
                    raise TimeoutError(f"MinIO at {self.url} not ready ({path} -> {status}):\n{self.log_tail()}")
                time.sleep(0.05)

    def stop(self, timeout: float = 15.0) -> None:
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
        """Stop and start again on the same port with the same data dir and credentials."""
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

    def __enter__(self) -> MinioServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
