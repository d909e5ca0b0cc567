"""Size rank tiers from measurement: peak memory and step time of local training per rank.

Each rank is measured in a fresh subprocess (so peak RSS is that of one client task: imports,
model, data, training; on CUDA also the peak GPU memory torch allocated, which sizes a GPU tier's
card: the pod's memory request stays host RSS), and the tier table gets requests = measured peak and limits = peak x
headroom, rounded up to 256 MiB, with the command that made it quoted in the output."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from typing import Any

import yaml

from .config import HetLoRAConfig

_CHILD = r"""
import json, resource, sys, time
import torch
from hetlora_core.config import config_from_dict
from hetlora_core import runtime
from hetlora_core.adapter import init_global
from hetlora_core.peft_bridge import spec_from_model
from hetlora_core.client import train_lora
from hetlora_core.precision import resolve
cfg = config_from_dict(json.loads(sys.argv[1])); rank = int(sys.argv[2]); steps = int(sys.argv[3])
prec = resolve(cfg); cuda = prec.device == "cuda"
m = runtime.model(cfg); client = next(iter(runtime.clients(cfg).values()))
g = init_global(spec_from_model(m, cfg.model.target_modules), cfg.ranks.r_max, cfg.model.lora_scale, 0)
train_lora(m, g.truncate(rank), client, cfg, 0)  # warm-up (allocations, autocast caches)
if cuda:
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
t = time.perf_counter(); res = train_lora(m, g.truncate(rank), client, cfg, 1)
if cuda:
    torch.cuda.synchronize()
dt = time.perf_counter() - t
print(json.dumps({"rank": rank, "step_seconds": dt / steps, "tokens_per_second": res.num_tokens / dt,
                  "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "peak_gpu_bytes": torch.cuda.max_memory_allocated() if cuda else None,
                  "precision": prec.as_dict()}))
"""


def measure_rank(cfg: HetLoRAConfig, rank: int, steps: int = 3) -> dict[str, Any]:
    """Peak RSS and step time of ``steps`` local steps at ``rank`` (in a fresh process)."""
    data = cfg.to_dict()
    data["training"] = {**data["training"], "local_steps": steps}
    out = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(data, default=list), str(rank), str(steps)],
                         capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"measuring rank {rank} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _mib(nbytes: float, headroom: float) -> str:
    return f"{int(math.ceil(nbytes * headroom / 2**20 / 256) * 256)}Mi"


def tier_table(cfg: HetLoRAConfig, measurements: dict[int, dict[str, Any]], headroom: float = 1.5,
               cpu: str = "1", cpu_limit: str = "2") -> list[dict[str, Any]]:
    """Tier entries for the config with resources from measurement (YAML-ready dicts)."""
    rows = []
    for t in cfg.ranks.tiers:
        m = measurements[t.rank]
        row = {k: v for k, v in t.__dict__.items()}
        row.update(memory_request=_mib(m["peak_rss_bytes"], 1.0), memory_limit=_mib(m["peak_rss_bytes"], headroom),
                   cpu_request=cpu, cpu_limit=cpu_limit, tolerations=list(t.tolerations))
        rows.append(row)
    return rows


def render(cfg: HetLoRAConfig, measurements: dict[int, dict[str, Any]], rows: list[dict[str, Any]], command: str) -> str:
    lines = [f"# Tier resources measured by: {command}",
             f"# model {cfg.model.name}, batch {cfg.training.batch_size} x seq {cfg.data.seq_len}"]
    prec = next((m["precision"] for m in measurements.values() if m.get("precision")), None)
    if prec:
        lines.append(f"# precision: {prec['device']} {prec['dtype']} ({prec['reason']})")
    for r, m in sorted(measurements.items()):
        gpu = f"peak GPU {m['peak_gpu_bytes'] / 2**20:,.0f} MiB, " if m.get("peak_gpu_bytes") is not None else ""
        lines.append(f"#   rank {r:>3}: {gpu}peak RSS {m['peak_rss_bytes'] / 2**20:,.0f} MiB, "
                     f"{m['step_seconds']:.2f} s/step, {m['tokens_per_second']:,.0f} tokens/s")
    return "\n".join(lines) + "\n" + yaml.safe_dump({"ranks": {"tiers": rows}}, sort_keys=False)
