"""The precision/device decision (hetlora_core.precision) as a pure function of the request and
fake machine facts, its config errors, and that a run records the decision in results.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hetlora_core import precision as pr
from hetlora_core.config import ConfigError, load_config, replace
from hetlora_core.precision import Precision, decide, requested_dtype

AVX2 = frozenset({"sse4_2", "avx", "avx2", "fma"})
AMX = AVX2 | {"avx512f", "amx_tile", "amx_bf16"}
AVX512BF16 = AVX2 | {"avx512f", "avx512_bf16"}

# (device, dtype, cuda?, cuda bf16?, cpu flags, quantize, bitsandbytes?) -> (device, dtype, words in the reason)
DECISIONS = [
    ("auto", "auto", False, False, AVX2, "none", False, "cpu", "float32", "no native bf16"),
    ("auto", "auto", False, False, AMX, "none", False, "cpu", "bfloat16", "amx_bf16"),
    ("auto", "auto", False, False, AVX512BF16, "none", False, "cpu", "bfloat16", "avx512_bf16"),
    ("auto", "auto", False, False, frozenset(), "none", False, "cpu", "float32", "no CUDA device"),
    ("cpu", "bfloat16", False, False, AVX2, "none", False, "cpu", "bfloat16", "emulated"),
    ("cpu", "float32", True, True, AMX, "none", False, "cpu", "float32", "requested"),
    ("cpu", "auto", True, True, AMX, "none", False, "cpu", "bfloat16", "device cpu: requested"),
    ("auto", "auto", True, True, AVX2, "none", False, "cuda", "bfloat16", "GPU supports bf16"),
    ("auto", "auto", True, False, AVX2, "none", False, "cuda", "float16", "gradient scaler"),
    ("cuda", "float32", True, True, AVX2, "none", False, "cuda", "float32", "requested"),
    ("cuda", "float16", True, True, AVX2, "none", False, "cuda", "float16", "requested"),
    ("auto", "auto", True, True, AVX2, "4bit", True, "cuda", "bfloat16", "CUDA available"),
]


@pytest.mark.parametrize("req_dev,req_dt,cuda,bf16,flags,quant,bnb,dev,dt,words", DECISIONS)
def test_decide(req_dev: str, req_dt: str, cuda: bool, bf16: bool, flags: frozenset[str], quant: str, bnb: bool,
                dev: str, dt: str, words: str) -> None:
    p = decide(req_dev, req_dt, cuda, bf16, flags, quant, bnb)
    assert (p.device, p.dtype, p.quantize) == (dev, dt, quant)
    assert words in p.reason, p.reason
    assert p.needs_scaler == (dt == "float16" and dev == "cuda")


# request the machine cannot serve -> ConfigError naming the field
REFUSALS = [
    (("cuda", "auto", False, False, AMX, "none", False), "model.device: 'cuda' requested"),
    (("auto", "float16", False, False, AMX, "none", False), "model.dtype: 'float16' is not supported on cpu"),
    (("cuda", "bfloat16", True, False, AVX2, "none", False), "model.dtype: 'bfloat16' requested but this GPU"),
    (("auto", "auto", False, False, AMX, "4bit", True), "model.quantize: '4bit' needs a CUDA device"),
    (("auto", "auto", True, True, AVX2, "4bit", False), "model.quantize: '4bit' needs the bitsandbytes package"),
]


@pytest.mark.parametrize("args,msg", REFUSALS)
def test_decide_refuses(args: tuple, msg: str) -> None:
    with pytest.raises(ConfigError, match=msg):
        decide(*args)


def test_legacy_bf16_flag_maps_to_model_dtype() -> None:
    base = load_config(None)
    assert requested_dtype(base.model, base.training) == "auto"
    on = load_config(None, {"training.bf16": True})
    assert requested_dtype(on.model, on.training) == "bfloat16"
    off = load_config(None, {"training.bf16": False, "model.dtype": "float32"})
    assert requested_dtype(off.model, off.training) == "float32"
    with pytest.raises(ConfigError, match="training.bf16: true .* contradicts model.dtype float32"):
        load_config(None, {"training.bf16": True, "model.dtype": "float32"})


@pytest.mark.parametrize("sets,msg", [
    ({"model.dtype": "float16", "model.device": "cpu"}, "model.dtype: 'float16' is CUDA-only"),
    ({"model.quantize": "4bit", "model.device": "cpu"}, "model.quantize: '4bit'"),
    ({"model.quantize": "8bit"}, r"model.quantize: must be one of \['none', '4bit'\]"),
    ({"model.device": "tpu"}, "model.device: must be one of"),
    ({"model.quantize": "4bit", "model.name": "tiny"}, "model.quantize: '4bit' needs a saved model"),
    ({"model.quantize": "4bit", "model.vocab": "corpus"}, "model.quantize: '4bit' cannot be combined with model.vocab: corpus"),
])
def test_config_rejects(sets: dict, msg: str) -> None:
    with pytest.raises(ConfigError, match=msg):
        load_config(None, sets)


def test_cpu_flags_parses_cpuinfo(tmp_path: Path) -> None:
    f = tmp_path / "cpuinfo"
    f.write_text("processor\t: 0\nflags\t\t: fpu avx2 amx_bf16 amx_tile\nbugs\t: x\n")
    assert pr.cpu_flags(str(f)) == {"fpu", "avx2", "amx_bf16", "amx_tile"}
    assert pr.cpu_flags(str(tmp_path / "missing")) == frozenset()


def test_float32_autocast_is_no_autocast_and_bf16_is() -> None:
    lin = torch.nn.Linear(4, 4)
    x = torch.randn(2, 4)
    with Precision("cpu", "float32", "t").autocast():
        assert lin(x).dtype == torch.float32 and not torch.is_autocast_enabled("cpu")
    with Precision("cpu", "bfloat16", "t").autocast():
        assert lin(x).dtype == torch.bfloat16


def test_quantization_config_errors_and_none() -> None:
    assert pr.quantization_config(load_config(None).model) is None
    assert pr.from_pretrained_kwargs("none") == {}
    # this machine: no CUDA (CI) -> 4bit is refused when resolved, naming the field and why
    cfg = load_config(None, {"model.quantize": "4bit"})
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="model.quantize: '4bit' needs a CUDA device"):
            pr.resolve(cfg)


def test_results_json_records_the_decision(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from hetlora_core.simulate import simulate

    cfg = replace(load_config("configs/smoke.yaml"), **{"federation.rounds": 1, "federation.clients_per_round": 2,
                                                        "training.local_steps": 1, "training.threads": 1,
                                                        "experiment": "prec", "training.bf16": None, "model.dtype": "float32"})
    simulate(cfg, tmp_path, progress=True)
    res = json.loads((tmp_path / "results.json").read_text())
    want = pr.resolve(cfg).as_dict()
    logged = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("[hetlora] precision:")]
    assert logged == [f"[hetlora] precision: {want['device']} float32: {want['reason']}"]  # once per run
    assert want["dtype"] == "float32" and want["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    assert res["precision"] == [{**want, "client_updates": 2}]
    assert res["config"]["model"]["dtype"] == "float32"


def test_gradient_checkpointing_trains_the_same_adapter() -> None:
    """Checkpointing recomputes each layer in backward (seen: twice the forwards of a module inside a layer), LoRA still
    gets its gradients (the frozen-base pitfall of reentrant checkpointing), the update matches,
    and the shared base model is left without checkpointing."""
    import numpy as np

    from hetlora_core import runtime
    from hetlora_core.adapter import init_global
    from hetlora_core.client import train_lora
    from hetlora_core.peft_bridge import spec_from_model

    cfg = load_config("configs/smoke.yaml", {"training.threads": 1, "training.local_steps": 2})
    ck = replace(cfg, **{"model.gradient_checkpointing": True})
    m, mk = runtime.model(cfg), runtime.model(ck)  # the same base unless a process cache dropped it
    g = init_global(spec_from_model(m, cfg.model.target_modules), 4, cfg.model.lora_scale, 0)
    client = next(iter(runtime.clients(cfg).values()))
    one_step = {"training.local_steps": 1}
    train_lora(m, g, client, replace(cfg, **one_step), 0)  # the first call's one-time checks (lm_loss) are not counted
    train_lora(mk, g, client, replace(ck, **one_step), 0)
    calls = []
    hooks = [x.model.layers[0].mlp.register_forward_pre_hook(lambda *_: calls.append(1)) for x in {id(m): m, id(mk): mk}.values()]
    try:
        a = train_lora(m, g, client, cfg, 0).adapter
        plain, calls[:] = len(calls), []
        b = train_lora(mk, g, client, ck, 0).adapter
    finally:
        for h in hooks:
            h.remove()
    assert (plain, len(calls)) == (2, 4)
    assert not m.is_gradient_checkpointing
    assert a is not None and b is not None
    assert max(float(np.abs(b.B[k] - g.B[k]).max()) for k in g.B) > 0  # LoRA got gradients under checkpointing
    for k in g.A:
        np.testing.assert_allclose(a.A[k], b.A[k], atol=1e-5)
        np.testing.assert_allclose(a.B[k], b.B[k], atol=1e-5)


@pytest.mark.parametrize("command", ["simulate", "run"])
def test_cli_refuses_an_unservable_request_before_any_round(tmp_path: Path, command: str) -> None:
    """model.quantize: 4bit on a machine without CUDA/bitsandbytes: one line naming the field
    (``run`` checks after starting its warm server, which is then stopped: nothing is left running)."""
    from click.testing import CliRunner
    from hetlora_kfp.pipelines.cli import main

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: 4bit may be servable here")
    out = CliRunner().invoke(main, [command, "-c", "configs/smoke.yaml", "--set", "model.quantize=4bit",
                                    "--set", "model.name=smollm2-135m", "--out", str(tmp_path)])
    assert out.exit_code != 0 and "model.quantize: '4bit' needs a CUDA device" in out.output
    assert "Traceback" not in out.output and not (tmp_path / "store").exists()
    assert not list(tmp_path.glob("warm-*"))  # the run's warm server stopped and its socket directory removed


def test_place_prepares_a_kbit_model_and_keeps_the_base_frozen() -> None:
    """The QLoRA placement path (peft's prepare_model_for_kbit_training) on a private tiny model:
    the API still fits and the base stays frozen and float32 (the NF4 load itself needs a GPU)."""
    from hetlora_core.models import load_base_model

    mcfg = load_config("configs/smoke.yaml").model
    model = load_base_model(mcfg, fresh=True)[0]
    placed = pr.place(model, mcfg, Precision("cuda", "bfloat16", "test", quantize="4bit"))
    assert placed is model
    assert all(not p.requires_grad and p.dtype == torch.float32 for p in placed.parameters())
    assert next(placed.parameters()).device.type == "cpu"  # a bnb model is placed at load, never moved here


def test_a_run_recorded_with_the_legacy_bf16_default_says_how_to_resume(tmp_path):
    """Runs recorded before model.dtype stored training.bf16: false; resuming with today's default
    (null) is refused (auto could pick bf16 on another CPU) with the one setting that resumes it."""
    from hetlora_core import store as st
    from hetlora_core.config import HetLoRAConfig, replace
    from hetlora_core.run import RunConfigMismatch, check_or_record_config

    store = st.LocalStore(str(tmp_path))
    now = HetLoRAConfig()
    old = now.to_dict()
    old["training"]["bf16"] = False
    st.put_json(store, st.config_key(now.experiment), old)
    with pytest.raises(RunConfigMismatch, match=r"resumes with --set training.bf16=false"):
        check_or_record_config(now, store)
    check_or_record_config(replace(now, **{"training.bf16": False}), store)  # the hint works
