"""The chunked causal-LM loss (hetlora_core/lm_loss.py) against the model's own forward, on the tiny
Llama (SmolLM2's architecture) with a LoRA adapter attached: same loss and gradients, masked labels
and padding included, full fine-tuning's output-layer gradient, and the fallback for models whose
forward changes the logits."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hetlora_core import lm_loss, peft_bridge, runtime
from hetlora_core.adapter import init_global
from hetlora_core.client import train_lora
from hetlora_core.config import HetLoRAConfig, replace
from hetlora_core.data import IGNORE, Batch


@pytest.fixture
def peft_model(smoke_model: torch.nn.Module, smoke_cfg: HetLoRAConfig):
    g = init_global(peft_bridge.spec_from_model(smoke_model, smoke_cfg.model.target_modules), 8, 2.0, 0)
    gen = np.random.default_rng(5)
    g.B = {m: gen.standard_normal(b.shape, np.float32) * 0.3 for m, b in g.B.items()}  # B != 0: A gets gradients
    pm = peft_bridge.attach(smoke_model, g)
    pm.train()
    yield pm
    pm.eval()
    peft_bridge.detach(pm)


def batch(masked: bool = False, padded: bool = False) -> Batch:
    ids = torch.randint(0, 49152, (3, 40), generator=torch.Generator().manual_seed(7))
    labels = ids.clone()
    mask = None
    if masked:  # instruction data: the prompt's labels are ignored
        labels[0, :25] = IGNORE
        labels[2, 3:11] = IGNORE
    if padded:  # right padding, ignored in the loss
        mask = torch.ones_like(ids)
        mask[1, 30:] = 0
        labels[1, 30:] = IGNORE
    return Batch(ids, labels, mask)


def loss_and_grads(pm: torch.nn.Module, b: Batch, chunked: bool, dtype: torch.dtype = torch.float32) -> tuple[float, list[torch.Tensor]]:
    params = peft_bridge.lora_parameters(pm)
    for p in params:
        p.grad = None
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        loss = lm_loss.causal_lm_loss(pm, b, dtype, chunked)
    loss.float().backward()
    return float(loss.detach()), [p.grad.clone() for p in params]


@pytest.mark.parametrize("masked,padded", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("chunk", [7, 128])  # 7: many chunks and a short last one
def test_chunked_loss_and_gradients_equal_the_models_own(peft_model, monkeypatch, masked, padded, chunk):
    monkeypatch.setattr(lm_loss, "CHUNK_TOKENS", chunk)
    b = batch(masked, padded)
    own, g_own = loss_and_grads(peft_model, b, chunked=False)
    calls = spy_chunked(monkeypatch)
    mine, g_mine = loss_and_grads(peft_model, b, chunked=True)
    assert calls and lm_loss._checked.get(peft_bridge.unwrapped(peft_model)) is True  # the chunked path really ran
    assert mine == pytest.approx(own, rel=1e-6)
    for a, c in zip(g_own, g_mine, strict=True):
        assert torch.count_nonzero(a) > 0
        torch.testing.assert_close(c, a, rtol=1e-5, atol=1e-7)


def test_bf16_autocast_matches_the_models_own(peft_model):
    b = batch(masked=True)
    own, g_own = loss_and_grads(peft_model, b, chunked=False, dtype=torch.bfloat16)
    mine, g_mine = loss_and_grads(peft_model, b, chunked=True, dtype=torch.bfloat16)
    assert mine == pytest.approx(own, rel=1e-5)
    for a, c in zip(g_own, g_mine, strict=True):  # same bf16 roundings (bit-equal on the machines measured)
        torch.testing.assert_close(c, a, rtol=1e-2, atol=1e-6)


def test_the_chunked_loss_is_the_formula():
    """Against cross_entropy written out, on random tensors (not through any model)."""
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(2, 9, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(50, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 50, (2, 9), generator=gen)
    labels[1, :4] = IGNORE
    targets = torch.nn.functional.pad(labels, (0, 1), value=IGNORE)[:, 1:].reshape(-1)
    ref = torch.nn.functional.cross_entropy((h.reshape(-1, 16) @ w.T), targets, ignore_index=IGNORE)
    gh_ref, gw_ref = torch.autograd.grad(ref, (h, w))
    mine = lm_loss.chunked_cross_entropy(h, w, labels, torch.float64)
    gh, gw = torch.autograd.grad(mine, (h, w))
    # The softmax runs in float32 whatever the input (as the model's own loss upcasts with .float()).
    assert float(mine.detach()) == pytest.approx(float(ref.detach()), rel=1e-6)
    torch.testing.assert_close(gh, gh_ref, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(gw, gw_ref, rtol=1e-5, atol=1e-7)
    # ignored positions (and the last one, which predicts nothing) get no gradient
    assert torch.count_nonzero(gh[1, :3]) == 0 and torch.count_nonzero(gh[:, -1]) == 0


def test_nothing_counted_is_nan_like_the_models_own(peft_model):
    b = batch()
    b = Batch(b.input_ids, torch.full_like(b.labels, IGNORE), None)
    with torch.no_grad():
        own = float(peft_model(**b.model_inputs()).loss)
        mine = float(lm_loss.causal_lm_loss(peft_model, b, torch.float32))
    assert math.isnan(own) and math.isnan(mine)


def test_full_fine_tuning_gets_the_tied_output_layer_gradient(smoke_cfg):
    """Full fine-tuning trains the tied embedding / output matrix: its gradient comes through both
    the lookup and the chunked output layer."""
    from hetlora_core.models import load_base_model

    m = load_base_model(smoke_cfg.model, fresh=True)[0]
    params = list(m.parameters())
    for p in params:
        p.requires_grad_(True)
    m.train()
    b = batch(masked=True)
    grads = []
    for chunked in (False, True):
        m.zero_grad(set_to_none=True)
        lm_loss.causal_lm_loss(m, b, torch.float32, chunked).backward()
        grads.append([p.grad.clone() for p in params])
    emb = m.get_input_embeddings().weight
    assert emb is m.get_output_embeddings().weight  # tied, as SmolLM2
    for a, c in zip(*grads, strict=True):
        torch.testing.assert_close(c, a, rtol=1e-5, atol=1e-7)


def spy_chunked(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = lm_loss._chunked
    monkeypatch.setattr(lm_loss, "_chunked", lambda *a: calls.append(1) or real(*a))
    return calls


def test_a_model_whose_forward_changes_the_loss_keeps_its_own(smoke_cfg, monkeypatch):
    """Something the config and the output layer do not show (here the forward scales its loss): the
    one-time check sees the chunked loss differ, and the model's own forward computes the loss."""
    from hetlora_core.models import load_base_model

    m = load_base_model(smoke_cfg.model, fresh=True)[0]
    real_forward = m.forward

    def forward(*a, **k):
        out = real_forward(*a, **k)
        out.loss = out.loss * 1.5
        return out

    m.forward = forward
    b = batch()
    with torch.no_grad():
        own = float(m(**b.model_inputs()).loss)
        got = float(lm_loss.causal_lm_loss(m, b, torch.float32))
    assert lm_loss._checked[m] is False
    assert got == own
    calls = spy_chunked(monkeypatch)
    with torch.no_grad():
        lm_loss.causal_lm_loss(m, b, torch.float32)
    assert calls == []  # decided once: not even tried again


