"""Config inputs outside the data path (issue 13's list): numbers as people write them, and YAML
that would cost unbounded memory refused by name before anything walks it."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from hetlora_core.cli import main, parse_sets
from hetlora_core.config import MAX_YAML_NODES, ConfigError, load_config


def test_set_with_an_exponent_is_a_number() -> None:
    """README's own example, ``--set training.lr=1e-3``: PyYAML reads ``1e-3`` as a string."""
    cfg = load_config(None, parse_sets(("training.lr=1e-3", "pruning.lam=5E-2", "federation.rounds=3")))
    assert cfg.training.lr == pytest.approx(1e-3) and cfg.pruning.lam == pytest.approx(0.05) and cfg.federation.rounds == 3


def test_yaml_file_numbers_without_a_dot(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("training:\n  lr: 3e-4\n  local_steps: '4'\n")
    cfg = load_config(p)
    assert cfg.training.lr == pytest.approx(3e-4) and cfg.training.local_steps == 4


@pytest.mark.parametrize(("value", "msg"), [("fast", "must be a number"), ("1e400", "must be finite"), ("2.5", "must be an integer")])
def test_bad_numbers_still_name_the_field(value: str, msg: str) -> None:
    key = "federation.rounds" if msg.endswith("integer") else "training.lr"
    with pytest.raises(ConfigError, match=f"{key}: {msg}"):
        load_config(None, parse_sets((f"{key}={value}",)))


def test_alias_bomb_is_refused_quickly(tmp_path: Path) -> None:
    lines = ['a0: &a0 ["x", "x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]  # 10^9 values once expanded
    p = tmp_path / "bomb.yaml"
    p.write_text("\n".join(lines) + "\n")
    assert p.stat().st_size < 2000
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match=f"{p}.*more than {MAX_YAML_NODES:,} values"):
        load_config(p)
    assert time.perf_counter() - t0 < 10  # bounded work, not a timing claim: unbounded would take minutes
    res = CliRunner().invoke(main, ["simulate", "-c", str(p), "--out", str(tmp_path / "o")])
    assert res.exit_code != 0 and "nested YAML aliases" in res.output and "Traceback" not in res.output


def test_oversized_config_file(tmp_path: Path) -> None:
    p = tmp_path / "big.yaml"
    p.write_text("experiment: x\n" + "# padding\n" * 120_000)
    with pytest.raises(ConfigError, match="bytes; a config is at most"):
        load_config(p)


def test_deeply_nested_yaml_is_a_config_error(tmp_path: Path) -> None:
    p = tmp_path / "deep.yaml"
    p.write_text("a: " + "[" * 3000 + "]" * 3000 + "\n")
    with pytest.raises(ConfigError, match="nested too deeply"):
        load_config(p)
    with pytest.raises(ConfigError, match="nested too deeply"):
        parse_sets(("training.lr=" + "[" * 100_000,))
