"""Trust boundary (issue 13, parts 3 and 4): every attack on the aggregate step found by probing it as
a client would, each with its outcome asserted: the client dropped with a reason naming it and the
field, or the round failing cleanly with the previous global intact; never an exception out of
aggregation or results collection. Real LocalStore, real aggregate step, no model (seconds)."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tally import TALLY
from test_aggregate_streaming import SPEC, cfg_of, honest

from hetlora_core import store as st
from hetlora_core.adapter import LoraAdapter
from hetlora_core.config import ConfigError, config_from_dict
from hetlora_core.results import collect_results
from hetlora_core.robust import RoundRejected, check_global, lower_median, norm_outliers
from hetlora_core.steps.aggregate import MAX_REASON, aggregate
from hetlora_core.steps.common import load_global
from hetlora_core.steps.plan import plan_round

IDS = ["c00", "c01", "c02", "c03"]
EVIL = "c03"


def _filled(a: LoraAdapter, value: float) -> LoraAdapter:
    return LoraAdapter({m: np.full_like(x, value) for m, x in a.A.items()}, {m: np.full_like(x, value) for m, x in a.B.items()}, a.scale)


def _long_tensor_name(a: LoraAdapter) -> bytes:
    """A valid-looking safetensors file whose one tensor has a 600 kB name (the message quotes it)."""
    data = a.to_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    header["x" * 600_000 + ".lora_A"] = header.pop(next(k for k in header if k != "__metadata__"))
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + data[8 + n:]


def one_round(tmp_path: Path, attack: Any, evil: tuple[str, ...] = (EVIL,), rnd: int = 0, ranks: tuple[int, ...] = (2, 4, 8, 8),
              **strategy: Any) -> tuple[Any, st.Store, dict[str, Any]]:
    """Rounds 0..rnd with honest uploads, except that in round ``rnd`` each client of ``evil`` uploads
    ``attack(honest_adapter, manifest_fields, rank)`` -> (adapter or raw bytes, manifest fields)."""
    cfg = cfg_of(tmp_path, len(IDS), list(ranks), strategy=strategy)
    store = st.LocalStore(tmp_path)
    man: dict[str, Any] = {}
    for r in range(rnd + 1):
        man = round_of(cfg, store, r, attack if r == rnd else None, evil)
    return cfg, store, man


def round_of(cfg: Any, store: st.Store, r: int, attack: Any, evil: tuple[str, ...]) -> dict[str, Any]:
    plan = plan_round(cfg, store, IDS, r)
    for c in plan.clients:
        a: LoraAdapter | bytes = honest(c.rank, 10 * r + int(c.client_id[1:]))
        fields: dict[str, Any] = {"num_samples": 5, "train_loss": 2.5}
        if attack is not None and c.client_id in evil:
            a, fields = attack(a, fields, c.rank)
        st.put_artifact(store, st.client_prefix("s", r, c.client_id), a if isinstance(a, bytes) else a.to_bytes(), fields)
    return aggregate(cfg, store, plan)


def assert_dropped(man: dict[str, Any], *needles: str, who: tuple[str, ...] = (EVIL,)) -> None:
    TALLY.add("honest_uploads_lost", len([c for c in IDS if c not in who and c not in man["participants"]]))  # counted, then asserted 0
    assert sorted(man["dropped"]) == sorted(who) and man["participants"] == [c for c in IDS if c not in who], man["dropped"]
    for c in who:
        why = man["dropped"][c]
        assert f"clients/{c}" in why and all(n in why for n in needles), why


def committed(store: st.Store, cfg: Any, rnd: int) -> LoraAdapter:
    return load_global(cfg, store, rnd + 1, None)  # the global clients receive in rnd + 1


def assert_finite_global(store: st.Store, cfg: Any, rnd: int) -> None:
    g = committed(store, cfg, rnd)
    assert all(np.isfinite(x).all() for x in [*g.A.values(), *g.B.values()])


# ---------------------------------------------------------------- part 3: uploads must match the plan


@pytest.mark.attack
def test_finite_poisoned_upload_is_dropped_not_committed(tmp_path: Path) -> None:
    """Before: all values 1e30 (finite, valid) were aggregated at weight ~1.0 and committed."""
    cfg, store, man = one_round(tmp_path, lambda a, f, r: (_filled(a, 1e30), f))
    assert_dropped(man, "update norm per rank component", "strategy.norm_ratio=10", "median")
    assert_finite_global(store, cfg, 0)
    assert math.sqrt(sum(v * v for v in committed(store, cfg, 0).delta_norms().values())) < 1.0


@pytest.mark.attack
def test_client_uploading_above_its_planned_rank_is_dropped(tmp_path: Path) -> None:
    """A rank-2 client uploading rank 8 (in round 1, against the committed global)."""
    cfg, store, man = one_round(tmp_path, lambda a, f, r: (honest(8, 99), f), rnd=1, ranks=(8, 8, 8, 2))
    assert_dropped(man, "rank 8 is outside [r_min, r_max] = [1, 2]", "layers.0.q_proj")
    assert man["clients"][EVIL]["rank"] == 2  # keeps its planned rank, not the one it sent


@pytest.mark.attack
def test_huge_integer_num_samples_is_dropped(tmp_path: Path) -> None:
    """Before: OverflowError out of the weights (int -> float)."""
    _, _, man = one_round(tmp_path, lambda a, f, r: (a, {**f, "num_samples": 10**400}))
    assert_dropped(man, "num_samples must be a positive integer", "at most")


@pytest.mark.attack
@pytest.mark.parametrize("norm_ratio", [10.0, None])
def test_1e20_upload_under_recon_svd_never_raises(norm_ratio: float | None, tmp_path: Path) -> None:
    """Before: LinAlgError out of the SVD. Dropped by the default norm ratio; without it, the round
    commits a finite global (the SVD of float64 sums copes) rather than raising."""
    e20 = np.random.default_rng(1)

    def attack(a: LoraAdapter, f: dict[str, Any], r: int) -> tuple[LoraAdapter, dict[str, Any]]:
        return LoraAdapter({m: (1e20 * e20.standard_normal(x.shape)).astype(np.float32) for m, x in a.A.items()},
                           {m: (1e20 * e20.standard_normal(x.shape)).astype(np.float32) for m, x in a.B.items()}, a.scale), f

    cfg, store, man = one_round(tmp_path, attack, name="recon_svd", norm_ratio=norm_ratio)
    if norm_ratio:
        assert_dropped(man, "strategy.norm_ratio=10")
    else:
        assert EVIL in man["participants"]
    assert_finite_global(store, cfg, 0)


@pytest.mark.attack
def test_two_oversized_strings_cannot_overflow_the_global_manifest(tmp_path: Path) -> None:
    """Before: two 600 kB tensor names, quoted in the drop reasons, pushed the global manifest past
    its 1 MiB limit and the commit failed for everyone. Reasons are capped now."""
    cfg, store, man = one_round(tmp_path, lambda a, f, r: (_long_tensor_name(a), f), evil=("c00", EVIL))
    assert_dropped(man, "modules with A but no B", "characters)", who=("c00", EVIL))
    assert all(len(w) <= MAX_REASON + 40 for w in man["dropped"].values())
    assert len(store.get_bytes(st.global_prefix("s", 0) + "/" + st.MANIFEST)) < 20_000


@pytest.mark.attack
def test_oversized_precision_strings_are_dropped(tmp_path: Path) -> None:
    _, _, man = one_round(tmp_path, lambda a, f, r: (a, {**f, "precision": {"device": "x" * 5000, "dtype": "y" * 5000}}))
    assert_dropped(man, "manifest field precision has a bad value")


@pytest.mark.attack
@pytest.mark.parametrize("loss", ["1.5", None, [1], {"a": 1}, float("nan"), float("inf"), True])
def test_non_numeric_train_loss_is_dropped_and_results_still_collect(loss: Any, tmp_path: Path) -> None:
    """Before: a string train_loss committed, then broke results.json collection for the experiment."""
    cfg, store, man = one_round(tmp_path, lambda a, f, r: (a, {**f, "train_loss": loss}))
    assert_dropped(man, "manifest field train_loss has a bad value")
    res = collect_results(cfg, store)
    assert json.dumps(res, allow_nan=False) and res["rounds"][0]["train_loss"] == pytest.approx(2.5)


@pytest.mark.attack
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_values_are_dropped_naming_the_tensor(value: float, tmp_path: Path) -> None:
    def attack(a: LoraAdapter, f: dict[str, Any], r: int) -> tuple[LoraAdapter, dict[str, Any]]:
        a.A["layers.1.q_proj"][0, 3] = value
        return a, f

    _, _, man = one_round(tmp_path, attack, rnd=1)
    assert_dropped(man, "layers.1.q_proj.lora_A: contains NaN or Inf")


@pytest.mark.parametrize("spec, needle", [
    ({**SPEC, "layers.0.q_proj": (24, 8)}, "does not match the base model's 24 x 16"),
    ({k: v for k, v in SPEC.items() if k != "layers.1.q_proj"}, "missing module(s) ['layers.1.q_proj']"),
    ({**SPEC, "layers.2.q_proj": (24, 16)}, "unknown module(s) ['layers.2.q_proj']"),
])
@pytest.mark.attack
def test_module_set_or_shape_mismatch_is_dropped(spec: dict[str, tuple[int, int]], needle: str, tmp_path: Path) -> None:
    _, _, man = one_round(tmp_path, lambda a, f, r: (honest(r, 5, spec), f), rnd=1)
    assert_dropped(man, needle)


# ---------------------------------------------------------------- part 4: robust aggregation


def test_norm_outliers_in_small_rounds_and_with_a_zero_median() -> None:
    ones = dict.fromkeys("abcd", 1.0)

    def drop(norms: dict[str, float], ranks: dict[str, float] | None = None, floor: float | None = None) -> list[str]:
        return sorted(norm_outliers({c: {"update": v} for c, v in norms.items()}, ranks or ones, 10.0,
                                    {"update": floor} if floor is not None else None))

    assert lower_median([3.0, 1.0]) == 1.0 and lower_median([4.0, 1.0, 2.0, 3.0]) == 2.0
    assert drop({"a": 1.0}) == []  # alone: its own median
    assert drop({"a": 1.0, "b": 1e6}) == []  # two clients, nothing trusted: two values cannot say which one lies
    assert drop({"a": 1.0, "b": 1e6}, floor=1.0) == ["b"]  # the previous global's norms can
    assert drop({"a": 1.0, "b": 1e-9}, floor=1.0) == []  # a tiny upload cannot lower the reference below them
    assert drop({"a": 1.0, "b": 1e-9, "c": 1.0}) == []  # ...nor, among three, below the honest median
    assert drop({"a": 1.0, "b": 9.0}, floor=1.0) == []  # within the ratio: kept, both ways
    assert drop({"a": 1.0, "b": 2.0, "c": 1e6}) == ["c"]
    assert drop({"a": 1.0, "b": 2.0, "c": 1e6, "d": 1e6}) == ["c", "d"]  # half poisoned cannot lift the median
    assert drop({"a": 0.0, "b": 0.0, "c": 0.0}) == []  # round 0, nobody moved: nobody dropped
    assert drop({"a": 0.0, "b": 0.0, "c": 1e-9}) == []  # a zero median does not drop a tiny positive norm
    assert drop({"a": 0.0, "b": 0.0, "c": 1e-9, "d": 1.0}) == ["d"]  # ...nor lets everything through
    assert drop({"a": 1.0, "b": float("nan")}, floor=1.0) == ["b"]
    # per rank component: a rank-64 client with 8x the norm of rank-1 clients is not an outlier
    assert drop({"a": 1.0, "b": 1.0, "c": 8.0}, {"a": 1, "b": 1, "c": 64}) == []
    assert norm_outliers({"a": {"update": 1.0}, "b": {"update": 1e9}}, ones, None) == {}  # null disables


@pytest.mark.attack
@pytest.mark.parametrize("rnd", [0, 1])
def test_a_tiny_upload_cannot_get_the_honest_client_of_a_two_client_round_dropped(rnd: int, tmp_path: Path) -> None:
    """Review finding: with two clients the lower median was the attacker's tiny norm, so the honest
    client was "ten times the median" and dropped, and the attacker's update committed alone. The
    reference is floored by the server's own global now (round 0: the seeded initial A)."""
    ids = IDS[:2]
    cfg = cfg_of(tmp_path, 2, [8, 8])
    store = st.LocalStore(tmp_path)
    man: dict[str, Any] = {}
    for r in range(rnd + 1):
        plan = plan_round(cfg, store, ids, r)
        for c in plan.clients:
            a = honest(c.rank, 10 * r + int(c.client_id[1:]))
            if r == rnd and c.client_id == ids[1]:
                a = _filled(a, 1e-12)
            st.put_artifact(store, st.client_prefix("s", r, c.client_id), a.to_bytes(), {"num_samples": 5})
        man = aggregate(cfg, store, plan)
    TALLY.add("honest_uploads_lost", int(ids[0] not in man["participants"]))
    assert ids[0] in man["participants"], man["dropped"]


