"""Store inputs outside the data path (issue 13, part 5): ``store.root`` honoured, never ignored;
S3 calls bounded by ``store.retry_deadline_s`` even against an endpoint that trickles or never
answers; disk-full and permission errors named as such; sizes checked before reading."""

from __future__ import annotations

import errno
import http.server
import json
import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from minio_server import MinioServer
from seaweed_server import SeaweedServer

from hetlora_core import store as st
from hetlora_core.config import StoreConfig, load_config
from hetlora_core.run import local_config
from hetlora_core.store import open_store

# ---------------------------------------------------------------- store.root


def test_local_config_honours_store_root(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert local_config(load_config(None), "out").store.root == str(tmp_path / "out" / "store")  # unset: OUT/store
    cfg = load_config(None, {"store.root": "elsewhere/st"})
    assert local_config(cfg, "out").store.root == str(tmp_path / "elsewhere" / "st")  # set: used, made absolute
    s3 = load_config(None, {"store.kind": "s3", "store.endpoint": "h:9000", "store.root": "x"})
    assert local_config(s3, "out").store == s3.store


def test_simulate_writes_the_store_at_store_root_and_export_finds_it(tmp_path: Path) -> None:
    from hetlora_core.cli import main

    out, root = tmp_path / "out", tmp_path / "elsewhere" / "store"
    r = CliRunner().invoke(main, ["simulate", "-c", "configs/smoke.yaml", "-q", "--out", str(out), "--set", "federation.rounds=1",
                                  "--set", f"store.root={root}"])
    assert r.exit_code == 0, r.output
    assert (root / "smoke" / "round-0000" / "global" / st.MANIFEST).is_file()
    assert not (out / "store").exists()  # not silently under --out
    assert json.loads((out / "results.json").read_text())["config"]["store"]["root"] == str(root)
    e = CliRunner().invoke(main, ["export", "--run", str(out), "--out", str(tmp_path / "peft")])
    assert e.exit_code == 0, e.output
    assert (tmp_path / "peft" / "adapter_config.json").is_file()


def test_a_store_without_a_root_is_a_config_error_naming_store_root(tmp_path: Path) -> None:
    from hetlora_kfp.pipelines.cli import main

    r = CliRunner().invoke(main, ["compile", "-c", "configs/smoke.yaml", "--round", "1", "--out", str(tmp_path / "p.yaml")])
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    assert "store.root: is empty" in r.output and "--set store.root=" in r.output


# ---------------------------------------------------------------- S3 calls inside the retry deadline


class StallingEndpoint:
    """A TCP server on 127.0.0.1 that accepts connections and then either never answers
    (``every=None``) or trickles an HTTP answer one byte every ``every`` seconds: slower than any
    useful server, yet fast enough that no single socket read ever times out."""

    def __init__(self, every: float | None) -> None:
        self.every, self.stop = every, threading.Event()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.endpoint = f"127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        with conn:
            if self.every is None:
                self.stop.wait(60)
                return
            for b in b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"x" * 1000:
                if self.stop.wait(self.every):
                    return
                try:
                    conn.sendall(bytes([b]))
                except OSError:
                    return

    def close(self) -> None:
        self.stop.set()
        self.sock.close()


@pytest.mark.parametrize(("every", "op"), [(None, "get"), (1.0, "get"), (1.0, "put"), (0.5, "list")])
def test_s3_call_against_a_stalling_endpoint_times_out_within_the_deadline(every: float | None, op: str) -> None:
    server = StallingEndpoint(every)
    try:
        s = st.S3Store(server.endpoint, "bkt", retry_deadline_s=2.0, credentials=("ak", "sk"), create_bucket=False)
        call = {"get": lambda: s.get_bytes("exp/round-0000/k"), "put": lambda: s.put_bytes("exp/round-0000/k", b"abc"),
                "list": lambda: s.list("exp/round-0000/k")}[op]
        t0 = time.monotonic()
        with pytest.raises(st.StoreUnavailable) as e:
            call()
        elapsed = time.monotonic() - t0
    finally:
        server.close()
    assert elapsed < 2.0 + 1.5, f"{op} took {elapsed:.1f} s with store.retry_deadline_s=2"
    msg = str(e.value)
    assert "timed out" in msg and server.endpoint in msg and f"{op} exp/round-0000/k" in msg, msg


# ---------------------------------------------------------------- disk full and permissions, by name


def test_s3_wrong_credentials_and_access_denied_are_told_apart(s3_store_config: StoreConfig,
                                                               s3_server: MinioServer | SeaweedServer) -> None:
    open_store(s3_store_config).put_bytes("e/k", b"x")
    ep, bucket = s3_server.endpoint, s3_store_config.bucket
    wrong = st.S3Store(ep, bucket, credentials=("nobody", "not-the-secret-1234"), create_bucket=False, retry_deadline_s=5)
    with pytest.raises(st.StoreAuthError) as e:
        wrong.get_bytes("e/k")
    assert not isinstance(e.value, st.StorePermissionError)
    assert "rejected the credentials" in str(e.value) and "get e/k" in str(e.value), str(e.value)
    # The real server's AccessDenied: a request without credentials to the private bucket.
    anonymous = st.S3Store(ep, bucket, credentials=("", ""), create_bucket=False, retry_deadline_s=5)
    t0 = time.monotonic()
    with pytest.raises(st.StorePermissionError) as d:
        anonymous.put_bytes("e/k2", b"x")
    assert time.monotonic() - t0 < 2, "a refusal is not retried"
    msg = str(d.value)
    assert "permission denied (AccessDenied)" in msg and "put e/k2" in msg and bucket in msg, msg
    assert s3_server.secret_key not in msg


def test_s3_edge_answers_match_on_every_server(s3_store_config: StoreConfig) -> None:
    """The answers S3Store maps to its own errors, from each real server (MinIO, SeaweedFS): a body
    over max_bytes, a missing key, an empty object, an empty prefix, a bucket that is not there."""
    s = open_store(s3_store_config)
    s.put_bytes("e/big", b"x" * 1000)
    with pytest.raises(st.ObjectTooLarge):
        s.get_bytes("e/big", max_bytes=999)  # refused from content-length, before the body is read
    assert s.get_bytes("e/big", max_bytes=1000) == b"x" * 1000
    with pytest.raises(st.NotFound):
        s.get_bytes("e/missing")
    assert not s.exists("e/missing")
    s.delete("e/missing")  # idempotent
    s.put_bytes("e/empty", b"")
    assert s.get_bytes("e/empty") == b"" and s.exists("e/empty")
    assert s.list("e") == ["e/big", "e/empty"] and s.list("nothing") == []
    s.delete_prefix("nothing")
    missing = st.S3Store(s3_store_config.endpoint, "no-such-bucket-here", retry_deadline_s=3, create_bucket=False)
    t0 = time.monotonic()
    for call in (lambda: missing.get_bytes("e/k"), lambda: missing.list("e")):
        with pytest.raises(st.StoreError, match="NoSuchBucket") as e:
            call()
        assert not isinstance(e.value, (st.NotFound, st.StoreUnavailable)), e.value
    assert time.monotonic() - t0 < 2, "a missing bucket is not retried"


class FullS3(http.server.BaseHTTPRequestHandler):
    """Answers every request the way a MinIO whose drives are full answers a PUT."""

    def _full(self) -> None:
        body = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>XMinioStorageFull</Code><Message>Storage backend has '
                b"reached its minimum free drive threshold. Please delete a few objects to proceed.</Message>"
                b"<Resource>/bkt/e/k</Resource><RequestId>1</RequestId><HostId>h</HostId></Error>")
        self.send_response(507)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_PUT = do_GET = do_HEAD = _full

    def log_message(self, *args: object) -> None:
        pass


