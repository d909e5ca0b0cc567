"""The typed config: every bad value is rejected with a message naming the field and the value."""

from __future__ import annotations

import json
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


@pytest.mark.parametrize("how", ["dict", "yaml", "set"])
def test_removed_rank_aware_normalisation_is_refused_naming_the_field(how, tmp_path):
    """``strategy.normalisation`` was removed (its only other value, rank_aware, trailed the paper's
    formula): asking for rank_aware is an error naming the field, the value and why, however it is set."""
    with pytest.raises(ConfigError, match=r"strategy\.normalisation: 'rank_aware': the option was removed .*docs/results\.md"):
        if how == "dict":
            config_from_dict({"strategy": {"normalisation": "rank_aware"}})
        elif how == "yaml":
            (tmp_path / "c.yaml").write_text("strategy:\n  name: hetlora\n  normalisation: rank_aware\n")
            load_config(tmp_path / "c.yaml")
        else:
            load_config(None, {"strategy.normalisation": "rank_aware"})
    with pytest.raises(ConfigError, match=r"strategy\.normalisation: 'bogus': the option was removed"):
        config_from_dict({"strategy": {"normalisation": "bogus"}})


def test_a_config_recorded_before_the_removal_still_loads_and_resumes(tmp_path):
    """Every config recorded before the removal spells out ``strategy.normalisation: paper`` (the
    default, what remains): it loads as the same config, and a run recorded with it resumes."""
    from hetlora_core.run import check_or_record_config
    from hetlora_core.store import LocalStore, config_key, get_json, put_json

    cfg = load_config(None, {"model.name": "tiny", "strategy.name": "zero_pad"})
    old = cfg.to_dict()
    assert "normalisation" not in old["strategy"]
    old["strategy"]["normalisation"] = "paper"
    assert config_from_dict(old) == cfg
    store = LocalStore(tmp_path / "store")
    put_json(store, config_key(cfg.experiment), json.loads(json.dumps(old)))
    check_or_record_config(cfg, store)  # no RunConfigMismatch
    assert "normalisation" not in get_json(store, config_key(cfg.experiment))["strategy"]
