"""A real Prometheus Pushgateway and a real Prometheus server for tests, bound to 127.0.0.1 only.

Debian's ``prometheus-pushgateway`` and ``prometheus`` packages (installed by ``scripts/setup.sh
tools``) provide the binaries. Prometheus scrapes the Pushgateway every second with
``honor_labels: true``, as the cluster's scrape config does, so a pushed value is queryable about
one scrape later.

Fixtures (session-scoped): ``pushgateway`` (:class:`Pushgateway`) and ``prometheus``
(:class:`Prometheus`). Missing binaries skip the test, or fail it when ``CI=true``.
If several modules import the fixtures (conftest.py does, via conftest_prometheus), pytest makes
one fixture definition per module, so the processes are shared through a reference count and
started once per session.
"""

from __future__ import annotations

import atexit
import json
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

HOST = "127.0.0.1"  # never bind anything else
WAIT_S = 15.0  # longest a test waits for a pushed value to show up in Prometheus
SCRAPE_INTERVAL = "1s"


from conftest import in_ci, skip_or_fail  # noqa: E402,F401 - one definition, shared by every fixture


def find_binary(*names: str) -> str | None:
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def http(method: str, url: str, data: bytes | None = None, headers: dict[str, str] | None = None,
         timeout: float = 10.0) -> tuple[int, bytes]:
    """One HTTP request; returns (status, body) for every status, raises only on connection errors."""
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 - 127.0.0.1 only
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


