"""The aggregate step's two passes: it keeps only each upload's facts after validating it, then reads
the valid uploads again group by group. Same bytes as ``strategies.aggregate`` over the same uploads;
an upload that changes between the two reads is dropped and the others reweighted; memory does not
grow with the number of uploads."""

from __future__ import annotations

import hashlib
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import hetlora_core.strategies as strategies
from hetlora_core import store as st
from hetlora_core.adapter import LoraAdapter, init_global
from hetlora_core.config import config_from_dict
from hetlora_core.steps.aggregate import QuorumError, aggregate
from hetlora_core.steps.plan import plan_round
from hetlora_core.strategies import ClientUpdate

SPEC = {"layers.0.q_proj": (24, 16), "layers.0.v_proj": (8, 16), "layers.1.q_proj": (24, 16)}
SCALE = 2.0


def cfg_of(root: Path, n: int, ranks: list[int], **sections: dict[str, Any]) -> Any:
    data: dict[str, Any] = {"experiment": "s", "store": {"root": str(root)}, "model": {"lora_scale": SCALE},
                            "ranks": {"r_min": 1, "r_max": 8, "assignment": "explicit", "explicit": ranks},
                            "data": {"num_clients": n}, "federation": {"clients_per_round": n, "quorum": 0.5}}
    for k, v in sections.items():
        data[k] = {**data.get(k, {}), **v}
    return config_from_dict(data)


def honest(rank: int, seed: int, spec: dict[str, tuple[int, int]] = SPEC) -> LoraAdapter:
    g = np.random.default_rng(seed)
    base = init_global(spec, 8, SCALE, 0).truncate(rank)
    return LoraAdapter({m: a + 0.01 * g.standard_normal(a.shape, np.float32) for m, a in base.A.items()},
                       {m: 0.01 * g.standard_normal(b.shape, np.float32) for m, b in base.B.items()}, SCALE)


def upload_all(store: st.Store, cfg: Any, ids: list[str]) -> tuple[Any, dict[str, LoraAdapter]]:
    plan = plan_round(cfg, store, ids, 0)
    ups = {}
    for c in plan.clients:
        ups[c.client_id] = honest(c.rank, int(c.client_id[1:]))
        st.put_artifact(store, st.client_prefix(cfg.experiment, 0, c.client_id), ups[c.client_id].to_bytes(),
                        {"num_samples": 5 + int(c.client_id[1:])})
    return plan, ups


def expected(cfg: Any, ups: dict[str, LoraAdapter], keep: list[str]) -> tuple[str, Any]:
    new, info = strategies.aggregate(init_global(SPEC, 8, SCALE, cfg.federation.seed),
                                     [ClientUpdate(c, ups[c], 5 + int(c[1:])) for c in keep], cfg.strategy, 8)
    return hashlib.sha256(new.to_bytes()).hexdigest(), info


IDS = [f"c{i:02d}" for i in range(12)]
RANKS = [1, 3, 8, 3, 2, 8, 3, 1, 2, 3, 8, 3]


@pytest.mark.parametrize("strategy", [{"name": "hetlora"}, {"name": "hetlora", "weight_granularity": "client", "clip_norm": 0.05},
                                      {"name": "zero_pad"}, {"name": "homlora"},
                                      {"name": "recon_svd"}])
def test_the_streamed_step_commits_the_bytes_of_aggregate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, strategy: dict) -> None:
    monkeypatch.setattr(strategies, "GROUP_BYTES", 3000)  # several groups per rank: one to three uploads each
    cfg = cfg_of(tmp_path, len(IDS), RANKS, strategy=strategy)
    store = st.open_store(cfg.store)
    plan, ups = upload_all(store, cfg, IDS)
    man = aggregate(cfg, store, plan)
    sha, info = expected(cfg, ups, IDS)
    assert man["participants"] == IDS and man["dropped"] == {}
    assert man["sha256"] == sha and man["weights"] == info.client_weights and man["clipped"] == info.clipped
    if "clip_norm" in strategy:
        assert man["clipped"], "the clipping case should clip someone"


