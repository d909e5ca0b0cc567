"""Every benchmark script still runs (its --quick variant, tiny model) and writes its JSON with the
ratio it exists to report. The numbers themselves are not asserted: they are measurements."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import skip_or_fail
from minio_server import find_minio

ROOT = Path(__file__).resolve().parents[1]
# script -> (JSON file it writes, keys that must hold a positive number)
EXPECTED = {
    "bench_aggregation.py": ("aggregation-quick.json", []),
    "bench_attach.py": ("attach-quick.json", ["ratio", "inject_s", "kept_s"]),
    "bench_bytes.py": ("bytes-quick.json", []),
    "bench_cluster.py": ("cluster.json", ["up_s", "rss_total_mb"]),
    "bench_eval.py": ("eval-quick.json", ["ratio", "chunked_ratio", "per_client_s", "batched_whole_s", "batched_s"]),
    "bench_flops.py": ("flops-quick.json", ["ratio_vs_peak_train_dtype", "step_seconds"]),
    "bench_pipeline_overhead.py": ("pipeline_overhead.json", ["ratio", "ratio_vs_cold", "in_process_cold_s"]),
    "bench_precision.py": ("precision-quick.json", ["auto_vs_float32", "bf16_vs_float32"]),
    "bench_pruning_form.py": ("pruning_form-quick.json", []),
    "bench_regulariser.py": ("regulariser-quick.json", ["ratio"]),
    "bench_task_startup.py": ("task_startup-quick.json", ["interpreter_s", "model_free_s", "model_s", "warm_s"]),
    "bench_threads.py": ("threads-quick.json", ["ratio"]),
    "bench_upload_path.py": ("upload_path-quick.json", ["ratio", "kept_ratio", "before_s", "now_s", "kept_s", "floor_s"]),
    "bench_vocab.py": ("vocab-quick.json", ["train_ratio", "eval_ratio"]),
}


def test_every_benchmark_is_covered() -> None:
    assert {p.name for p in (ROOT / "benchmarks").glob("bench_*.py")} == set(EXPECTED)


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(EXPECTED))
def test_benchmark_quick_variant_runs(script: str, tmp_path: Path) -> None:
    name, keys = EXPECTED[script]
    if script == "bench_pipeline_overhead.py" and find_minio() is None:
        skip_or_fail("MinIO server binary not found: run scripts/setup.sh tools")
    if script == "bench_cluster.py":
        from real_cluster import missing_prerequisites

        if why := missing_prerequisites():  # a running cluster: the benchmark waits or says why (RealCluster.claim)
            skip_or_fail(f"real cluster unavailable: {why}")
    extra = {"bench_flops.py": ["--chunks", "64"],  # its loss chunk variants run too
             "bench_pipeline_overhead.py": ["--also", "started", "cli"]}.get(script, [])  # and its like-for-like arms
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--quick", "--out", str(tmp_path), *extra],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    res = json.loads((tmp_path / name).read_text())
    for k in keys:
        assert isinstance(res[k], float) and res[k] > 0, (k, res.get(k))
    if script == "bench_pipeline_overhead.py":
        assert res["same_global_bytes"] is True  # the pipeline computed what simulate computed
        assert set(res["same_by_mode"]) == {"cold", "warm", "warm-started", "cli"}  # every arm ran and agreed
        assert res["baseline_by_mode"]["cli"] == "in-process, cold process"
    if script == "bench_flops.py":  # every training-step variant timed; the headline figure is the defaults'
        compiled = "defaults + compiled decoder layers" in res["variants"]
        assert compiled == (res["compile_seconds"] is not None) != bool(res["compile_error"])  # timed, or why not
        assert len(res["variants"]) == 6 + compiled and all(v["step_seconds"] > 0 for v in res["variants"].values())
        assert "defaults, 64-token loss chunks" in res["variants"]
        assert res["step_seconds"] == res["variants"]["defaults (all three)"]["step_seconds"]
        # the matmul floor replays the defaults' products: about the counted FLOPs, less time than the step
        assert 0.9 < res["matmul_floor_flops"] / res["flops_per_step_counted"] < 1.1
        assert 0 < res["matmul_floor_seconds"] < res["step_seconds"] and res["ratio_ceiling_vs_peak_train_dtype"] > 0
    if script == "bench_task_startup.py":
        assert res["model_free_torch_free"] is True  # the model-free tasks' start-up never pays for torch
