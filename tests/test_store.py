"""hetlora_core.store: LocalStore and S3Store (a real MinIO and a real SeaweedFS), manifests, the commit protocol, JSON documents,
atomic_write and the package's import structure. The layout's keys: tests/test_layout_ownership.py."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import pickle
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import S3_SERVERS, SERVER_FIXTURE, s3_store_config_for
from minio_server import MinioServer, free_port
from seaweed_server import SeaweedServer

from hetlora_core import store as st
from hetlora_core.config import StoreConfig
from hetlora_core.store import (
    ADAPTER,
    MANIFEST,
    ChecksumMismatch,
    InvalidJSON,
    InvalidManifest,
    LocalStore,
    NotFound,
    Store,
    StoreAuthError,
    StoreUnavailable,
    atomic_write,
    client_prefix,
    get_artifact,
    get_json,
    get_manifest,
    global_prefix,
    last_committed_round,
    list_client_prefixes,
    open_store,
    put_artifact,
    put_json,
)

BAD_KEYS = ["../escape", "a/../../escape", "/etc/passwd", "a//b", "a/./b", "a/..", "", "a\\..\\b", "C:/x",
            "a/\x00b", "a/.hetlora-tmp-x"]


@pytest.fixture(params=["local", *S3_SERVERS])
def store(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Store:
    """Each store test runs on a local directory, a real MinIO and a real SeaweedFS."""
    if request.param == "local":
        return open_store(StoreConfig(kind="local", root=str(tmp_path / "store")))
    return open_store(s3_store_config_for(request.getfixturevalue(SERVER_FIXTURE[request.param]), monkeypatch))


def s3(cfg: StoreConfig, **changes: object) -> st.S3Store:
    return open_store(dataclasses.replace(cfg, **changes))  # type: ignore[return-value]


# ---------------------------------------------------------------- both stores


def test_round_trip(store: Store) -> None:
    store.put_bytes("exp/a.bin", b"\x00\x01payload")
    store.put_bytes("exp/empty", b"")
    assert store.get_bytes("exp/a.bin") == b"\x00\x01payload"
    assert store.get_bytes("exp/empty") == b""
    assert store.exists("exp/a.bin") and not store.exists("exp/missing") and not store.exists("exp")
    with pytest.raises(NotFound, match="exp/missing"):
        store.get_bytes("exp/missing")


def test_list_is_sorted_and_directory_scoped(store: Store) -> None:
    for key in ["e/r/z", "e/r/a", "e/r/sub/m", "e/rx/a", "f/a"]:
        store.put_bytes(key, b"x")
    assert store.list("e/r") == ["e/r/a", "e/r/sub/m", "e/r/z"]  # never e/rx/*
    assert store.list("e/r/") == store.list("e/r")
    assert store.list("e") == ["e/r/a", "e/r/sub/m", "e/r/z", "e/rx/a"]
    assert store.list("") == ["e/r/a", "e/r/sub/m", "e/r/z", "e/rx/a", "f/a"]
    assert store.list("nothing/here") == []


def test_idempotent_overwrite(store: Store) -> None:
    store.put_bytes("e/k", b"first")
    store.put_bytes("e/k", b"second, longer")
    assert store.get_bytes("e/k") == b"second, longer"
    m1 = put_artifact(store, "e/art", b"v1", {"round": 1})
    m2 = put_artifact(store, "e/art", b"v2-bytes", {"round": 1})
    assert store.list("e/art") == ["e/art/adapter.safetensors", "e/art/manifest.json"]
    assert m1["sha256"] != m2["sha256"]
    assert get_artifact(store, "e/art") == (b"v2-bytes", m2)


def test_delete_prefix(store: Store) -> None:
    for key in ["e/r/a", "e/r/b/c", "e/rx/a"]:
        store.put_bytes(key, b"x")
    store.delete_prefix("e/r")
    assert store.list("e") == ["e/rx/a"]
    store.delete_prefix("e/absent")  # no-op
    with pytest.raises(ValueError, match="non-empty prefix"):
        store.delete_prefix("")


@pytest.mark.parametrize("key", BAD_KEYS)
def test_path_traversal_rejected(store: Store, key: str, tmp_path: Path) -> None:
    before = sorted(p.name for p in tmp_path.iterdir())
    for call in (lambda: store.put_bytes(key, b"x"), lambda: store.get_bytes(key), lambda: store.exists(key)):
        with pytest.raises(ValueError, match="store key"):
            call()
    if key:  # '' as a prefix means "everything" for list
        with pytest.raises(ValueError):
            store.list(key + "/sub")
        with pytest.raises(ValueError):
            store.delete_prefix(key + "/sub")
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written beside the store


def test_artifact_manifest(store: Store) -> None:
    payload = os.urandom(3000)
    g0, g1 = global_prefix("e", 0), global_prefix("e", 1)
    m = put_artifact(store, g0, payload, {"round": 0, "rank": 8}, filename="a.safetensors")
    assert m == {"round": 0, "rank": 8, "object": "a.safetensors", "size": 3000,
                 "sha256": hashlib.sha256(payload).hexdigest()}
    assert json.loads(store.get_bytes(f"{g0}/{MANIFEST}")) == m
    assert get_artifact(store, g0) == (payload, m)
    assert get_manifest(store, g0) == m
    assert get_manifest(store, g1) is None
    with pytest.raises(NotFound, match="not committed"):
        get_artifact(store, g1)
    with pytest.raises(ValueError):
        put_artifact(store, "e/x", b"", {}, filename="manifest.json")
    with pytest.raises(ValueError):
        put_artifact(store, "e/x", b"", {}, filename="../evil")


def test_atomic_commit(store: Store) -> None:
    exp = "exp"
    assert last_committed_round(store, exp) == -1
    put_artifact(store, global_prefix(exp, 0), b"g0", {"round": 0})
    for cid in ("c1", "c2"):
        put_artifact(store, client_prefix(exp, 1, cid), b"u-" + cid.encode(), {"client": cid})
    store.put_bytes(f"{client_prefix(exp, 1, 'c3')}/{ADAPTER}", b"half-written client")
    # Round 1's global adapter is there but its manifest (the commit) is not: round 1 is invisible.
    store.put_bytes(f"{global_prefix(exp, 1)}/{ADAPTER}", b"g1")
    put_artifact(store, global_prefix("exp2", 7), b"other experiment", {})
    put_artifact(store, global_prefix("exp-longer", 9), b"prefix-sharing experiment", {})
    assert last_committed_round(store, exp) == 0
    assert list_client_prefixes(store, exp, 1) == [client_prefix(exp, 1, "c1"), client_prefix(exp, 1, "c2")]
    assert list_client_prefixes(store, exp, 2) == []
    put_artifact(store, global_prefix(exp, 1), b"g1", {"round": 1})
    assert last_committed_round(store, exp) == 1
    assert last_committed_round(store, "exp2") == 7


@pytest.mark.parametrize("corrupt", ["same-size", "truncated"])
def test_checksum_mismatch_detected(store: Store, corrupt: str) -> None:
    payload = b"A" * 1000
    m = put_artifact(store, "e/c/x", payload, {})
    bad = b"A" * 999 + b"B" if corrupt == "same-size" else payload[:500]
    store.put_bytes("e/c/x/adapter.safetensors", bad)  # corrupt the object after the commit
    with pytest.raises(ChecksumMismatch) as exc:
        get_artifact(store, "e/c/x")
    msg = str(exc.value)
    assert "e/c/x/adapter.safetensors" in msg
    if corrupt == "same-size":
        assert m["sha256"] in msg and hashlib.sha256(bad).hexdigest() in msg
    else:
        assert "expected 1000" in msg and "got 500" in msg


@pytest.mark.parametrize("raw", [
    b"[1, 2]", b'{"object": "adapter.safetensors", "size": 1}', b"not json", pickle.dumps({"object": "x"}),
    json.dumps({"object": "../../etc/passwd", "sha256": "0" * 64, "size": 1}).encode(),
    json.dumps({"object": "a", "sha256": "XYZ", "size": 1}).encode(),
    json.dumps({"object": "a", "sha256": "0" * 64, "size": True}).encode(),
    json.dumps({"object": "a", "sha256": "0" * 64, "size": 1, "pad": "x" * (1024 * 1024)}).encode(),
], ids=["list", "missing-keys", "not-json", "pickle", "object-escapes", "bad-sha", "bool-size", "huge"])
def test_bad_manifest_rejected(store: Store, raw: bytes) -> None:
    store.put_bytes("e/m/manifest.json", raw)
    store.put_bytes("e/m/a", b"x")
    with pytest.raises(InvalidManifest, match="e/m/manifest.json"):
        get_artifact(store, "e/m")


def test_json_documents(store: Store) -> None:
    assert get_json(store, "e/doc.json") is None  # absent
    put_json(store, "e/doc.json", {"b": [1, 2.5], "a": {"x": None}})
    assert get_json(store, "e/doc.json") == {"a": {"x": None}, "b": [1, 2.5]}
    assert store.get_bytes("e/doc.json") == b'{\n "a": {\n  "x": null\n },\n "b": [\n  1,\n  2.5\n ]\n}'  # sorted: stable bytes
    with pytest.raises(TypeError):
        put_json(store, "e/list.json", [1, 2])  # type: ignore[arg-type]
    for raw, why in ((b"[1, 2]", "must be a JSON object"), (b"\xff{", "not valid UTF-8 JSON"), (b"{" * 100_000, "not valid"),
                     (pickle.dumps({"a": 1}), "not valid UTF-8 JSON")):
        store.put_bytes("e/bad.json", raw)
        with pytest.raises(InvalidJSON) as exc:
            get_json(store, "e/bad.json")
        msg = str(exc.value)
        assert "e/bad.json" in msg and why in msg and len(msg) < 400, msg
    store.put_bytes("e/big.json", b'{"pad": "' + b"x" * 2000 + b'"}')
    assert get_json(store, "e/big.json", max_bytes=4096) is not None
    with pytest.raises(InvalidJSON, match="e/big.json is larger than 1000 bytes"):
        get_json(store, "e/big.json", max_bytes=1000)
    assert issubclass(InvalidManifest, InvalidJSON) and issubclass(InvalidJSON, st.StoreError)
    with pytest.raises(ValueError, match="store key"):
        get_json(store, "../x.json")


def test_delete_and_drop_payload(store: Store) -> None:
    store.put_bytes("e/k", b"x")
    store.delete("e/k")
    store.delete("e/k")  # idempotent
    assert not store.exists("e/k")
    prefix = client_prefix("e", 0, "c1")
    put_artifact(store, prefix, b"weights", {"client": "c1"})
    assert st.drop_payload(store, prefix) is True
    assert store.list(prefix) == [f"{prefix}/{MANIFEST}"]  # the record stays, the payload is gone
    assert get_manifest(store, prefix) is not None
    with pytest.raises(NotFound):
        get_artifact(store, prefix)
    assert st.drop_payload(store, client_prefix("e", 0, "absent")) is False


# ---------------------------------------------------------------- LocalStore only


def test_local_write_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = LocalStore(tmp_path / "s")
    s.put_bytes("e/k", b"old")

    def boom(src: str, dst: str) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(st.StoreError, match="cannot write e/k"):
        s.put_bytes("e/k", b"new")
    monkeypatch.undo()
    assert s.get_bytes("e/k") == b"old"
    assert sorted(p.name for p in (tmp_path / "s" / "e").iterdir()) == ["k"]  # no temp file left


def test_local_symlink_escape_rejected(tmp_path: Path) -> None:
    (tmp_path / "outside").mkdir()
    s = LocalStore(tmp_path / "s")
    (tmp_path / "s" / "link").symlink_to(tmp_path / "outside")
    with pytest.raises(ValueError, match="outside"):
        s.put_bytes("link/x", b"x")
    assert list((tmp_path / "outside").iterdir()) == []


@pytest.mark.parametrize("how", ["bytes", "writer"])
def test_atomic_write(tmp_path: Path, how: str) -> None:
    target = tmp_path / "new" / "sub" / "f.bin"  # missing parents are created
    atomic_write(target, b"one" if how == "bytes" else (lambda p: Path(p).write_bytes(b"one")))
    assert target.read_bytes() == b"one" and (target.stat().st_mode & 0o777) == 0o644
    atomic_write(target, b"two", mode=0o600)
    assert target.read_bytes() == b"two" and (target.stat().st_mode & 0o777) == 0o600
    assert os.listdir(target.parent) == ["f.bin"]


def test_atomic_write_failure_leaves_the_old_file_and_no_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "f.json"
    target.write_bytes(b"old")
    seen: list[str] = []

    def half_then_crash(tmp: str) -> None:
        Path(tmp).write_bytes(b"half of the new")
        seen.extend(os.listdir(tmp_path))
        assert target.read_bytes() == b"old"  # mid-write, readers still see the whole old file
        raise RuntimeError("writer died")

    with pytest.raises(RuntimeError, match="writer died"):
        atomic_write(target, half_then_crash)
    assert len(seen) == 2 and any(n.startswith(st.TMP_PREFIX) for n in seen)  # the temp sat beside the target...
    assert os.listdir(tmp_path) == ["f.json"] and target.read_bytes() == b"old"  # ...and is gone

    def boom(src: str, dst: str) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk gone"):
        atomic_write(target, b"new")
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["f.json"] and target.read_bytes() == b"old"


def test_atomic_write_replaces_a_symlink_instead_of_following_it(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    (tmp_path / "link").symlink_to(victim)
    atomic_write(tmp_path / "link", b"new")
    assert victim.read_bytes() == b"precious" and not (tmp_path / "link").is_symlink()


def test_package_imports_without_a_cycle_and_lazily(tmp_path: Path) -> None:
    """Each module imports on its own in a fresh interpreter (no cycle), and a local run never loads
    minio/urllib3: S3Store comes in on first use."""
    code = """