class TamperingStore(st.LocalStore):
    """Serves ``key`` as stored on its first read; from the second read on, ``replacement`` (None:
    the object is gone): a client task retried between the aggregate step's two reads, or a rotting disk."""

    def __init__(self, root: Path, key: str, replacement: bytes | None) -> None:
        super().__init__(root)
        self.key, self.replacement, self.reads = key, replacement, 0

    def get_bytes(self, key: str, *, max_bytes: int | None = None) -> bytes:
        if key == self.key:
            self.reads += 1
            if self.reads > 1:
                if self.replacement is None:
                    raise st.NotFound(f"{key}: no such object")
                return self.replacement
        return super().get_bytes(key, max_bytes=max_bytes)


@pytest.mark.parametrize("victim, replace", [("c06", "valid"), ("c03", "gone"), ("c02", "valid")])
def test_an_upload_changed_between_the_two_reads_is_dropped_and_the_others_reweighted(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, victim: str, replace: str) -> None:
    monkeypatch.setattr(strategies, "GROUP_BYTES", 6000)  # c06 is not first in its group: a partly fed group is discarded
    cfg = cfg_of(tmp_path, len(IDS), RANKS)
    _, ups = upload_all(st.LocalStore(tmp_path), cfg, IDS)
    key = st.client_prefix("s", 0, victim) + "/adapter.safetensors"
    evil = ups[victim].clone()
    evil.B = {m: b * 1e3 for m, b in evil.B.items()}  # valid, finite, and it would dominate the sparsity weights
    store = TamperingStore(tmp_path, key, evil.to_bytes() if replace == "valid" else None)
    plan = plan_round(cfg, store, IDS, 0)
    man = aggregate(cfg, store, plan)
    assert store.reads == 2
    keep = [c for c in IDS if c != victim]
    assert man["participants"] == keep and list(man["dropped"]) == [victim]
    why = man["dropped"][victim]
    assert st.client_prefix("s", 0, victim) in why
    assert ("changed between the aggregate step's two reads" if replace == "valid" else "no such object") in why
    sha, info = expected(cfg, ups, keep)  # exactly what the others alone give: weights recomputed without it
    assert man["sha256"] == sha and man["weights"] == info.client_weights
    assert victim not in man["client_reports"] and man["clients"][victim]["rank"] == plan.client(victim).rank


def test_a_drop_in_the_second_pass_can_break_the_quorum_and_nothing_is_committed(tmp_path: Path) -> None:
    cfg = cfg_of(tmp_path, len(IDS), RANKS, federation={"quorum": 1.0})
    _, ups = upload_all(st.LocalStore(tmp_path), cfg, IDS)
    store = TamperingStore(tmp_path, st.client_prefix("s", 0, "c05") + "/adapter.safetensors", b"\x80\x04pickle")
    plan = plan_round(cfg, store, IDS, 0)
    with pytest.raises(QuorumError, match=r"11 valid client uploads, quorum needs 12 of 12") as e:
        aggregate(cfg, store, plan)
    assert "changed between the aggregate step's two reads" in str(e.value)
    assert st.last_committed_round(store, "s") == -1


