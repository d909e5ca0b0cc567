"""Server state that clients cannot forge (issue 13, part 2): HMAC-signed plans, globals and metrics.

The attacks of the issue, each against the step that reads the state (store/signing.py says who
verifies what): a client rewrites the plan so that only it is listed (aggregate refuses it), round
0's global is copied to round 1 (the driver's resume, planning and load_global refuse it), a global
manifest is forged (refused). Every rejection is a ``ForgedState`` naming the key. Model-free:
LocalStore and small numpy adapters; the one whole run uses the tiny model.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from hetlora_core import store as st
from hetlora_core.adapter import LoraAdapter
from hetlora_core.config import ConfigError, StoreConfig, config_from_dict
from hetlora_core.run import RoundRunner
from hetlora_core.steps.aggregate import aggregate_task
from hetlora_core.steps.common import load_global
from hetlora_core.steps.plan import load_plan, plan_round

ENV = "HETLORA_SERVER_KEY"
KEY = "k" * 40
SPEC = {"layers.0.q_proj": (16, 16), "layers.0.v_proj": (8, 16)}
IDS = [f"c{i}" for i in range(4)]


@pytest.fixture
def server_key(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv(ENV, KEY)
    return KEY


def cfg_for(tmp_path: Path, **store: Any) -> Any:
    return config_from_dict({"experiment": "sig", "model": {"lora_scale": 2.0},
                             "ranks": {"r_min": 2, "r_max": 8, "assignment": "explicit", "explicit": [2, 4, 8, 8]},
                             "data": {"num_clients": 4}, "federation": {"clients_per_round": 4, "quorum": 0.25, "rounds": 3},
                             "store": {"root": str(tmp_path / "store"), **store}})


def upload_all(cfg: Any, store: st.Store, rnd: int) -> None:
    """Every planned client uploads a small valid adapter of its rank."""
    rng = np.random.default_rng(rnd)
    for c in load_plan(cfg, store, rnd).clients:
        a = LoraAdapter({m: (0.01 * rng.standard_normal((c.rank, s[1]))).astype(np.float32) for m, s in SPEC.items()},
                        {m: (0.01 * rng.standard_normal((s[0], c.rank))).astype(np.float32) for m, s in SPEC.items()}, 2.0)
        st.put_artifact(store, st.client_prefix(cfg.experiment, rnd, c.client_id), a.to_bytes(),
                        {"client_id": c.client_id, "num_samples": 10})


def commit_round(cfg: Any, store: st.Store, rnd: int) -> dict[str, Any]:
    plan_round(cfg, store, IDS, rnd)
    upload_all(cfg, store, rnd)
    json.loads(aggregate_task(cfg.to_json(), rnd, []))
    man = st.get_manifest(store, st.global_prefix(cfg.experiment, rnd))
    assert man is not None
    return man


# ---------------------------------------------------------------- the signature itself


def test_seal_and_verify_catch_tampering_replay_and_another_key() -> None:
    key, doc = KEY.encode(), {"round": 1, "clients": {"a": {"rank": 2}}, "weights": {"a": 0.25}}
    signed = st.signing.seal(doc, key, "global", "exp", 1)
    assert st.signing.verify(json.loads(json.dumps(signed)), "where", key, "global", "exp", 1) == signed  # survives JSON
    with pytest.raises(st.ForgedState, match=r"^where: its server signature does not match its content"):
        st.signing.verify({**signed, "weights": {"a": 1.0}}, "where", key, "global", "exp", 1)
    with pytest.raises(st.ForgedState, match="does not match"):
        st.signing.verify(signed, "where", b"x" * 40, "global", "exp", 1)  # another key
    with pytest.raises(st.ForgedState, match=r"^where carries no server signature .*global of round 1 of 'exp'"):
        st.signing.verify(doc, "where", key, "global", "exp", 1)
    with pytest.raises(st.ForgedState, match=r"signed for round 1 \(expected 2\).*replay"):
        st.signing.verify(signed, "where", key, "global", "exp", 2)
    with pytest.raises(st.ForgedState, match=r"experiment 'exp' \(expected 'other'\)"):
        st.signing.verify(signed, "where", key, "global", "other", 1)
    with pytest.raises(st.ForgedState, match=r"kind 'global' \(expected 'plan'\)"):
        st.signing.verify(signed, "where", key, "plan", "exp", 1)
    odd = {**signed, st.signing.FIELD: {**signed[st.signing.FIELD], "hmac": "é" * 64}}  # non-ASCII: a clean refusal
    with pytest.raises(st.ForgedState, match="does not match"):
        st.signing.verify(odd, "where", key, "global", "exp", 1)
    forged_binding = {**signed, st.signing.FIELD: {**signed[st.signing.FIELD], "round": 2}}  # relabel the round
    with pytest.raises(st.ForgedState, match="does not match"):
        st.signing.verify(forged_binding, "where", key, "global", "exp", 2)


def test_config_fields_are_validated() -> None:
    with pytest.raises(ConfigError, match="store.server_key_env"):
        StoreConfig(server_key_env="lower-case")
    with pytest.raises(ConfigError, match="store.signing"):
        StoreConfig(signing="sometimes")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="kubeflow.client_store_secret.*must differ"):
        config_from_dict({"kubeflow": {"client_store_secret": "hetlora-store"}})
    with pytest.raises(ConfigError, match="kubeflow.server_key_secret"):
        config_from_dict({"kubeflow": {"server_key_secret": "Bad_Name"}})


def test_short_key_is_refused_without_echoing_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV, "tooshort-secret")
    with pytest.raises(st.ServerKeyError, match=f"{ENV} holds 15 characters") as e:
        st.signing.server_key(StoreConfig())
    assert "tooshort" not in str(e.value)


# ---------------------------------------------------------------- the attacks, each refused by its reader


@pytest.mark.attack
def test_plan_rewritten_by_a_client_is_refused_by_aggregation(tmp_path: Path, server_key: str) -> None:
    """The issue's attack: the plan rewritten to list only the attacker committed the round with it
    alone at weight 1.0. Now aggregation refuses the plan, names its key, and commits nothing."""
    cfg = cfg_for(tmp_path)
    store = st.open_store(cfg.store)
    plan_round(cfg, store, IDS, 0)
    upload_all(cfg, store, 0)
    key = st.plan_key(cfg.experiment, 0)
    doc = json.loads(store.get_bytes(key))
    assert doc[st.signing.FIELD]["kind"] == "plan" and KEY not in store.get_bytes(key).decode()
    evil = next(c for c in doc["clients"] if c["client_id"] == "c3")
    for forged in ({**doc, "clients": [evil]},  # keeps the (now wrong) signature
                   {k: v for k, v in doc.items() if k != st.signing.FIELD} | {"clients": [evil]}):  # drops it
        store.put_bytes(key, json.dumps(forged).encode())
        with pytest.raises(st.ForgedState, match=rf"^{key}"):
            aggregate_task(cfg.to_json(), 0, [])
        assert st.get_manifest(store, st.global_prefix(cfg.experiment, 0)) is None  # nothing committed
    store.put_bytes(key, json.dumps(doc).encode())  # the genuine plan again: the round commits with everyone
    assert sorted(json.loads(aggregate_task(cfg.to_json(), 0, []))["participants"]) == IDS


@pytest.mark.attack
def test_round_0_global_replayed_as_round_1_is_refused(tmp_path: Path, server_key: str) -> None:
    cfg = cfg_for(tmp_path)
    store = st.open_store(cfg.store)
    g0 = commit_round(cfg, store, 0)
    assert g0[st.signing.FIELD] == {**g0[st.signing.FIELD], "kind": "global", "experiment": "sig", "round": 0}
    plan_round(cfg, store, IDS, 1)  # round 1 planned, then "committed" by a copy of round 0's global
    src, dst = st.global_prefix(cfg.experiment, 0), st.global_prefix(cfg.experiment, 1)
    for name in (st.ADAPTER, st.MANIFEST):
        store.put_bytes(f"{dst}/{name}", store.get_bytes(f"{src}/{name}"))
    assert st.last_committed_round(store, cfg.experiment) == 1  # the store alone is fooled...
    msg = rf"^{dst}/manifest.json is a validly signed copy of other server state: signed for round 0 \(expected 1\)"
    with pytest.raises(st.ForgedState, match=msg):  # ...load_global (train/prune/aggregate/evaluate) is not
        load_global(cfg, store, 2, None)
    with pytest.raises(st.ForgedState, match=msg):  # nor the driver planning round 2 from it
        plan_round(cfg, store, IDS, 2)

    class Never:  # the driver's resume refuses before any round runs
        name, command, local_key, on_task = "test", "hetlora test", False, None

        def run_round(self, *a: Any) -> None:
            raise AssertionError("a round ran on a replayed global")

        evaluate = run_round

    runner = RoundRunner(cfg, Never(), tmp_path / "out")  # type: ignore[arg-type]
    runner.check_model = lambda: None  # type: ignore[method-assign]  # no model needed to refuse
    with pytest.raises(st.ForgedState, match=msg):
        runner.run()


@pytest.mark.attack
def test_forged_global_manifest_is_refused(tmp_path: Path, server_key: str) -> None:
    """A client edits the committed manifest (its own weight, the ranks every later plan starts
    from) and recomputes nothing it cannot: the signature no longer matches."""
    cfg = cfg_for(tmp_path)
    store = st.open_store(cfg.store)
    man = commit_round(cfg, store, 0)
    key = f"{st.global_prefix(cfg.experiment, 0)}/{st.MANIFEST}"
    forged = {**man, "clients": {c: {**s, "rank": 8} for c, s in man["clients"].items()}}
    store.put_bytes(key, json.dumps(forged).encode())
    with pytest.raises(st.ForgedState, match=rf"^{key}: its server signature does not match its content"):
        plan_round(cfg, store, IDS, 1)
    with pytest.raises(st.ForgedState, match=rf"^{key}"):
        load_global(cfg, store, 1, None)
    unsigned = {k: v for k, v in forged.items() if k != st.signing.FIELD}  # a manifest made from scratch
    store.put_bytes(key, json.dumps(unsigned).encode())
    with pytest.raises(st.ForgedState, match=rf"^{key} carries no server signature"):
        st.signing.get_global_manifest(store, cfg.store, cfg.experiment, 0)


@pytest.mark.attack
def test_plan_of_another_experiment_is_refused(tmp_path: Path, server_key: str) -> None:
    cfg = cfg_for(tmp_path)
    other = config_from_dict({**json.loads(cfg.to_json()), "experiment": "other"})
    store = st.open_store(cfg.store)
    plan_round(other, store, IDS, 0)
    store.put_bytes(st.plan_key(cfg.experiment, 0), store.get_bytes(st.plan_key(other.experiment, 0)))
    with pytest.raises(st.ForgedState, match=r"experiment 'other' \(expected 'sig'\)"):
        load_plan(cfg, store, 0)


@pytest.mark.attack
def test_metrics_are_signed_and_checked(tmp_path: Path, server_key: str) -> None:
    cfg = cfg_for(tmp_path)
    store = st.open_store(cfg.store)
    key = st.eval_key(cfg.experiment, 0)
    st.signing.put_signed_json(store, cfg.store, key, {"round": 0, "global": {"ppl": 9.0}}, "eval", cfg.experiment, 0)
    got = st.signing.get_signed_json(store, cfg.store, key, "eval", cfg.experiment, 0)
    assert got is not None and got["global"] == {"ppl": 9.0}
    store.put_bytes(key, store.get_bytes(key).replace(b"9.0", b"1.0"))  # a client reports a better perplexity
    with pytest.raises(st.ForgedState, match=rf"^{key}: its server signature does not match"):
        st.signing.get_signed_json(store, cfg.store, key, "eval", cfg.experiment, 0)


# ---------------------------------------------------------------- no key


def test_no_key_auto_is_unsigned_and_required_refuses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV, raising=False)
    cfg = cfg_for(tmp_path)
    store = st.open_store(cfg.store)
    plan_round(cfg, store, IDS, 0)  # auto without a key: as before signing existed
    assert st.signing.FIELD not in json.loads(store.get_bytes(st.plan_key(cfg.experiment, 0)))
    assert load_plan(cfg, store, 0).round == 0
    monkeypatch.setenv(ENV, KEY)  # a reader holding the key refuses unsigned state
    with pytest.raises(st.ForgedState, match="carries no server signature"):
        load_plan(cfg, store, 0)
    monkeypatch.delenv(ENV)
    strict = cfg_for(tmp_path, signing="required")
    with pytest.raises(st.ServerKeyError, match=f"store.signing is 'required' and {ENV} is not set"):
        plan_round(strict, store, IDS, 0)


def test_local_driver_key_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV, raising=False)
    sc = StoreConfig(root=str(tmp_path / "store"))
    with st.signing.local_server_key(sc, tmp_path / "old", fresh=False) as source:
        assert source == "" and ENV not in os.environ  # a run recorded unsigned stays unsigned
    with st.signing.local_server_key(sc, tmp_path / "out", fresh=True) as source:
        path = tmp_path / "store.server.key"  # beside the store folder: it follows the store, not --out
        assert source == str(path) and stat.S_IMODE(path.stat().st_mode) == 0o600
        key = os.environ[ENV]
        assert len(key) >= st.signing.MIN_KEY_CHARS and not path.is_relative_to(tmp_path / "store")
    assert ENV not in os.environ  # restored: no key leaks into whatever runs next in this process
    with st.signing.local_server_key(sc, tmp_path / "another-out", fresh=False):
        assert os.environ[ENV] == key  # the same key on resume, from any output directory
    s3 = StoreConfig(kind="s3", endpoint="minio:9000")
    assert st.signing.local_key_path(s3, tmp_path / "out") == tmp_path / "out" / st.signing.KEY_FILE
    path.chmod(0o644)
    with pytest.raises(st.ServerKeyError, match="readable by other users"), st.signing.local_server_key(sc, tmp_path / "out", True):
        pass
    monkeypatch.setenv(ENV, KEY)
    with st.signing.local_server_key(sc, tmp_path / "elsewhere", fresh=True) as source:
        assert source == f"${ENV}" and not (tmp_path / "elsewhere").exists()  # the environment's key wins


def test_submit_refuses_a_driver_and_cluster_that_disagree_on_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """Kubeflow: the driver signs plans the aggregate task verifies, so both hold the key or neither."""
    from hetlora_kfp.pipelines.runners import check_driver_key

    base = {"store": {"kind": "s3", "endpoint": "minio:9000"}}
    with_secret = config_from_dict({**base, "kubeflow": {"server_key_secret": "hetlora-server-key"}})
    monkeypatch.delenv(ENV, raising=False)
    check_driver_key(config_from_dict(base))  # neither: unsigned, as before
    with pytest.raises(st.ServerKeyError, match=rf"server_key_secret is 'hetlora-server-key' but {ENV} is not set.*export {ENV}="):
        check_driver_key(with_secret)
    with pytest.raises(st.ServerKeyError, match="store.signing is 'required'"):
        check_driver_key(config_from_dict({**base, "store": {**base["store"], "signing": "required"}}))
    monkeypatch.setenv(ENV, KEY)
    check_driver_key(with_secret)  # both
    with pytest.raises(st.ServerKeyError, match=f"{ENV} is set here but kubeflow.server_key_secret is empty"):
        check_driver_key(config_from_dict(base))


@pytest.mark.attack
@pytest.mark.slow  # ~15-35 s: one tiny-model round in-process
def test_a_local_run_signs_its_state_and_refuses_a_replay_on_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The default demo path (``hetlora simulate``, no key configured): the driver makes OUT/store.server.key,
    every piece of server state is signed with it (and the key is nowhere in the store), and a
    resume after round 0's global was copied to round 1 stops with ForgedState naming the key."""
    from hetlora_core.simulate import simulate

    monkeypatch.delenv(ENV, raising=False)
    cfg = config_from_dict({"experiment": "demo", "model": {"name": "tiny", "tiny_hidden": 16, "tiny_layers": 1},
                            "data": {"num_clients": 2, "max_chars": 6000, "seq_len": 16, "eval_max_tokens": 16},
                            "ranks": {"r_min": 2, "r_max": 4, "tiers": [{"name": "small", "rank": 2}, {"name": "large", "rank": 4}]},
                            "training": {"local_steps": 1, "batch_size": 2, "threads": 1},
                            "federation": {"rounds": 1, "clients_per_round": 2}})
    out = tmp_path / "out"
    assert simulate(cfg, out, progress=False)["rounds_committed"] == 1
    key_file = out / "store.server.key"  # beside OUT/store
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600 and ENV not in os.environ
    key = key_file.read_text().strip()
    store = st.LocalStore(out / "store")
    signed = {"plan": st.plan_key("demo", 0), "global": f"{st.global_prefix('demo', 0)}/{st.MANIFEST}",
              "eval": st.eval_key("demo", 0), "baseline": st.baseline_key("demo")}
    for kind, k in signed.items():
        sig = json.loads(store.get_bytes(k))[st.signing.FIELD]
        assert sig["kind"] == kind and sig["experiment"] == "demo"
        st.signing.verify(json.loads(store.get_bytes(k)), k, key.encode(), kind, "demo", -1 if kind == "baseline" else 0)
    assert not any(key.encode() in store.get_bytes(k) for k in store.list(""))
    for name in (st.ADAPTER, st.MANIFEST):  # the replay: round 0's global as round 1's commit
        store.put_bytes(f"{st.global_prefix('demo', 1)}/{name}", store.get_bytes(f"{st.global_prefix('demo', 0)}/{name}"))
    more = config_from_dict({**json.loads(cfg.to_json()), "federation": {**json.loads(cfg.to_json())["federation"], "rounds": 3}})
    with pytest.raises(st.ForgedState, match=rf"^{st.global_prefix('demo', 1)}/manifest.json is a validly signed copy.*round 0 \(expected 1\)"):
        simulate(more, out, progress=False)
    assert ENV not in os.environ