@pytest.mark.attack
def test_factor_rebalancing_is_caught_by_the_factor_norms(tmp_path: Path) -> None:
    """A x 1e3, B / 1e3: ||s B A|| is unchanged (the product check cannot see it), but A then enters
    the factor average at 1e3 x its size; the norm of A gives it away."""
    _, _, man = one_round(tmp_path, lambda a, f, r: (LoraAdapter({m: x * 1e3 for m, x in a.A.items()},
                                                                 {m: x * 1e-3 for m, x in a.B.items()}, a.scale), f))
    assert_dropped(man, "norm of A per rank component", "strategy.norm_ratio=10")


@pytest.mark.attack
def test_a_global_that_overflows_fails_the_round_and_keeps_the_previous_one(tmp_path: Path) -> None:
    """Two clients near float32's limit under Recon+SVD (norm ratio off): their weighted B A overflows
    float32 once refactored. The round fails naming the round and the reason; round 0's global is
    untouched and nothing of round 1 is written."""
    def attack(a: LoraAdapter, f: dict[str, Any], r: int) -> tuple[LoraAdapter, dict[str, Any]]:
        return _filled(a, 3e38), f

    cfg, store, _ = one_round(tmp_path, None, evil=(), name="recon_svd", norm_ratio=None)
    before = store.get_bytes(st.global_prefix("s", 0) + "/" + st.MANIFEST)
    with pytest.raises(RoundRejected, match=r"round 1: the aggregated global is not committed: \d+ non-finite value"):
        round_of(cfg, store, 1, attack, ("c02", EVIL))
    assert store.get_bytes(st.global_prefix("s", 0) + "/" + st.MANIFEST) == before
    assert store.list(st.global_prefix("s", 1)) == []
    assert_finite_global(store, cfg, 0)


