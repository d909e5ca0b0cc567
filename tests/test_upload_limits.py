"""An upload's size is bounded before it is read (issue 13): a manifest may not claim more bytes
than an honest upload of the client's planned rank and the global's shapes can have, and an object
larger than its own manifest says is refused unread. Either way only that client is dropped, with a
reason naming its key; the others commit. Real LocalStore, real aggregate step."""

from __future__ import annotations

import json
from pathlib import Path

from test_aggregate_streaming import IDS, RANKS, SPEC, cfg_of, honest, upload_all

from hetlora_core import store as st
from hetlora_core.methods import method_for
from hetlora_core.steps.aggregate import aggregate
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
