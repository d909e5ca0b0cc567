"""The proximal form of the tail regulariser (``pruning.form: proximal``): the prox operator's math on
small tensors, Adam's step sizes against a real AdamW step, the loop's hook, the behavioural claim on
the tiny Llama (AdamW drowns the loss-form penalty on a small tail; the proximal step prunes it), and
the config field.

Every expected value is computed independently of ``proximal_step`` (numpy norms, an AdamW step's
observed update), and the behavioural test asserts on measured tail scores, so a prox that shrinks
by the wrong amount, touches the head, or is not applied makes a test fail.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hetlora_core import client as client_mod
from hetlora_core import regulariser as regulariser_mod
from hetlora_core import runtime
from hetlora_core.adapter import LoraAdapter, init_global
from hetlora_core.client import train_lora
from hetlora_core.config import ConfigError, HetLoRAConfig, PruningConfig, load_config, replace
from hetlora_core.peft_bridge import spec_from_model
from hetlora_core.pruning import decide, tail_start
from hetlora_core.regulariser import adam_step_sizes, proximal_step, regulariser, tail_score

LR, LAM = 0.05, 0.2  # tau = lr * lam = 0.01


def tensors(rank: int, seed: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    g = np.random.default_rng(seed)
    A = {"p": torch.tensor(g.standard_normal((rank, 4), np.float32)), "q": torch.tensor(g.standard_normal((rank, 5), np.float32))}
    B = {"p": torch.tensor(g.standard_normal((3, rank), np.float32)), "q": torch.tensor(g.standard_normal((6, rank), np.float32))}
    return A, B


def clone(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {m: x.clone() for m, x in t.items()}


# ---------------------------------------------------------------- the operator


def test_group_lasso_prox_shrinks_each_tail_group_by_lr_lam_and_leaves_the_head():
    A, B = tensors(8)
    start = 6  # gamma 0.75: tail components 6, 7
    B["p"][:, 7] = torch.tensor([0.004, -0.003, 0.005])  # norm 0.00707 <= tau: zeroed
    A["q"][6] = torch.full((5,), 0.004)  # norm 0.00894 <= tau: zeroed
    A0, B0 = clone(A), clone(B)
    cfg = PruningConfig(lam=LAM, gamma=0.75)
    proximal_step(A, B, {"p": 8, "q": 8}, cfg, r_min=2, step=LR)
    tau = LR * LAM
    for m in A:
        assert torch.equal(A[m][:start], A0[m][:start]) and torch.equal(B[m][:, :start], B0[m][:, :start]), m
        groups = [(A0[m][j], A[m][j]) for j in range(start, 8)] + [(B0[m][:, j], B[m][:, j]) for j in range(start, 8)]
        for old, new in groups:
            n_old = float(np.linalg.norm(old.numpy().astype(np.float64)))
            if n_old <= tau:
                assert torch.count_nonzero(new) == 0
            else:  # same direction, norm lower by exactly tau
                assert float(np.linalg.norm(new.numpy().astype(np.float64))) == pytest.approx(n_old - tau, rel=1e-5)
                np.testing.assert_allclose(new.numpy() * n_old / (n_old - tau), old.numpy(), rtol=1e-5, atol=1e-7)
    assert torch.count_nonzero(B["p"][:, 7]) == 0 and torch.count_nonzero(A["q"][6]) == 0
    assert torch.count_nonzero(A["p"][7]) == 4  # its B column died, the A row only shrank: groups are independent


def test_norm_of_product_prox_soft_thresholds_the_tail_product():
    A, B = tensors(8, seed=1)
    A0, B0 = clone(A), clone(B)
    proximal_step(A, B, {"p": 8, "q": 8}, PruningConfig(lam=LAM, gamma=0.75, score="norm_of_product"), r_min=2, step=LR)
    tau = LR * LAM
    for m in A:
        before = (B0[m][:, 6:] @ A0[m][6:]).double().numpy()
        after = (B[m][:, 6:] @ A[m][6:]).double().numpy()
        n = np.linalg.norm(before)
        np.testing.assert_allclose(after, before * (1 - tau / n), rtol=1e-5, atol=1e-8)  # exact block soft-threshold
        assert torch.equal(A[m][:6], A0[m][:6]) and torch.equal(B[m][:, :6], B0[m][:, :6])
        ratio_a = float(A[m][6:].norm() / A0[m][6:].norm())
        assert ratio_a == pytest.approx(float(B[m][:, 6:].norm() / B0[m][:, 6:].norm()), rel=1e-6)  # balanced split
    small_A, small_B = {"p": A0["p"] * 0.01}, {"p": B0["p"] * 0.01}  # ||tail product|| ~ 1e-4 < tau: zeroed
    proximal_step(small_A, small_B, {"p": 8}, PruningConfig(lam=LAM, gamma=0.75, score="norm_of_product"), r_min=2, step=LR)
    assert torch.count_nonzero(small_A["p"][6:]) == 0 and torch.count_nonzero(small_B["p"][:, 6:]) == 0
    assert torch.count_nonzero(small_A["p"][:6]) == 24


def test_per_entry_step_sizes_use_each_groups_mean():
    A, B = tensors(4, seed=2)
    A0, B0 = clone(A), clone(B)
    eta_A = {m: torch.rand(a.shape, generator=torch.Generator().manual_seed(5)) * 0.1 for m, a in A.items()}
    eta_B = {m: torch.rand(b.shape, generator=torch.Generator().manual_seed(6)) * 0.1 for m, b in B.items()}
    proximal_step(A, B, {"p": 4, "q": 4}, PruningConfig(lam=LAM, gamma=0.5), r_min=1, step=(eta_A, eta_B))
    for m in A:
        for j in (2, 3):
            tau_a, tau_b = LAM * float(eta_A[m][j].mean()), LAM * float(eta_B[m][:, j].mean())
            assert float(A[m][j].norm()) == pytest.approx(max(0.0, float(A0[m][j].norm()) - tau_a), rel=1e-5, abs=1e-7)
            assert float(B[m][:, j].norm()) == pytest.approx(max(0.0, float(B0[m][:, j].norm()) - tau_b), rel=1e-5, abs=1e-7)


def test_modules_at_r_min_are_left_alone_unless_asked_and_off_means_off():
    g = np.random.default_rng(3)
    A = {"p": torch.tensor(g.standard_normal((2, 4), np.float32)), "q": torch.tensor(g.standard_normal((3, 5), np.float32))}
    B = {"p": torch.tensor(g.standard_normal((3, 2), np.float32)), "q": torch.tensor(g.standard_normal((6, 3), np.float32))}
    A0, B0 = clone(A), clone(B)
    ranks = {"p": 2, "q": 3}  # p received at r_min = 2: cannot prune; q can
    proximal_step(A, B, ranks, PruningConfig(lam=LAM), r_min=2, step=LR)
    assert torch.equal(A["p"], A0["p"]) and torch.equal(B["p"], B0["p"])
    assert not torch.equal(A["q"][2:], A0["q"][2:]) and torch.equal(A["q"][:2], A0["q"][:2])
    proximal_step(A, B, ranks, PruningConfig(lam=LAM, regularize_at_r_min=True), r_min=2, step=LR)
    assert not torch.equal(A["p"][1:], A0["p"][1:]) and torch.equal(A["p"][:1], A0["p"][:1])
    for cfg in (PruningConfig(enabled=False, lam=LAM), PruningConfig(lam=0.0)):
        A2, B2 = clone(A0), clone(B0)
        proximal_step(A2, B2, ranks, cfg, r_min=1, step=LR)
        assert all(torch.equal(A2[m], A0[m]) and torch.equal(B2[m], B0[m]) for m in A0)


def test_adam_step_sizes_are_the_steps_adamw_took():
    """After real AdamW steps (no weight decay), the update each entry got equals its step size times
    Adam's bias-corrected first moment: the metric the prox uses is the one the optimiser used."""
    g = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.randn(3, 4, generator=g))
    opt = torch.optim.AdamW([p], lr=0.01, weight_decay=0.0)
    fresh = adam_step_sizes(opt, {"p": p})["p"]
    assert torch.equal(fresh, torch.full((3, 4), 0.01))  # no state yet: the plain lr
    for step in range(1, 4):
        before = p.detach().clone()
        p.grad = torch.randn(3, 4, generator=g) * 10.0 ** -step
        opt.step()
        m_hat = opt.state[p]["exp_avg"] / (1 - 0.9 ** step)
        torch.testing.assert_close(before - p.detach(), adam_step_sizes(opt, {"p": p})["p"] * m_hat, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("score", ["product_of_norms", "norm_of_product"])
def test_reported_penalty_is_the_same_value_without_grad(score, monkeypatch):
    A, B = tensors(8)
    cfg = PruningConfig(lam=LAM, gamma=0.75, score=score)
    stacked: list[list[str]] = []
    real = regulariser_mod._stacked_scores
    monkeypatch.setattr(regulariser_mod, "_stacked_scores", lambda A, B, ms, *a: stacked.append(ms) or real(A, B, ms, *a))
    with torch.no_grad():
        quiet = regulariser(A, B, {"p": 8, "q": 8}, cfg, r_min=2)
    assert sorted(m for ms in stacked for m in ms) == ["p", "q"]  # the stacked path ran
    Ag = {m: a.clone().requires_grad_(True) for m, a in A.items()}
    live = regulariser(Ag, B, {"p": 8, "q": 8}, cfg, r_min=2)
    assert quiet is not None and live is not None and not quiet.requires_grad and live.requires_grad
    # without grad the modules' tails are stacked per shape: the same value up to summation order
    assert float(quiet) == pytest.approx(float(live.detach()), rel=1e-6)
    per_module = sum(float(tail_score(A[m], B[m], tail_start(8, 0.75), score)) for m in A)
    assert float(quiet) == pytest.approx(LAM * per_module, rel=1e-6)


# ---------------------------------------------------------------- on the tiny Llama with AdamW


@pytest.fixture(scope="module")
def cfg(smoke_cfg: HetLoRAConfig) -> HetLoRAConfig:
    return smoke_cfg  # conftest: the tiny Llama with real Shakespeare clients, float32, one thread


@pytest.fixture(scope="module")
def model(smoke_model: torch.nn.Module) -> torch.nn.Module:
    return smoke_model


@pytest.fixture(scope="module")
def one_client(cfg: HetLoRAConfig):
    return runtime.clients(cfg)[runtime.client_ids(cfg)[0]]


def small_tail_global(model: torch.nn.Module, cfg: HetLoRAConfig, rank: int = 8, tail: float = 1e-4) -> LoraAdapter:
    """A mid-training global (B ~ 0.3) whose last component is small (entries ~``tail``): the state a
    pruning round should remove, and one AdamW's ~lr-sized steps swamp."""
    g = init_global(spec_from_model(model, cfg.model.target_modules), rank, 2.0, 1)
    gen = np.random.default_rng(101)
    g.B = {m: gen.standard_normal(b.shape, np.float32) * 0.3 for m, b in g.B.items()}
    for m in g.modules:
        g.A[m][rank - 1:] *= tail / np.abs(g.A[m][rank - 1:]).mean()
        g.B[m][:, rank - 1:] *= tail / np.abs(g.B[m][:, rank - 1:]).mean()
    return g


@pytest.mark.parametrize("score", ["product_of_norms", "norm_of_product"])
def test_adamw_drowns_the_loss_form_and_the_proximal_form_prunes(model, cfg, one_client, score):
    """Same client, batches, received adapter and lam (the default 0.01): the loss-form penalty lets
    AdamW grow the small tail (no prune); the proximal step takes it to zero (prune fires)."""
    received = small_tail_global(model, cfg)
    common = {"pruning.score": score, "pruning.lam": 0.01, "training.local_steps": 3}
    loss_cfg = replace(cfg, **common, **{"pruning.form": "loss"})
    prox_cfg = replace(cfg, **common, **{"pruning.form": "proximal"})
    by_loss = train_lora(model, received, one_client, loss_cfg, 1)
    by_prox = train_lora(model, received, one_client, prox_cfg, 1)
    assert by_loss.adapter is not None and by_prox.adapter is not None
    d_loss = decide(received, by_loss.adapter, loss_cfg.pruning, cfg.ranks.r_min)
    d_prox = decide(received, by_prox.adapter, prox_cfg.pruning, cfg.ranks.r_min)
    assert d_loss.score_before == d_prox.score_before > 0
    assert d_loss.score_after > d_loss.score_before and not d_loss.pruned, d_loss  # the audit's finding, reproduced
    assert d_prox.score_after < d_prox.score_before and d_prox.pruned, d_prox
    assert d_prox.new_ranks == dict.fromkeys(received.modules, 7)
    assert by_prox.reg_loss > 0  # the penalty's value is still reported


def test_proximal_form_adds_nothing_to_the_loss_and_steps_once_per_step(model, cfg, one_client, monkeypatch):
    """One step from the same state: the proximal form's gradient step is the unregularised one (the
    penalty is not in the loss) and the prox runs once after every optimiser step."""
    received = small_tail_global(model, cfg, tail=1e-2)
    common = {"training.local_steps": 1, "pruning.lam": 0.01}
    calls: list[int] = []
    real = client_mod.proximal_step

    def counting(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    off = train_lora(model, received, one_client, replace(cfg, **common, **{"pruning.enabled": False}), 1)
    monkeypatch.setattr(client_mod, "proximal_step", lambda *a, **kw: calls.append(1))  # no shrinkage: the bare AdamW step
    bare = train_lora(model, received, one_client, replace(cfg, **common, **{"pruning.form": "proximal"}), 1)
    assert calls == [1] and bare.reg_loss > 0 and off.reg_loss == 0
    assert bare.adapter is not None and off.adapter is not None
    assert all(np.array_equal(bare.adapter.A[m], off.adapter.A[m]) and np.array_equal(bare.adapter.B[m], off.adapter.B[m])
               for m in received.modules)
    monkeypatch.setattr(client_mod, "proximal_step", counting)
    three = train_lora(model, received, one_client, replace(cfg, **{**common, "training.local_steps": 3, "pruning.form": "proximal"}), 1)
    assert len(calls) == 1 + 3 and three.reg_loss > 0


def test_proximal_step_skips_a_zero_received_tail(model, cfg, one_client):
    """Round 0 (B = 0): the tail score cannot go down, so no prune can follow, and the tail's A rows get
    no gradient (Adam's metric there is lr/eps): the prox leaves such a module alone instead of zeroing
    A's tail rows into a dead component. The update equals the unregularised one, bit for bit."""
    received = init_global(spec_from_model(model, cfg.model.target_modules), 8, 2.0, 0)
    common = {"training.local_steps": 2, "pruning.lam": 0.01}
    prox = train_lora(model, received, one_client, replace(cfg, **common, **{"pruning.form": "proximal"}), 0)
    off = train_lora(model, received, one_client, replace(cfg, **common, **{"pruning.enabled": False}), 0)
    assert prox.adapter is not None and off.adapter is not None
    for m in received.modules:
        assert np.array_equal(prox.adapter.A[m], off.adapter.A[m]) and np.array_equal(prox.adapter.B[m], off.adapter.B[m]), m
        assert np.count_nonzero(prox.adapter.A[m][7]) == prox.adapter.A[m].shape[1]


# ---------------------------------------------------------------- config


def test_form_field_validation():
    assert PruningConfig().form == "proximal"  # the default since it prunes where the loss form does not
    assert PruningConfig(form="loss").form == "loss"
    with pytest.raises(ConfigError, match=r"pruning\.form: must be 'loss' or 'proximal', got 'prox'"):
        PruningConfig(form="prox")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"pruning\.form.*'gradient'"):
        load_config(None, {"pruning.form": "gradient"})
    assert load_config(None, {"pruning.form": "proximal"}).pruning.form == "proximal"


def test_a_run_recorded_before_pruning_form_resumes_only_with_the_loss_form(tmp_path) -> None:
    """Runs recorded before ``pruning.form`` existed trained with the penalty in the loss; resuming
    one under today's default (proximal) would switch forms mid-run: refused, with the fix."""
    from hetlora_core import store as st
    from hetlora_core.config import HetLoRAConfig, replace
    from hetlora_core.run import RunConfigMismatch, check_or_record_config

    store = st.LocalStore(str(tmp_path))
    now = HetLoRAConfig()
    assert now.pruning.form == "proximal"
    old = now.to_dict()
    del old["pruning"]["form"]
    st.put_json(store, st.config_key(now.experiment), old)
    with pytest.raises(RunConfigMismatch, match=r"resumes with --set pruning.form=loss"):
        check_or_record_config(now, store)
    check_or_record_config(replace(now, **{"pruning.form": "loss"}), store)  # the hint works


# ---------------------------------------------------------------- the grouped form (an optimiser as the step)


@pytest.mark.parametrize("score", ["product_of_norms", "norm_of_product"])
def test_grouped_adam_prox_equals_the_per_module_form(score, monkeypatch):
    """``proximal_step(..., opt)`` stacks modules of equal shapes (a few kernels per shape, not ~15 per
    module); it must compute what the per-module form computes with ``adam_step_sizes``: here with
    two shapes, mixed received ranks (so tails start at different rows), a module at r_min and a
    parameter that has no Adam state yet (left to the per-module form)."""
    g = torch.Generator().manual_seed(3)
    shapes = {"q0": (8, 6, 5), "q1": (8, 6, 5), "q2": (8, 6, 5), "v0": (8, 3, 5), "v1": (6, 3, 5), "v2": (8, 3, 5)}
    A = {m: torch.nn.Parameter(torch.randn(r, i, generator=g)) for m, (r, o, i) in shapes.items()}
    B = {m: torch.nn.Parameter(torch.randn(o, r, generator=g) * 0.3) for m, (r, o, i) in shapes.items()}
    ranks = {"q0": 8, "q1": 8, "q2": 8, "v0": 8, "v1": 6, "v2": 2}  # v2 at r_min: never touched
    fresh = torch.nn.Parameter(torch.randn(8, 7, generator=g))  # in the optimiser, never stepped; a shape of its own
    fresh_b = torch.nn.Parameter(torch.randn(3, 8, generator=g) * 0.3)
    opt = torch.optim.AdamW([*A.values(), *B.values(), fresh, fresh_b], lr=0.05, weight_decay=0.0)
    for _ in range(3):
        for p in [*A.values(), *B.values()]:
            p.grad = torch.randn(p.shape, generator=g) * 0.1
        opt.step()
    cfg = PruningConfig(lam=0.5, gamma=0.75, score=score)
    A["fresh"], B["fresh"] = fresh, fresh_b
    ranks["fresh"] = 8
    before_A, before_B = clone(A), clone(B)
    with torch.no_grad():
        want_A, want_B = clone(A), clone(B)
        proximal_step(want_A, want_B, ranks, cfg, 2, (adam_step_sizes(opt, A), adam_step_sizes(opt, B)))
        left: list[list[str]] = []
        real = regulariser_mod._grouped_adam_prox
        monkeypatch.setattr(regulariser_mod, "_grouped_adam_prox", lambda *a: left.append(real(*a)) or left[-1])
        proximal_step(A, B, ranks, cfg, 2, opt)  # on the live parameters: the optimiser's state is theirs
    assert left == [["fresh"]]  # every module with Adam state was grouped; only the stateless one fell back
    for m in A:
        torch.testing.assert_close(A[m].detach(), want_A[m], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(B[m].detach(), want_B[m], rtol=1e-6, atol=1e-7)
    moved = [m for m in A if not torch.equal(A[m].detach(), before_A[m])]
    assert {"q0", "q1", "q2", "v0", "v1", "fresh"} <= set(moved) and "v2" not in moved  # not vacuous; r_min untouched
    assert torch.equal(B["v2"].detach(), before_B["v2"])