def test_check_global_rejects_a_norm_far_above_every_client() -> None:
    ok = [np.ones((2, 2), np.float32)]
    check_global(3, ok, 5.0, 1.0, 10.0)  # within 10x the largest client
    check_global(3, ok, 50.0, 1.0, None)  # no ratio: only finiteness
    with pytest.raises(RoundRejected, match=r"round 3: .* update norm 50 is more than strategy.norm_ratio=10 times"):
        check_global(3, ok, 50.0, 1.0, 10.0)
    with pytest.raises(RoundRejected, match="round 3: .*1 non-finite value"):
        check_global(3, [np.array([1.0, np.inf], np.float32)], 1.0, 1.0, None)


@pytest.mark.parametrize("bad", [1, 0.5, -3, float("nan")])
def test_norm_ratio_validation_names_the_bad_value(bad: float) -> None:
    with pytest.raises(ConfigError, match=f"strategy.norm_ratio: must be .*got {bad}"):
        config_from_dict({"strategy": {"norm_ratio": bad}})
    assert config_from_dict({"strategy": {"norm_ratio": None}}).strategy.norm_ratio is None
    assert config_from_dict({}).strategy.norm_ratio == 10.0


def test_results_collect_from_a_global_manifest_committed_before_the_checks(tmp_path: Path) -> None:
    """A global manifest written before client fields were type-checked may hold a string train_loss
    (the issue's probe): collection leaves it out instead of failing for the whole experiment."""
    cfg, store, man = one_round(tmp_path, None, evil=())
    prefix = st.global_prefix("s", 0)
    data, _ = st.get_artifact(store, prefix)
    reports = {**man["client_reports"], EVIL: {**man["client_reports"][EVIL], "train_loss": "NaN", "bytes_up": "x"}}
    st.put_artifact(store, prefix, data, {k: v for k, v in man.items() if k not in ("object", "sha256", "size")} | {"client_reports": reports})
    res = collect_results(cfg, store)
    assert res["rounds"][0]["train_loss"] == pytest.approx(2.5) and json.dumps(res, allow_nan=False)