def test_output_layer_hooks_and_logit_settings_keep_the_models_own_loss(smoke_cfg, monkeypatch):
    from hetlora_core.models import load_base_model

    m = load_base_model(smoke_cfg.model, fresh=True)[0]
    assert lm_loss._parts(m) is not None
    hook = m.get_output_embeddings().register_forward_hook(lambda mod, inp, out: out * 20.0)
    assert lm_loss._parts(m) is None
    hook.remove()
    monkeypatch.setattr(m.config, "final_logit_softcapping", 30.0, raising=False)
    assert lm_loss._parts(m) is None


def test_float16_keeps_the_models_own_loss(peft_model, monkeypatch):
    """A float16 run's gradient scaler scales the loss's gradient before its cast to float16; the
    chunked path casts in forward, so small gradient entries would flush to zero."""
    calls = spy_chunked(monkeypatch)
    b = batch()
    with torch.no_grad():
        lm_loss.causal_lm_loss(peft_model, b, torch.float16)
        assert calls == []
        lm_loss.causal_lm_loss(peft_model, b, torch.float32)
    assert calls == [1]


def test_non_finite_logits_of_ignored_positions_cannot_reach_loss_or_gradients():
    gen = torch.Generator().manual_seed(1)
    h = torch.randn(1, 6, 8, generator=gen, requires_grad=True)
    w = torch.randn(20, 8, generator=gen)
    labels = torch.randint(0, 20, (1, 6), generator=gen)
    labels[0, :3] = IGNORE  # positions 0 and 1 predict ignored labels 1 and 2
    poisoned = h.detach().clone()
    poisoned[0, :2] = float("inf")  # e.g. float16 overflow on a prompt row
    x = poisoned.requires_grad_(True)
    loss = lm_loss.chunked_cross_entropy(x, w, labels, torch.float32)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    assert torch.count_nonzero(x.grad[0, :2]) == 0
def test_training_with_either_loss_gives_the_same_adapter(smoke_model, smoke_cfg):
    client = runtime.clients(smoke_cfg)[runtime.client_ids(smoke_cfg)[0]]
    g = init_global(peft_bridge.spec_from_model(smoke_model, smoke_cfg.model.target_modules), 8, 2.0, 0)
    a = train_lora(smoke_model, g, client, replace(smoke_cfg, **{"training.chunked_loss": True}), 0)
    b = train_lora(smoke_model, g, client, replace(smoke_cfg, **{"training.chunked_loss": False}), 0)
    assert a.train_loss == pytest.approx(b.train_loss, rel=1e-5)
    for m in a.adapter.A:
        np.testing.assert_allclose(a.adapter.A[m], b.adapter.A[m], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(a.adapter.B[m], b.adapter.B[m], rtol=1e-4, atol=1e-6)
