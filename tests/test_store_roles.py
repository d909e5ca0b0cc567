"""The two store roles on a real MinIO (issue 13): the client user cannot write server state.

``ensure_roles`` makes the users through MinIO's admin API; then, with each user's own keys, the
client is refused (AccessDenied, as ``StoreAuthError`` naming the key) on every key only the server
writes, may write its uploads and evaluation sums, and deletes nothing; the server writes plans and
globals. One round runs with the roles split as in the cluster: the driver and aggregation as the
server, the uploads as clients. ``hetlora store roles`` writes the keys as 0600 files, and keeps them.
"""

from __future__ import annotations

import json
import stat
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from minio_server import MinioServer

from hetlora_core import store as st
from hetlora_core.adapter import LoraAdapter
from hetlora_core.config import StoreConfig, config_from_dict
from hetlora_core.steps.aggregate import aggregate_task
from hetlora_core.steps.plan import plan_round
from hetlora_core.store.roles import Credentials, client_policy, client_write_patterns, ensure_roles

EXP = "roles"
IDS = ["a", "b", "c"]


@pytest.fixture
def roles(minio_server: MinioServer) -> tuple[StoreConfig, Credentials, st.Store, st.Store]:
    """(store config, the server's credentials, the server's store, a client's store) on a fresh
    bucket with fresh users."""
    if not minio_server.running():
        minio_server.start()
    tag = uuid.uuid4().hex[:8]
    bucket = f"roles-{tag}"
    server, client = ensure_roles(minio_server.endpoint, Credentials(minio_server.access_key, minio_server.secret_key), bucket,
                                  server_user=f"srv-{tag}", client_user=f"cli-{tag}")
    assert server.secret_key not in repr(server) and client.secret_key not in repr(client)
    cfg = StoreConfig(kind="s3", endpoint=minio_server.endpoint, bucket=bucket, retry_deadline_s=10.0)
    return (cfg, server, st.open_store(cfg, credentials=(server.access_key, server.secret_key)),
            st.open_store(cfg, credentials=(client.access_key, client.secret_key)))


def server_keys(rnd: int) -> list[str]:
    return [st.plan_key(EXP, rnd), f"{st.global_prefix(EXP, rnd)}/{st.MANIFEST}", f"{st.global_prefix(EXP, rnd)}/{st.ADAPTER}",
            st.eval_key(EXP, rnd), st.baseline_key(EXP), st.config_key(EXP)]


def test_patterns_come_from_the_layout() -> None:
    assert client_write_patterns() == ["*/round-*/clients/*/*", "*/round-*/eval/clients/*.json"]
    for key in server_keys(3):  # no server key matches a client pattern (a '*' may span '/')
        assert "/clients/" not in key
    assert "/clients/" in st.trained_prefix(EXP, 3, "a") and "/eval/clients/" in st.client_eval_key(EXP, 3, "a")
    policy = client_policy("store", ["data", "store"])  # folder data's bucket is read, never written
    read, get, put = policy["Statement"]
    assert read["Resource"] == ["arn:aws:s3:::store", "arn:aws:s3:::data"]
    assert get["Resource"] == ["arn:aws:s3:::store/*", "arn:aws:s3:::data/*"] and get["Action"] == ["s3:GetObject"]
    assert put["Action"] == ["s3:PutObject"] and all(r.startswith("arn:aws:s3:::store/") for r in put["Resource"])
    assert not any("Delete" in a or a == "s3:*" for s in policy["Statement"] for a in s["Action"])


@pytest.mark.attack
def test_client_cannot_write_or_delete_server_state(roles: tuple[StoreConfig, Credentials, st.Store, st.Store]) -> None:
    _, _, server, client = roles
    for key in server_keys(1):
        server.put_bytes(key, b'{"by": "server"}')  # the server role writes plans, globals, metrics, config
    for key in server_keys(1) + server_keys(2):  # overwrite what exists, or plant what does not yet
        with pytest.raises(st.StoreAuthError, match=rf"put {key} .*AccessDenied"):
            client.put_bytes(key, b'{"by": "attacker"}')
    with pytest.raises(st.StoreAuthError, match="AccessDenied"):
        client.delete(st.plan_key(EXP, 1))
    with pytest.raises(st.StoreError, match="4 object.s. not deleted, first: .*AccessDenied"):  # every one refused
        client.delete_prefix(st.round_prefix(EXP, 1))
    assert {k: server.get_bytes(k) for k in server_keys(1)} == {k: b'{"by": "server"}' for k in server_keys(1)}
    assert not any(server.exists(k) for k in server_keys(2)[:4])  # the round-2 keys were never planted
    # What a client does write and read
    st.put_artifact(client, st.trained_prefix(EXP, 1, "a"), b"trained", {"client_id": "a"})
    st.put_artifact(client, st.client_prefix(EXP, 1, "a"), b"upload", {"client_id": "a"})
    client.put_bytes(st.client_eval_key(EXP, 1, "a"), b"{}")
    assert client.get_bytes(st.plan_key(EXP, 1)) == b'{"by": "server"}'
    assert st.get_artifact(client, st.trained_prefix(EXP, 1, "a"))[0] == b"trained"
    assert st.list_client_ids(server, EXP, 1) == ["a"]


