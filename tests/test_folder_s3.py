"""Folder data under an S3 prefix on the real MinIO and SeaweedFS: one train task lists and gets only
its own client's keys, and a whole `hetlora run` (kfp.local, MinIO) trains and evaluates on it."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest
from hetlora_kfp.pipelines.runners import run_local
from test_client_isolation import CLIENTS, folder_config, make_folders

from hetlora_core import store as st
from hetlora_core.config import HetLoRAConfig, StoreConfig
from hetlora_core.datasource import client_ids
from hetlora_core.steps.plan import plan_round
from hetlora_core.steps.train import train
from hetlora_core.store.s3 import S3Store


def upload_clients(tmp_path: Path, store_cfg: StoreConfig) -> str:
    """The clients of test_client_isolation, uploaded to a fresh data bucket; returns data.path."""
    make_folders(tmp_path / "local")
    bucket = f"d-{uuid.uuid4().hex[:16]}"
    s3 = S3Store(store_cfg.endpoint, bucket, retry_deadline_s=15.0)
    for f in sorted((tmp_path / "local").rglob("*.jsonl")):
        s3.put_bytes(f"clients/{f.relative_to(tmp_path / 'local').as_posix()}", f.read_bytes())
    s3.put_bytes("clients/README.md", b"a file at the prefix root is not a client")
    return f"s3://{bucket}/clients"


def s3_config(tmp_path: Path, store_cfg: StoreConfig, data_path: str, **extra: Any) -> HetLoRAConfig:
    store = {"kind": "s3", "endpoint": store_cfg.endpoint, "bucket": store_cfg.bucket, "retry_deadline_s": 15.0}
    return folder_config(data_path, tmp_path / "unused", store=store, **extra)


def test_a_train_task_reads_only_its_own_prefix(tmp_path: Path, s3_store_config: StoreConfig,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    data_path = upload_clients(tmp_path, s3_store_config)
    cfg = s3_config(tmp_path, s3_store_config, data_path)
    store = st.open_store(cfg.store)
    assert client_ids(cfg) == sorted(CLIENTS)
    plan_round(cfg, store, client_ids(cfg), 0)
    data_bucket = data_path[5:].split("/", 1)[0]
    touched: list[str] = []
    real_get, real_list = S3Store.get_bytes, S3Store.list

    def get(self: S3Store, key: str, **kw: Any) -> bytes:
        if self.bucket == data_bucket:
            touched.append(key)
        return real_get(self, key, **kw)

    def lst(self: S3Store, prefix: str = "") -> list[str]:
        if self.bucket == data_bucket:
            touched.append(prefix + "/")
        return real_list(self, prefix)

    monkeypatch.setattr(S3Store, "get_bytes", get)
    monkeypatch.setattr(S3Store, "list", lst)
    report = train(cfg, store, 0, "bob")
    assert report.status == "trained", report.reason
    assert "clients/bob/train.jsonl" in touched and "clients/bob/eval.jsonl" in touched
    assert all(k.startswith("clients/bob/") for k in touched), touched


@pytest.mark.slow  # a whole kfp.local run: MinIO only (the store calls it makes are the ones tested above)
def test_hetlora_run_on_folder_data_under_an_s3_prefix(tmp_path: Path, minio_store_config: StoreConfig) -> None:
    data_path = upload_clients(tmp_path, minio_store_config)
    cfg = s3_config(tmp_path, minio_store_config, data_path)
    res = run_local(cfg, tmp_path / "kfp", progress=False)
    assert res["rounds_committed"] == 1
    r0 = res["rounds"][0]
    assert sorted(r0["participants"]) == sorted(CLIENTS) and r0["global_ppl"] > 1
    assert sorted(r0["per_client_rouge_l"]) == sorted(CLIENTS) and 0 <= r0["rouge_l"] <= 1
    saved = json.loads((tmp_path / "kfp" / "results.json").read_text())
    assert saved["rounds"][0]["rouge_l"] == r0["rouge_l"]
