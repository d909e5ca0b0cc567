"""Federated evaluation of folder data: every client evaluates the global on its own eval split in
its own task and reports only sums; the server combines them token-weighted, which gives the same
perplexity (and baseline) as one central evaluation over the same eval splits. The server opens no
client folder; a client's task opens only its own; forged reports are left out and named."""

from __future__ import annotations

import builtins
import json
import math
import os
import shutil
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
from hetlora_core.results import collect_results
from hetlora_core.rouge import greedy_answers
from hetlora_core.run import local_config
from hetlora_core.simulate import simulate
from hetlora_core.steps.evaluate import evaluate as server_evaluate
from hetlora_core.steps.evaluate_client import evaluate_client


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One simulated round on three folder clients (instruction records), shared by the tests."""
    tmp = tmp_path_factory.mktemp("fedeval")
    make_folders(tmp / "data", n=8)
    cfg = folder_config(tmp / "data", tmp / "store")
    res = simulate(cfg, tmp / "run", progress=False)
    store = st.open_store(local_config(cfg, tmp / "run").store)  # simulate's store is OUT/store
    return {"tmp": tmp, "cfg": cfg, "res": res, "store": store}


def _record_paths(monkeypatch: pytest.MonkeyPatch, root: Path) -> list[str]:
    """Every path under ``root`` that open / os.open / os.scandir / os.lstat / os.listdir / os.stat are called with."""
    seen: list[str] = []

    def wrap(real: Any) -> Any:
        def rec(p: Any = ".", *a: Any, **k: Any) -> Any:
            if isinstance(p, (str, os.PathLike)) and str(p).startswith(str(root)):
                seen.append(str(p))
            return real(p, *a, **k)
        return rec

    for mod, name in ((builtins, "open"), (os, "open"), (os, "scandir"), (os, "lstat"), (os, "listdir"), (os, "stat")):
        monkeypatch.setattr(mod, name, wrap(getattr(mod, name)))
    return seen


def test_federated_perplexity_equals_central(run: dict[str, Any]) -> None:
    cfg, res, store = run["cfg"], run["res"], run["store"]
    assert res["rounds_committed"] == 1
    ev = st.get_json(store, st.eval_key("iso", 0))
    assert ev is not None and ev["federated"] is True and ev["eval_dropped"] == {} and ev["eval_missing"] == []
    got = {c: st.get_json(store, st.client_eval_key("iso", 0, c)) for c in CLIENTS}
    reports = {c: r for c, r in got.items() if r is not None and r["client_id"] == c}
    assert sorted(reports) == sorted(CLIENTS)  # every client reported, as itself

    model, glob, clients = runtime.model(cfg), runtime.global_adapter(cfg, store, 0), runtime.all_client_data(cfg)
    central = evaluate(model, glob, clients, cfg)  # one pass over all eval splits at once
    assert ev["global"]["tokens"] == central.tokens > 0
    assert abs(ev["global"]["ppl"] - central.ppl) <= 1e-6 * central.ppl
    # the combine itself, by hand from the reports: exp(sum nll / sum tokens)
    by_hand = math.exp(sum(r["global"]["nll"] for r in reports.values()) / sum(r["global"]["tokens"] for r in reports.values()))
    assert abs(by_hand - central.ppl) <= 1e-6 * central.ppl
    for c, p in central.per_client.items():
        assert math.isclose(ev["global"]["per_client"][c], p, rel_tol=1e-9)
    # personal: each client at its own rank (the global manifest's), centrally
    gman = st.get_manifest(store, st.global_prefix("iso", 0))
    assert gman is not None
    ranks = {c: int(s["rank"]) for c, s in gman["clients"].items()}
    assert len(set(ranks.values())) > 1  # the test covers truncation: clients of different ranks
    own = evaluate(model, glob, clients, cfg, ranks)
    assert abs(ev["personal"]["ppl"] - own.ppl) <= 1e-6 * own.ppl
    # the baseline, combined from the clients' base-model sums of round 0
    base, central_base = st.get_json(store, st.baseline_key("iso")), evaluate(model, None, clients, cfg)
    assert base is not None and abs(base["global"]["ppl"] - central_base.ppl) <= 1e-6 * central_base.ppl
    assert res["baseline_ppl"] == pytest.approx(base["global"]["ppl"], rel=1e-12)
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


def test_a_client_eval_task_reads_only_its_own_folder(run: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    cfg, store, root = run["cfg"], run["store"], run["tmp"] / "data"
    before = st.get_json(store, st.client_eval_key("iso", 0, "carol"))
    runtime._folder_client.cache_clear()  # the per-process data cache would hide the reads
    seen = _record_paths(monkeypatch, root)
    out = evaluate_client(cfg, store, 0, "carol")
    monkeypatch.undo()
    assert str(root / "carol" / "eval.jsonl") in seen  # the recorder does see the data layer's reads
    assert all(p.startswith(str(root / "carol")) for p in seen), sorted(set(seen))
    assert before is not None and out["global"] == before["global"] and "base" not in out  # the baseline exists now


def test_the_server_evaluate_step_opens_no_client_folder(run: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    cfg, store, root = run["cfg"], run["store"], run["tmp"] / "data"
    want = st.get_json(store, st.eval_key("iso", 0))
    runtime._folder_client.cache_clear()
    moved = root.with_name("data-away")
    shutil.move(root, moved)  # no client data on the server at all
    try:
        seen = _record_paths(monkeypatch, root)
        got = server_evaluate(cfg, store, 0)
        monkeypatch.undo()
    finally:
        shutil.move(moved, root)
    assert seen == []
    assert want is not None and got["global"] == want["global"] and got["personal"] == want["personal"]


FORGED: dict[str, Any] = {
    "nan": '{"client_id": "bob", "round": 0, "global": {"nll": NaN, "tokens": 5}, "personal": {"nll": 1.0, "tokens": 5}}',
    "negative tokens": {"global": {"nll": 3.0, "tokens": -5}},
    "huge tokens": {"global": {"nll": 3.0, "tokens": 10**15}},
    "huge nll": {"personal": {"nll": 1e300, "tokens": 5}},
    "400-digit nll": {"global": {"nll": 10**400, "tokens": 5}},  # math.isfinite would overflow on it
    # within MAX_COUNT but more than any eval split of this config gives: would outweigh the others
    "more tokens than the config allows": {"global": {"nll": 3.0 * 10**6, "tokens": 10**6}},
    "more prompts than the config allows": {"rouge": {"sum": 900.0, "prompts": 1000}},
    "float tokens": {"global": {"nll": 3.0, "tokens": 5.0}},
    "string nll": {"global": {"nll": "3.0", "tokens": 5}},
    "bool tokens": {"global": {"nll": 3.0, "tokens": True}},
    "rouge over 1": {"rouge": {"sum": 7.0, "prompts": 2}},
    "other client": {"client_id": "alice"},
    "not a dict": "[1, 2, 3]",
    "not json": "{oops",
    "long string": {"global": {"nll": "x" * 5000, "tokens": 5}},
}


@pytest.mark.parametrize("kind", sorted(FORGED))
def test_a_forged_client_report_is_left_out_and_named(run: dict[str, Any], kind: str) -> None:
    cfg, store = run["cfg"], run["store"]
    key = st.client_eval_key("iso", 0, "bob")
    real = st.get_json(store, key)
    assert real is not None
    forged = FORGED[kind]
    body = forged.encode() if isinstance(forged, str) else json.dumps({**real, **forged}).encode()
    store.put_bytes(key, body)
    try:
        ev = server_evaluate(cfg, store, 0)
        shown = collect_results(cfg, store)["rounds"][0]
    finally:
        st.put_json(store, key, real)
    assert list(ev["eval_dropped"]) == ["bob"] and ev["eval_missing"] == [] and len(ev["eval_dropped"]["bob"]) <= 200
    assert shown["eval_dropped"] == ev["eval_dropped"]  # results.json names it too
    others = {c: st.get_json(store, st.client_eval_key("iso", 0, c)) for c in ("alice", "carol")}
    want = math.exp(sum(r["global"]["nll"] for r in others.values() if r) / sum(r["global"]["tokens"] for r in others.values() if r))
    assert ev["global"]["ppl"] == pytest.approx(want, rel=1e-12) and sorted(ev["global"]["per_client"]) == ["alice", "carol"]
    assert all(math.isfinite(ev[m]["ppl"]) for m in ("global", "personal"))
    assert "bob" not in ev["rouge_l"]["per_client"]


def test_a_missing_report_is_named_and_none_at_all_fails_loudly(run: dict[str, Any]) -> None:
    cfg, store = run["cfg"], run["store"]
    saved = {c: st.get_json(store, st.client_eval_key("iso", 0, c)) for c in CLIENTS}
    try:
        store.delete(st.client_eval_key("iso", 0, "alice"))
        ev = server_evaluate(cfg, store, 0)
        assert ev["eval_missing"] == ["alice"] and "no report" in ev["eval_dropped"]["alice"]
        assert sorted(ev["global"]["per_client"]) == ["bob", "carol"]
        for c in CLIENTS[1:]:
            store.delete(st.client_eval_key("iso", 0, c))
        with pytest.raises(st.NotFound, match="no client reported usable"):
            server_evaluate(cfg, store, 0)
    finally:
        for c, r in saved.items():
            assert r is not None
            st.put_json(store, st.client_eval_key("iso", 0, c), r)
        server_evaluate(cfg, store, 0)


def forget_evaluation(store: st.Store, exp: str, clients: list[str], rnd: int = 0) -> None:
    """Round ``rnd`` as a task killed between its commit and its evaluation leaves it: committed,
    with neither the server's evaluation nor any client's report."""
    store.delete(st.eval_key(exp, rnd))
    for c in clients:
        store.delete(st.client_eval_key(exp, rnd, c))


def test_a_committed_unevaluated_round_is_evaluated_by_every_client_again(run: dict[str, Any]) -> None:
    """The runner's catch-up (a task killed between the commit and the evaluation): resuming runs
    every client's evaluate-client task again (from the stored plan), then the server combine."""
    cfg, store, tmp = run["cfg"], run["store"], run["tmp"]
    want = st.get_json(store, st.eval_key("iso", 0))
    forget_evaluation(store, "iso", CLIENTS)
    res = simulate(cfg, tmp / "run", progress=False)
    assert all(store.exists(st.client_eval_key("iso", 0, c)) for c in CLIENTS)
    got = st.get_json(store, st.eval_key("iso", 0))
    assert want is not None and got is not None and got["global"] == want["global"] and got["rouge_l"] == want["rouge_l"]
    assert res["rounds"][0]["global_ppl"] == want["global"]["ppl"]
