"""Shared bits of the benchmark scripts: machine facts, timing, a plain-text table, the JSON file.

Every benchmark reports ratios against a baseline measured in the same run, with baseline and
candidate interleaved repetition by repetition, and takes medians: the machine is shared, so
absolute times drift with other jobs' load while ratios measured side by side stay meaningful.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench-out"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def native_bf16() -> bool:
    """Whether this CPU has bf16 matmul units (AVX512-BF16 or AMX). Without them PyTorch's CPU bf16
    matmul falls back to slow kernels (measured 10-50x slower than float32 on an AVX2 EPYC)."""
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


def machine() -> dict[str, Any]:
    import torch

    model = ""
    try:
        model = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                      if ln.startswith("model name")), "")
    except OSError:
        pass
    flags = cpu_flags()
    return {
        "nproc": os.cpu_count(), "cpu": model or platform.processor(), "load_avg": list(os.getloadavg()),
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "avx2": "avx2" in flags, "avx512f": "avx512f" in flags, "avx512_bf16": "avx512_bf16" in flags,
        "amx_bf16": "amx_bf16" in flags, "python": platform.python_version(),
    }


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1e4 else f"{v:,.0f}"
        return str(v)

    cells = [[fmt(v) for v in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    out = [line, "  ".join("-" * w for w in widths)]
    # every row has one cell per header: a longer or shorter row is a caller bug, not a column to drop
    out += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(out)


def write(name: str, result: dict[str, Any], out_dir: str | Path | None = None) -> Path:
    """bench-out/NAME.json (or NAME-quick.json), with the machine facts at start and end."""
    out = Path(out_dir) if out_dir else OUT
    out.mkdir(parents=True, exist_ok=True)
    result.setdefault("machine", machine())
    result["machine"]["load_avg_end"] = list(os.getloadavg())
    result["command"] = " ".join([Path(sys.executable).name, *sys.argv])
    path = out / f"{name}.json"
    path.write_text(json.dumps(result, indent=1, sort_keys=True))
    print(f"\nwrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    return path
