"""Store inputs outside the data path (issue 13, part 5): ``store.root`` honoured, never ignored;
S3 calls bounded by ``store.retry_deadline_s`` even against an endpoint that trickles or never
answers; disk-full and permission errors named as such; sizes checked before reading."""

from __future__ import annotations

import json
from pathlib import Path

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
