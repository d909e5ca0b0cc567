"""Tier sizing from measurement."""

from __future__ import annotations

import yaml

from hetlora_core.config import config_from_dict, load_config
from hetlora_core.tiers import measure_rank, render, tier_table


def test_tier_table_uses_peak_and_headroom():
    cfg = load_config("configs/smoke.yaml")
    meas = {r: {"rank": r, "peak_rss_bytes": (1000 + 100 * r) * 2**20, "step_seconds": 0.1 * r, "tokens_per_second": 100.0}
            for r in (2, 4, 8)}
    rows = tier_table(cfg, meas, headroom=2.0)
    large = next(r for r in rows if r["name"] == "large")
    assert large["memory_request"] == "2048Mi"  # 1800 MiB rounded up to 256 MiB steps
    assert large["memory_limit"] == "3840Mi"  # 3600 MiB rounded up
    text = render(cfg, meas, rows, "hetlora tiers measure -c configs/smoke.yaml")
    assert text.startswith("# Tier resources measured by: hetlora tiers measure")
    parsed = yaml.safe_load(text)
    again = config_from_dict({"ranks": {"r_min": 2, "r_max": 8, "tiers": parsed["ranks"]["tiers"]}})
    assert [t.memory_limit for t in again.ranks.tiers] == [r["memory_limit"] for r in rows]


def test_measure_rank_runs_a_real_training_subprocess():
    cfg = load_config("configs/smoke.yaml")
    m = measure_rank(cfg, 4, steps=1)
    assert m["rank"] == 4 and m["peak_rss_bytes"] > 100 * 2**20 and m["step_seconds"] > 0
    # CPU: no GPU figure; the decision taken in the child is reported (CI has no CUDA)
    assert m["peak_gpu_bytes"] is None and m["precision"]["device"] == "cpu"


def test_render_reports_gpu_peak_per_rank():
    cfg = load_config("configs/smoke.yaml")
    prec = {"device": "cuda", "dtype": "bfloat16", "quantize": "none", "reason": "device cuda: CUDA available"}
    meas = {r: {"rank": r, "peak_rss_bytes": 2**30, "peak_gpu_bytes": r * 100 * 2**20, "step_seconds": 0.1,
                "tokens_per_second": 1e4, "precision": prec} for r in (2, 4, 8)}
    text = render(cfg, meas, tier_table(cfg, meas), "cmd")
    assert "# precision: cuda bfloat16" in text
    assert "rank   8: peak GPU 800 MiB, peak RSS 1,024 MiB" in text
