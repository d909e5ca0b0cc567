"""benchmarks/gpu_check.py (the prepared CUDA/QLoRA check for a GPU machine) runs here in CPU
mode: the same code path up to the CUDA-only steps, which it reports as skipped."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_cpu_mode_writes_its_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setattr(sys, "argv", ["gpu_check.py", "--cpu-only", "--out", str(tmp_path)])
    with pytest.raises(SystemExit) as e:
        mod.main()
    res = json.loads((tmp_path / "gpu_check-cpu.json").read_text())
    assert e.value.code == 0 and res["ok"] is True and res["has_cuda"] is False
    assert res["parity"]["cuda"] == "skipped: no CUDA" and 0 < res["parity"]["cpu_train_loss"] < 20
    assert res["low_precision"] == {"skipped": "no CUDA"} and res["qlora"] == {"skipped": "no CUDA"}
    (row,) = res["throughput"]
    assert row["shape"] == "tiny" and row["tokens_per_s"] > 0 and row["peak_gpu_bytes"] is None
    ev = res["eval_batching"]
    assert ev["clients"] == 6 and ev["per_client_s"] > 0 and ev["batched_s"] > 0 and ev["ppl_rel_diff"] < 1e-5
