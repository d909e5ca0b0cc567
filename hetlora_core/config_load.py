"""Loading a config from plain data: YAML files, JSON, ``--set`` overrides and KFP dict parameters.

Split from config.py (which owns the typed sections and their validation) so each stays readable;
config.py re-exports every name here, so callers import all of it from ``hetlora_core.config``
(import this module only through config.py: it needs config's classes first).
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from .config import ConfigError, HetLoRAConfig, _check

# Settings removed from the config: (section, key) -> (the value that asks for what remains, why the
# setting went). Every config recorded before the removal spells that value out (``to_dict`` writes
# every field), so it is dropped without a word: earlier runs resume, export and re-report as before.
# Any other value asks for behaviour that no longer exists: refused, naming the field, the value and why.
# Why rank_aware went, said by a config that asks for it and by a report of its recorded runs (bench_paper).
RANK_AWARE_EVIDENCE = ("ended 8-12% worse in final perplexity than the paper's normalisation on CPU and on an H200 "
                       "(docs/results.md, docs/results-gpu.md)")
REMOVED_SETTINGS: dict[tuple[str, str], tuple[Any, str]] = {
    ("strategy", "normalisation"): (
        "paper", f"the option was removed (rank_aware, not in the paper, {RANK_AWARE_EVIDENCE}); delete the key, "
                 "the paper's formula is the only one"),
}


def _drop_removed(data: dict[str, Any], path: str) -> dict[str, Any]:
    """``data`` without the removed settings of section ``path`` that ask for what remains (``REMOVED_SETTINGS``)."""
    gone = {}
    for (section, key), (kept, why) in REMOVED_SETTINGS.items():
        if section == path and key in data:
            _check(data[key] == kept, f"{path}.{key}", f"{data[key]!r}: {why}")
            gone[key] = kept
    return {k: v for k, v in data.items() if k not in gone} if gone else data


def _build(cls: type, data: Any, path: str) -> Any:
    """Build dataclass ``cls`` from ``data``, rejecting unknown keys and coercing types."""
    if dataclasses.is_dataclass(data):
        return data
    _check(isinstance(data, dict), path or "<root>", f"must be a mapping, got {type(data).__name__}")
    data = _drop_removed(data, path)
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    _check(not unknown, path or "<root>", f"unknown key(s) {unknown}; allowed: {sorted(names)}")
    kwargs = {k: _coerce(hints[k], v, f"{path}.{k}" if path else k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field is missing
        raise ConfigError(f"config: {path or '<root>'}: {e}") from None


def _coerce(tp: Any, v: Any, path: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):  # a dataclass type (hints are never instances)
        return _build(tp, v, path)
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        if v is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        # ``str | tuple[str, ...]`` (model.target_modules): a YAML list is the tuple, anything else the first option.
        lists = [a for a in options if typing.get_origin(a) is tuple]
        return _coerce(lists[0] if lists and isinstance(v, (list, tuple)) else options[0], v, path)
    if origin is Literal:
        _check(v in args, path, f"must be one of {list(args)}, got {v!r}")
        return v
    if origin is tuple:
        _check(isinstance(v, (list, tuple)), path, f"must be a list, got {type(v).__name__}")
        return tuple(_coerce(args[0], x, f"{path}[{i}]") for i, x in enumerate(v))
    if origin is dict:
        _check(isinstance(v, dict), path, f"must be a mapping, got {type(v).__name__}")
        return {str(k): (str(x) if args and args[1] is str else x) for k, x in v.items()}
    if tp is bool:
        _check(isinstance(v, bool), path, f"must be true or false, got {v!r}")
        return v
    if tp in (int, float) and isinstance(v, str):
        # YAML 1.1 (PyYAML) reads 1e-3 -- no dot -- as a string, in files and in --set alike; the
        # number a user wrote is meant. Only a string float() reads whole is taken.
        try:
            v = float(v.strip()) if tp is float or any(c in v for c in ".eE") else int(v.strip())
        except ValueError:
            raise ConfigError(f"config: {path}: must be a number, got {v!r}") from None
    if tp is int:
        # KFP hands numbers inside dict parameters back as floats: accept 3.0, reject 3.5.
        ok = isinstance(v, int) and not isinstance(v, bool) or isinstance(v, float) and v.is_integer()
        _check(ok, path, f"must be an integer, got {v!r}")
        return int(v)
    if tp is float:
        _check(isinstance(v, (int, float)) and not isinstance(v, bool), path, f"must be a number, got {v!r}")
        _check(v == v and abs(v) != float("inf"), path, f"must be finite, got {v!r}")
        return float(v)
    if tp is str:
        _check(isinstance(v, (str, int, float)) and not isinstance(v, bool), path, f"must be a string, got {v!r}")
        return str(v)
    return v


def config_from_dict(data: dict[str, Any]) -> HetLoRAConfig:
    """Validate plain data (from YAML, JSON or a KFP dict parameter) into a config."""
    return _build(HetLoRAConfig, data, "")


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> HetLoRAConfig:
    """Read a YAML/JSON config file (None: the defaults) and apply dotted ``overrides``."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config: file {p} not found; pass an existing YAML file (see configs/)")
        data = load_yaml(p.read_bytes(), str(p)) or {}
    for key, value in (overrides or {}).items():
        set_dotted(data, key, value)
    return config_from_dict(data)


# Security: a config is small. These bounds stop a hostile or broken file before it costs memory:
# 1 MiB of YAML, and at most 100,000 values once its aliases are expanded (a "billion laughs" file of
# nested aliases is 1 KB on disk and billions of values once walked).
MAX_YAML_BYTES = 1 << 20
MAX_YAML_NODES = 100_000


def load_yaml(text: bytes | str, where: str) -> Any:
    """``yaml.safe_load`` within the bounds above; a violation is a ConfigError naming ``where``."""
    raw = text.encode() if isinstance(text, str) else text
    if len(raw) > MAX_YAML_BYTES:
        raise ConfigError(f"config: {where} is {len(raw):,} bytes; a config is at most {MAX_YAML_BYTES:,}")
    try:
        data = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"config: {where} is not valid YAML: {e}") from None
    except RecursionError:
        raise ConfigError(f"config: {where} is nested too deeply to be a config") from None
    budget = [MAX_YAML_NODES]

    def walk(x: Any) -> None:  # counts values as if every alias were expanded, and stops at the budget
        budget[0] -= 1
        if budget[0] < 0:
            raise ConfigError(f"config: {where} expands to more than {MAX_YAML_NODES:,} values (nested YAML aliases?); "
                              "write the config out without anchors and aliases")
        for y in (x.values() if isinstance(x, dict) else x if isinstance(x, list) else ()):
            walk(y)

    try:
        walk(data)
    except RecursionError:
        raise ConfigError(f"config: {where} is nested too deeply to be a config") from None
    return data


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """``set_dotted(d, "training.lr", 1e-3)`` sets ``d["training"]["lr"]``."""
    *parents, leaf = key.split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
        _check(isinstance(node, dict), key, "cannot set below a non-mapping value")
    node[leaf] = value


def replace(cfg: HetLoRAConfig, **dotted: Any) -> HetLoRAConfig:
    """A copy of ``cfg`` with dotted keys changed (``replace(cfg, **{"training.lr": 1e-3})``), validated."""
    data = cfg.to_dict()
    for k, v in dotted.items():
        set_dotted(data, k, v)
    return config_from_dict(data)