@pytest.mark.slow  # ~20-40 s: three tiny-model runs in-process
def test_the_local_key_follows_the_store_and_a_signed_run_never_resumes_unsigned(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Review finding: the key lived in --out while the store follows store.root, so resuming the same
    store from another --out went on unsigned (and the first --out could then not resume at all). The
    key lies beside the store now, and a signed history without its key is a clear stop."""
    from hetlora_core.simulate import simulate

    monkeypatch.delenv(ENV, raising=False)
    base = {"experiment": "demo", "model": {"name": "tiny", "tiny_hidden": 16, "tiny_layers": 1},
            "store": {"root": str(tmp_path / "shared-store")},
            "data": {"num_clients": 2, "max_chars": 6000, "seq_len": 16, "eval_max_tokens": 16},
            "ranks": {"r_min": 2, "r_max": 4, "tiers": [{"name": "small", "rank": 2}, {"name": "large", "rank": 4}]},
            "training": {"local_steps": 1, "batch_size": 2, "threads": 1}}

    def rounds(n: int) -> Any:
        return config_from_dict({**base, "federation": {"rounds": n, "clients_per_round": 2}})

    simulate(rounds(1), tmp_path / "a", progress=False)
    simulate(rounds(2), tmp_path / "b", progress=False)  # the same store from another output directory
    store = st.LocalStore(tmp_path / "shared-store")
    man = json.loads(store.get_bytes(f"{st.global_prefix('demo', 1)}/{st.MANIFEST}"))
    assert st.signing.FIELD in man  # signed with the store's key, not left unsigned
    (tmp_path / "shared-store.server.key").unlink()
    with pytest.raises(st.ServerKeyError, match=r"demo: its state is signed, but no server key was found.*shared-store\.server\.key"):
        simulate(rounds(3), tmp_path / "a", progress=False)
    assert st.last_committed_round(store, "demo") == 1  # nothing written unsigned
