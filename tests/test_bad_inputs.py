"""The bad-input corpus (tests/corpus/generate.py, generated into tmp at test time): every malformed
adapter, manifest and config is rejected with a message that says what is wrong and where, and
``hetlora inspect`` turns a bad file into ``error: ...`` and exit code 1, never a traceback."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from click.testing import CliRunner
from corpus.generate import PAYLOAD, R_MAX, R_MIN, SPEC, Case, adapter_cases, config_cases, manifest_cases, valid_adapter
from hetlora_kfp.pipelines.cli import main

from hetlora_core import store as st
from hetlora_core.adapter import AdapterError, LoraAdapter
from hetlora_core.cli import main as core_main
from hetlora_core.config import ConfigError, load_config

ADAPTERS, MANIFESTS, CONFIGS = adapter_cases(), manifest_cases(), config_cases()


def ids(cases: list[Case]) -> list[str]:
    return [c.name for c in cases]


def test_corpus_is_complete() -> None:
    """Every kind of bad input the issue lists is in the corpus (guards against silent shrinkage)."""
    names = {c.name for c in ADAPTERS}
    for needed in ("wrong_shape", "rank_above_r_max", "nan", "inf", "truncated_header", "truncated_data", "oversized_header",
                   "pickle_renamed", "torch_save_renamed", "dtype_float16", "extra_module", "missing_module"):
        assert needed in names
    assert {"not_json", "json_array", "missing_sha256", "huge", "size_wrong"} <= {c.name for c in MANIFESTS}
    assert {"unknown_top_level_key", "negative_steps", "r_min_above_r_max", "empty_tiers"} <= {c.name for c in CONFIGS}
    LoraAdapter.from_bytes(valid_adapter(), SPEC, R_MIN, R_MAX, 2.0)  # the base the mutations start from is valid


@pytest.mark.parametrize("case", ADAPTERS, ids=ids(ADAPTERS))
def test_bad_adapter_is_rejected_saying_what_and_where(case: Case, tmp_path: Path) -> None:
    path = tmp_path / f"{case.name}.safetensors"
    path.write_bytes(case.data)
    with pytest.raises(AdapterError) as exc:
        LoraAdapter.load(path, spec=SPEC, r_min=R_MIN, r_max=R_MAX, **case.kwargs)
    msg = str(exc.value)
    assert re.search(case.expected, msg), f"{case.name}: {msg}"
    assert msg.startswith(f"{path}: "), f"the message must start with the file: {msg}"  # where: the file...
    assert case.where in msg  # ...and the module, when one module is at fault
    assert "\n" not in msg.strip() and len(msg) < 600  # one readable line, not a dump


@pytest.mark.parametrize("case", ADAPTERS, ids=ids(ADAPTERS))
def test_bad_adapter_without_the_model(case: Case) -> None:
    """Without the base model (no spec), only module/shape mismatches against the model can pass."""
    try:
        LoraAdapter.from_bytes(case.data, None, R_MIN, R_MAX, where="upload", **case.kwargs)
    except AdapterError as e:
        assert not case.needs_spec or "upload" in str(e)
        return
    assert case.needs_spec, f"{case.name} was accepted without a spec"


@pytest.mark.parametrize("case", ADAPTERS, ids=ids(ADAPTERS))
def test_hetlora_inspect_reports_bad_files_without_a_traceback(case: Case, tmp_path: Path) -> None:
    path = tmp_path / f"{case.name}.safetensors"
    path.write_bytes(case.data)
    args = ["inspect", str(path), "--r-min", str(R_MIN), "--r-max", str(R_MAX)]
    res = CliRunner().invoke(main, args)
    out = res.output + (res.stderr if res.stderr_bytes is not None else "")
    assert "Traceback" not in out
    if case.needs_spec or case.kwargs:
        # inspect has no base model (and no model.lora_scale): a file that is a valid adapter in
        # itself passes; aggregation checks it against the model (tests/test_faults.py).
        assert res.exit_code in (0, 1), out
        return
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit), (res.exit_code, res.exception, out)
    assert out.startswith("error: ") and str(path) in out, out
    assert re.search(case.expected, out), out


def test_inspect_on_the_core_cli_too(tmp_path: Path) -> None:
    (tmp_path / "p.safetensors").write_bytes(next(c.data for c in ADAPTERS if c.name == "pickle_renamed"))
    res = CliRunner().invoke(core_main, ["inspect", str(tmp_path / "p.safetensors")])
    assert res.exit_code == 1 and "pickle" in res.output and "Traceback" not in res.output


@pytest.mark.parametrize("case", MANIFESTS, ids=ids(MANIFESTS))
def test_bad_manifest_is_rejected_saying_what_and_where(case: Case, tmp_path: Path) -> None:
    store = st.LocalStore(tmp_path)
    prefix = st.client_prefix("exp", 3, "alice")
    store.put_bytes(f"{prefix}/{st.ADAPTER}", PAYLOAD)
    store.put_bytes(f"{prefix}/{st.MANIFEST}", case.data)
    exc_type = getattr(st, case.kwargs["exc"])
    with pytest.raises(st.StoreError) as exc:
        st.get_artifact(store, prefix)
    assert type(exc.value) is exc_type, (type(exc.value), exc.value)
    msg = str(exc.value)
    assert re.search(case.expected, msg), f"{case.name}: {msg}"
    assert prefix in msg, f"the message must name the key: {msg}"
    assert len(msg) < 1000  # a hostile manifest is not echoed back in full


def test_manifests_are_never_unpickled(tmp_path: Path) -> None:
    import pickle

    store = st.LocalStore(tmp_path)
    store.put_bytes(f"e/x/{st.MANIFEST}", pickle.dumps({"object": "a", "sha256": "0" * 64, "size": 1}))
    with pytest.raises(st.InvalidManifest, match="not valid UTF-8 JSON"):
        st.get_manifest(store, "e/x")


@pytest.mark.parametrize("case", CONFIGS, ids=ids(CONFIGS))
def test_bad_config_is_rejected_saying_what_and_where(case: Case, tmp_path: Path) -> None:
    path = tmp_path / f"{case.name}.yaml"
    path.write_bytes(case.data)
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    msg = str(exc.value)
    assert re.search(case.expected, msg), f"{case.name}: {msg}"
    assert case.where in msg
    if case.name == "not_yaml":
        assert str(path) in msg


def test_bad_config_on_the_command_line_is_a_clean_error(tmp_path: Path) -> None:
    case = next(c for c in CONFIGS if c.name == "r_min_above_r_max")
    (tmp_path / "bad.yaml").write_bytes(case.data)
    res = CliRunner().invoke(main, ["simulate", "-c", str(tmp_path / "bad.yaml"), "--out", str(tmp_path / "o")])
    assert res.exit_code == 1 and "ranks.r_min: r_min (8) must be <= r_max (4)" in res.output
    assert "Traceback" not in res.output and not (tmp_path / "o").exists()
