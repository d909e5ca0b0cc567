"""Fixtures shared by the test suite."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NoReturn, TypeVar

import pytest
from minio_server import MinioServer, find_minio, minio_binary_path
from seaweed_server import SeaweedServer, find_weed, weed_binary_path
from server_process import ServerProcess
from tally import TALLY, Tally

from hetlora_core.config import StoreConfig


def in_ci() -> bool:
    """CI=true (GitHub Actions, GitLab, ...): a missing tool is a failure, not a skip."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def skip_or_fail(reason: str) -> NoReturn:
    if in_ci():
        pytest.fail(f"{reason} (CI=true: failing instead of skipping)", pytrace=False)
    pytest.skip(reason)


Server = TypeVar("Server", bound=ServerProcess)


def session_server(server_class: Callable[[str], Server], binary: str | None, missing: str) -> Iterator[Server]:
    """The body of a session-scoped server fixture: skip (fail under CI) with ``missing`` when the
    binary was not built, else start one server for the whole session and close it at the end."""
    if binary is None:
        skip_or_fail(missing)
    server = server_class(binary)
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture(scope="session")
def minio_server() -> Iterator[MinioServer]:
    """A real MinIO on 127.0.0.1 for the whole session: ``.endpoint``, ``.access_key``,
    ``.secret_key``, ``.bucket`` (plus ``.stop()``, ``.restart()``, ``.startup_s``).
    A test that stops it must restart it (``minio_store_config`` restarts it if needed)."""
    yield from session_server(MinioServer, find_minio(),
                              f"MinIO server binary not found at {minio_binary_path()}: run scripts/setup.sh tools "
                              "(builds it with go install; set HETLORA_CACHE if it lives elsewhere)")


def s3_store_config_for(server: MinioServer | SeaweedServer, monkeypatch: pytest.MonkeyPatch) -> StoreConfig:
    """A config for ``server`` with a fresh bucket; its credentials in HETLORA_S3_* for this test only."""
    if not server.running():
        server.start()  # an earlier test stopped it and failed before restarting
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "HETLORA_S3_CA_BUNDLE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HETLORA_S3_ACCESS_KEY", server.access_key)
    monkeypatch.setenv("HETLORA_S3_SECRET_KEY", server.secret_key)
    return StoreConfig(kind="s3", endpoint=server.endpoint, bucket=f"t-{uuid.uuid4().hex[:16]}",
                       retry_deadline_s=15.0)


@pytest.fixture
def minio_store_config(minio_server: MinioServer, monkeypatch: pytest.MonkeyPatch) -> StoreConfig:
    """A ``StoreConfig(kind="s3")`` for the session MinIO with a fresh bucket per test; the
    credentials are put in the environment (HETLORA_S3_*) for this test only."""
    return s3_store_config_for(minio_server, monkeypatch)


@pytest.fixture(scope="session")
def seaweed_server() -> Iterator[SeaweedServer]:
    """A real SeaweedFS (master, volume, filer and S3 gateway in one ``weed server``) on 127.0.0.1
    for the whole session, with the same attributes as ``minio_server``."""
    yield from session_server(SeaweedServer, find_weed(),
                              f"SeaweedFS binary not found at {weed_binary_path()}: run scripts/setup.sh tools "
                              "(builds it from its Go module; set HETLORA_CACHE if it lives elsewhere)")


# Every S3 server the store suite runs against: MinIO (Kubeflow before 2.15) and SeaweedFS (its
# default since). A test asks for ``s3_server`` / ``s3_store_config`` to run once per server;
# ``minio_server`` / ``minio_store_config`` stay for what only MinIO has (admin API, IAM users, TLS).
S3_SERVERS = [pytest.param("minio", marks=pytest.mark.minio), pytest.param("seaweedfs", marks=pytest.mark.seaweedfs)]
SERVER_FIXTURE = {"minio": "minio_server", "seaweedfs": "seaweed_server"}


@pytest.fixture(params=S3_SERVERS)
def s3_server(request: pytest.FixtureRequest) -> MinioServer | SeaweedServer:
    """The session server of this parameter: ``minio_server`` or ``seaweed_server`` (started on first use)."""
    server: MinioServer | SeaweedServer = request.getfixturevalue(SERVER_FIXTURE[request.param])
    return server


@pytest.fixture
def s3_store_config(s3_server: MinioServer | SeaweedServer, monkeypatch: pytest.MonkeyPatch) -> StoreConfig:
    """``minio_store_config`` for each server of ``S3_SERVERS`` (a fresh bucket per test)."""
    return s3_store_config_for(s3_server, monkeypatch)


# ---------------------------------------------------------------- the tiny model, float32, one thread


@pytest.fixture(scope="module")
def smoke_cfg():  # -> HetLoRAConfig; imported lazily: collecting tests loads no torch
    """configs/smoke.yaml (a tiny Llama of SmolLM2's architecture, real Shakespeare clients) in
    float32 on one thread: exact comparisons, and no oversubscription on a shared 2-core machine."""
    from hetlora_core.config import load_config

    return load_config("configs/smoke.yaml", {"training.bf16": False, "training.threads": 1})


@pytest.fixture(scope="module")
def smoke_model(smoke_cfg):  # -> torch.nn.Module: the process's shared base model for smoke_cfg
    import torch

    from hetlora_core import runtime

    torch.set_num_threads(1)
    return runtime.model(smoke_cfg)


# Real Prometheus + Pushgateway (session-scoped; see tests/prometheus_server.py)
from conftest_prometheus import prometheus, pushgateway  # noqa: E402,F401

# ---------------------------------------------------------------- the reliability figures (tests/tally.py)


@pytest.fixture(scope="session")
def tally() -> Iterator[Tally]:
    """The session's fault/attack counter: what tests/test_faults.py injects and resumes."""
    yield TALLY


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Count every test marked ``attack`` once, as held if it passed (its outcome assertions hold)."""
    outcome = yield
    rep = outcome.get_result()  # type: ignore[attr-defined]
    if rep.when == "call" and item.get_closest_marker("attack") is not None:
        TALLY.attack(Path(str(item.fspath)).name, rep.passed)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    TALLY.write()
