"""Credentials come only from the environment and go nowhere else; buckets are private; TLS works.

A round of the smoke config runs against a real MinIO whose credentials are fresh random values
(set only in the environment), the round's pipeline is compiled by the CLI in a subprocess, and
then every place a credential could leak is searched for the values (and their base64 and
URL-encoded forms): the captured logs at DEBUG (ours, urllib3's, minio's), stdout/stderr of the
run and of the subprocess, results.json and every file of the run folder, every object in the
bucket (listed and read back), and the compiled YAML.

TLS: tests/test_store.py::test_s3_tls covers secure=True with a private CA (HETLORA_S3_CA_BUNDLE),
an untrusted certificate and plain HTTP to a TLS port. Here a sniffing TCP proxy on 127.0.0.1
shows what crosses the wire: with SigV4 the secret key never does, even over plain HTTP; the access
key id and the data do over HTTP, and neither does over TLS.
"""

from __future__ import annotations

import base64
import logging
import os
import secrets
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from minio_server import HOST, MinioServer

from hetlora_core import store as st
from hetlora_core.config import StoreConfig, load_config, replace
from hetlora_core.simulate import simulate

pytestmark = pytest.mark.minio
ROOT = Path(__file__).resolve().parents[1]


def forms(value: str) -> list[bytes]:
    """The value and the encodings a leak could hide it in."""
    raw = value.encode()
    return [raw, base64.b64encode(raw), base64.urlsafe_b64encode(raw), urllib.parse.quote(value, safe="").encode()]


def leaks(haystack: bytes | str, needles: list[str]) -> list[str]:
    data = haystack.encode(errors="replace") if isinstance(haystack, str) else haystack
    return [n for n in needles if any(f in data for f in forms(n))]


@pytest.fixture
def own_minio(minio_server: MinioServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[MinioServer]:
    """A MinIO of its own with fresh random credentials, put in the environment only."""
    server = MinioServer(minio_server.binary)  # minio_server: the binary exists (skip/fail otherwise)
    server.access_key = "AK" + secrets.token_hex(9).upper()
    server.secret_key = "sk-" + secrets.token_urlsafe(30)
    with server:
        for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "HETLORA_S3_CA_BUNDLE"):
            monkeypatch.delenv(var, raising=False)
        monkeypatch.setenv("HETLORA_S3_ACCESS_KEY", server.access_key)
        monkeypatch.setenv("HETLORA_S3_SECRET_KEY", server.secret_key)
        yield server


@pytest.mark.timeout(600)
def test_credentials_appear_nowhere(own_minio: MinioServer, tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                    capfd: pytest.CaptureFixture[str]) -> None:
    creds = [own_minio.access_key, own_minio.secret_key]
    assert leaks(b"x" + base64.b64encode(creds[1].encode()) + b"y", creds) == [creds[1]]  # the detector detects
    caplog.set_level(logging.DEBUG)  # everything: ours, urllib3's connection log, minio's
    sets = {"experiment": "secrets", "federation.rounds": 1, "store.kind": "s3", "store.endpoint": own_minio.endpoint,
            "store.bucket": "hetlora-secrets", "store.retry_deadline_s": 20.0,
            "data.eval_max_tokens": 32}  # the smoke config, evaluated on fewer tokens (evaluation dominates its time)
    cfg = replace(load_config(ROOT / "configs" / "smoke.yaml"), **sets)
    assert not leaks(cfg.to_json(), creds)  # the config never holds them
    out = tmp_path / "run"
    res = simulate(cfg, out, progress=True)
    assert res["rounds_committed"] == 1

    # The pipeline, compiled by the CLI as a user does; round 1 reads the committed state from the store.
    yaml_path = tmp_path / "round-1.yaml"
    args = [f"{k}={v}" for k, v in sets.items()]
    p = subprocess.run([sys.executable, "-m", "hetlora_kfp.pipelines.cli", "compile", "-c", "configs/smoke.yaml", "--round", "1",
                        "--out", str(yaml_path), *[a for kv in args for a in ("--set", kv)]],
                       cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]

    captured = capfd.readouterr()
    places: dict[str, bytes | str] = {"logs": caplog.text, "stdout": captured.out, "stderr": captured.err,
                                      "compile stdout": p.stdout, "compile stderr": p.stderr}
    for f in sorted(out.rglob("*")):  # results.json, perplexity.png, anything else the run wrote
        if f.is_file():
            places[str(f.relative_to(tmp_path))] = f.read_bytes()
    store = st.open_store(cfg.store)
    keys = store.list("")
    assert f"{st.global_prefix(cfg.experiment, 0)}/{st.MANIFEST}" in keys and len(keys) >= 10
    for k in keys:
        places[f"s3://{cfg.store.bucket}/{k}"] = store.get_bytes(k)
    places["compiled YAML"] = yaml_path.read_text()
    assert (out / "results.json").is_file() and "results.json" in " ".join(places)
    found = {where: leaks(text, creds) for where, text in places.items()}
    assert not {w: n for w, n in found.items() if n}, f"credential values leaked: {found}"

    # The YAML wires the credentials from the Kubernetes Secret, by name only.
    docs = list(yaml.safe_load_all(yaml_path.read_text()))
    platform = next(d for d in docs if "platforms" in d)
    execs = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    wired = [e for e in execs.values() if e.get("secretAsEnv")]
    assert len(wired) == len(execs) >= 4  # every task (train, prune, aggregate, evaluate) and only by reference
    for e in wired:
        envs = {kv["envVar"] for s in e["secretAsEnv"] for kv in s["keyToEnv"]}
        assert envs == {"HETLORA_S3_ACCESS_KEY", "HETLORA_S3_SECRET_KEY"}
        assert {s.get("secretName") or s.get("secretNameParameter", {}).get("runtimeValue", {}).get("constant")
                for s in e["secretAsEnv"]} == {cfg.kubeflow.store_secret}


