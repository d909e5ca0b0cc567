"""One federated round through the pipeline (kfp.local + the real MinIO) against the same round
in-process (hetlora simulate, local store), as a ratio from one run of each.

    .venv/bin/python benchmarks/bench_pipeline_overhead.py            # default config (SmolLM2)
    .venv/bin/python benchmarks/bench_pipeline_overhead.py --quick    # configs/smoke.yaml (tiny)
    .venv/bin/python benchmarks/bench_pipeline_overhead.py --set training.local_steps=12  # more work

Both runs use the same config and seeds and must produce the same global adapter (checked). The
model and tokenised data are cached on disk before timing, so neither side pays the one-time GGUF
conversion. Two baselines, both timed in this run:
  * in-process, warm: ``simulate`` inside this process, model already in memory (the pure compute);
  * in-process, cold: ``hetlora simulate`` as a fresh process (what a user runs: imports and model
    load once).
The pipeline pays a process start, imports (kfp, torch; transformers + peft in train/evaluate) and a
model load in every task, i.e. a fixed cost per task: the JSON reports it per task, so the ratio can
be read for any amount of work per client. Target from the project's issue: ratio <= 1.15."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from hetlora_kfp.pipelines.runners import run_local  # noqa: E402
from minio_server import MinioServer, find_minio  # noqa: E402

from hetlora_core import runtime  # noqa: E402
from hetlora_core import store as st  # noqa: E402
from hetlora_core.cli import parse_sets  # noqa: E402
from hetlora_core.config import load_config, replace  # noqa: E402
from hetlora_core.simulate import simulate  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny model (configs/smoke.yaml)")
    ap.add_argument("--config", default=None, help="config file (default: embedded defaults, or smoke with --quick)")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="config override (repeatable), e.g. training.local_steps=12")
    ap.add_argument("--out", default=str(ROOT / "bench-out"), help="where the JSON result goes")
    ap.add_argument("--name", default="pipeline_overhead", help="JSON file name (without .json)")
    args = ap.parse_args()
    cfg = load_config(args.config or (ROOT / "configs/smoke.yaml" if args.quick else None), parse_sets(tuple(args.sets)))
    cfg = replace(cfg, **{"federation.rounds": 1, "experiment": "bench-overhead"})
    n_tasks = 2 * cfg.federation.clients_per_round + 2  # train + prune per client, aggregate, evaluate
    runtime.clients(cfg), runtime.model(cfg)  # warm the on-disk caches (model, tokens)
    binary = find_minio()
    if binary is None:
        sys.exit("MinIO binary missing: run scripts/setup.sh tools")
    server = MinioServer(binary)
    server.start()
    os.environ["HETLORA_S3_ACCESS_KEY"], os.environ["HETLORA_S3_SECRET_KEY"] = server.access_key, server.secret_key
    try:
        with tempfile.TemporaryDirectory() as tmp:
            t = time.perf_counter()
            simulate(cfg, Path(tmp) / "inproc", progress=False)
            inproc = time.perf_counter() - t
            cfg_file = Path(tmp) / "cfg.json"
            cfg_file.write_text(cfg.to_json())
            t = time.perf_counter()
            subprocess.run([sys.executable, "-m", "hetlora_kfp.pipelines.cli", "simulate", "-c", str(cfg_file),
                            "--out", str(Path(tmp) / "cold")], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
            cold = time.perf_counter() - t
            s3 = replace(cfg, **{"store.kind": "s3", "store.endpoint": server.endpoint, "store.bucket": server.bucket})
            t = time.perf_counter()
            run_local(s3, Path(tmp) / "kfp")
            pipe = time.perf_counter() - t
            a, _ = st.get_artifact(st.LocalStore(Path(tmp) / "inproc" / "store"), st.global_prefix(cfg.experiment, 0))
            b, _ = st.get_artifact(st.open_store(s3.store), st.global_prefix(cfg.experiment, 0))
    finally:
        server.close()
    res = {"config": args.config or ("configs/smoke.yaml" if args.quick else "defaults"), "model": cfg.model.name,
           "sets": args.sets, "local_steps": cfg.training.local_steps, "batch_size": cfg.training.batch_size,
           "clients_per_round": cfg.federation.clients_per_round, "tasks": n_tasks, "in_process_s": inproc,
           "in_process_cold_s": cold, "pipeline_s": pipe, "ratio": pipe / inproc, "ratio_vs_cold": pipe / cold,
           "overhead_per_task_s": (pipe - inproc) / n_tasks, "same_global_bytes": a == b,
           "nproc": os.cpu_count(), "load_avg": os.getloadavg()}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"{args.name}.json").write_text(json.dumps(res, indent=1))
    print(f"one round, {cfg.model.name}, {cfg.federation.clients_per_round} clients x {cfg.training.local_steps} steps: "
          f"in-process {inproc:.1f} s (cold process {cold:.1f} s), kfp.local + MinIO {pipe:.1f} s ({n_tasks} tasks); "
          f"ratio {pipe / inproc:.2f} vs warm, {pipe / cold:.2f} vs cold (target <= 1.15); "
          f"fixed cost {(pipe - inproc) / n_tasks:.1f} s per task; same global: {a == b}")


if __name__ == "__main__":
    main()