import sys
import hetlora_core.store as st
st.LocalStore(sys.argv[1])
assert not {"minio", "urllib3", "hetlora_core.store.s3"} & set(sys.modules), sorted(sys.modules)
assert st.S3Store.__module__ == "hetlora_core.store.s3" and "minio" in sys.modules
from hetlora_core.store import S3Store
"""
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "s")], cwd=root, check=True, timeout=120)
    for mod in ("s3", "layout", "artifacts", "local", "base", "factory"):
        subprocess.run([sys.executable, "-c", f"import hetlora_core.store.{mod}"], cwd=root, check=True, timeout=120)
    assert not (root / "hetlora_core" / "store.py").exists() and not (root / "hetlora_core" / "store_s3.py").exists()


# ---------------------------------------------------------------- S3Store against a real MinIO and SeaweedFS
# (s3_server / s3_store_config: once per server of conftest.S3_SERVERS; minio_*: what only MinIO has)

def test_s3_bucket_created_private(s3_store_config: StoreConfig, s3_server: MinioServer | SeaweedServer) -> None:
    s = open_store(s3_store_config)
    s.put_bytes("e/secret.bin", b"x")
    url = f"http://{s3_server.endpoint}/{s3_store_config.bucket}/e/secret.bin"
    with pytest.raises(urllib.error.HTTPError) as exc:  # anonymous read must be refused
        urllib.request.urlopen(url, timeout=5)
    assert exc.value.code == 403
    assert s.describe() == f"s3 bucket {s3_store_config.bucket} at http://{s3_server.endpoint}"
    assert s3_server.secret_key not in repr(s) + s.describe()
    with pytest.raises(TypeError, match="credentials"):
        pickle.dumps(s)


def test_s3_unavailable_is_quick_and_clear(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    secret = "s3cr3t-" + os.urandom(8).hex()
    monkeypatch.setenv("HETLORA_S3_ACCESS_KEY", "someone")
    monkeypatch.setenv("HETLORA_S3_SECRET_KEY", secret)
    endpoint = f"127.0.0.1:{free_port()}"  # nothing listens here
    caplog.set_level(logging.DEBUG)
    t0 = time.monotonic()
    with pytest.raises(StoreUnavailable) as exc:
        open_store(StoreConfig(kind="s3", endpoint=endpoint, retry_deadline_s=1.0))
    took = time.monotonic() - t0
    msg = str(exc.value)
    assert 0.9 <= took < 4.0, took
    for part in (endpoint, "Is the server running", "store.endpoint", "store.secure", "Connection refused"):
        assert part in msg
    assert "retry" in caplog.text  # transient errors were retried, and said so
    assert secret not in msg + caplog.text


@pytest.mark.parametrize("which", ["HETLORA_S3_SECRET_KEY", "HETLORA_S3_ACCESS_KEY"])
def test_s3_wrong_credentials(s3_store_config: StoreConfig, monkeypatch: pytest.MonkeyPatch, which: str) -> None:
    monkeypatch.setenv(which, "wrong-" + "x" * 20)
    t0 = time.monotonic()
    with pytest.raises(StoreAuthError) as exc:
        s3(s3_store_config, retry_deadline_s=30.0)
    assert time.monotonic() - t0 < 5.0  # not retried until the deadline
    assert "HETLORA_S3_ACCESS_KEY" in str(exc.value) and "HETLORA_S3_SECRET_KEY" in str(exc.value)
    assert "wrong-" not in str(exc.value)


def test_s3_credentials_from_environment_only(s3_store_config: StoreConfig, s3_server: MinioServer | SeaweedServer,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HETLORA_S3_ACCESS_KEY")
    monkeypatch.delenv("HETLORA_S3_SECRET_KEY")
    with pytest.raises(StoreAuthError, match="HETLORA_S3_ACCESS_KEY and HETLORA_S3_SECRET_KEY"):
        open_store(s3_store_config)
    monkeypatch.setenv("HETLORA_S3_ACCESS_KEY", s3_server.access_key)
    with pytest.raises(StoreAuthError, match="HETLORA_S3_SECRET_KEY is not"):
        open_store(s3_store_config)
    monkeypatch.delenv("HETLORA_S3_ACCESS_KEY")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)  # the AWS fallback
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    open_store(s3_store_config).put_bytes("e/k", b"ok")


@pytest.mark.minio  # S3Store._retry's own logic: any live server will do, so MinIO only
def test_s3_retries_5xx_but_not_auth(minio_store_config: StoreConfig) -> None:
    from minio.error import S3Error

    s = s3(minio_store_config, retry_deadline_s=5.0)

    class Resp:
        def __init__(self, status: int) -> None:
            self.status, self.headers = status, {}

    calls = []

    def flaky(code: str, status: int, fail_times: int):
        def fn() -> str:
            calls.append(code)
            if len(calls) <= fail_times:
                raise S3Error(Resp(status), code, "m", "/r", "id", "host")  # type: ignore[arg-type]
            return "done"
        return fn

    assert s._retry("put", "k", flaky("SlowDown", 503, 2)) == "done" and len(calls) == 3
    calls.clear()
    with pytest.raises(StoreAuthError):
        s._retry("put", "k", flaky("SignatureDoesNotMatch", 403, 5))
    assert len(calls) == 1


@pytest.mark.timeout(120)
@pytest.mark.parametrize("s3_server", [S3_SERVERS[0], pytest.param("seaweedfs", marks=[pytest.mark.seaweedfs, pytest.mark.slow])],
                         indirect=True)  # SeaweedFS: ~25 s (its master's 15 s warm-up after a restart)
def test_s3_put_survives_server_restart(s3_store_config: StoreConfig, s3_server: MinioServer | SeaweedServer) -> None:
    # A restarted SeaweedFS holds PUTs until its master has warmed up (restart_write_pause_s): the
    # deadline must cover the outage plus that pause, as store.retry_deadline_s must in production.
    budget = 20.0 + s3_server.restart_write_pause_s
    s = s3(s3_store_config, retry_deadline_s=budget)
    s.put_bytes("e/before", b"persisted")  # also leaves a pooled connection that goes stale
    payload = os.urandom(200_000)
    result: dict[str, object] = {}

    def worker() -> None:
        t0 = time.monotonic()
        try:
            put_artifact(s, global_prefix("e", 0), payload, {"round": 0})
            result["took"] = time.monotonic() - t0
        except BaseException as e:  # noqa: BLE001 - reported by the assertion below
            result["error"] = e

    s3_server.stop()
    th = threading.Thread(target=worker)
    th.start()
    try:
        time.sleep(2.0)
        assert th.is_alive(), f"put gave up while the server was down: {result}"
    finally:
        s3_server.restart()
        th.join(40)
    assert "error" not in result, result
    assert 1.5 <= result["took"] < budget  # type: ignore[operator]
    assert get_artifact(s, global_prefix("e", 0))[0] == payload
    assert s.get_bytes("e/before") == b"persisted"  # same data dir after restart


@pytest.mark.minio
def test_s3_tls(minio_server: MinioServer, monkeypatch: pytest.MonkeyPatch) -> None:
    # minio_server only ensures the binary exists (skip/fail otherwise); this test runs its own TLS MinIO.
    # MinIO only: it checks our client's TLS handling (CA bundle, http-vs-https), not the server.
    with MinioServer(minio_server.binary, tls=True) as tls:
        monkeypatch.setenv("HETLORA_S3_ACCESS_KEY", tls.access_key)
        monkeypatch.setenv("HETLORA_S3_SECRET_KEY", tls.secret_key)
        cfg = StoreConfig(kind="s3", endpoint=tls.endpoint, bucket="tls-bucket", secure=True, retry_deadline_s=5.0)
        monkeypatch.delenv("HETLORA_S3_CA_BUNDLE", raising=False)
        monkeypatch.delenv("SSL_CERT_FILE", raising=False)
        t0 = time.monotonic()
        with pytest.raises(StoreUnavailable, match="HETLORA_S3_CA_BUNDLE"):  # untrusted cert: not retried
            open_store(cfg)
        assert time.monotonic() - t0 < 3.0
        with pytest.raises(StoreUnavailable, match="store.secure"):  # plain HTTP to a TLS port
            open_store(dataclasses.replace(cfg, secure=False, retry_deadline_s=1.0))
        monkeypatch.setenv("HETLORA_S3_CA_BUNDLE", tls.ca_file or "")
        s = open_store(cfg)
        put_artifact(s, "e/tls", b"over tls", {})
        assert get_artifact(s, "e/tls")[0] == b"over tls"
        assert s.describe().startswith("s3 bucket tls-bucket at https://")


@pytest.mark.parametrize("fsync", [True, False])
def test_local_store_fsync_follows_store_fsync(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fsync: bool) -> None:
    """store.fsync reaches the LocalStore open_store makes: every write flushed to disk by default,
    none in a scratch store; the file is whole and atomic either way."""
    synced: list[int] = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real(fd))[1])
    s = st.open_store(StoreConfig(root=str(tmp_path / "s"), fsync=fsync))
    s.put_bytes("e/k", b"x" * 1000)
    atomic_write(tmp_path / "w", lambda p: Path(p).write_bytes(b"w"), fsync=fsync)
    assert len(synced) == (2 if fsync else 0)
    assert s.get_bytes("e/k") == b"x" * 1000 and (tmp_path / "w").read_bytes() == b"w"
    assert sorted(os.listdir(tmp_path / "s" / "e")) == ["k"]


def test_copy_artifact(store: Store) -> None:
    """copy_artifact commits at a new prefix the object of another, with its digest and size, and
    the copy stays as it is when the source is rewritten or its payload dropped; a missing source
    is NotFound, an object above max_bytes is not copied, a corrupt source is refused on read."""
    put_artifact(store, "e/src", b"one" * 100, {"n": 1})
    man = st.copy_artifact(store, "e/src", "e/dst", {"n": 2, "object": "ignored", "sha256": "x"})
    assert man["n"] == 2 and man["sha256"] == hashlib.sha256(b"one" * 100).hexdigest() and man["size"] == 300
    assert get_artifact(store, "e/dst") == (b"one" * 100, man)
    put_artifact(store, "e/src", b"two", {"n": 1})
    st.drop_payload(store, "e/src")
    assert get_artifact(store, "e/dst")[0] == b"one" * 100
    with pytest.raises(NotFound):
        st.copy_artifact(store, "e/absent", "e/x", {})
    with pytest.raises(st.ObjectTooLarge):
        store.copy("e/dst/adapter.safetensors", "e/y", max_bytes=10)
    assert not store.exists("e/y") and not store.exists("e/x/manifest.json")
    put_artifact(store, "e/bad", b"good bytes", {})
    store.put_bytes("e/bad/adapter.safetensors", b"evil bytes")  # the object changed behind its manifest
    st.copy_artifact(store, "e/bad", "e/bad2", {})
    with pytest.raises(ChecksumMismatch):
        get_artifact(store, "e/bad2")


def test_local_copy_is_a_hard_link_with_a_fallback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """LocalStore.copy moves no bytes (a hard link to the same inode); where links fail (another
    filesystem, EXDEV) it reads and writes; a symlink source is read like get_bytes reads it."""
    import errno

    s = LocalStore(tmp_path / "s")
    s.put_bytes("e/a", b"payload")
    s.copy("e/a", "f/b")
    s.copy("e/a", "f/b")  # again (a retried step): no hidden third link left behind
    a, b = (tmp_path / "s/e/a").stat(), (tmp_path / "s/f/b").stat()
    assert a.st_ino == b.st_ino and a.st_nlink == 2 and s.get_bytes("f/b") == b"payload"
    assert os.listdir(tmp_path / "s/f") == ["b"]
    s.put_bytes("e/a", b"new")  # a rename over the key: the link keeps the old bytes
    assert s.get_bytes("f/b") == b"payload"

    def no_link(*a: object, **k: object) -> None:
        raise OSError(errno.EXDEV, "cross-device link")

    monkeypatch.setattr(os, "link", no_link)
    s.copy("e/a", "f/c")
    assert s.get_bytes("f/c") == b"new" and (tmp_path / "s/f/c").stat().st_nlink == 1
    assert sorted(os.listdir(tmp_path / "s/f")) == ["b", "c"]  # no temp file left
    monkeypatch.undo()
    (tmp_path / "outside").write_bytes(b"secret")
    (tmp_path / "s/e/link").symlink_to(tmp_path / "outside")
    with pytest.raises(ValueError, match="outside"):
        s.copy("e/link", "f/d")
