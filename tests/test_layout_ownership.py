"""The store layout has one owner, ``hetlora_core/store/layout.py``.

* every key function gives the documented key and rejects ids that could reach other keys;
* README's layout block is exactly ``layout_table()``, which is built from those functions;
* no module outside ``hetlora_core/store/`` spells a layout key: string literals (and the literal
  parts of f-strings) are scanned with ``ast``, so docstrings and comments may still describe the
  layout, but code must call the layout functions.
"""

from __future__ import annotations

import ast
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from hetlora_core import store as st

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("hetlora_core", "components", "pipelines", "benchmarks", "scripts")
OWNER = ROOT / "hetlora_core" / "store"
# Fragments that only a layout key contains. Code outside the store package that needs one of
# these keys calls st.config_key / st.round_name / st.global_prefix / ... instead.
KEY_FRAGMENTS = ("round-", "/global", "/clients/", "/eval/", "baseline/metrics", "plan.json")
# No exceptions: every literal that looked like a key so far was a key (or a name mirroring the
# store's round naming, which st.round_name gives). Add a path here only with a comment saying why.
ALLOWED: dict[str, str] = {}

BAD_SEGMENTS = ["a/b", "..", ".", "", "/abs", "a\\b", "x\x00y", ".hetlora-tmp-x", "C:", None, 3]
BAD_ROUNDS = [-1, True, 1.5, "3", None]


# ---------------------------------------------------------------- the key functions


def test_every_key_function() -> None:
    assert st.config_key("exp") == "exp/config.json"
    assert st.baseline_key("exp") == "exp/baseline/metrics.json"
    assert st.round_name(7) == "round-0007" and st.round_name(12345) == "round-12345"
    assert st.round_prefix("exp", 7) == "exp/round-0007"
    assert st.plan_key("exp", 7) == "exp/round-0007/plan.json"
    assert st.global_prefix("exp", 12) == "exp/round-0012/global"
    assert st.client_prefix("exp", 0, "hamlet--hamlet") == "exp/round-0000/clients/hamlet--hamlet"
    assert st.trained_prefix("exp", 0, "c-1") == "exp/round-0000/clients/c-1/trained"
    assert st.eval_key("exp", 3) == "exp/round-0003/eval/metrics.json"


EXP_FUNCTIONS: list[Callable[[Any], str]] = [
    st.config_key, st.baseline_key, lambda e: st.round_prefix(e, 0), lambda e: st.plan_key(e, 0),
    lambda e: st.global_prefix(e, 0), lambda e: st.client_prefix(e, 0, "c"), lambda e: st.trained_prefix(e, 0, "c"),
    lambda e: st.eval_key(e, 0),
]


@pytest.mark.parametrize("bad", BAD_SEGMENTS, ids=repr)
def test_bad_experiment_and_client_ids_rejected(bad: Any) -> None:
    for fn in EXP_FUNCTIONS:
        with pytest.raises(ValueError):
            fn(bad)
    for fn2 in (st.client_prefix, st.trained_prefix):
        if bad in (None, 3):  # client ids are str()-ed (config ids may be numbers): "None" and "3" are fine
            continue
        with pytest.raises(ValueError, match="client_id"):
            fn2("exp", 0, bad)


@pytest.mark.parametrize("bad", BAD_ROUNDS, ids=repr)
def test_bad_rounds_rejected(bad: Any) -> None:
    fns: list[Callable[[Any], str]] = [st.round_name, lambda r: st.round_prefix("e", r), lambda r: st.global_prefix("e", r),
                                       lambda r: st.plan_key("e", r), lambda r: st.eval_key("e", r),
                                       lambda r: st.client_prefix("e", r, "c")]
    for fn in fns:
        with pytest.raises(ValueError, match="round"):
            fn(bad)