class _Process:
    """A server process writing to a log file in its own temp dir."""

    name = "server"

    def __init__(self, binary: str) -> None:
        self.binary = binary
        self.workdir = Path(tempfile.mkdtemp(prefix=f"hetlora-{self.name}-"))
        self.log_path = self.workdir / f"{self.name}.log"
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        atexit.register(self.close)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def _args(self) -> list[str]:
        raise NotImplementedError

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "<no log>"

    def start(self, ready_timeout: float = 30.0) -> None:
        last_error = ""
        for _attempt in range(3):  # a free port can be taken between free_port() and bind: retry
            self.port = free_port()
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen([self.binary, *self._args()], stdout=log, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL, cwd=self.workdir)
            deadline = time.monotonic() + ready_timeout
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    last_error = f"{self.name} exited with {self.proc.returncode}"
                    break
                try:
                    status, _ = http("GET", f"{self.url}/-/ready", timeout=2)
                    if status == 200:
                        return
                except OSError:
                    pass
                time.sleep(0.05)
            else:
                last_error = f"{self.name} not ready after {ready_timeout:.0f} s"
            self.stop()
        raise RuntimeError(f"could not start {self.name}: {last_error}\n--- log ---\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


class Pushgateway(_Process):
    name = "pushgateway"

    def _args(self) -> list[str]:
        return [f"--web.listen-address={HOST}:{self.port}"]

    def groups(self) -> list[dict[str, Any]]:
        """The groups the Pushgateway holds (``/api/v1/metrics``): each has ``labels`` (job and
        grouping key) and one entry per metric name."""
        status, body = http("GET", f"{self.url}/api/v1/metrics")
        assert status == 200, body
        return json.loads(body)["data"]

    def group_labels(self, **match: str) -> list[dict[str, str]]:
        """Grouping-key label sets (job included) of the groups whose labels contain ``match``."""
        out = []
        for g in self.groups():
            labels = g["labels"]
            if all(labels.get(k) == v for k, v in match.items()):
                out.append(labels)
        return out

    def metrics_text(self) -> str:
        status, body = http("GET", f"{self.url}/metrics")
        assert status == 200
        return body.decode()


class Prometheus(_Process):
    name = "prometheus"

    def __init__(self, binary: str, scrape_target: str) -> None:
        super().__init__(binary)
        self.scrape_target = scrape_target
        self.config_path = self.workdir / "prometheus.yml"
        self.config_path.write_text(
            "global:\n"
            f"  scrape_interval: {SCRAPE_INTERVAL}\n"
            f"  evaluation_interval: {SCRAPE_INTERVAL}\n"
            "scrape_configs:\n"
            "  - job_name: pushgateway\n"
            "    honor_labels: true\n"
            f"    scrape_interval: {SCRAPE_INTERVAL}\n"
            "    static_configs:\n"
            f"      - targets: ['{scrape_target}']\n"
        )

    def _args(self) -> list[str]:
        return [f"--config.file={self.config_path}", f"--storage.tsdb.path={self.workdir / 'data'}",
                f"--web.listen-address={HOST}:{self.port}"]

    def api(self, path: str, **params: str) -> tuple[int, dict[str, Any]]:
        """POST to ``/api/v1/<path>`` (form-encoded, so long queries fit); returns (status, JSON)."""
        data = urllib.parse.urlencode(params).encode()
        status, body = http("POST", f"{self.url}/api/v1/{path}", data=data,
                            headers={"Content-Type": "application/x-www-form-urlencoded"})
        try:
            return status, json.loads(body)
        except ValueError:
            return status, {"status": "error", "error": body.decode(errors="replace")}

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query; returns the result vector (raises AssertionError on an API error)."""
        status, doc = self.api("query", query=expr)
        assert status == 200 and doc.get("status") == "success", f"query {expr!r} failed: {status} {doc}"
        data = doc["data"]
        return data["result"] if data["resultType"] == "vector" else [{"metric": {}, "value": data["result"]}]

    def wait_for(self, expr: str, until: Callable[[list[dict[str, Any]]], bool] = bool,
                 timeout: float = WAIT_S) -> list[dict[str, Any]]:
        """Poll ``expr`` until ``until(result)`` holds; fail with the last result after ``timeout``."""
        deadline = time.monotonic() + timeout
        result: list[dict[str, Any]] = []
        while True:
            result = self.query(expr)
            if until(result):
                return result
            if time.monotonic() > deadline:
                raise AssertionError(f"after {timeout:.0f} s, {expr!r} gave {result!r}")
            time.sleep(0.2)


# ---------------------------------------------------------------- shared, reference-counted processes

_shared: dict[str, _Process] = {}
_users: dict[str, int] = {}


def _acquire(key: str, make: Callable[[], _Process]) -> _Process:
    if key not in _shared:
        proc = make()
        proc.start()
        _shared[key] = proc
    _users[key] = _users.get(key, 0) + 1
    return _shared[key]


def _release(key: str) -> None:
    _users[key] -= 1
    if _users[key] == 0:
        _shared.pop(key).close()


@pytest.fixture(scope="session")
def pushgateway() -> Iterator[Pushgateway]:
    """A real Pushgateway on 127.0.0.1 (``.url``, ``.groups()``, ``.group_labels(**match)``)."""
    binary = find_binary("prometheus-pushgateway", "pushgateway")
    if binary is None:
        skip_or_fail("prometheus-pushgateway not found: run scripts/setup.sh tools "
                     "(apt-get install prometheus-pushgateway)")
    proc = _acquire("pushgateway", lambda: Pushgateway(binary))
    try:
        yield proc  # type: ignore[misc]
    finally:
        _release("pushgateway")


@pytest.fixture(scope="session")
def prometheus(pushgateway: Pushgateway) -> Iterator[Prometheus]:
    """A real Prometheus on 127.0.0.1 scraping ``pushgateway`` every second with honor_labels
    (``.url``, ``.query(expr)``, ``.wait_for(expr, until)``, ``.api(path, **params)``)."""
    binary = find_binary("prometheus")
    if binary is None:
        skip_or_fail("prometheus not found: run scripts/setup.sh tools (apt-get install prometheus)")
    target = f"{HOST}:{pushgateway.port}"
    proc = _acquire("prometheus", lambda: Prometheus(binary, target))
    try:
        yield proc  # type: ignore[misc]
    finally:
        _release("prometheus")
