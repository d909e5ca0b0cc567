"""The CLI as a user meets it: --help everywhere, inspect, export (peft folder + merged model)."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from hetlora_kfp.pipelines.cli import main

from hetlora_core import runtime
from hetlora_core.config import load_config, replace
from hetlora_core.simulate import simulate

COMMANDS = ["run", "simulate", "compile", "submit", "inspect", "export", "tiers", "preflight", "bench", "cache", "data"]


@pytest.mark.parametrize("cmd", COMMANDS)
def test_help_explains_every_command(cmd):
    out = CliRunner().invoke(main, [cmd, "--help"])
    assert out.exit_code == 0, out.output
    assert "Usage:" in out.output and len(out.output.splitlines()) > 5


def test_top_level_help_lists_commands():
    out = CliRunner().invoke(main, ["--help"])
    assert out.exit_code == 0
    for cmd in COMMANDS:
        assert cmd in out.output


def test_cache_warm_reports_the_prebuilt_folders(tmp_path, monkeypatch):
    """With a complete prebuilt copy (as in the image) warming converts nothing and names it."""
    from hetlora_core import models

    for name, marker in ((models._MODEL_DIR, "config.json"), (models._TOKENIZER_DIR, "tokenizer_config.json")):
        (tmp_path / name).mkdir()
        (tmp_path / name / marker).write_text("{}")
    monkeypatch.setenv("HETLORA_PREBUILT_CACHE", str(tmp_path))
    monkeypatch.setenv("HETLORA_CACHE", str(tmp_path / "rw"))
    out = CliRunner().invoke(main, ["cache", "warm"])
    assert out.exit_code == 0, out.output
    assert f"model: {tmp_path / models._MODEL_DIR}" in out.output
    assert not (tmp_path / "rw" / models._MODEL_DIR).exists()


def test_bad_config_is_a_clean_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("training: {lr: -1}\n")
    out = CliRunner().invoke(main, ["simulate", "-c", str(bad), "--out", str(tmp_path / "o")])
    assert out.exit_code != 0 and "training.lr: must be > 0, got -1" in out.output
    out = CliRunner().invoke(main, ["simulate", "--set", "federation.roundz=2", "--out", str(tmp_path / "o")])
    assert out.exit_code != 0 and "unknown key(s) ['roundz']" in out.output


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    cfg = replace(load_config("configs/smoke.yaml"), **{"federation.rounds": 1, "experiment": "clitest"})
    simulate(cfg, out, progress=False)
    return out, cfg


def test_inspect_valid_adapter_and_console_script(smoke_run):
    out, _ = smoke_run
    f = out / "store" / "clitest" / "round-0000" / "global" / "adapter.safetensors"
    res = CliRunner().invoke(main, ["inspect", str(f), "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.output)
    assert info["rank"] == 8 and info["modules"] == 4  # 2 layers x (q_proj, v_proj)
    # the installed console script, as a user runs it: a bad file gives exit 1 and no traceback
    bad = out / "bad.safetensors"
    bad.write_bytes(b"\x80\x04garbage")
    p = subprocess.run([sys.executable, "-m", "hetlora_kfp.pipelines.cli", "inspect", str(bad)], capture_output=True, text=True)
    assert p.returncode == 1 and "pickle" in p.stderr and "Traceback" not in p.stderr


def test_export_peft_folder_and_merged_model(smoke_run, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out, cfg = smoke_run
    res = CliRunner().invoke(main, ["export", "--run", str(out), "--out", str(tmp_path / "m"), "--merge"])
    assert res.exit_code == 0, res.output
    base = runtime.model(cfg)
    x = torch.randint(0, 1000, (1, 12))
    glob = runtime.global_adapter(replace(cfg, **{"store.root": str(out / "store")}), _store(out), 0)
    from hetlora_core.peft_bridge import attach, detach

    pm = attach(base, glob)
    want = pm(input_ids=x).logits.detach()
    detach(pm)
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "m"))
    assert torch.allclose(loaded(input_ids=x).logits, want, atol=1e-5)
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "m" / "merged"))
    assert torch.allclose(merged(input_ids=x).logits, want, atol=1e-4)
    assert float(max(abs(glob.B[m]).max() for m in glob.modules)) > 0  # a trained, non-trivial adapter


def _store(out):
    from hetlora_core.store import LocalStore

    return LocalStore(out / "store")


def test_core_never_imports_kfp_or_kubernetes():
    code = ("import sys, pkgutil, importlib, hetlora_core\n"
            "for m in pkgutil.iter_modules(hetlora_core.__path__):\n"
            "    importlib.import_module('hetlora_core.' + m.name)\n"
            "bad = sorted(n for n in sys.modules if n.split('.')[0] in ('kfp', 'kubernetes'))\n"
            "print(bad); sys.exit(1 if bad else 0)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr


def test_export_of_a_gpu_run_works_on_a_cpu_machine(smoke_run, tmp_path):
    """A run recorded with model.device cuda / bfloat16 (trained on GPU tiers) exports here: export
    always loads the float32 base on this machine's CPU (adapters are float32 whatever trained them)."""
    import shutil

    from hetlora_core import store as st

    out, cfg = smoke_run
    run = tmp_path / "gpu-run"
    shutil.copytree(out, run)
    store = _store(run)
    key = st.config_key(st.experiments(store)[0])
    rec = st.get_json(store, key)
    rec["model"].update({"device": "cuda", "dtype": "bfloat16"})
    rec["training"]["bf16"] = None  # the legacy flag unset, as in a run configured with model.dtype
    st.put_json(store, key, rec)
    res = CliRunner().invoke(main, ["export", "--run", str(run), "--out", str(tmp_path / "m")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "m" / "adapter_config.json").is_file()


def test_export_takes_the_run_directorys_experiment_from_a_shared_store(tmp_path: Path) -> None:
    """Review finding: with store.root shared by several runs, export took the alphabetically first
    experiment. It takes the one the run directory's results.json names, or fails listing them."""
    from hetlora_core.cli import run_experiment

    (tmp_path / "results.json").write_text(json.dumps({"experiment": "zeta"}))
    assert run_experiment(str(tmp_path), ["alpha", "zeta"]) == "zeta"
    assert run_experiment(str(tmp_path / "nowhere"), ["only"]) == "only"
    with pytest.raises(SystemExit):
        run_experiment(str(tmp_path / "nowhere"), ["alpha", "zeta"])
