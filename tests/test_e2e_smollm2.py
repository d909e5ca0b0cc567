"""End-to-end federated runs through ``simulate``: the smoke config on the tiny Llama (fast:
results.json, rank persistence, resume) and, marked slow, the real SmolLM2 on Shakespeare."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from hetlora_core import runtime
from hetlora_core import store as st
from hetlora_core.adapter import LoraAdapter
from hetlora_core.config import HetLoRAConfig, config_from_dict, load_config
from hetlora_core.peft_bridge import spec_from_model
from hetlora_core.run import RoundFailed, local_config
from hetlora_core.simulate import simulate

FAST = {  # the smoke config, made smaller still: one layer, one thread, one eval window per client
    "model.tiny_hidden": 32, "model.tiny_layers": 1, "training.threads": 1, "training.local_steps": 2,
    "training.batch_size": 2, "data.eval_max_tokens": 32,
}


def smoke(**overrides) -> HetLoRAConfig:
    return load_config("configs/smoke.yaml", {**FAST, **overrides})


def run(cfg: HetLoRAConfig, out: Path, **kw) -> dict:
    return simulate(cfg, out, progress=False, **kw)


def global_shas(out: Path, cfg: HetLoRAConfig) -> list[str]:
    store = st.LocalStore(out / "store")
    return [st.get_manifest(store, st.global_prefix(cfg.experiment, r))["sha256"]
            for r in range(st.last_committed_round(store, cfg.experiment) + 1)]


# ---------------------------------------------------------------- smoke config (fast)


def test_results_json_is_well_formed(tmp_path: Path):
    cfg = smoke()
    res = run(cfg, tmp_path)
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["rounds_committed"] == res["rounds_committed"] == cfg.federation.rounds == 2
    assert config_from_dict(on_disk["config"]) == local_config(cfg, tmp_path)  # the config round-trips
    assert (tmp_path / "perplexity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert math.isfinite(on_disk["baseline_ppl"]) and on_disk["baseline_ppl"] > 1
    ids = set(runtime.client_ids(cfg))
    spec = spec_from_model(runtime.model(cfg), cfg.model.target_modules)
    store = st.LocalStore(tmp_path / "store")
    for rnd in on_disk["rounds"]:
        sel = rnd["selected"]
        assert len(sel) == cfg.federation.clients_per_round == len(set(sel)) and set(sel) <= ids
        assert rnd["participants"] == sel and rnd["dropped"] == {} and rnd["clipped"] == []
        assert sum(rnd["weights"].values()) == pytest.approx(1.0) and set(rnd["weights"]) == set(sel)
        assert set(rnd["client_ranks"]) == ids
        assert all(cfg.ranks.r_min <= r <= cfg.ranks.r_max for r in rnd["client_ranks"].values())
        assert set(rnd["clients"]) == set(sel) and set(rnd["per_client_ppl"]) == ids
        for key in ("global_ppl", "personal_ppl", "train_loss", "train_seconds", "aggregate_seconds", "eval_seconds"):
            assert isinstance(rnd[key], float) and math.isfinite(rnd[key]) and rnd[key] >= 0, key
        up = down = 0
        for cid, rep in rnd["clients"].items():
            # download: the global truncated to the client's rank, float32, A and B of every module
            assert rep["bytes_down"] == 4 * rep["rank_before"] * sum(o + i for o, i in spec.values())
            data, _ = st.get_artifact(store, st.client_prefix(cfg.experiment, rnd["round"], cid))
            assert rep["bytes_up"] == len(data)  # upload: the safetensors file actually sent
            assert LoraAdapter.from_bytes(data).rank == rep["rank_after"]
            assert rep["num_tokens"] == cfg.training.local_steps * cfg.training.batch_size * cfg.data.seq_len
            up, down = up + rep["bytes_up"], down + rep["bytes_down"]
        assert (rnd["bytes_up"], rnd["bytes_down"]) == (up, down) and up > down  # header + metadata
    assert [r["round"] for r in on_disk["rounds"]] == [0, 1]


def test_pruned_ranks_persist_across_rounds(tmp_path: Path):
    """Pruning forced (huge lambda, gamma 0.5): a client's rank in round t+1's plan is the rank it
    left round t with, whether or not it took part in round t."""
    cfg = smoke(**{"pruning.lam": 100.0, "pruning.gamma": 0.5, "federation.rounds": 4})
    res = run(cfg, tmp_path)
    rounds = res["rounds"]
    events = [e for r in rounds for e in r["prune_events"]]
    assert events, "no client pruned: the test would be vacuous"
    assert all(e["to"] == max(cfg.ranks.r_min, math.floor(0.5 * e["from"])) for e in events)
    assert rounds[0]["prune_events"] == []  # B = 0 at round 0: nothing to prune
    assert len({tuple(r["selected"]) for r in rounds}) > 1  # selection is redrawn every round
    store = st.LocalStore(tmp_path / "store")
    initial = {c: r for c, r in rounds[0]["client_ranks"].items() if c not in rounds[0]["clients"]}
    for t in range(len(rounds)):
        plan = json.loads(store.get_bytes(f"{st.round_prefix(cfg.experiment, t)}/plan.json"))
        planned = {c["client_id"]: c["rank"] for c in plan["clients"]}
        assert planned == {c: rep["rank_before"] for c, rep in rounds[t]["clients"].items()}
        for c, rep in rounds[t]["clients"].items():
            assert rounds[t]["client_ranks"][c] == rep["rank_after"] <= rep["rank_before"]
        if t == 0:
            assert all(planned[c] == r for c, r in initial.items() if c in planned)
        else:
            assert all(planned[c] == rounds[t - 1]["client_ranks"][c] for c in planned)
            # clients that sat this round out keep their rank
            assert all(rounds[t]["client_ranks"][c] == rounds[t - 1]["client_ranks"][c]
                       for c in rounds[t]["client_ranks"] if c not in planned)
    # a client pruned in round t trains at its new rank the next time it is selected
    pruned_then_seen = [(t, e) for t, r in enumerate(rounds) for e in r["prune_events"]
                        if any(e["client"] in rounds[u]["clients"] for u in range(t + 1, len(rounds)))]
    assert pruned_then_seen, "no pruned client was selected again: raise federation.rounds"
    for t, e in pruned_then_seen:
        nxt = next(u for u in range(t + 1, len(rounds)) if e["client"] in rounds[u]["clients"])
        assert rounds[nxt]["clients"][e["client"]]["rank_before"] == e["to"]


def test_adapter_bytes_are_deterministic():
    """Byte-identical resume needs equal adapters to serialise to equal bytes (safetensors writes
    its metadata from a hash map in a varying order; ``to_bytes`` canonicalises the header)."""
    import hashlib

    a = LoraAdapter({"m": torch.ones(2, 3).numpy()}, {"m": torch.ones(4, 2).numpy()}, 2.0)
    assert len({hashlib.sha256(a.to_bytes({"round": "1", "client": "x", "z": "y"})).digest() for _ in range(30)}) == 1


def test_resume_gives_the_same_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    cfg2 = smoke()
    cfg1 = smoke(**{"federation.rounds": 1})
    run(cfg2, tmp_path / "straight")
    ref = global_shas(tmp_path / "straight", cfg2)
    assert len(ref) == 2 and ref[0] != ref[1]

    run(cfg1, tmp_path / "extended")  # finish after one round, then ask for two
    assert len(global_shas(tmp_path / "extended", cfg2)) == 1
    res = run(cfg2, tmp_path / "extended")
    assert global_shas(tmp_path / "extended", cfg2) == ref and res["rounds_committed"] == 2

    # killed mid-round 1, after its first client's final upload (the fault-injection failpoint)
    monkeypatch.setenv("HETLORA_FAILPOINTS", "prune_done@round=1:raise")
    with pytest.raises(RoundFailed, match="InjectedFault: injected fault at prune_done"):  # the runner's wording, cause named
        run(cfg2, tmp_path / "killed")
    monkeypatch.delenv("HETLORA_FAILPOINTS")
    assert len(global_shas(tmp_path / "killed", cfg2)) == 1
    res = run(cfg2, tmp_path / "killed")
    assert global_shas(tmp_path / "killed", cfg2) == ref
    straight = json.loads((tmp_path / "straight" / "results.json").read_text())
    assert [r["global_ppl"] for r in res["rounds"]] == [r["global_ppl"] for r in straight["rounds"]]


def test_resume_refuses_a_different_config(tmp_path: Path):
    from hetlora_core.run import RunConfigMismatch

    run(smoke(**{"federation.rounds": 1}), tmp_path)
    with pytest.raises(RunConfigMismatch, match="training"):
        run(smoke(**{"federation.rounds": 2, "training.lr": 0.01}), tmp_path)


# ---------------------------------------------------------------- real SmolLM2 (slow)


@pytest.mark.slow
def test_smollm2_federated_run_lowers_heldout_perplexity(tmp_path: Path):
    """Four Shakespeare roles, two per round, two rounds of three local steps on SmolLM2-135M:
    the global adapter's held-out perplexity after round 2 is below the base model's."""
    cfg = load_config(None, {
        "experiment": "e2e-smollm2",
        "model.name": "smollm2-135m",
        "data.num_clients": 4, "data.seq_len": 64, "data.eval_max_tokens": 256, "data.max_chars": 8000,
        "training.local_steps": 3, "training.batch_size": 4, "training.lr": 3e-3,
        "training.bf16": False,  # bf16 autocast is ~10-50x slower on CPUs without AVX512-BF16/AMX (this one)
        # One thread: on a shared 2-core machine, 2 MKL threads ran a SmolLM2 step 2-3x slower than one.
        "training.threads": 1,
        "federation.rounds": 2, "federation.clients_per_round": 2,
    })
    torch.set_num_threads(1)  # the baseline evaluation runs before any training sets it
    res = run(cfg, tmp_path)
    base = res["baseline_ppl"]
    assert 20 < base < 500, f"base perplexity {base} is far from SmolLM2's ~114 on Shakespeare"
    final = res["rounds"][-1]
    assert final["global_ppl"] < base, (base, [r["global_ppl"] for r in res["rounds"]])
    assert final["personal_ppl"] < base
    assert res["rounds_committed"] == 2 and all(r["train_loss"] < 10 for r in res["rounds"])
