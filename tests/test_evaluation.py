"""Held-out perplexity on the tiny Llama: against the model's own loss, the base model, each
client's own rank, and the token-weighted overall figure."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hetlora_core import evaluation, lm_loss, peft_bridge, runtime
from hetlora_core.adapter import LoraAdapter, init_global
from hetlora_core.config import HetLoRAConfig, load_config, replace
from hetlora_core.data import eval_batch, eval_windows
from hetlora_core.evaluation import EvalResult, evaluate, evaluate_full, nll
from hetlora_core.peft_bridge import spec_from_model

R_MAX = 8


@pytest.fixture(scope="module")
def cfg() -> HetLoRAConfig:
    return load_config("configs/smoke.yaml", {"training.bf16": False, "data.eval_max_tokens": 96})


@pytest.fixture(scope="module")
def model(cfg):
    torch.set_num_threads(1)
    return runtime.model(cfg)


@pytest.fixture(scope="module")
def clients(cfg):
    return list(runtime.clients(cfg).values())


def random_global(model, cfg, b_std: float = 0.3) -> LoraAdapter:
    g = init_global(spec_from_model(model, cfg.model.target_modules), R_MAX, cfg.model.lora_scale, 1)
    gen = np.random.default_rng(7)
    g.B = {m: gen.standard_normal(b.shape, np.float32) * b_std for m, b in g.B.items()}
    return g


def test_nll_matches_the_models_own_loss(model, clients, cfg):
    w = eval_windows(clients[0].heldout_ids, cfg.data.seq_len, cfg.data.eval_max_tokens)
    total, count = nll(model, w, bf16=False)
    assert count == w.shape[0] * (cfg.data.seq_len - 1)
    with torch.no_grad():
        hf = float(model(input_ids=w, labels=w).loss)  # mean over shifted tokens
    assert total / count == pytest.approx(hf, rel=1e-5)


def test_base_model_equals_a_zero_update_adapter(model, clients, cfg):
    base = evaluate(model, None, clients, cfg)
    zero = init_global(spec_from_model(model, cfg.model.target_modules), R_MAX, cfg.model.lora_scale, 0)  # B = 0
    assert all(float(np.abs(b).max()) == 0 for b in zero.B.values())
    with_zero = evaluate(model, zero, clients, cfg)
    assert with_zero.ppl == pytest.approx(base.ppl, rel=1e-5)
    assert with_zero.per_client == pytest.approx(base.per_client, rel=1e-5)
    assert with_zero.tokens == base.tokens
    # ... and a non-zero update is visible, so the comparison above is not vacuous
    assert abs(evaluate(model, random_global(model, cfg), clients, cfg).ppl / base.ppl - 1) > 1e-3


def test_overall_is_token_weighted(model, clients, cfg):
    r = evaluate(model, random_global(model, cfg), clients, cfg)
    expected_tokens = {c.client_id: eval_windows(c.heldout_ids, cfg.data.seq_len, cfg.data.eval_max_tokens).numel()
                       - eval_windows(c.heldout_ids, cfg.data.seq_len, cfg.data.eval_max_tokens).shape[0]
                       for c in clients}
    assert r.per_client_tokens == expected_tokens and r.tokens == sum(expected_tokens.values())
    log_mean = sum(math.log(p) * expected_tokens[c] for c, p in r.per_client.items()) / r.tokens
    assert r.ppl == pytest.approx(math.exp(log_mean), rel=1e-9)
    assert EvalResult.combine(r.per_client, r.per_client_tokens).ppl == pytest.approx(r.ppl, rel=1e-9)
    # a plain mean of per-client perplexities would differ when token counts differ
    if len(set(expected_tokens.values())) > 1:
        assert r.ppl != pytest.approx(sum(r.per_client.values()) / len(r.per_client), rel=1e-9)


def test_each_client_at_its_own_rank(model, clients, cfg):
    g = random_global(model, cfg)
    ranks: dict = {c.client_id: r for c, r in zip(clients, [2, 4, R_MAX, 3, R_MAX, 2], strict=True)}  # smoke: 6 clients
    mods = g.modules
    ranks[clients[-1].client_id] = {m: (2 if i % 2 else 5) for i, m in enumerate(mods)}  # per-module ranks
    own = evaluate(model, g, clients, cfg, ranks)
    shared = evaluate(model, g, clients, cfg)
    for c in clients:
        alone = evaluate(model, g.truncate(ranks[c.client_id]), [c], cfg)
        assert own.per_client[c.client_id] == pytest.approx(alone.per_client[c.client_id], rel=1e-6)
        if ranks[c.client_id] == R_MAX:
            assert own.per_client[c.client_id] == pytest.approx(shared.per_client[c.client_id], rel=1e-6)
        else:  # the truncated model is a different model
            assert abs(own.per_client[c.client_id] / shared.per_client[c.client_id] - 1) > 1e-4
    assert own.tokens == shared.tokens


def test_evaluation_leaves_the_base_model_clean(model, clients, cfg):
    state = {k: v.clone() for k, v in model.state_dict().items()}
    n_modules = len(list(model.modules()))
    g = random_global(model, cfg)
    evaluate(model, g, clients[:2], cfg)
    evaluate(model, g, clients[:2], cfg, {c.client_id: 3 for c in clients[:2]})
    delta = {n: np.full(tuple(p.shape), 1e-3, np.float32) for n, p in list(model.named_parameters())[:3]}
    full = evaluate_full(model, delta, clients[:2], cfg)
    assert len(list(model.modules())) == n_modules
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert not any("lora" in n for n, _ in model.named_modules())
    base = evaluate(model, None, clients[:2], cfg)
    assert full.ppl != pytest.approx(base.ppl, rel=1e-6)  # the delta was applied while evaluating
    zero = evaluate_full(model, {n: np.zeros_like(d) for n, d in delta.items()}, clients[:2], cfg)
    assert zero.ppl == pytest.approx(base.ppl, rel=1e-9)


def test_bf16_evaluation_is_close_to_float32(model, clients, cfg):
    g = random_global(model, cfg)
    f32 = evaluate(model, g, clients[:2], cfg)
    bf = evaluate(model, g, clients[:2], replace(cfg, **{"training.bf16": True}))
    assert bf.ppl == pytest.approx(f32.ppl, rel=0.05)


def test_clients_windows_go_through_the_model_together(model, clients, cfg):
    """Every client's windows in shared forward passes (fewer, fuller calls: launch-bound on a GPU),
    with each client's figure equal to evaluating it alone."""
    g = random_global(model, cfg)
    calls: list[tuple[int, int]] = []
    decoder = lm_loss._parts(model)[0]  # every forward runs it: the model's own, or the chunked path's
    hook = decoder.register_forward_hook(lambda m, args, kwargs, out: calls.append(tuple(kwargs["input_ids"].shape)),
                                         with_kwargs=True)
    try:
        together = evaluate(model, g, clients, cfg)
    finally:
        hook.remove()
    passes = [r for r, n in calls if n == cfg.data.seq_len]  # not lm_loss's one short check of the chunked path
    rows = sum(eval_windows(c.heldout_ids, cfg.data.seq_len, cfg.data.eval_max_tokens).shape[0] for c in clients)
    assert sum(passes) == rows and len(passes) == math.ceil(rows / evaluation.EVAL_BATCH) < len(clients)
    for c in clients:
        alone = nll(model_with := peft_bridge.attach(model, g), eval_batch(c, cfg.data), bf16=False)
        peft_bridge.detach(model_with)
        assert together.per_client[c.client_id] == pytest.approx(math.exp(alone[0] / alone[1]), rel=1e-6)
        assert together.per_client_tokens[c.client_id] == alone[1]


