"""Federated evaluation of folder data: per-client sums, combined token-weighted, give the same
perplexity as one central evaluation over the same eval splits; and a whole simulated round on
folder data (instruction records) reports it."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from rouge_score import rouge_scorer
from test_client_isolation import CLIENTS, folder_config, make_folders

from hetlora_core import peft_bridge, runtime
from hetlora_core import store as st
from hetlora_core.data import IGNORE
from hetlora_core.evaluation import evaluate, nll
from hetlora_core.rouge import greedy_answers
from hetlora_core.run import local_config
from hetlora_core.simulate import simulate
from hetlora_core.steps import evaluate as eval_step


def test_federated_perplexity_equals_central(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_folders(tmp_path / "data", n=8)
    cfg = folder_config(tmp_path / "data", tmp_path / "store")
    calls: list[list[str]] = []
    real = eval_step.per_client

    def spy(c: Any, fn: Any) -> Any:
        def counted(cs: list[Any]) -> Any:
            calls.append([x.client_id for x in cs])
            return fn(cs)
        return real(c, counted)

    monkeypatch.setattr(eval_step, "per_client", spy)
    res = simulate(cfg, tmp_path / "run", progress=False)
    assert res["rounds_committed"] == 1
    assert calls and all(len(c) == 1 for c in calls)  # never two clients' data in one evaluation call
    assert sorted(c[0] for c in calls[:3]) == sorted(CLIENTS)

    store = st.open_store(local_config(cfg, tmp_path / "run").store)  # simulate's store is OUT/store
    ev = st.get_json(store, st.eval_key("iso", 0))
    model, glob, clients = runtime.model(cfg), runtime.global_adapter(cfg, store, 0), runtime.all_client_data(cfg)
    central = evaluate(model, glob, clients, cfg)  # one pass over all eval splits at once
    assert ev is not None and ev["global"]["tokens"] == central.tokens > 0
    assert abs(ev["global"]["ppl"] - central.ppl) <= 1e-6 * central.ppl
    for c, p in central.per_client.items():
        assert math.isclose(ev["global"]["per_client"][c], p, rel_tol=1e-9)
    # the count is answer tokens only: eval.jsonl holds 2 pairs per client, each answer a few tokens
    assert central.tokens == sum(c.heldout_samples.target_tokens() for c in clients if c.heldout_samples is not None)
    assert res["rounds"][0]["global_ppl"] == pytest.approx(ev["global"]["ppl"], rel=1e-12)
    # the masked nll agrees with the model's own loss (HF's masked mean over labels != -100)
    held = clients[0].heldout_samples
    assert held is not None
    b = held.eval_batch(cfg.data.eval_max_tokens)
    assert b.attention_mask is not None
    total, n = nll(model, b, False)
    with torch.no_grad():
        hf_loss = float(model(**b.model_inputs()).loss)
    assert n == int((b.labels[:, 1:] != IGNORE).sum()) < int(b.attention_mask.sum())
    assert total / n == pytest.approx(hf_loss, rel=1e-5)

    # ROUGE-L per round: every client answered its 2 eval prompts; one client recomputed by hand
    rl = ev["rouge_l"]
    assert sorted(rl["per_client"]) == sorted(CLIENTS) and rl["prompts"] == 2 * len(CLIENTS)
    assert res["rounds"][0]["rouge_l"] == pytest.approx(sum(rl["per_client"].values()) / len(CLIENTS), rel=1e-12)
    alice = runtime.client_data(cfg, "alice")
    assert [ref for _, ref in alice.eval_prompts] == ["Answer 6 from alice.", "Answer 7 from alice."]
    pm = peft_bridge.attach(model, glob)
    try:
        answers = greedy_answers(pm, runtime.tokenizer(cfg), alice, cfg.data.rouge_max_new_tokens)
    finally:
        peft_bridge.detach(pm)
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    want = sum(scorer.score(ref, a)["rougeL"].fmeasure for a, (_, ref) in zip(answers, alice.eval_prompts, strict=True)) / 2
    assert rl["per_client"]["alice"] == pytest.approx(want, abs=1e-12)
