"""The one switch on the method (hetlora_core.methods), and full fine-tuning's uploads passing the
same validation as LoRA's: a bad full-FT upload drops its client, it does not fail the round."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from hetlora_core import store as st
from hetlora_core.config import config_from_dict
from hetlora_core.methods import method_for
from hetlora_core.methods.full_ft import FullFineTuning
from hetlora_core.methods.lora import LoraMethod
from hetlora_core.steps.aggregate import aggregate
from hetlora_core.steps.plan import plan_round

SPEC = {"w": (3, 4), "b": (4,)}
IDS = ["c0", "c1", "c2", "c3", "c4"]


def cfg(tmp_path: Path, **strategy: object):
    return config_from_dict({"experiment": "m", "store": {"root": str(tmp_path)}, "data": {"num_clients": 5},
                             "strategy": strategy or {"name": "full_ft"},
                             "federation": {"clients_per_round": 5, "quorum": 0.2}})


@pytest.mark.parametrize("name,kind,trains_lora,prunes", [
    ("hetlora", LoraMethod, True, True), ("zero_pad", LoraMethod, True, False), ("homlora", LoraMethod, True, False),
    ("recon_svd", LoraMethod, True, False), ("full_ft", FullFineTuning, False, False)])
def test_method_for_answers_what_other_code_asks(tmp_path: Path, name: str, kind: type, trains_lora: bool, prunes: bool) -> None:
    m = method_for(cfg(tmp_path, name=name))
    assert isinstance(m, kind) and m.name == name and m.trains_lora is trains_lora and m.prunes is prunes


def test_hetlora_without_pruning_does_not_prune(tmp_path: Path) -> None:
    c = config_from_dict({"pruning": {"enabled": False}})
    assert not method_for(c).prunes


def delta(value: float, spec: dict[str, tuple[int, ...]] = SPEC) -> dict[str, np.ndarray]:
    return {k: np.full(s, value, np.float32) for k, s in spec.items()}


def test_bad_full_ft_uploads_are_dropped_with_their_reason(tmp_path: Path) -> None:
    c = cfg(tmp_path)
    method, store = method_for(c), st.open_store(c.store)
    for rnd in (0, 1):
        plan = plan_round(c, store, IDS, rnd)
        uploads = {
            "c0": method.encode(delta(1.0)), "c1": method.encode(delta(3.0)),
            "c2": method.encode({**delta(1.0), "w": np.full((3, 4), np.nan, np.float32)}),  # NaN
            "c3": method.encode(delta(1.0, {"w": (4, 3), "b": (4,)})),  # other shape
            "c4": b"\x80\x04pickle",  # a pickle, never loaded
        }
        for cid, data in uploads.items():
            st.put_artifact(store, st.client_prefix("m", rnd, cid), data, {"client_id": cid, "num_samples": 10})
        man = aggregate(c, store, plan)
        assert man["participants"] == ["c0", "c1"], man["dropped"]
        reasons = man["dropped"]
        assert sorted(reasons) == ["c2", "c3", "c4"]
        assert "contains NaN or Inf" in reasons["c2"]
        assert ("modules or shapes differ" if rnd == 0 else "names or shapes differ") in reasons["c3"]
        assert "pickle" in reasons["c4"]
        for cid, why in reasons.items():
            assert st.client_prefix("m", rnd, cid) in why, why
        data, _ = st.get_artifact(store, st.global_prefix("m", rnd))
        glob = method.decode(data, SPEC, "global")
        assert all(np.allclose(v, 2.0) for v in glob.values())  # the honest average, nothing else


def test_a_full_ft_round_without_valid_uploads_fails_and_commits_nothing(tmp_path: Path) -> None:
    from hetlora_core.steps.aggregate import QuorumError

    c = cfg(tmp_path)
    store = st.open_store(c.store)
    plan = plan_round(c, store, IDS, 0)
    for cid in IDS:
        st.put_artifact(store, st.client_prefix("m", 0, cid), b"not safetensors", {"num_samples": 1})
    with pytest.raises(QuorumError, match="0 valid client uploads"):
        aggregate(c, store, plan)
    assert st.last_committed_round(store, "m") == -1


def test_lora_upload_above_the_planned_rank_is_dropped(tmp_path: Path) -> None:
    """A client planned at rank r may not upload a larger rank (it would keep it for later rounds)."""
    from hetlora_core.adapter import init_global

    c = config_from_dict({"experiment": "m", "store": {"root": str(tmp_path)}, "data": {"num_clients": 4},
                          "ranks": {"r_min": 2, "r_max": 8, "explicit": [2, 2, 8, 8], "assignment": "explicit"},
                          "federation": {"clients_per_round": 4, "quorum": 0.5}})
    store = st.open_store(c.store)
    plan = plan_round(c, store, ["a", "b", "c", "d"], 0)
    g = init_global({"q": (6, 5)}, 8, c.model.lora_scale, 0)
    for cp in plan.clients:
        up = g.truncate(8 if cp.client_id == "a" else cp.rank)  # "a" is planned at rank 2
        up.B = {m: np.full_like(b, 0.1) for m, b in up.B.items()}
        st.put_artifact(store, st.client_prefix("m", 0, cp.client_id), up.to_bytes(), {"num_samples": 3})
    man = aggregate(c, store, plan)
    assert plan.client("a").rank == 2 and sorted(man["participants"]) == ["b", "c", "d"]
    assert "rank 8 is outside [r_min, r_max] = [2, 2]" in man["dropped"]["a"]
    assert man["clients"]["a"]["rank"] == 2  # its planned rank persists, not the one it claimed


def test_a_method_that_does_not_prune_passes_its_trained_bytes_through(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The prune step of full fine-tuning (or any method that does not prune) commits the trained
    bytes as the client's upload without decoding them and with the digest already checked; a
    corrupt trained update goes through the same way and the server drops it with its reason."""
    from hetlora_core.steps.prune import prune

    c = cfg(tmp_path)
    method, store = method_for(c), st.open_store(c.store)
    plan = plan_round(c, store, IDS, 0)
    trained = {cid: method.encode(delta(float(i))) for i, cid in enumerate(IDS)}
    trained["c4"] = b"not safetensors at all"
    for cid, data in trained.items():
        st.put_artifact(store, st.trained_prefix("m", 0, cid), data, {"client_id": cid, "num_samples": 10, "rank_before": 1})

    def no_decode(*a: object, **k: object) -> None:
        raise AssertionError("the prune step of a method that does not prune decoded an upload")

    monkeypatch.setattr(FullFineTuning, "decode", no_decode)
    reports = {cid: prune(c, store, 0, cid) for cid in IDS}
    monkeypatch.undo()
    st.put_artifact(store, st.trained_prefix("m", 0, "gone"), b"x", {"client_id": "gone", "rank_before": 1})
    st.drop_payload(store, st.trained_prefix("m", 0, "gone"))  # a manifest whose object is missing
    gone = prune(c, store, 0, "gone")
    assert gone.status == "failed" and st.trained_prefix("m", 0, "gone") in gone.reason, gone
    for cid, data in trained.items():
        got, man = st.get_artifact(store, st.client_prefix("m", 0, cid))
        assert got == data and reports[cid].status == "ok" and reports[cid].sha256 == man["sha256"]
        assert man["bytes_up"] == len(data) and man["pruned"] is False
    man = aggregate(c, store, plan)
    assert man["participants"] == ["c0", "c1", "c2", "c3"]
    assert st.client_prefix("m", 0, "c4") in man["dropped"]["c4"] and "safetensors" in man["dropped"]["c4"]


def test_full_ft_encodes_the_canonical_safetensors_bytes(tmp_path: Path) -> None:
    """Full fine-tuning's direct encoder gives the bytes safetensors + canonical_safetensors gave
    (resumed runs and content checks compare uploads byte for byte), and they decode to the delta."""
    from safetensors.numpy import save

    from hetlora_core.adapter import canonical_safetensors
    from hetlora_core.methods.full_ft import FORMAT

    method = method_for(cfg(tmp_path))
    state = {"model.layers.1.w": np.arange(12, dtype=np.float32).reshape(3, 4), "a.b": np.ones((4,), np.float32),
             "lm_head.weight": np.arange(8, dtype=np.float32).reshape(2, 4)[:, ::2]}  # a non-contiguous view
    data = method.encode(state)
    assert data == canonical_safetensors(save({k: np.ascontiguousarray(v) for k, v in state.items()}, metadata={"format": FORMAT}))
    back = method.decode(data, {k: v.shape for k, v in state.items()}, "t")
    assert all(np.array_equal(back[k], v) for k, v in state.items())
