"""The process lifecycle shared by the real S3 servers the tests run (tests/minio_server.py,
tests/seaweed_server.py): a temp work dir, spawn-and-wait-until-ready, stop (SIGTERM, then SIGKILL),
restart on the same ports and data, close (stop and delete the work dir), context manager.

A subclass says only what differs between servers: ``command()``, ``environment()``, the ports
and credentials it makes in ``__init__`` and its readiness checks in ``_wait_ready``. Keeping the
lifecycle in one place means both servers stop, restart and clean up the same way, so a test that
stops "the S3 server" mid-round sees the same behaviour whichever server it runs against.
"""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Self

HOST = "127.0.0.1"  # never bind anything else


def cached_binary_path(name: str) -> Path:
    """Where scripts/setup.sh puts a server binary it builds: ``$HETLORA_CACHE/bin/<name>``."""
    cache = os.environ.get("HETLORA_CACHE") or os.path.expanduser("~/.cache/hetlora")
    return Path(cache) / "bin" / name


def find_binary(name: str) -> str | None:
    """The binary scripts/setup.sh built, else one on PATH, else None."""
    path = cached_binary_path(name)
    if path.is_file() and os.access(path, os.X_OK):
        return str(path)
    return shutil.which(name)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def distinct_ports(n: int) -> list[int]:
    """``n`` free ports, no two the same (one server listens on all of them at once)."""
    ports: list[int] = []
    while len(ports) < n:
        if (p := free_port()) not in ports:
            ports.append(p)
    return ports


class ServerProcess:
    """One server process with a private temp work dir; ``endpoint``/``url`` on ``HOST:port``."""

    name = "server"  # in messages: "<name> at <url> not ready"
    process_name = "server"  # in messages: "<process_name> exited with <rc>"
    stop_timeout_s = 15.0  # how long stop() waits after SIGTERM before SIGKILL
    tls = False
    ca_file: str | None = None
    # Seconds a server holds writes after a restart with data (0: it takes them once ready).
    restart_write_pause_s = 0.0
    port: int

    def __init__(self, *, workdir_prefix: str, log_name: str) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix=workdir_prefix))
        self.data_dir = self.workdir / "data"
        self.data_dir.mkdir()
        self.log_path = self.workdir / log_name
        self.proc: subprocess.Popen[bytes] | None = None
        self.startup_s: list[float] = []  # seconds from spawn to ready, per start
        atexit.register(self.close)  # the process and the temp dir go at interpreter exit at the latest

    @property
    def endpoint(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.endpoint}"

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # ------------------------------------------------ what a subclass says

    def command(self) -> list[str]:
        raise NotImplementedError

    def environment(self) -> dict[str, str]:
        """The server's environment: a subclass strips what would change its credentials."""
        raise NotImplementedError

    def spawn_cwd(self) -> Path | None:
        """The server's working directory (None: this process's)."""
        return None

    def _wait_ready(self, deadline: float) -> None:
        raise NotImplementedError

    def _not_ready_detail(self, what: str) -> str:
        """What a readiness timeout names: the check, plus whatever the subclass last saw."""
        return what

    # ------------------------------------------------ the lifecycle

    def start(self, timeout: float = 60.0) -> float:
        """Spawn the server and wait until it is ready; returns the startup time in seconds."""
        if self.running():
            return 0.0
        env = self.environment()
        t0 = time.monotonic()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.command(), env=env, cwd=self.spawn_cwd(), stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=subprocess.STDOUT)
        self._wait_ready(t0 + timeout)
        took = time.monotonic() - t0
        self.startup_s.append(took)
        return took

    def _wait_until(self, what: str, ok: Callable[[], bool], deadline: float) -> None:
        """Poll ``ok`` until it holds; fail at once if the process died, and stop it at ``deadline``."""
        while not ok():
            if not self.running():
                raise RuntimeError(f"{self.process_name} exited with {self.proc.returncode if self.proc else '?'}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"{self.name} at {self.url} not ready ({self._not_ready_detail(what)}):\n{self.log_tail()}")
            time.sleep(0.05)

    def stop(self, timeout: float | None = None) -> None:
        """SIGTERM, then SIGKILL after ``timeout`` (default ``stop_timeout_s``)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(self.stop_timeout_s if timeout is None else timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def restart(self, timeout: float = 60.0) -> float:
        """Stop and start again on the same ports with the same data dir and credentials."""
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

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
