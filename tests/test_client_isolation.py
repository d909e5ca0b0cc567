"""Isolation of folder data: the driver lists clients by folder name only, and one client's train
task reads only that client's folder (it even succeeds when every other folder is gone)."""

from __future__ import annotations

import builtins
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from hetlora_core import store as st
from hetlora_core.config import HetLoRAConfig, config_from_dict
from hetlora_core.datasource import client_ids
from hetlora_core.steps.plan import plan_round
from hetlora_core.steps.train import train

CLIENTS = ("alice", "bob", "carol")


def make_folders(root: Path, clients: tuple[str, ...] = CLIENTS, n: int = 6) -> None:
    """Prompt/completion clients with different answers each (real text shape, tiny size)."""
    for k, c in enumerate(clients):
        (root / c).mkdir(parents=True)
        pairs = [{"prompt": f"{c} asks question {i}?", "completion": f"Answer {i * (k + 1)} from {c}."} for i in range(n)]
        (root / c / "train.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs[:-2]))
        (root / c / "eval.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs[-2:]))


def folder_config(root: Path | str, store_root: Path, **extra: Any) -> HetLoRAConfig:
    return config_from_dict({
        "experiment": "iso",
        "model": {"name": "tiny", "tiny_hidden": 32, "tiny_layers": 1},
        "data": {"source": "folder", "path": str(root), "num_clients": len(CLIENTS), "seq_len": 48, "eval_max_tokens": 48},
        "ranks": {"r_min": 2, "r_max": 4, "tiers": [{"name": "small", "rank": 2}, {"name": "large", "rank": 4}]},
        "training": {"local_steps": 2, "batch_size": 2, "bf16": False, "threads": 1},
        "federation": {"rounds": 1, "clients_per_round": len(CLIENTS)},
        "store": {"root": str(store_root)}, **extra})


def test_a_train_task_needs_only_its_own_folder(tmp_path: Path) -> None:
    make_folders(tmp_path / "data")
    cfg = folder_config(tmp_path / "data", tmp_path / "store")
    store = st.open_store(cfg.store)
    plan_round(cfg, store, client_ids(cfg), 0)
    for other in CLIENTS[1:]:
        shutil.rmtree(tmp_path / "data" / other)  # after planning: only alice's folder is left
    report = train(cfg, store, 0, "alice")
    assert report.status == "trained", report.reason
    man = st.get_manifest(store, st.trained_prefix("iso", 0, "alice"))
    assert man is not None and man["num_samples"] == 4 and man["num_tokens"] > 0
    # bob's task now fails as a client-side failure that names bob's missing folder
    bob = train(cfg, store, 0, "bob")
    assert bob.status == "failed" and "bob" in bob.reason


def test_one_train_task_opens_only_its_clients_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "data"
    make_folders(root)
    cfg = folder_config(root, tmp_path / "store")
    store = st.open_store(cfg.store)
    plan_round(cfg, store, client_ids(cfg), 0)

    seen: list[str] = []
    real_open, real_scandir, real_lstat, real_os_open = builtins.open, os.scandir, os.lstat, os.open

    def note(p: Any) -> None:
        if isinstance(p, (str, os.PathLike)) and str(p).startswith(str(root)):
            seen.append(str(p))

    def rec_open(file: Any, *a: Any, **k: Any) -> Any:
        note(file)
        return real_open(file, *a, **k)

    def rec_scandir(p: Any = ".") -> Any:
        note(p)
        return real_scandir(p)

    def rec_lstat(p: Any, *a: Any, **k: Any) -> Any:
        note(p)
        return real_lstat(p, *a, **k)

    def rec_os_open(p: Any, *a: Any, **k: Any) -> Any:
        note(p)
        return real_os_open(p, *a, **k)

    monkeypatch.setattr(builtins, "open", rec_open)
    monkeypatch.setattr(os, "scandir", rec_scandir)
    monkeypatch.setattr(os, "lstat", rec_lstat)
    monkeypatch.setattr(os, "open", rec_os_open)
    report = train(cfg, store, 0, "carol")
    monkeypatch.undo()
    assert report.status == "trained", report.reason
    assert str(root / "carol" / "train.jsonl") in seen  # the recorder does see the data layer's reads
    assert seen and all(p.startswith(str(root / "carol")) for p in seen), sorted(set(seen))


def test_the_driver_lists_clients_without_reading_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_folders(tmp_path / "data")
    (tmp_path / "data" / "bob" / "train.jsonl").write_text("not json at all")  # never read by listing
    cfg = folder_config(tmp_path / "data", tmp_path / "store")
    opened: list[str] = []
    real_open = builtins.open

    def rec_open(f: Any, *a: Any, **k: Any) -> Any:
        opened.append(str(f))
        return real_open(f, *a, **k)

    monkeypatch.setattr(builtins, "open", rec_open)
    assert client_ids(cfg) == sorted(CLIENTS)
    monkeypatch.undo()
    assert not [p for p in opened if str(tmp_path / "data") in p]
