"""One federated round through the pipeline (kfp.local + the real MinIO) against the same round
in-process (hetlora simulate, local store), as a ratio from one run of each.

    .venv/bin/python benchmarks/bench_pipeline_overhead.py            # default config (SmolLM2)
    .venv/bin/python benchmarks/bench_pipeline_overhead.py --quick    # configs/smoke.yaml (tiny)

Both runs use the same config and seeds and must produce the same global adapter (checked). The
model and tokenised data are cached before timing, so neither side pays the one-time GGUF load.
Target from the project's issue: ratio <= 1.15."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from minio_server import MinioServer, find_minio  # noqa: E402

from hetlora_core import runtime  # noqa: E402
from hetlora_core import store as st  # noqa: E402
from hetlora_core.config import load_config, replace  # noqa: E402
from hetlora_core.simulate import simulate  # noqa: E402
from hetlora_kfp.pipelines.driver import run_local  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny model (configs/smoke.yaml)")
    ap.add_argument("--config", default=None, help="config file (default: embedded defaults, or smoke with --quick)")
    ap.add_argument("--out", default=str(ROOT / "bench-out"), help="where the JSON result goes")
    args = ap.parse_args()
    cfg = load_config(args.config or (ROOT / "configs/smoke.yaml" if args.quick else None))
    cfg = replace(cfg, **{"federation.rounds": 1, "experiment": "bench-overhead"})
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
            s3 = replace(cfg, **{"store.kind": "s3", "store.endpoint": server.endpoint, "store.bucket": server.bucket})
            t = time.perf_counter()
            run_local(s3, Path(tmp) / "kfp")
            pipe = time.perf_counter() - t
            a, _ = st.get_artifact(st.LocalStore(Path(tmp) / "inproc" / "store"), st.global_prefix(cfg.experiment, 0))
            b, _ = st.get_artifact(st.open_store(s3.store), st.global_prefix(cfg.experiment, 0))
    finally:
        server.close()
    res = {"config": args.config or ("configs/smoke.yaml" if args.quick else "defaults"), "model": cfg.model.name,
           "clients_per_round": cfg.federation.clients_per_round, "in_process_s": inproc, "pipeline_s": pipe,
           "ratio": pipe / inproc, "same_global_bytes": a == b, "nproc": os.cpu_count(), "load_avg": os.getloadavg()}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "pipeline_overhead.json").write_text(json.dumps(res, indent=1))
    print(f"one round, {cfg.model.name}, {cfg.federation.clients_per_round} clients: in-process {inproc:.1f} s, "
          f"kfp.local + MinIO {pipe:.1f} s, ratio {pipe / inproc:.2f} (target <= 1.15); same global: {a == b}")


if __name__ == "__main__":
    main()