def test_queries_follow_the_layout(tmp_path: Path) -> None:
    store = st.LocalStore(tmp_path)
    for exp in ("exp-b", "exp-a"):
        st.put_json(store, st.config_key(exp), {"experiment": exp})
    store.put_bytes("exp-c/other.json", b"{}")  # no config.json: not an experiment
    store.put_bytes("deep/er/config.json", b"{}")  # config.json not at the top of an experiment
    assert st.experiments(store) == ["exp-a", "exp-b"]

    assert st.last_committed_round(store, "exp-a") == -1
    st.put_artifact(store, st.global_prefix("exp-a", 10000), b"g", {})  # past four digits still counts
    st.put_artifact(store, st.global_prefix("exp-ab", 20000), b"g", {})  # an experiment sharing the name's start
    st.put_artifact(store, st.trained_prefix("exp-a", 20001, "c"), b"t", {})  # not a global manifest
    assert st.last_committed_round(store, "exp-a") == 10000

    st.put_artifact(store, st.client_prefix("exp-a", 1, "b"), b"u", {})
    st.put_artifact(store, st.client_prefix("exp-a", 1, "a"), b"u", {})
    st.put_artifact(store, st.trained_prefix("exp-a", 1, "trained-only"), b"t", {})  # trained, never uploaded
    store.put_bytes(f"{st.client_prefix('exp-a', 1, 'torn')}/{st.ADAPTER}", b"no manifest")
    assert st.list_client_ids(store, "exp-a", 1) == ["a", "b"]
    assert st.list_client_prefixes(store, "exp-a", 1) == [st.client_prefix("exp-a", 1, c) for c in ("a", "b")]
    assert st.list_client_ids(store, "exp-a", 2) == []


# ---------------------------------------------------------------- the README block


def test_layout_table_lists_every_key_pattern() -> None:
    table = st.layout_table()
    lines = table.splitlines()
    exp, rnd, cid = "<experiment>", 7, "<id>"
    files = f"/{{{st.ADAPTER},{st.MANIFEST}}}"
    expected = [st.config_key(exp), st.baseline_key(exp), st.plan_key(exp, rnd), st.trained_prefix(exp, rnd, cid) + files,
                st.client_prefix(exp, rnd, cid) + files, st.global_prefix(exp, rnd) + files, st.refusal_key(exp, rnd),
                st.client_eval_key(exp, rnd, cid), st.eval_key(exp, rnd)]
    assert [line.split()[0] for line in lines] == expected
    for line in lines:
        assert line.partition("  ")[2].strip() and len(line) <= 130, line  # each pattern has a one-line description that fits


def test_readme_layout_block_is_the_layout_table() -> None:
    readme = (ROOT / "README.md").read_text()
    block = f"```\n{st.layout_table()}\n```\n"
    assert readme.count(block) == 1, (
        "README.md's store layout block differs from hetlora_core.store.layout_table(); paste its output:\n" + block)


# ---------------------------------------------------------------- ownership


def _docstring_nodes(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                ids.add(id(first.value))
    return ids


def key_literals(source: str, filename: str = "<src>") -> Iterator[tuple[int, str]]:
    """(line, literal) of every string literal or f-string part that holds a layout-key fragment;
    docstrings (and comments, which ast drops) are not code and are skipped."""
    tree = ast.parse(source, filename)
    docstrings = _docstring_nodes(tree)
    for node in ast.walk(tree):  # f-strings: ast.walk reaches their literal parts as Constant nodes
        if (isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
                and any(f in node.value for f in KEY_FRAGMENTS)):
            yield node.lineno, node.value


def test_the_scanner_sees_literals_and_f_string_parts_but_not_docstrings() -> None:
    src = '''"""Module doc: <exp>/round-0007/plan.json is fine here."""
def f(exp, rnd):
    """So is <exp>/round-0007/global in a docstring."""
    # and a comment: exp/round-0000/clients/x
    a = f"{exp}/round-{rnd:04d}"
    b = exp + "/eval/metrics.json"
    return a, b, "ok", f"{exp}/baseline/metrics.json"
'''
    assert [line for line, _ in key_literals(src)] == [5, 6, 7]


def test_no_module_outside_the_store_spells_a_layout_key() -> None:
    files = sorted(p for d in SCANNED for p in (ROOT / d).rglob("*.py") if OWNER not in p.parents)
    assert len(files) > 30 and ROOT / "hetlora_core" / "cli.py" in files  # the scan sees the project
    violations = []
    for path in files:
        rel = path.relative_to(ROOT).as_posix()
        if rel in ALLOWED:
            continue
        violations += [f"{rel}:{line}: {text[:80]!r}" for line, text in key_literals(path.read_text(), rel)]
    assert not violations, ("build store keys with hetlora_core.store's layout functions (st.config_key, st.round_name, "
                            "st.global_prefix, st.eval_key, ...), not string literals:\n" + "\n".join(violations))