def test_row_nll_does_not_depend_on_rows_per_pass(model, clients, cfg):
    """The GPU's fuller passes (CUDA_EVAL_ROWS) give the CPU's numbers: rows are independent."""
    from hetlora_core.precision import resolve

    w = torch.cat([eval_windows(c.heldout_ids, cfg.data.seq_len, cfg.data.eval_max_tokens) for c in clients])
    a = evaluation.row_nll(model, w, resolve(cfg), rows=3)
    b = evaluation.row_nll(model, w, resolve(cfg), rows=evaluation.CUDA_EVAL_ROWS)
    assert a.shape == (w.shape[0],) and torch.allclose(a, b, rtol=1e-6)
    total, _ = nll(model, w, bf16=False)
    assert float(a.sum()) == pytest.approx(total, rel=1e-6)


def test_eval_rows_keep_the_logits_within_budget(model, cfg, monkeypatch):
    """Rows per pass: the device's batch for short windows, fewer for long windows of a large
    vocabulary (the logits of one pass stay within LOGIT_BUDGET), never zero; read through peft too."""
    vocab = model.get_output_embeddings().weight.shape[0]
    assert evaluation.eval_rows(model, 16, "cpu") == min(evaluation.EVAL_BATCH, evaluation.LOGIT_BUDGET // (16 * vocab))
    pm = peft_bridge.attach(model, random_global(model, cfg))
    try:
        assert evaluation.eval_rows(pm, 16, "cuda") == min(evaluation.CUDA_EVAL_ROWS, evaluation.LOGIT_BUDGET // (16 * vocab))
    finally:
        peft_bridge.detach(pm)
    monkeypatch.setattr(evaluation, "LOGIT_BUDGET", 5 * 16 * vocab)
    assert evaluation.eval_rows(model, 16, "cuda") == 5 and evaluation.eval_rows(model, 4096, "cuda") == 1


@pytest.mark.parametrize("bf16", [False, True])
def test_chunked_output_layer_gives_the_models_own_perplexity(model, clients, cfg, bf16, monkeypatch):
    """The output layer a chunk of tokens at a time (lm_loss.target_logprobs) against the model's own
    logits over whole passes (training.chunked_loss: false): the same perplexities to rounding; and
    the output layer never runs on a whole pass (its logits, ~300 MB a pass at SmolLM2's vocabulary,
    were fresh memory faulted in on every pass)."""
    g = random_global(model, cfg)
    on = replace(cfg, **{"training.bf16": bf16, "data.eval_max_tokens": 200})
    head = model.get_output_embeddings()
    rows: list[int] = []
    forward = head.forward

    def counted(x: torch.Tensor) -> torch.Tensor:  # not a hook: a hooked output layer is never chunked (lm_loss._parts)
        rows.append(x.shape[0] * x.shape[1])
        return forward(x)

    monkeypatch.setattr(head, "forward", counted)
    ranks = {c.client_id: 2 + i % 3 for i, c in enumerate(clients)}
    chunked = evaluate(model, g, clients, on, ranks=ranks)
    assert max(rows, default=0) <= 16  # at most the one short check (lm_loss._agrees): no whole pass
    own = evaluate(model, g, clients, replace(on, **{"training.chunked_loss": False}), ranks=ranks)
    assert max(rows) > lm_loss.CHUNK_TOKENS  # the model's own forward ran the output layer on whole passes
    assert chunked.tokens == own.tokens and chunked.per_client_tokens == own.per_client_tokens
    assert chunked.ppl == pytest.approx(own.ppl, rel=1e-5 if not bf16 else 2e-3)
    for c in clients:
        assert chunked.per_client[c.client_id] == pytest.approx(own.per_client[c.client_id], rel=1e-5 if not bf16 else 2e-3)


def test_chunked_logprobs_skip_ignored_targets_and_cover_every_chunk() -> None:
    """Across several chunks, with ignored targets: each row's log-probability as log_softmax of
    the full logits gives it, 0 where the target is ignored."""
    gen = torch.Generator().manual_seed(3)
    hidden, weight = torch.randn(300, 16, generator=gen), torch.randn(50, 16, generator=gen)
    targets = torch.randint(0, 50, (300,), generator=gen)
    targets[::7] = -100
    got = lm_loss.target_logprobs(hidden, weight, targets, torch.float32, chunk_tokens=64)
    want = torch.log_softmax(hidden @ weight.T, -1).gather(1, targets.clamp_min(0)[:, None])[:, 0]
    keep = targets != -100
    assert torch.allclose(got[keep], want[keep], atol=1e-5) and bool((got[~keep] == 0).all())
