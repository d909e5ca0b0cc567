"""The typed config: every bad value is rejected with a message naming the field and the value."""

from __future__ import annotations

from pathlib import Path

import pytest

from hetlora_core.config import ConfigError, config_from_dict, load_config, replace

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


def test_defaults_are_valid_and_round_trip():
    cfg = load_config()
    assert config_from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_load(path):
    load_config(path)


@pytest.mark.parametrize("data, message", [
    ({"trainig": {}}, r"unknown key\(s\) \['trainig'\]"),
    ({"training": {"lr": 1e-3, "lrr": 1}}, r"training: unknown key\(s\) \['lrr'\]"),
    ({"training": {"local_steps": -1}}, r"training.local_steps: must be >= 1, got -1"),
    ({"ranks": {"r_min": 8, "r_max": 4}}, r"r_min \(8\) must be <= r_max \(4\)"),
    ({"ranks": {"tiers": []}}, r"ranks.tiers: is empty"),
    ({"ranks": {"r_max": 4, "tiers": [{"name": "big", "rank": 9}]}}, r"ranks.tiers\[big\].rank: 9 is outside"),
    ({"ranks": {"tiers": [{"name": "a", "rank": 2}, {"name": "a", "rank": 4}]}}, r"unique"),
    ({"ranks": {"tiers": [{"rank": 2}]}}, r"ranks.tiers\[0\]"),
    ({"strategy": {"name": "fedprox"}}, r"strategy.name: must be one of"),
    ({"pruning": {"gamma": 1.5}}, r"pruning.gamma: must be in \(0, 1\), got 1.5"),
    ({"training": {"lr": float("nan")}}, r"training.lr: must be finite"),
    ({"training": {"batch_size": 2.5}}, r"training.batch_size: must be an integer, got 2.5"),
    ({"training": {"bf16": "yes"}}, r"training.bf16: must be true or false"),
    ({"federation": {"clients_per_round": 50}}, r"exceeds data.num_clients"),
    ({"store": {"kind": "s3"}}, r"store.endpoint: is required"),
    ({"store": {"kind": "s3", "endpoint": "http://x:9000"}}, r"without a scheme"),
    ({"experiment": "a/b"}, r"experiment: must be"),
    ({"ranks": {"assignment": "explicit", "explicit": [2, 4]}}, r"ranks.explicit: has 2 ranks but data.num_clients is 6"),
])
def test_bad_config_rejected(data, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(data)


def test_kfp_floats_are_coerced():
    cfg = config_from_dict({"training": {"local_steps": 3.0}, "ranks": {"r_min": 2.0}})
    assert cfg.training.local_steps == 3 and isinstance(cfg.ranks.r_min, int)


def test_load_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("training: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_overrides_and_replace():
    cfg = load_config(overrides={"training.lr": 1e-4, "strategy.name": "zero_pad"})
    assert cfg.training.lr == 1e-4 and cfg.strategy.name == "zero_pad"
    assert replace(cfg, **{"federation.rounds": 7}).federation.rounds == 7
    with pytest.raises(ConfigError):
        replace(cfg, **{"federation.rounds": 0})
