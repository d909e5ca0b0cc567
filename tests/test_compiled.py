"""``training.compile`` (hetlora_core/compiled.py) on the real tiny Llama: the decoder layers really
run compiled inside a training call and eagerly after it, the trained adapter agrees with an eager
run to rounding (also after a rank change, which recompiles), and a model without a named decoder
block or a failing compiler trains eagerly instead of failing the client."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from hetlora_core import compiled, runtime
from hetlora_core.adapter import LoraAdapter, init_global
from hetlora_core.client import train_lora
from hetlora_core.config import HetLoRAConfig, replace
from hetlora_core.peft_bridge import spec_from_model

# a cold compile of the tiny Llama at two ranks (~20-40 s with an empty inductor cache)
pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _fresh_warnings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(compiled, "_warned", set())  # each fallback warns once per process: here once per test


@pytest.fixture(scope="module")
def cfg(smoke_cfg: HetLoRAConfig) -> HetLoRAConfig:
    return replace(smoke_cfg, **{"training.local_steps": 2})  # float32, one thread (conftest)


@pytest.fixture(scope="module")
def received(smoke_model: torch.nn.Module, cfg: HetLoRAConfig) -> LoraAdapter:
    g = init_global(spec_from_model(smoke_model, cfg.model.target_modules), 8, 2.0, 1)
    rng = np.random.default_rng(5)
    g.B = {m: rng.standard_normal(b.shape, np.float32) * 0.3 for m, b in g.B.items()}  # mid-training: B != 0
    return g


def _train(model: torch.nn.Module, adapter: LoraAdapter, cfg: HetLoRAConfig, on: bool) -> LoraAdapter:
    client = runtime.clients(cfg)[runtime.client_ids(cfg)[0]]
    out = train_lora(model, adapter, client, replace(cfg, **{"training.compile": on}), 0).adapter
    assert out is not None
    return out


def _close(a: LoraAdapter, b: LoraAdapter) -> None:
    assert a.ranks == b.ranks
    for m in a.A:
        np.testing.assert_allclose(a.A[m], b.A[m], rtol=0, atol=1e-4, err_msg=m)
        np.testing.assert_allclose(a.B[m], b.B[m], rtol=0, atol=1e-4, err_msg=m)


def test_compiled_training_runs_compiled_and_agrees_with_eager(smoke_model: torch.nn.Module, cfg: HetLoRAConfig,
                                                               received: LoraAdapter) -> None:
    if why := compiled.unusable("cpu"):
        pytest.skip(f"torch.compile cannot build on this machine: {why}")
    layers = compiled.blocks(smoke_model)
    assert layers and all(type(m).__name__ == "LlamaDecoderLayer" for m in layers)
    torch._dynamo.reset()
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    eager = _train(smoke_model, received, cfg, on=False)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == frames  # off: nothing compiled
    fused = _train(smoke_model, received, cfg, on=True)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"] - frames
    assert 0 < graphs <= 2, graphs  # on: dynamo captured the layers, one graph serving all of them
    assert all(m._compiled_call_impl is None for m in layers)  # and they run eagerly again after the call
    _close(fused, eager)
    # a rank change (another tier, or a pruned client) recompiles and still agrees
    low = received.truncate(4)
    _close(_train(smoke_model, low, cfg, on=True), _train(smoke_model, low, cfg, on=False))


def test_model_without_a_named_block_trains_eagerly(smoke_model: torch.nn.Module, cfg: HetLoRAConfig,
                                                    received: LoraAdapter, monkeypatch: pytest.MonkeyPatch,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(smoke_model, "_no_split_modules", None)
    assert compiled.blocks(smoke_model) == []
    with caplog.at_level(logging.WARNING, logger="hetlora_core.compiled"):
        out = _train(smoke_model, received, cfg, on=True)
    assert "names no decoder block" in caplog.text and "LlamaForCausalLM" in caplog.text
    _close(out, _train(smoke_model, received, cfg, on=False))


def test_a_failing_compiler_falls_back_to_eager(smoke_model: torch.nn.Module, cfg: HetLoRAConfig,
                                                received: LoraAdapter, monkeypatch: pytest.MonkeyPatch,
                                                caplog: pytest.LogCaptureFixture) -> None:
    import torch._inductor.config as inductor

    torch._dynamo.reset()  # a fresh compile, not the one made above
    monkeypatch.setattr(inductor, "fx_graph_cache", False)  # no cached kernels: the compiler must run
    monkeypatch.setattr(inductor.cpp, "cxx", (None, "/nonexistent/c++"))
    compiled.unusable.cache_clear()  # probe again, with the broken compiler
    try:
        with caplog.at_level(logging.WARNING, logger="hetlora_core.compiled"):
            out = _train(smoke_model, received, cfg, on=True)
    finally:
        compiled.unusable.cache_clear()  # later tests probe the real compiler
    assert "cannot build here" in caplog.text and "/nonexistent/c++" in caplog.text
    _close(out, _train(smoke_model, received, cfg, on=False))