def _upload(store: st.Store, rnd: int, client_id: str, rank: int) -> None:
    spec = {"layers.0.q_proj": (16, 16), "layers.0.v_proj": (8, 16)}
    rng = np.random.default_rng(len(client_id) + rnd)
    a = LoraAdapter({m: (0.01 * rng.standard_normal((rank, s[1]))).astype(np.float32) for m, s in spec.items()},
                    {m: (0.01 * rng.standard_normal((s[0], rank))).astype(np.float32) for m, s in spec.items()}, 2.0)
    st.put_artifact(store, st.client_prefix(EXP, rnd, client_id), a.to_bytes(), {"client_id": client_id, "num_samples": 10})


def test_a_round_with_split_roles(roles: tuple[StoreConfig, Credentials, st.Store, st.Store],
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The issue's plan rewrite, with the roles split: the client's rewrite is refused by MinIO,
    and the round commits with every client the driver planned."""
    store_cfg, server_creds, server, client = roles
    cfg: Any = config_from_dict({"experiment": EXP, "model": {"lora_scale": 2.0}, "data": {"num_clients": 3},
                                 "ranks": {"r_min": 2, "r_max": 8, "assignment": "explicit", "explicit": [2, 4, 8]},
                                 "federation": {"clients_per_round": 3, "quorum": 0.5}, "store": store_cfg.__dict__})
    plan = plan_round(cfg, server, IDS, 0)
    doc = json.loads(client.get_bytes(st.plan_key(EXP, 0)))  # clients read the plan...
    with pytest.raises(st.StoreAuthError, match="AccessDenied"):  # ...and cannot rewrite it to list only themselves
        client.put_bytes(st.plan_key(EXP, 0), json.dumps({**doc, "clients": doc["clients"][:1]}).encode())
    for c in plan.clients:
        _upload(client, 0, c.client_id, c.rank)
    # aggregate_task opens the store from the environment: give it the server role's keys, as its Secret would
    monkeypatch.setenv("HETLORA_S3_ACCESS_KEY", server_creds.access_key)
    monkeypatch.setenv("HETLORA_S3_SECRET_KEY", server_creds.secret_key)
    out = json.loads(aggregate_task(cfg.to_json(), 0, []))
    assert sorted(out["participants"]) == IDS and out["dropped"] == {}
    with pytest.raises(st.StoreAuthError, match="AccessDenied"):  # the commit is out of the clients' reach too
        st.put_artifact(client, st.global_prefix(EXP, 0), b"forged", {"round": 0})


def test_cli_writes_0600_files_and_keeps_the_secrets(minio_server: MinioServer, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from hetlora_kfp.pipelines.cli import main

    if not minio_server.running():
        minio_server.start()
    monkeypatch.setenv("MINIO_ROOT_USER", minio_server.access_key)
    monkeypatch.setenv("MINIO_ROOT_PASSWORD", minio_server.secret_key)
    bucket = f"cli-{uuid.uuid4().hex[:8]}"
    args = ["store", "roles", "--out", str(tmp_path / "keys"), "--set", "store.kind=s3", "--set", f"store.endpoint={minio_server.endpoint}",
            "--set", f"store.bucket={bucket}"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    files = {p.name: p for p in (tmp_path / "keys").iterdir()}
    assert sorted(files) == ["client.env", "server-key.env", "server.env"]
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in files.values())
    first = {n: p.read_text() for n, p in files.items()}
    for text in first.values():
        assert text.split("=", 1)[1].strip() not in res.output  # the secrets are in files, never printed
    assert "kubectl -n kubeflow create secret generic hetlora-store --from-env-file=" in res.output
    env = dict(line.split("=", 1) for line in first["client.env"].splitlines())
    client = st.open_store(StoreConfig(kind="s3", endpoint=minio_server.endpoint, bucket=bucket, retry_deadline_s=10.0),
                           credentials=(env["accesskey"], env["secretkey"]))
    with pytest.raises(st.StoreAuthError, match="AccessDenied"):
        client.put_bytes(st.plan_key(EXP, 0), b"{}")
    assert CliRunner().invoke(main, args).exit_code == 0  # rerun: same users, same secrets (no rotation)
    assert {n: p.read_text() for n, p in files.items()} == first
    monkeypatch.setenv("MINIO_ROOT_PASSWORD", "wrong-password")
    res = CliRunner().invoke(main, args)
    assert res.exit_code != 0 and "could not create the store roles" in res.output and "Traceback" not in res.output


def test_a_client_copies_only_into_its_own_keys(roles: tuple[StoreConfig, Credentials, st.Store, st.Store]) -> None:
    """The prune step of a method that does not prune commits its trained object by a server-side
    copy (S3 CopyObject): with the client role it works within the client's keys, and a copy into
    server state is refused like any write there."""
    _, _, server, client = roles
    trained, upload = st.trained_prefix(EXP, 0, "c0"), st.client_prefix(EXP, 0, "c0")
    st.put_artifact(client, trained, b"trained bytes", {"num_samples": 1})
    man = st.copy_artifact(client, trained, upload, {"num_samples": 1})
    assert st.get_artifact(server, upload) == (b"trained bytes", man)
    with pytest.raises(st.StoreAuthError, match="AccessDenied"):
        client.copy(f"{trained}/{st.ADAPTER}", f"{st.global_prefix(EXP, 0)}/{st.ADAPTER}")
    assert not server.exists(f"{st.global_prefix(EXP, 0)}/{st.ADAPTER}")
