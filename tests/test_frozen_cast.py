"""The frozen base's Linear weights held in the autocast dtype for a CPU training call
(hetlora_core/frozen_cast.py): what is swapped and what is not, restored after, bit-identical
training, and a cast that follows in-place changes."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

from hetlora_core import frozen_cast, peft_bridge, runtime
from hetlora_core.adapter import init_global
from hetlora_core.client import train_lora
from hetlora_core.config import HetLoRAConfig, load_config


@pytest.fixture(scope="module")
def cfg() -> HetLoRAConfig:
    # bf16 autocast on CPU (emulated where the CPU has no bf16: the tiny model keeps it cheap)
    return load_config("configs/smoke.yaml", {"model.dtype": "bfloat16", "training.bf16": None, "training.threads": 1})


@pytest.fixture(scope="module")
def model(cfg: HetLoRAConfig) -> torch.nn.Module:
    torch.set_num_threads(1)
    return runtime.model(cfg)


def test_frozen_linears_are_swapped_for_the_block_only(model):
    lin = [m for m in model.modules() if type(m) is torch.nn.Linear]
    emb = model.get_input_embeddings().weight
    assert model.get_output_embeddings().weight is emb  # tied: the output layer must stay float32
    before = {id(m.weight): m.weight.detach().clone() for m in lin}
    with frozen_cast.held_in(model, torch.bfloat16, "cpu"):
        swapped = [m for m in lin if m.weight.dtype == torch.bfloat16]
        assert len(swapped) == len(lin) - 1 and model.get_output_embeddings() not in swapped
        assert emb.dtype == torch.float32
        for m in swapped:
            assert torch.equal(m.weight, before[id(m.weight)].to(torch.bfloat16))
    assert all(m.weight.dtype == torch.float32 and torch.equal(m.weight, before[id(m.weight)]) for m in lin)
    with pytest.raises(RuntimeError, match="boom"), frozen_cast.held_in(model, torch.bfloat16, "cpu"):
        raise RuntimeError("boom")
    assert all(m.weight.dtype == torch.float32 for m in lin)


@pytest.mark.parametrize("dtype,device", [(torch.float32, "cpu"), (torch.bfloat16, "cuda")])
def test_nothing_is_swapped_in_float32_or_off_the_cpu(model, dtype, device):
    with frozen_cast.held_in(model, dtype, device):
        assert all(p.dtype == torch.float32 for p in model.parameters())


def test_trainable_weights_are_left_alone():
    lin = torch.nn.Linear(4, 4)  # requires grad: full fine-tuning trains it
    with frozen_cast.held_in(torch.nn.Sequential(lin), torch.bfloat16, "cpu"):
        assert lin.weight.dtype == torch.float32


def test_a_cast_lives_for_one_training_call():
    """Made once inside held_in; gone after it, so a write through .data between calls (peft's
    merge does one: neither the version counter nor the address changes) is seen by the next call."""
    lin = torch.nn.Linear(8, 8)
    lin.weight.requires_grad_(False)
    model = torch.nn.Sequential(lin)
    with frozen_cast.held_in(model, torch.bfloat16, "cpu"):
        first = lin.weight.data
    assert frozen_cast.cast(lin.weight, torch.bfloat16) is not frozen_cast.cast(lin.weight, torch.bfloat16)  # outside: plain .to
    lin.weight.data += 1.0
    with frozen_cast.held_in(model, torch.bfloat16, "cpu"):
        now = lin.weight.data
    assert not torch.equal(now, first)
    assert torch.equal(now, lin.weight.detach().to(torch.bfloat16))  # the cast of the written weights
    t = torch.nn.Parameter(torch.randn(8, 8))  # trainable: never kept
    with frozen_cast.held_in(model, torch.bfloat16, "cpu"):
        assert frozen_cast.cast(t, torch.bfloat16) is not frozen_cast.cast(t, torch.bfloat16)
        w = torch.nn.Parameter(torch.randn(8, 8), requires_grad=False)
        assert frozen_cast.cast(w, torch.bfloat16) is frozen_cast.cast(w, torch.bfloat16)


def test_a_weight_shared_by_two_linears_is_swapped_once_and_restored():
    a, b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    b.weight = a.weight
    a.weight.requires_grad_(False)
    with frozen_cast.held_in(torch.nn.Sequential(a, b), torch.bfloat16, "cpu"):
        assert a.weight.dtype == torch.bfloat16
    assert a.weight.dtype == torch.float32 and b.weight is a.weight


def test_training_is_bit_identical_with_and_without_the_held_casts(model, cfg, monkeypatch):
    client = runtime.clients(cfg)[runtime.client_ids(cfg)[0]]
    g = init_global(peft_bridge.spec_from_model(model, cfg.model.target_modules), 8, 2.0, 0)
    held = train_lora(model, g, client, cfg, 0)
    monkeypatch.setattr(frozen_cast, "held_in", lambda *a, **k: contextlib.nullcontext())
    cast_each_forward = train_lora(model, g, client, cfg, 0)
    assert held.train_loss == cast_each_forward.train_loss
    for m in held.adapter.A:
        assert np.array_equal(held.adapter.A[m], cast_each_forward.adapter.A[m])
        assert np.array_equal(held.adapter.B[m], cast_each_forward.adapter.B[m])
