"""Store inputs outside the data path (issue 13, part 5): ``store.root`` honoured, never ignored;
S3 calls bounded by ``store.retry_deadline_s`` even against an endpoint that trickles or never
answers; disk-full and permission errors named as such; sizes checked before reading."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from hetlora_core import store as st
from hetlora_core.config import load_config
from hetlora_core.run import local_config

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
