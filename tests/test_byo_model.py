"""Bring your own model: any Hugging Face causal LM from a folder (or a hub id in a mounted cache),
``target_modules: auto | all-linear | list`` resolved per architecture and checked before any
round, and an export that ``AutoPeftModelForCausalLM`` loads offline.

The models are tiny and randomly initialised, built here into tmp_path with save_pretrained and
SmolLM2's tokenizer saved beside them (nothing downloaded, nothing committed)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner

from hetlora_core import models, runtime
from hetlora_core.cli import main
from hetlora_core.config import ConfigError, ModelConfig, load_config
from hetlora_core.model_source import ModelError
from hetlora_core.simulate import simulate
from hetlora_core.targets import check_model

TOK = models.load_tokenizer()
SPECIAL = {"bos_token_id": TOK.bos_token_id, "eos_token_id": TOK.eos_token_id, "pad_token_id": TOK.pad_token_id}
SMALL = {"vocab_size": len(TOK), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128, **SPECIAL}


def _configs() -> dict[str, Any]:
    from transformers import GemmaConfig, GPT2Config, LlamaConfig, Phi3Config, Qwen2Config

    return {
        "llama": LlamaConfig(**SMALL),
        "qwen2": Qwen2Config(**SMALL),
        "gemma": GemmaConfig(**SMALL, head_dim=8),
        # GPT-2's attention and MLP are transformers' Conv1D (weights stored (in, out)), not nn.Linear.
        "gpt2": GPT2Config(vocab_size=len(TOK), n_embd=32, n_layer=2, n_head=4, n_positions=128, **SPECIAL),
        "phi3": Phi3Config(**SMALL),  # fused qkv_proj; peft has no default for it
    }


def make_model(root: Path, arch: str, dtype: torch.dtype = torch.float32) -> Path:
    """A random ``arch`` model saved as a Hugging Face folder with a tokenizer."""
    from transformers import AutoModelForCausalLM

    folder = root / arch
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        model = AutoModelForCausalLM.from_config(_configs()[arch])
    model.to(dtype).save_pretrained(str(folder))
    TOK.save_pretrained(str(folder))
    return folder


def run_cfg(name: str, experiment: str, target_modules: Any = "auto") -> Any:
    return load_config(None, {
        "experiment": experiment, "model.name": name, "model.target_modules": target_modules,
        "data.num_clients": 2, "data.min_chars": 5000, "data.max_chars": 5500, "data.seq_len": 16, "data.eval_max_tokens": 32,
        "ranks.r_min": 2, "ranks.r_max": 4, "ranks.tiers": [{"name": "small", "rank": 2}, {"name": "large", "rank": 4}],
        "training.local_steps": 1, "training.batch_size": 2, "training.lr": 0.01,
        "federation.rounds": 2, "federation.clients_per_round": 2,
    })


SLOW = pytest.mark.slow  # ~5-10 s each alone, ~20 s on a shared 2-core machine: Llama and GPT-2 (Linear, Conv1D) stay fast


@pytest.mark.parametrize("arch,targets,expect", [
    ("llama", "auto", {"q_proj", "v_proj"}),
    pytest.param("qwen2", "auto", {"q_proj", "v_proj"}, marks=SLOW),
    pytest.param("gemma", "auto", {"q_proj", "v_proj"}, marks=SLOW),
    ("gpt2", "auto", {"c_attn"}),
    pytest.param("phi3", "all-linear", {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}, marks=SLOW),
])
def test_any_architecture_trains_two_rounds_and_exports_for_peft(tmp_path, monkeypatch, arch, targets, expect):
    """A folder model through the whole path: simulate commits both rounds, the export loads with
    AutoPeftModelForCausalLM offline, applies the trained adapter (logits move off the base and
    equal ours), and --merge gives the same logits in the base's dtype."""
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("HETLORA_CACHE", str(tmp_path / "cache"))  # token cache of this test only
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    dtype = torch.bfloat16 if arch == "qwen2" else torch.float32
    folder = make_model(tmp_path / "models", arch, dtype)
    cfg = run_cfg(str(folder), f"byo-{arch}", targets)
    assert cfg.model.name == str(folder.resolve())
    res = simulate(cfg, tmp_path / "run", progress=False)
    assert res["rounds_committed"] == 2
    glob = runtime.global_adapter(load_config(None, {**json.loads(cfg.to_json()), "store": {"root": str(tmp_path / "run" / "store")}}),
                                  _store(tmp_path / "run"), 1)
    assert {m.rsplit(".", 1)[-1] for m in glob.modules} == expect
    assert float(max(abs(glob.B[m]).max() for m in glob.modules)) > 0  # trained

    out = tmp_path / "export"
    r = CliRunner().invoke(main, ["export", "--run", str(tmp_path / "run"), "--out", str(out), "--merge"])
    assert r.exit_code == 0, r.output
    meta = json.loads((out / "adapter_config.json").read_text())
    assert meta["base_model_name_or_path"] == str(folder.resolve()) and meta["task_type"] == "CAUSAL_LM"

    x = torch.randint(0, 2000, (1, 10))
    peft_model = AutoPeftModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    with torch.no_grad():
        got, plain = peft_model(input_ids=x).logits, base(input_ids=x).logits
        from hetlora_core.peft_bridge import attach, detach

        ours = attach(runtime.model(cfg), glob)
        want = ours(input_ids=x).logits
        detach(ours)
    assert not torch.allclose(got, plain, atol=1e-6)  # the adapter is really applied
    assert torch.allclose(got, want, atol=1e-5)
    merged = AutoModelForCausalLM.from_pretrained(str(out / "merged"), dtype="auto")
    assert next(merged.parameters()).dtype == dtype
    with torch.no_grad():
        m_logits = merged.float()(input_ids=x).logits
    tol = 5e-2 if dtype == torch.bfloat16 else 1e-4
    assert torch.allclose(m_logits, want, atol=tol), (m_logits - want).abs().max()