def test_the_step_holds_one_group_not_every_upload(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Python-heap peak (tracemalloc sees numpy's buffers) of the step with 6 and 36 uploads of
    ~150 kB: the difference must be a small fraction of the 30 extra uploads (~4.6 MB), which the
    step used to hold all at once."""
    spec = {f"layers.{i}.q_proj": (256, 256) for i in range(4)}
    monkeypatch.setattr(strategies, "GROUP_BYTES", 300_000)  # about two uploads per group

    def peak(n: int) -> tuple[int, int]:
        cfg = cfg_of(tmp_path / str(n), n, [8] * n)
        store = st.open_store(cfg.store)
        ids = [f"c{i:02d}" for i in range(n)]
        plan = plan_round(cfg, store, ids, 0)
        size = 0
        for c in plan.clients:
            data = honest(8, int(c.client_id[1:]), spec).to_bytes()
            size += len(data)
            st.put_artifact(store, st.client_prefix("s", 0, c.client_id), data, {"num_samples": 3})
        tracemalloc.start()
        try:
            man = aggregate(cfg, store, plan)
            _, top = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert len(man["participants"]) == n
        return top, size

    small, small_bytes = peak(6)
    large, large_bytes = peak(36)
    assert large - small < 0.15 * (large_bytes - small_bytes), (small, large, small_bytes, large_bytes)


def test_full_fine_tuning_streams_one_delta_at_a_time_to_the_same_bytes(tmp_path: Path) -> None:
    from hetlora_core.methods import method_for
    from hetlora_core.methods.full_ft import average_tensors

    cfg = config_from_dict({"experiment": "f", "store": {"root": str(tmp_path)}, "data": {"num_clients": 4},
                            "strategy": {"name": "full_ft"}, "federation": {"clients_per_round": 4, "quorum": 0.5}})
    method, store = method_for(cfg), st.open_store(cfg.store)
    plan = plan_round(cfg, store, ["a", "b", "c", "d"], 0)
    g = np.random.default_rng(0)
    deltas = {c: {"w": g.standard_normal((5, 3), np.float32), "b": g.standard_normal(3, np.float32)} for c in "abcd"}
    for i, c in enumerate("abcd"):
        st.put_artifact(store, st.client_prefix("f", 0, c), method.encode(deltas[c]), {"num_samples": i + 1})
    man = aggregate(cfg, store, plan)
    want = method.encode(average_tensors([deltas[c] for c in "abcd"], [1, 2, 3, 4]))
    assert man["sha256"] == hashlib.sha256(want).hexdigest()
    assert man["weights"] == pytest.approx({"a": 0.1, "b": 0.2, "c": 0.3, "d": 0.4})


class CountingReads(st.LocalStore):
    """Counts the reads of the clients' upload objects."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.reads: dict[str, int] = {}

    def get_bytes(self, key: str, *, max_bytes: int | None = None) -> bytes:
        if key.endswith("/adapter.safetensors") and "/clients/" in key:
            self.reads[key] = self.reads.get(key, 0) + 1
        return super().get_bytes(key, max_bytes=max_bytes)


@pytest.mark.parametrize("strategy", [{"name": "hetlora"}, {"name": "hetlora", "weight_granularity": "client", "clip_norm": 0.05},
                                      {"name": "zero_pad"}, {"name": "recon_svd"}])
@pytest.mark.parametrize("keep_mb, reads", [(0.0, 2), (1.0, 1), (0.005, 2)])
def test_kept_first_pass_uploads_give_the_same_bytes_with_one_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                     strategy: dict, keep_mb: float, reads: int) -> None:
    """strategy.keep_uploads_mb: within the budget the step aggregates the tensors it validated in its
    first pass (one read per upload), past it every upload is read again (a 5 KiB budget is below these
    12 uploads' total); the committed global is the same bytes either way."""
    monkeypatch.setattr(strategies, "GROUP_BYTES", 3000)
    cfg = cfg_of(tmp_path, len(IDS), RANKS, strategy={**strategy, "keep_uploads_mb": keep_mb})
    store = CountingReads(tmp_path)
    plan, ups = upload_all(store, cfg, IDS)
    man = aggregate(cfg, store, plan)
    sha, info = expected(cfg, ups, IDS)
    assert man["participants"] == IDS and man["sha256"] == sha and man["weights"] == info.client_weights
    assert sorted(set(store.reads.values())) == [reads], store.reads


def test_a_kept_upload_changed_after_its_first_read_stays_as_validated(tmp_path: Path) -> None:
    """With the uploads kept, what is aggregated is what the first pass validated: an object swapped
    afterwards is never read, so nobody is dropped and the global is the honest one."""
    cfg = cfg_of(tmp_path, len(IDS), RANKS, strategy={"keep_uploads_mb": 1.0})
    _, ups = upload_all(st.LocalStore(tmp_path), cfg, IDS)
    evil = ups["c06"].clone()
    evil.B = {m: b * 1e3 for m, b in evil.B.items()}
    store = TamperingStore(tmp_path, st.client_prefix("s", 0, "c06") + "/adapter.safetensors", evil.to_bytes())
    man = aggregate(cfg, store, plan_round(cfg, store, IDS, 0))
    assert store.reads == 1 and man["participants"] == IDS and man["dropped"] == {}
    assert man["sha256"] == expected(cfg, ups, IDS)[0]


def test_full_fine_tuning_kept_uploads_same_bytes_one_read(tmp_path: Path) -> None:
    """Full fine-tuning (its uploads are whole models: where keeping them pays) commits the same
    global with its uploads kept as read twice."""
    from hetlora_core.methods import method_for

    shas = []
    for keep_mb in (0.0, 1.0):
        root = tmp_path / f"k{keep_mb}"
        cfg = config_from_dict({"experiment": "f", "store": {"root": str(root)}, "data": {"num_clients": 4},
                                "strategy": {"name": "full_ft", "keep_uploads_mb": keep_mb},
                                "federation": {"clients_per_round": 4, "quorum": 0.5}})
        store, method = CountingReads(root), method_for(cfg)
        plan = plan_round(cfg, store, ["a", "b", "c", "d"], 0)
        g = np.random.default_rng(0)
        for i, c in enumerate(plan.clients):
            delta = {"w": g.standard_normal((30, 20)).astype(np.float32), "b": np.full((20,), float(i), np.float32)}
            st.put_artifact(store, st.client_prefix("f", 0, c.client_id), method.encode(delta), {"num_samples": 3 + i})
        man = aggregate(cfg, store, plan)
        assert len(man["participants"]) == 4 and sorted(set(store.reads.values())) == [1 if keep_mb else 2]
        shas.append(man["sha256"])
    assert shas[0] == shas[1]


def padded(adapter: LoraAdapter, extra: int) -> bytes:
    """The adapter's safetensors bytes with ``extra`` spaces of JSON whitespace in the header: valid, the
    same tensors, and ``extra`` bytes larger than any honest upload of its rank."""
    import struct

    data = adapter.to_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return struct.pack("<Q", n + extra) + data[8:8 + n] + b" " * extra + data[8 + n:]


@pytest.mark.parametrize("keep_mb", [0.0, 1.0])
def test_a_round0_upload_over_its_exact_bound_is_dropped_kept_or_not(tmp_path: Path, keep_mb: float) -> None:
    """Round 0 reads uploads within the peers' bound (no spec yet); an upload above the exact bound of
    its planned rank (here valid tensors behind a padded header) is dropped once the spec is known,
    whether the step keeps its tensors or would read it again: the same participants and bytes."""
    cfg = cfg_of(tmp_path, len(IDS), RANKS, strategy={"keep_uploads_mb": keep_mb})
    store = st.LocalStore(tmp_path)
    plan, ups = upload_all(store, cfg, IDS)
    st.put_artifact(store, st.client_prefix("s", 0, "c04"), padded(ups["c04"], 200_000), {"num_samples": 9})
    man = aggregate(cfg, store, plan)
    keep = [c for c in IDS if c != "c04"]
    assert man["participants"] == keep and "more than the" in man["dropped"]["c04"]
    assert st.client_prefix("s", 0, "c04") in man["dropped"]["c04"]
    assert man["sha256"] == expected(cfg, ups, keep)[0]


def test_kept_uploads_in_a_later_round_give_the_same_bytes(tmp_path: Path) -> None:
    """Round 1 (its spec from the committed global): kept and read-twice commit the same global."""
    shas = []
    for keep_mb in (0.0, 1.0):
        root = tmp_path / f"k{keep_mb}"
        cfg = cfg_of(root, len(IDS), RANKS, strategy={"keep_uploads_mb": keep_mb})
        store = CountingReads(root)
        plan, _ = upload_all(store, cfg, IDS)
        aggregate(cfg, store, plan)
        plan1 = plan_round(cfg, store, IDS, 1)
        for c in plan1.clients:
            st.put_artifact(store, st.client_prefix("s", 1, c.client_id), honest(c.rank, 100 + int(c.client_id[1:])).to_bytes(),
                            {"num_samples": 4})
        store.reads.clear()
        man = aggregate(cfg, store, plan1)
        assert man["round"] == 1 and man["participants"] == IDS
        assert sorted(set(store.reads.values())) == [1 if keep_mb else 2]
        shas.append(man["sha256"])
    assert shas[0] == shas[1]