def test_bucket_is_private(own_minio: MinioServer) -> None:
    s = st.open_store(StoreConfig(kind="s3", endpoint=own_minio.endpoint, bucket="private-by-default"))
    g0 = st.global_prefix("e", 0)
    st.put_artifact(s, g0, b"weights", {"round": 0})
    base = f"http://{own_minio.endpoint}/private-by-default"
    for method, url, data in (("GET", f"{base}/{g0}/{st.ADAPTER}", None),
                              ("GET", f"{base}/{g0}/{st.MANIFEST}", None),
                              ("GET", f"{base}?list-type=2", None),  # anonymous listing
                              ("PUT", f"{base}/e/evil", b"x"),  # anonymous write
                              ("GET", f"{base}?policy", None)):
        req = urllib.request.Request(url, data=data, method=method)
        with pytest.raises(urllib.error.HTTPError) as exc:
            urllib.request.urlopen(req, timeout=5)
        assert exc.value.code == 403, (method, url, exc.value.code)
    assert s.list("e") == [f"{g0}/{st.ADAPTER}", f"{g0}/{st.MANIFEST}"]


# ---------------------------------------------------------------- what crosses the wire


class SniffProxy:
    """A TCP proxy on 127.0.0.1 that records every byte in both directions."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target, self.captured, self.lock = target, bytearray(), threading.Lock()
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind((HOST, 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while chunk := src.recv(65536):
                with self.lock:
                    self.captured += chunk
                dst.sendall(chunk)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.closed = True
        self.sock.close()


def _talk(endpoint: str, secure: bool, payload: bytes) -> None:
    s = st.open_store(StoreConfig(kind="s3", endpoint=endpoint, bucket="wire", secure=secure, retry_deadline_s=10))
    st.put_artifact(s, st.global_prefix("e", 0), payload, {"round": 0})
    assert st.get_artifact(s, st.global_prefix("e", 0))[0] == payload
    assert s.list("e")


def _sniffed(port: int, tls: bool, payload: bytes) -> bytes:
    """Every byte of one store round trip through a capturing proxy in front of ``port``."""
    proxy = SniffProxy((HOST, port))
    try:
        _talk(f"{HOST}:{proxy.port}", tls, payload)
    finally:
        proxy.close()
    return bytes(proxy.captured)


def test_secret_key_never_crosses_the_wire_and_tls_hides_the_rest(own_minio: MinioServer, minio_server: MinioServer,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    payload = b"PAYLOAD-" + secrets.token_hex(16).encode()
    plain = _sniffed(own_minio.port, False, payload)
    assert payload in plain  # the proxy saw the traffic...
    assert not leaks(plain, [own_minio.secret_key])  # ...but SigV4 never sends the secret key
    assert own_minio.access_key.encode() in plain  # the access key id and the data do travel in clear: use TLS

    with MinioServer(minio_server.binary, tls=True) as tls:
        monkeypatch.setenv("HETLORA_S3_ACCESS_KEY", tls.access_key)
        monkeypatch.setenv("HETLORA_S3_SECRET_KEY", tls.secret_key)
        monkeypatch.setenv("HETLORA_S3_CA_BUNDLE", tls.ca_file or "")
        wire = _sniffed(tls.port, True, payload)
        assert len(wire) > len(payload) and b"\x16\x03" in wire[:8]  # a TLS handshake, then records
        assert not leaks(wire, [tls.access_key, tls.secret_key]) and payload not in wire


def test_no_secret_in_any_failure_message_or_log(own_minio: MinioServer, tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                 capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Failures are where secrets slip out (an error that prints a URL, a request, a config): with a
    store key pair, a hub token and a Pushgateway password set, every failing store operation
    (refused credentials, a permission denied, a closed port, a stalling endpoint), a failed metrics
    push, a CLI run that cannot reach its store and a config that holds a password leave none of
    them in a message, a log line (DEBUG, every logger) or the console."""
    from click.testing import CliRunner
    from test_store_inputs import StallingEndpoint

    from hetlora_core.cli import main
    from hetlora_core.config import ConfigError, MetricsConfig
    from hetlora_core.metrics import push_round_metrics
    from hetlora_core.store.s3 import S3Store

    hub_token, gw_password = "hf_" + secrets.token_hex(16), "gw-" + secrets.token_urlsafe(16)
    closed = socket.socket()
    closed.bind((HOST, 0))
    port = closed.getsockname()[1]  # bound, never listening: connections are refused
    monkeypatch.setenv("HF_TOKEN", hub_token)
    monkeypatch.setenv("HETLORA_PUSHGATEWAY_URL", f"http://metrics:{gw_password}@{HOST}:{port}")
    monkeypatch.setenv("HETLORA_PUSHGATEWAY_TIMEOUT_S", "1")
    needles = [own_minio.access_key, own_minio.secret_key, hub_token, gw_password]
    caplog.set_level(logging.DEBUG)
    messages: list[str] = []

    def fails(call: Any, kind: type[BaseException]) -> None:
        with pytest.raises(kind) as e:
            call()
        messages.append(f"{type(e.value).__name__}: {e.value}")

    ep = own_minio.endpoint
    st.open_store(StoreConfig(kind="s3", endpoint=ep, bucket="leaks")).put_bytes("e/k", b"x")
    wrong_secret = S3Store(ep, "leaks", credentials=(own_minio.access_key, "x" * 40), create_bucket=False, retry_deadline_s=3)
    fails(lambda: wrong_secret.get_bytes("e/k"), st.StoreAuthError)
    fails(lambda: S3Store(ep, "leaks", credentials=("", ""), create_bucket=False, retry_deadline_s=3).put_bytes("e/k", b"y"),
          st.StorePermissionError)
    fails(lambda: st.open_store(StoreConfig(kind="s3", endpoint=f"{HOST}:{port}", retry_deadline_s=0.5)), st.StoreUnavailable)
    stall = StallingEndpoint(0.5)
    try:
        fails(lambda: S3Store(stall.endpoint, "leaks", retry_deadline_s=1.0, create_bucket=False).get_bytes("e/k"),
              st.StoreUnavailable)
    finally:
        stall.close()
    assert push_round_metrics(MetricsConfig(), "run", 0, duration_s=1.0, global_ppl=1.0, mean_train_loss=1.0, clients=1,
                              bytes_up=1, bytes_down=1) is False
    r = CliRunner().invoke(main, ["simulate", "-c", "configs/smoke.yaml", "--out", str(tmp_path / "run"), "--set", "store.kind=s3",
                                  "--set", f"store.endpoint={HOST}:{port}", "--set", "store.retry_deadline_s=0.5"])
    assert r.exit_code == 1 and "is unavailable" in r.output, r.output
    messages.append(r.output)
    fails(lambda: MetricsConfig(pushgateway_url=f"http://metrics:{gw_password}@gw:9091"), ConfigError)
    closed.close()

    assert "could not push" in caplog.text and "metrics:***@" in caplog.text  # the push did fail, and said where
    assert any("contains a password" in m for m in messages) and len(messages) == 6
    captured = capfd.readouterr()
    places = {"messages": "\n".join(messages), "logs": caplog.text, "stdout": captured.out, "stderr": captured.err}
    found = {where: leaks(text, needles) for where, text in places.items()}
    assert not {w: n for w, n in found.items() if n}, f"secrets leaked: {found}"
