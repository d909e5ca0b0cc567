"""An upload's size is bounded before it is read (issue 13): a manifest may not claim more bytes
than an honest upload of the client's planned rank and the global's shapes can have, and an object
larger than its own manifest says is refused unread. Either way only that client is dropped, with a
reason naming its key; the others commit. Real LocalStore, real aggregate step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_aggregate_streaming import IDS, RANKS, SPEC, cfg_of, honest, upload_all

from hetlora_core import store as st
from hetlora_core.methods import method_for
from hetlora_core.steps.aggregate import QuorumError, aggregate
from hetlora_core.steps.plan import plan_round


class CountingStore(st.LocalStore):
    """A LocalStore that records how many bytes each get_bytes returned."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.read: dict[str, int] = {}

    def get_bytes(self, key: str, *, max_bytes: int | None = None) -> bytes:
        data = super().get_bytes(key, max_bytes=max_bytes)
        self.read[key] = self.read.get(key, 0) + len(data)
        return data


def test_oversized_claims_and_objects_drop_only_their_client(tmp_path: Path) -> None:
    cfg = cfg_of(tmp_path, len(IDS), RANKS)
    store = CountingStore(tmp_path)
    upload_all(store, cfg, IDS)
    aggregate(cfg, store, plan_round(cfg, store, IDS, 0))  # round 0 commits: round 1 has the global's shapes
    plan = plan_round(cfg, store, IDS, 1)
    for c in plan.clients:
        st.put_artifact(store, st.client_prefix("s", 1, c.client_id), honest(c.rank, 100 + int(c.client_id[1:])).to_bytes(),
                        {"num_samples": 5})
    claim, grown = "c02", "c05"  # both planned at rank 8
    bound = method_for(cfg).max_upload_bytes(SPEC, 8)
    man_key = st.client_prefix("s", 1, claim) + "/" + st.MANIFEST
    man = json.loads(store.get_bytes(man_key))
    store.put_bytes(man_key, json.dumps({**man, "size": 10**9}).encode())  # claims a gigabyte
    obj = st.client_prefix("s", 1, grown) + "/adapter.safetensors"
    store.put_bytes(obj, store.get_bytes(obj) + b"\0" * (1 << 20))  # 1 MiB more than its manifest says
    store.read.clear()
    out = aggregate(cfg, store, plan)
    assert sorted(out["dropped"]) == [claim, grown] and sorted(out["participants"]) == sorted(set(IDS) - {claim, grown})
    assert "its manifest says 1,000,000,000 bytes" in out["dropped"][claim] and f"{bound:,}" in out["dropped"][claim]
    assert obj in out["dropped"][grown] and "larger than" in out["dropped"][grown]
    assert store.read.get(st.client_prefix("s", 1, claim) + "/adapter.safetensors", 0) == 0  # never read
    assert store.read.get(obj, 0) == 0  # refused on its size, not read
    honest_size = len(honest(8, 0).to_bytes())
    assert honest_size <= bound < 2 * honest_size + 64 * 1024  # the bound admits honest uploads and little more


def test_round0_uploads_are_bounded_by_their_peers_and_store_max_upload_mb(tmp_path: Path) -> None:
    """Round 0 has no global to take shapes from: a client may claim at most about twice what its
    peers claim per rank, and never more than ``store.max_upload_mb``. A 1 GiB object (sparse: no
    disk is spent) is refused unread, whether its manifest admits its size or hides it."""
    cfg = cfg_of(tmp_path, len(IDS), RANKS)
    store = CountingStore(tmp_path)
    upload_all(store, cfg, IDS)
    claim, hidden = "c02", "c05"
    for c, size in ((claim, 1 << 30), (hidden, None)):
        prefix = st.client_prefix("s", 0, c)
        obj = f"{prefix}/adapter.safetensors"
        with open(tmp_path / obj, "r+b") as f:
            f.truncate(1 << 30)  # a 1 GiB object
        if size is not None:
            man = json.loads(store.get_bytes(f"{prefix}/{st.MANIFEST}"))
            store.put_bytes(f"{prefix}/{st.MANIFEST}", json.dumps({**man, "size": size}).encode())
    store.read.clear()
    out = aggregate(cfg, store, plan_round(cfg, store, IDS, 0))
    assert sorted(out["dropped"]) == [claim, hidden], out["dropped"]
    assert "its manifest says 1,073,741,824 bytes" in out["dropped"][claim] and st.client_prefix("s", 0, claim) in out["dropped"][claim]
    assert "1,073,741,824 bytes" in out["dropped"][hidden] and "not read" in out["dropped"][hidden], out["dropped"][hidden]
    assert not any(k.endswith("adapter.safetensors") and k.split("/")[-2] in (claim, hidden) for k in store.read)  # never read


def test_round0_lone_client_is_bounded_by_store_max_upload_mb(tmp_path: Path) -> None:
    cfg = cfg_of(tmp_path, 1, [8], store={"max_upload_mb": 0.001})  # ~1 KB: less than any upload of SPEC
    store = CountingStore(tmp_path)
    upload_all(store, cfg, ["c00"])
    with pytest.raises(QuorumError) as e:  # its only client dropped: the round fails, cleanly
        aggregate(cfg, store, plan_round(cfg, store, ["c00"], 0))
    assert "c00" in str(e.value) and "more than the 1,048" in str(e.value), str(e.value)
    assert not any(k.endswith("adapter.safetensors") for k in store.read)


@pytest.mark.attack
def test_round0_peers_cannot_lower_an_honest_clients_bound(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A client claiming a tiny size must not shrink its peers' bounds (review finding: with the
    median of one peer, a 2-client round's attacker set the honest client's bound and got it
    dropped). With fewer than two peers only store.max_upload_mb bounds; with more, the largest
    peer claim does, so one tiny claim changes nothing."""
    from hetlora_core.steps import upload_bounds

    monkeypatch.setattr(upload_bounds, "SLACK_BYTES", 0, raising=False)  # SPEC's uploads are far below the 1 MiB slack
    for ids in (["c00", "c01"], ["c00", "c01", "c02", "c03"]):
        root = tmp_path / str(len(ids))
        cfg = cfg_of(root, len(ids), [8] * len(ids))
        store = st.LocalStore(root)
        upload_all(store, cfg, ids)
        evil = ids[-1]
        key = st.client_prefix("s", 0, evil) + "/" + st.MANIFEST
        store.put_bytes(key, json.dumps({**json.loads(store.get_bytes(key)), "size": 1}).encode())  # claims 1 byte
        out = aggregate(cfg, store, plan_round(cfg, store, ids, 0))
        assert list(out["dropped"]) == [evil] and out["participants"] == ids[:-1], out["dropped"]