def _store(out: Path) -> Any:
    from hetlora_core.store import LocalStore

    return LocalStore(out / "store")


def test_smollm2_folder_by_path_equals_the_builtin_name():
    folder = models.warm_cache()["model"]
    by_path, tok_path = models.load_base_model(ModelConfig(name=folder))
    builtin, tok = models.load_base_model(ModelConfig())
    assert by_path is not builtin  # really loaded through the folder path
    text = "Shall I compare thee to a summer's day?"
    ids = tok(text, return_tensors="pt")["input_ids"]
    assert torch.equal(tok_path(text, return_tensors="pt")["input_ids"], ids)
    with torch.no_grad():
        assert torch.equal(by_path(input_ids=ids).logits, builtin(input_ids=ids).logits)
    assert check_model(ModelConfig(name=folder)) == check_model(ModelConfig()) == ("q_proj", "v_proj")


def test_auto_keeps_smollm2s_default_modules():
    """``auto`` is peft's Llama default, the same q_proj/v_proj the project always trained."""
    model, _ = models.load_base_model(ModelConfig(name="tiny"))
    from hetlora_core.peft_bridge import spec_from_model

    assert spec_from_model(model, "auto") == spec_from_model(model, ("q_proj", "v_proj"))
    assert ModelConfig().target_modules == "auto"


def test_missing_target_module_is_rejected_before_any_round(tmp_path):
    cfg = run_cfg("tiny", "badtargets", ["q_proj", "c_attn"])
    with pytest.raises(ConfigError, match=r"model.target_modules: \['c_attn'\] not found.*'k_proj', 'o_proj', 'q_proj'"):
        simulate(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "store").exists() or not any((tmp_path / "run" / "store").rglob("round-*"))
    # the CLI: one clean line, no traceback
    r = CliRunner().invoke(main, ["simulate", "--set", "model.name=tiny", "--set", "model.target_modules=[c_attn]",
                                  "--out", str(tmp_path / "cli")])
    assert r.exit_code != 0 and "model.target_modules: ['c_attn'] not found" in r.output and "up_proj" in r.output
    assert "Traceback" not in r.output


def test_auto_without_a_peft_default_names_the_choices(tmp_path):
    cfg = ModelConfig(name=str(make_model(tmp_path, "phi3")))
    with pytest.raises(ConfigError, match=r"auto has no default for model type 'phi3'.*all-linear.*'qkv_proj'"):
        check_model(cfg)


def test_all_linear_leaves_out_the_output_head(tmp_path):
    for arch, want in (("gpt2", ("c_attn", "c_fc", "c_proj")), ("llama", ("down_proj", "gate_proj", "k_proj", "o_proj", "q_proj",
                                                                          "up_proj", "v_proj"))):
        assert check_model(ModelConfig(name=str(make_model(tmp_path, arch)), target_modules="all-linear")) == want


def test_hub_id_without_a_hub_fails_with_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    cfg = ModelConfig(name="Qwen/Qwen2.5-0.5B")  # a hub id is a valid name: whether it loads is known at load time
    with pytest.raises(ModelError) as e:
        models.load_base_model(cfg)
    msg = str(e.value)
    assert "\n" not in msg and "'Qwen/Qwen2.5-0.5B'" in msg and "local folder" in msg and "HF_HOME" in msg
    r = CliRunner().invoke(main, ["simulate", "--set", "model.name=Qwen/Qwen2.5-0.5B", "--out", str(tmp_path / "o")])
    assert r.exit_code != 0 and "HF_HOME" in r.output and "Traceback" not in r.output


def test_hub_id_loads_offline_from_a_mounted_cache(tmp_path, monkeypatch):
    """The cluster recipe: a Hugging Face cache on a volume, HF_HOME pointing at it, no network."""
    snap = tmp_path / "hf" / "hub" / "models--acme--tiny-llama" / "snapshots" / ("0" * 40)
    make_model(snap.parent, "llama").rename(snap)
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    cfg = ModelConfig(name="acme/tiny-llama")
    model, tok = models.load_base_model(cfg)
    assert type(model).__name__ == "LlamaForCausalLM" and len(tok) == len(TOK)
    assert check_model(cfg) == ("q_proj", "v_proj") and models.base_name_or_path(cfg) == "acme/tiny-llama"