def test_full_minio_is_reported_as_full_at_once_not_as_a_server_down() -> None:
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FullS3)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        s = st.S3Store(f"127.0.0.1:{srv.server_address[1]}", "bkt", region="us-east-1", credentials=("ak", "sk"),
                       create_bucket=False, retry_deadline_s=5)
        t0 = time.monotonic()
        with pytest.raises(st.StoreFull) as e:
            s.put_bytes("e/k", b"abc")
        elapsed = time.monotonic() - t0
    finally:
        srv.shutdown()
    msg = str(e.value)
    assert elapsed < 2 and "Is the server running" not in msg, msg  # not retried until the deadline
    assert "no space left (XMinioStorageFull" in msg and "put e/k" in msg, msg


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    """A real 64 KiB tmpfs (needs root and mount rights; skipped elsewhere: the mocked tests below run everywhere)."""
    d = tmp_path / "tiny"
    d.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(d)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a small tmpfs needs root")
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], check=False)


def test_local_store_on_a_full_disk_then_read_only(tiny_fs: Path) -> None:
    s = st.LocalStore(tiny_fs)
    s.put_bytes("e/small", b"ok")
    with pytest.raises(st.StoreFull) as e:
        s.put_bytes("e/big", b"x" * 256 * 1024)
    assert "e/big" in str(e.value) and "the disk is full (ENOSPC" in str(e.value), str(e.value)
    assert s.list("e") == ["e/small"] and os.listdir(tiny_fs / "e") == ["small"]  # no partial object, no temp file
    subprocess.run(["mount", "-o", "remount,ro", str(tiny_fs)], check=True)
    with pytest.raises(st.StorePermissionError, match=r"cannot write e/other .*read-only \(EROFS\)"):
        s.put_bytes("e/other", b"x")
    assert s.get_bytes("e/small") == b"ok"


def test_local_store_full_disk_and_permission_denied_mocked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same errors where no tmpfs can be mounted: the OSError a full disk raises at fsync (NFS,
    delayed allocation), and the PermissionError of a directory the user may not read."""
    import hetlora_core.store.base as base
    import hetlora_core.store.local as local

    s = st.LocalStore(tmp_path)
    s.put_bytes("e/k", b"ok")

    def full(_fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(base.os, "fsync", full)
    with pytest.raises(st.StoreFull, match=r"cannot write e/new .*the disk is full \(ENOSPC"):
        s.put_bytes("e/new", b"x")
    monkeypatch.undo()
    assert s.list("e") == ["e/k"]

    def denied(path: object, *a: object, **k: object) -> None:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))

    monkeypatch.setattr(local, "open", denied, raising=False)
    with pytest.raises(st.StorePermissionError, match=r"cannot read e/k .*permission denied \(EACCES"):
        s.get_bytes("e/k")