def test_a_run_recorded_before_norm_ratio_resumes_only_without_it(tmp_path: Path) -> None:
    """Runs recorded before strategy.norm_ratio existed aggregated every upload; resuming one under
    today's default would switch mid-run: refused, with the fix (as for pruning.form)."""
    from hetlora_core.config import HetLoRAConfig, replace
    from hetlora_core.run import RunConfigMismatch, check_or_record_config

    store = st.LocalStore(str(tmp_path))
    now = HetLoRAConfig()
    old = now.to_dict()
    del old["strategy"]["norm_ratio"]
    st.put_json(store, st.config_key(now.experiment), old)
    with pytest.raises(RunConfigMismatch, match=r"resumes with --set strategy.norm_ratio=null"):
        check_or_record_config(now, store)
    check_or_record_config(replace(now, **{"strategy.norm_ratio": None}), store)  # the hint works
    del old["pruning"]["form"]  # recorded before both settings: one hint naming both, working the first time
    st.put_json(store, st.config_key(now.experiment), old)
    with pytest.raises(RunConfigMismatch, match=r"resumes with --set pruning.form=loss --set strategy.norm_ratio=null"):
        check_or_record_config(now, store)
    check_or_record_config(replace(now, **{"strategy.norm_ratio": None, "pruning.form": "loss"}), store)


@pytest.mark.attack
def test_full_fine_tuning_outlier_is_dropped_too(tmp_path: Path) -> None:
    """The norm ratio is the method's: full fine-tuning compares the norms of the weight deltas."""
    from hetlora_core.methods import method_for

    cfg = config_from_dict({"experiment": "m", "store": {"root": str(tmp_path)}, "data": {"num_clients": 4},
                            "strategy": {"name": "full_ft"}, "federation": {"clients_per_round": 4, "quorum": 0.5}})
    method, store = method_for(cfg), st.LocalStore(tmp_path)
    plan = plan_round(cfg, store, IDS, 0)
    for i, c in enumerate(IDS):
        d = {"w": np.full((3, 4), 1e6 if c == EVIL else 1.0 + i, np.float32)}
        st.put_artifact(store, st.client_prefix("m", 0, c), method.encode(d), {"num_samples": 10})
    man = aggregate(cfg, store, plan)
    assert_dropped(man, "update norm per rank component", "strategy.norm_ratio=10")