@pytest.mark.parametrize("name,msg", [
    ("/no/such/model", "is not an existing folder"),
    ("./models/mine", "is not an existing folder"),
    ("nonsense", "neither a built-in model"),
])
def test_model_name_is_checked_at_config_time(name, msg):
    with pytest.raises(ConfigError, match=f"model.name: .*{msg}"):
        ModelConfig(name=name)


def test_model_folder_needs_a_config_json(tmp_path):
    with pytest.raises(ConfigError, match="has no config.json"):
        ModelConfig(name=str(tmp_path))


@pytest.mark.parametrize("targets,msg", [
    ("q_proj", "must be 'auto', 'all-linear' or a list"),
    (["self_attn.q_proj"], "without dots"),
    (["auto"], "stand alone"),
    ([], "at least one module"),
])
def test_target_modules_values_are_checked(targets, msg):
    with pytest.raises(ConfigError, match=msg):
        load_config(None, {"model.target_modules": targets})


def test_target_modules_yaml_list_and_selectors():
    assert load_config(None, {"model.target_modules": ["q_proj", "k_proj"]}).model.target_modules == ("q_proj", "k_proj")
    assert load_config(None, {"model.target_modules": "all-linear"}).model.target_modules == "all-linear"


def test_gpt2_conv1d_layers_are_wrapped_without_peft_guessing(tmp_path, recwarn):
    """GPT-2's Conv1D stores weights (in, out): the spec reads (out, in) and attach tells peft
    fan_in_fan_out, so peft neither warns nor guesses (its guess is what merging depends on)."""
    from hetlora_core.adapter import init_global
    from hetlora_core.peft_bridge import attach, detach, spec_from_model

    model, _ = models.load_base_model(ModelConfig(name=str(make_model(tmp_path, "gpt2"))))
    spec = spec_from_model(model, "auto")
    assert spec["transformer.h.0.attn.c_attn"] == (96, 32)  # 3 x n_embd out, n_embd in
    detach(attach(model, init_global(spec, 4, 2.0, 0)))
    assert not [w for w in recwarn.list if "fan_in_fan_out" in str(w.message)]


def test_a_run_recorded_with_the_old_default_list_resumes_under_auto(tmp_path):
    """Runs recorded before ``auto`` existed hold target_modules [q_proj, v_proj]: the same modules,
    so resuming them is no config mismatch; a different list still is."""
    from hetlora_core.run import RunConfigMismatch, check_or_record_config
    from hetlora_core.store import LocalStore

    store = LocalStore(tmp_path / "store")
    old = load_config(None, {"model.name": "tiny", "model.target_modules": ["v_proj", "q_proj"]})
    check_or_record_config(old, store)
    new = load_config(None, {"model.name": "tiny"})
    check_or_record_config(new, store, ("q_proj", "v_proj"))  # auto resolved to the recorded list
    with pytest.raises(RunConfigMismatch, match="model"):
        check_or_record_config(load_config(None, {"model.name": "tiny", "model.target_modules": "all-linear"}), store,
                               ("down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"))
    fresh = LocalStore(tmp_path / "fresh")
    check_or_record_config(old, fresh)
    with pytest.raises(RunConfigMismatch, match="model"):
        check_or_record_config(new, fresh)  # resolution unknown: compared as written


@pytest.mark.slow
def test_auto_gives_the_same_bytes_as_the_old_default_list(tmp_path):
    """The default changed from [q_proj, v_proj] to auto: the committed globals are byte-identical."""
    from hetlora_core import store as st

    shas = []
    for i, tm in enumerate(("auto", ["q_proj", "v_proj"])):
        cfg = run_cfg("tiny", "same-bytes", tm)
        simulate(cfg, tmp_path / f"r{i}", progress=False)
        store = st.LocalStore(tmp_path / f"r{i}" / "store")
        shas.append([st.get_manifest(store, st.global_prefix(cfg.experiment, r))["sha256"] for r in range(2)])
    assert shas[0] == shas[1]


def test_kubeflow_driver_leaves_an_unseen_hub_model_to_the_tasks(tmp_path, monkeypatch):
    """``hetlora submit``'s driver need not hold the model (the tasks read it from the cluster's
    cache volume): an uncached hub id is logged there, while a local executor stops on it."""
    from hetlora_core.run import RoundRunner

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    cfg = load_config(None, {"model.name": "acme/not-here", "store.root": str(tmp_path / "store")})

    class Remote:
        name, command, on_task, loads_model_here = "Kubeflow", "hetlora submit", None, False

    lines: list[str] = []
    runner = RoundRunner(cfg, Remote(), tmp_path)
    runner.log = lines.append
    assert runner.check_model() is None and "checked when the first task loads it" in lines[0]
    Remote.loads_model_here = True
    with pytest.raises(ModelError, match="HF_HUB_OFFLINE is set"):
        RoundRunner(cfg, Remote(), tmp_path).check_model()
