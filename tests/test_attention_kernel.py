"""``model.attention`` (hetlora_core/attention.py): the auto rule, the switch for one training call
and back, and training that agrees across kernels to rounding."""

from __future__ import annotations

import numpy as np
import pytest

from hetlora_core import attention, peft_bridge, runtime
from hetlora_core.adapter import init_global
from hetlora_core.client import train_lora
from hetlora_core.config import ConfigError, load_config, replace


@pytest.mark.parametrize("setting,device,dtype,seq,want", [
    ("auto", "cpu", "bfloat16", 64, "eager"), ("auto", "cpu", "bfloat16", attention.CPU_EAGER_MAX_LEN, "eager"),
    ("auto", "cpu", "bfloat16", attention.CPU_EAGER_MAX_LEN + 1, None), ("auto", "cpu", "float32", 64, None),
    ("auto", "cuda", "bfloat16", 64, None), ("sdpa", "cpu", "bfloat16", 64, "sdpa"), ("eager", "cuda", "float16", 4096, "eager"),
])
def test_auto_takes_eager_on_cpu_in_bf16_for_short_windows_only(setting, device, dtype, seq, want):
    assert attention.choose(setting, device, dtype, seq) == want


def test_a_bad_setting_is_refused_by_name():
    with pytest.raises(ConfigError, match="model.attention.*'flash'"):
        load_config(None, {"model.attention": "flash"})


def test_the_kernel_is_switched_for_the_block_and_back_also_after_an_error(smoke_model, smoke_cfg):
    own = smoke_model.config._attn_implementation
    other = "eager" if own != "eager" else "sdpa"
    pm = peft_bridge.attach(smoke_model, init_global(peft_bridge.spec_from_model(smoke_model, smoke_cfg.model.target_modules), 4, 2.0, 0))
    try:
        with attention.using(pm, other):
            assert smoke_model.config._attn_implementation == other
            assert all(getattr(m, "config", smoke_model.config)._attn_implementation == other for m in smoke_model.modules() if hasattr(m, "config"))
        assert smoke_model.config._attn_implementation == own
        with pytest.raises(RuntimeError, match="boom"), attention.using(pm, other):
            raise RuntimeError("boom")
        assert smoke_model.config._attn_implementation == own
        with attention.using(pm, None):  # None: the model's own, untouched
            assert smoke_model.config._attn_implementation == own
    finally:
        peft_bridge.detach(pm)


def test_training_with_either_kernel_agrees_to_rounding(smoke_model, smoke_cfg):
    client = runtime.clients(smoke_cfg)[runtime.client_ids(smoke_cfg)[0]]
    g = init_global(peft_bridge.spec_from_model(smoke_model, smoke_cfg.model.target_modules), 8, 2.0, 0)
    seen = []
    real = attention.using

    def spy(m, kernel):  # the kernel train_lora asked for
        seen.append(kernel)
        return real(m, kernel)

    attention.using = spy
    try:
        runs = {k: train_lora(smoke_model, g, client, replace(smoke_cfg, **{"model.attention": k}), 0) for k in ("eager", "sdpa")}
    finally:
        attention.using = real
    assert seen == ["eager", "sdpa"]
    a, b = runs["eager"].adapter, runs["sdpa"].adapter
    assert runs["eager"].train_loss == pytest.approx(runs["sdpa"].train_loss, rel=1e-5)
    for m in a.A:
        np.testing.assert_allclose(a.A[m], b.A[m], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(a.B[m], b.B[m], rtol=1e-4, atol=1e-6)
