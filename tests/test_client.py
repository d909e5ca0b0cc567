"""The client side on a real (tiny, random) Llama: the scale through peft, local training, cleanup.

Every check compares against an independent computation (a manual ``W0 + s B A`` forward, a
second training run, a snapshot of the base weights), so a wrong scale, a regulariser that leaks
into the head components, non-determinism or a lingering peft layer each make a test fail.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hetlora_core import client as client_mod
from hetlora_core import peft_bridge, runtime
from hetlora_core.adapter import LoraAdapter, init_global
from hetlora_core.client import client_seed, train_full, train_lora
from hetlora_core.config import HetLoRAConfig, ModelConfig, replace
from hetlora_core.evaluation import nll
from hetlora_core.models import load_base_model
from hetlora_core.peft_bridge import spec_from_model
from hetlora_core.pruning import self_prune, tail_score, tail_start

R_MAX = 8
SCALE = 2.0


@pytest.fixture(scope="module")
def cfg(smoke_cfg: HetLoRAConfig) -> HetLoRAConfig:
    return smoke_cfg  # conftest: the tiny Llama with real Shakespeare clients, float32, one thread


@pytest.fixture(scope="module")
def model(smoke_model: torch.nn.Module) -> torch.nn.Module:
    return smoke_model


@pytest.fixture(scope="module")
def one_client(cfg: HetLoRAConfig):
    return runtime.clients(cfg)[runtime.client_ids(cfg)[0]]


def random_global(model: torch.nn.Module, cfg: HetLoRAConfig, seed: int = 1, b_std: float = 0.3) -> LoraAdapter:
    """A global adapter at r_max with non-zero B (a mid-training state; round 0 has B = 0)."""
    g = init_global(spec_from_model(model, cfg.model.target_modules), R_MAX, SCALE, seed)
    gen = np.random.default_rng(seed + 100)
    g.B = {m: gen.standard_normal(b.shape, np.float32) * b_std for m, b in g.B.items()}
    return g


def ids(n: int = 2, t: int = 16, vocab: int = 49152) -> torch.Tensor:
    return torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(3))


@torch.no_grad()
def peft_logits(model: torch.nn.Module, adapter: LoraAdapter, x: torch.Tensor) -> torch.Tensor:
    pm = peft_bridge.attach(model, adapter)
    try:
        return pm(input_ids=x).logits
    finally:
        peft_bridge.detach(pm)


@torch.no_grad()
def manual_logits(model: torch.nn.Module, g: LoraAdapter, r: int, scale: float, x: torch.Tensor) -> torch.Tensor:
    """The base model with every target weight replaced by ``W0 + s * B[:, :r] @ A[:r]``."""
    params = dict(model.named_parameters())
    over = {f"{m}.weight": params[f"{m}.weight"] + scale * torch.from_numpy(g.B[m][:, :r] @ g.A[m][:r])
            for m in g.modules}
    return torch.func.functional_call(model, over, (), {"input_ids": x}).logits


def snapshot(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], list[str]]:
    return ({k: v.detach().clone() for k, v in model.state_dict().items()},
            [f"{n}:{type(m).__module__}.{type(m).__name__}" for n, m in model.named_modules()])


def assert_untouched(model: torch.nn.Module, snap: tuple[dict[str, torch.Tensor], list[str]]) -> None:
    state, modules = snap
    now = model.state_dict()
    assert set(now) == set(state), f"state_dict keys changed: {sorted(set(now) ^ set(state))[:5]}"
    changed = [k for k in state if not torch.equal(now[k], state[k])]
    assert not changed, f"base weights modified: {changed[:5]}"
    assert snapshot(model)[1] == modules, "module tree changed (lingering peft/LoRA layers?)"
    assert not any("peft" in m or "lora" in m.lower() for m in modules)
    assert all(not p.requires_grad for p in model.parameters())
    assert not model.training


# ---------------------------------------------------------------- the scale through peft


@pytest.mark.parametrize("r", [1, 3, R_MAX])
def test_client_at_rank_r_computes_the_truncated_global(model, cfg, r):
    g, x = random_global(model, cfg), ids()
    got = peft_logits(model, g.truncate(r), x)
    want = manual_logits(model, g, r, SCALE, x)
    with torch.no_grad():
        base = model(input_ids=x).logits
    tol = 1e-4
    assert (got - base).abs().max() > 100 * tol, "the adapter barely changes the logits: the test would be vacuous"
    assert torch.allclose(got, want, atol=tol, rtol=0), f"max diff {(got - want).abs().max():.3g}"
    # A rank-dependent scale (peft's default alpha / r with a fixed alpha) would be caught:
    wrong = manual_logits(model, g, r, SCALE * R_MAX / r if r != R_MAX else SCALE / 2, x)
    assert (wrong - got).abs().max() > 100 * tol


def test_zero_padding_gives_identical_logits(model, cfg):
    g, x = random_global(model, cfg), ids()
    a = g.truncate(3)
    padded = a.pad(R_MAX)
    assert padded.ranks == {m: R_MAX for m in a.modules}
    got, want = peft_logits(model, padded, x), peft_logits(model, a, x)
    assert torch.allclose(got, want, atol=1e-5, rtol=0), f"max diff {(got - want).abs().max():.3g}"
    # and padding is not the same as keeping the global's higher components
    assert (peft_logits(model, g, x) - want).abs().max() > 1e-3


@pytest.mark.parametrize("scale", [0.5, 2.0, 16.0])
@pytest.mark.parametrize("r", [1, 2, 7, 16])
def test_peft_scaling_equals_scale_at_every_rank(model, cfg, scale, r):
    a = init_global(spec_from_model(model, cfg.model.target_modules), r, scale, 0)
    pm = peft_bridge.attach(model, a)
    try:
        layers = peft_bridge._lora_layers(pm)
        assert set(layers) == set(a.modules)
        for layer in layers.values():
            assert layer.r["default"] == r
            assert layer.scaling["default"] == pytest.approx(scale, rel=1e-12)
    finally:
        peft_bridge.detach(pm)


@pytest.mark.parametrize("layers", [2, 12])
def test_per_module_ranks_via_rank_pattern(layers):
    """Different ranks per module (per-module pruning): each module gets its own rank and still
    the one scale. 12 layers: the pattern for 'layers.1' must not also match 'layers.10'/'layers.11'."""
    m, _ = load_base_model(ModelConfig(name="tiny", tiny_hidden=16, tiny_layers=layers))
    spec = spec_from_model(m, ("q_proj", "v_proj"))
    ranks = {name: 1 + (i * 5) % 7 for i, name in enumerate(spec)}  # 1..7, mixed
    assert len(set(ranks.values())) > 2
    g = init_global(spec, R_MAX, SCALE, 0)
    gen = np.random.default_rng(5)
    g.B = {k: gen.standard_normal(b.shape, np.float32) for k, b in g.B.items()}
    a = g.truncate(ranks)
    cfg = peft_bridge.lora_config(a)
    for name, r in ranks.items():
        assert cfg.rank_pattern.get(name, cfg.r) == r
        assert cfg.alpha_pattern.get(name, cfg.lora_alpha) / r == pytest.approx(SCALE)
    x = ids(1, 8)
    pm = peft_bridge.attach(m, a)
    try:
        got = {n: (layer.r["default"], layer.scaling["default"], tuple(layer.lora_A["default"].weight.shape))
               for n, layer in peft_bridge._lora_layers(pm).items()}
        assert got == {n: (r, pytest.approx(SCALE), (r, spec[n][1])) for n, r in ranks.items()}
        back = peft_bridge.extract(pm, SCALE)
        assert back.ranks == ranks and all(np.array_equal(back.B[k], a.B[k]) for k in ranks)
        with torch.no_grad():
            logits = pm(input_ids=x).logits
    finally:
        peft_bridge.detach(pm)
    params = dict(m.named_parameters())
    over = {f"{k}.weight": params[f"{k}.weight"] + SCALE * torch.from_numpy(a.B[k] @ a.A[k]) for k in ranks}
    with torch.no_grad():
        want = torch.func.functional_call(m, over, (), {"input_ids": x}).logits
    assert torch.allclose(logits, want, atol=1e-4, rtol=0)


# ---------------------------------------------------------------- kept LoRA layers (attach reuse=True)


@torch.no_grad()
def kept_logits(model: torch.nn.Module, adapter: LoraAdapter, x: torch.Tensor) -> torch.Tensor:
    pm = peft_bridge.attach(model, adapter, reuse=True)
    try:
        return pm(input_ids=x).logits
    finally:
        peft_bridge.detach(pm)


def test_kept_layers_compute_what_a_fresh_attach_computes(model, cfg):
    """The in-process loop attaches the same shapes over and over; putting kept LoRA layers back
    must load the new weights into them (not keep the last client's), per shape, and leave the
    base model exactly as a fresh attach + unload does."""
    peft_bridge._KEPT.clear()
    snap, x = snapshot(model), ids()
    g1, g2 = random_global(model, cfg, seed=1), random_global(model, cfg, seed=2)
    for g in (g1, g2, g1):  # rank 3, then rank 5 in between, then rank 3 again with other weights
        for r in (3, 5):
            fresh, kept = peft_logits(model, g.truncate(r), x), kept_logits(model, g.truncate(r), x)
            assert torch.equal(kept, fresh), f"rank {r}: max diff {(kept - fresh).abs().max():.3g}"
            assert_untouched(model, snap)
    assert len(peft_bridge._KEPT) == 2  # one entry per shape, found again (not re-injected) each time
    assert not torch.equal(kept_logits(model, g1.truncate(3), x), kept_logits(model, g2.truncate(3), x))


def test_kept_layers_drop_their_gradients_and_a_failed_load_leaves_the_model_clean(model, cfg):
    peft_bridge._KEPT.clear()
    snap, g = snapshot(model), random_global(model, cfg)
    pm = peft_bridge.attach(model, g.truncate(2), reuse=True)
    params = peft_bridge.lora_parameters(pm)
    pm(input_ids=ids()).logits.sum().backward()
    assert all(p.grad is not None for p in params)
    peft_bridge.detach(pm)
    assert all(p.grad is None for p in params)  # kept out of the model without the last client's gradients
    pm = peft_bridge.attach(model, g.truncate(2), reuse=True)
    try:
        assert peft_bridge.lora_parameters(pm)[0] is params[0]  # the kept layers, put back
        with pytest.raises(RuntimeError, match="already has LoRA layers attached"):
            peft_bridge.attach(model, g.truncate(2), reuse=True)
    finally:
        peft_bridge.detach(pm)
    bad = g.truncate(2)
    bad.A = {m: a[:, :-1] for m, a in bad.A.items()}  # wrong input width: the copy into the layers fails
    with pytest.raises(RuntimeError):
        peft_bridge.attach(model, bad, reuse=True)
    model.eval()
    assert_untouched(model, snap)  # nothing left attached: the next attach works
    peft_bridge.detach(peft_bridge.attach(model, g.truncate(2), reuse=True))


def test_kept_layers_of_one_model_at_a_time(model, cfg):
    """A model the runtime's cache let go must not stay alive in the kept layers."""
    peft_bridge._KEPT.clear()
    peft_bridge.detach(peft_bridge.attach(model, random_global(model, cfg).truncate(2), reuse=True))
    other, _ = load_base_model(ModelConfig(name="tiny", tiny_hidden=16, tiny_layers=1))
    a = init_global(spec_from_model(other, ("q_proj", "v_proj")), 2, SCALE, 0)
    peft_bridge.detach(peft_bridge.attach(other, a, reuse=True))
    assert {k[0] for k in peft_bridge._KEPT} == {id(other)}

def test_kept_layers_are_bounded_by_memory_then_by_count(model, cfg, monkeypatch):
    """Least recently used shapes go once the model's kept LoRA weights pass KEPT_SHARE of its own
    parameters (the newest always stays); KEPT_MAX bounds the entries over every model."""
    peft_bridge._KEPT.clear()
    g = random_global(model, cfg)
    base = sum(p.numel() for p in model.parameters())
    per_rank = sum(b.shape[0] + a.shape[1] for a, b in zip(g.A.values(), g.B.values(), strict=True))  # LoRA parameters per unit of rank
    monkeypatch.setattr(peft_bridge, "KEPT_SHARE", 10.5 * per_rank / base)  # room for ranks summing to 10
    for r in (1, 2, 3, 4):  # 10 in all: every one kept
        peft_bridge.detach(peft_bridge.attach(model, g.truncate(r), reuse=True))
    assert sorted(e.size // per_rank for e in peft_bridge._KEPT.values()) == [1, 2, 3, 4]
    peft_bridge.detach(peft_bridge.attach(model, g.truncate(1), reuse=True))  # found again: now the most recent
    peft_bridge.detach(peft_bridge.attach(model, g.truncate(5), reuse=True))  # 15 > 10.5: the oldest (2, 3) go
    assert [e.size // per_rank for e in peft_bridge._KEPT.values()] == [4, 1, 5]
    peft_bridge.detach(peft_bridge.attach(model, g.truncate(8), reuse=True))  # alone over the budget: kept alone
    assert [e.size // per_rank for e in peft_bridge._KEPT.values()] == [8]
    monkeypatch.setattr(peft_bridge, "KEPT_SHARE", 1.0)
    monkeypatch.setattr(peft_bridge, "KEPT_MAX", 3)
    for r in (1, 2, 3, 4, 5):
        peft_bridge.detach(peft_bridge.attach(model, g.truncate(r), reuse=True))
    assert [e.size // per_rank for e in peft_bridge._KEPT.values()] == [3, 4, 5]


def test_a_replaced_module_drops_the_kept_layers(cfg):
    """If the model's module tree changed since (a layer replaced), the kept layers wrap a layer
    that is no longer there: a fresh injection instead of putting stale layers back."""
    m, _ = load_base_model(ModelConfig(name="tiny", tiny_hidden=16, tiny_layers=1))
    a = init_global(spec_from_model(m, ("q_proj", "v_proj")), 2, SCALE, 0)
    peft_bridge.detach(peft_bridge.attach(m, a, reuse=True))
    attn = m.get_submodule("model.layers.0.self_attn")
    new_q = attn.q_proj = torch.nn.Linear(attn.q_proj.in_features, attn.q_proj.out_features, bias=False)
    pm = peft_bridge.attach(m, a, reuse=True)
    try:
        assert peft_bridge._lora_layers(pm)["model.layers.0.self_attn.q_proj"].base_layer is new_q
    finally:
        peft_bridge.detach(pm)
    assert m.get_submodule("model.layers.0.self_attn.q_proj") is new_q


# ---------------------------------------------------------------- train_lora


def train_cfg(cfg: HetLoRAConfig, **kw) -> HetLoRAConfig:
    return replace(cfg, **kw)


def test_training_lowers_the_loss(model, cfg, one_client):
    c = train_cfg(cfg, **{"training.lr": 0.02, "training.local_steps": 12, "training.batch_size": 4})
    received = init_global(spec_from_model(model, c.model.target_modules), R_MAX, SCALE, 0)  # round 0: B = 0
    res = train_lora(model, received, one_client, c, 0)
    seq = c.data.seq_len
    fixed = one_client.train_ids[: 8 * seq].reshape(8, seq)  # training text, fixed windows
    pm = peft_bridge.attach(model, received)
    before = nll(pm, fixed, False)
    peft_bridge.detach(pm)
    pm = peft_bridge.attach(model, res.adapter)
    after = nll(pm, fixed, False)
    peft_bridge.detach(pm)
    assert after[1] == before[1] == 8 * (seq - 1)
    assert after[0] / after[1] < before[0] / before[1] - 0.05, (before[0] / before[1], after[0] / after[1])
    assert res.num_tokens == 12 * 4 * seq and res.num_samples == len(one_client.train_ids) // seq
    assert res.adapter.ranks == received.ranks and res.adapter.scale == SCALE
    assert any(float(np.abs(b).max()) > 0 for b in res.adapter.B.values())  # training moved B off zero


def test_regulariser_moves_only_the_tail(model, cfg, one_client):
    """One AdamW step from the same state on the same batch, with a huge lambda and without the
    regulariser: the head components come out bit-identical (the regulariser's gradient is zero
    there), the tail ones differ and their score is lower with the regulariser."""
    gamma, r = 0.5, R_MAX
    start = tail_start(r, gamma)
    received = random_global(model, cfg).truncate(r)
    common = {"training.local_steps": 1, "training.lr": 0.01, "pruning.gamma": gamma}
    on = train_lora(model, received, one_client, train_cfg(cfg, **common, **{"pruning.lam": 100.0}), 1)
    off = train_lora(model, received, one_client, train_cfg(cfg, **common, **{"pruning.enabled": False}), 1)
    assert on.reg_loss > 0 and off.reg_loss == 0
    assert on.train_loss == off.train_loss  # same batch, same starting point
    for m in received.modules:
        assert np.array_equal(on.adapter.A[m][:start], off.adapter.A[m][:start]), m
        assert np.array_equal(on.adapter.B[m][:, :start], off.adapter.B[m][:, :start]), m
        assert not np.array_equal(on.adapter.A[m][start:], off.adapter.A[m][start:]), m
        kind = cfg.pruning.score
        s_on = tail_score(on.adapter.A[m], on.adapter.B[m], start, kind)
        s_off = tail_score(off.adapter.A[m], off.adapter.B[m], start, kind)
        s_recv = tail_score(received.A[m], received.B[m], start, kind)
        assert s_on < s_off and s_on < s_recv, (m, s_on, s_off, s_recv)
    # ... so the prune decision fires on the regularised update: rank 8 -> floor(0.5 * 8) = 4
    pruned, d = self_prune(received, on.adapter, train_cfg(cfg, **common, **{"pruning.lam": 100.0}).pruning, cfg.ranks.r_min)
    assert d.pruned and pruned.rank == start


@pytest.mark.parametrize("overrides", [
    {"ranks.r_min": R_MAX, "ranks.assignment": "uniform"},  # a client already at r_min cannot prune: no regulariser (default)
    {"strategy.name": "zero_pad"},  # baselines never regularise
    {"pruning.lam": 0.0},
])
def test_no_regulariser_where_it_does_not_apply(model, cfg, one_client, overrides):
    received = random_global(model, cfg).truncate(R_MAX)
    common = {"training.local_steps": 2, "training.lr": 0.01, "pruning.lam": 100.0, "pruning.gamma": 0.5}
    ref = train_lora(model, received, one_client, train_cfg(cfg, **common, **{"pruning.enabled": False}), 0)
    res = train_lora(model, received, one_client, train_cfg(cfg, **{**common, **overrides}), 0)
    assert res.reg_loss == 0
    assert all(np.array_equal(res.adapter.A[m], ref.adapter.A[m]) and np.array_equal(res.adapter.B[m], ref.adapter.B[m])
               for m in received.modules)
    if "ranks.r_min" in overrides:  # ... unless asked for explicitly
        forced = train_lora(model, received, one_client,
                            train_cfg(cfg, **{**common, **overrides, "pruning.regularize_at_r_min": True}), 0)
        m0 = received.modules[0]
        assert forced.reg_loss > 0 and not np.array_equal(forced.adapter.A[m0], ref.adapter.A[m0])


def test_same_seed_same_adapter_and_rounds_draw_different_batches(model, cfg, one_client, monkeypatch):
    c = train_cfg(cfg, **{"training.local_steps": 2})
    received = random_global(model, cfg).truncate(4)
    seen: list[torch.Tensor] = []
    real = client_mod.sample_batch

    def spy(*a, **kw):
        b = real(*a, **kw)
        seen.append(b.clone())
        return b

    monkeypatch.setattr(client_mod, "sample_batch", spy)
    r1, r2, r3 = (train_lora(model, received, one_client, c, rnd) for rnd in (0, 0, 1))
    b1, b2, b3 = seen[0:2], seen[2:4], seen[4:6]
    assert all(torch.equal(x, y) for x, y in zip(b1, b2, strict=True))  # local_steps batches per call
    assert not any(torch.equal(x, y) for x, y in zip(b1, b3, strict=True))
    for m in received.modules:
        assert np.array_equal(r1.adapter.A[m], r2.adapter.A[m]) and np.array_equal(r1.adapter.B[m], r2.adapter.B[m])
    assert any(not np.array_equal(r1.adapter.A[m], r3.adapter.A[m]) for m in received.modules)
    # seeds differ per round, per client and per run seed, and are stable integers
    s = client_seed(0, 0, one_client.client_id)
    assert s == client_seed(0, 0, one_client.client_id)
    assert len({s, client_seed(0, 1, one_client.client_id), client_seed(1, 0, one_client.client_id),
                client_seed(0, 0, "other--client")}) == 4


def test_dropout_is_seeded_per_client_and_the_global_generator_restored(model, cfg, one_client, monkeypatch):
    """A base model's dropout draws from torch's global generator: the same client update whatever the
    process drew before (a warm server's child finds LoRA layers kept by its warm-up and skips the
    injection's draws), and the caller's generator state as it was."""
    c = train_cfg(cfg, **{"training.local_steps": 2})
    received = random_global(model, cfg).truncate(4)

    def update(before: int) -> LoraAdapter:
        torch.manual_seed(before)
        torch.rand(before)  # a process's history
        res = train_lora(model, received, one_client, c, 0)
        assert res.adapter is not None
        return res.adapter

    no_dropout = update(1)
    for m in (m for m in model.modules() if hasattr(m, "attention_dropout")):
        monkeypatch.setattr(m, "attention_dropout", 0.5)
    first, second = update(1), update(2)
    # the dropout is live (else this test could not fail), and seeded per client
    assert any(not np.array_equal(first.A[m], no_dropout.A[m]) for m in received.modules)
    assert all(np.array_equal(first.A[m], second.A[m]) and np.array_equal(first.B[m], second.B[m]) for m in received.modules)
    torch.manual_seed(7)
    want = torch.rand(3)
    torch.manual_seed(7)
    train_lora(model, received, one_client, c, 0)
    assert torch.equal(torch.rand(3), want)


def test_base_model_untouched_after_training_and_after_a_failure(model, cfg, one_client, monkeypatch):
    snap = snapshot(model)
    received = random_global(model, cfg).truncate(4)
    train_lora(model, received, one_client, train_cfg(cfg, **{"training.local_steps": 2, "training.lr": 0.05}), 0)
    assert_untouched(model, snap)

    def boom(*a, **kw):
        raise RuntimeError("client killed mid-training")

    monkeypatch.setattr(client_mod, "sample_batch", boom)
    with pytest.raises(RuntimeError, match="killed"):
        train_lora(model, received, one_client, cfg, 0)
    monkeypatch.undo()
    model.eval()  # the loop leaves train mode only on success; dropout is 0 in Llama anyway
    assert_untouched(model, snap)
    # and the next client still trains normally on the clean base
    again = train_lora(model, received, one_client, train_cfg(cfg, **{"training.local_steps": 1}), 0)
    assert again.adapter.ranks == received.ranks
    assert_untouched(model, snap)


# ---------------------------------------------------------------- train_full


def test_train_full_restores_the_base_and_returns_a_delta(model, cfg, one_client):
    snap = snapshot(model)
    names = client_mod.full_param_names(model)
    gen = np.random.default_rng(0)
    shifted = names[1]
    global_delta = {n: np.zeros(tuple(p.shape), np.float32) for n, p in model.named_parameters()}
    global_delta[shifted] = gen.standard_normal(global_delta[shifted].shape, np.float32) * 0.01
    c = train_cfg(cfg, **{"training.local_steps": 2, "training.lr": 1e-3})
    res = train_full(model, global_delta, one_client, c, 0)
    assert_untouched(model, snap)
    assert res.adapter is None and set(res.full_delta) == set(names)
    assert all(d.dtype == np.float32 and np.isfinite(d).all() for d in res.full_delta.values())
    moved = [n for n in names if not np.array_equal(res.full_delta[n], global_delta[n])]
    assert len(moved) > len(names) // 2, "training changed almost nothing"
    # the returned delta is relative to the base (it includes the global delta it started from)
    # (two AdamW steps at lr 1e-3 move each weight by about 2e-3, far less than the 0.01 offset)
    d, g0 = res.full_delta[shifted], global_delta[shifted]
    assert float(np.linalg.norm(d - g0)) < 0.5 * float(np.linalg.norm(g0)) and not np.array_equal(d, g0)
    assert res.num_tokens == 2 * c.training.batch_size * c.data.seq_len and res.reg_loss == 0
