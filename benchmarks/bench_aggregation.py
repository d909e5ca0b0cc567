"""Server aggregation against the number of clients, per strategy, as a ratio to a memory-bandwidth
baseline (numpy summing the very same client bytes), and the aggregate step's peak memory.

    .venv/bin/python benchmarks/bench_aggregation.py            # 10, 100, 1000 clients, 30 layers
    .venv/bin/python benchmarks/bench_aggregation.py --quick    # 10, 100, 1000 clients, 4 layers, 2 repetitions

Shapes are SmolLM2-135M's q/v LoRA modules: 30 layers x (q_proj 576 x 576, v_proj 192 x 576; --quick: 4 layers),
client ranks uniform in [2, 16], r_max 16 (1000 clients hold ~2.1 GB of float32 factors at 30 layers).

**Time** (library code, in this process). Every client's A and B tensors are views into one flat
buffer per client, and the baseline adds those buffers (one ``np.add`` per client into one
accumulator), so it reads exactly the bytes the strategies read. Timed: ``strategies.aggregate``
for hetlora, zero_pad and recon_svd (the grouped paths; hetlora measures its sparsity weights on the
averaging's own chunk stacks, one pass), and HetLoRA's two halves apart: the sparsity weights alone
(``client_weights``: ``||B_k A_k||_F`` per client and module, r x r Gram form, as the aggregate step's
first pass computes them) and the factor averaging with given weights (``average_factors``: one
stacked reduction per module and rank group). Repetitions
interleave the baseline and each case; medians are reported; a case whose first run exceeds
``--max-seconds`` is not repeated at that size. ``--compare DIR`` adds ``<strategy>@before``: the
same ``aggregate`` call of another checkout's ``hetlora_core`` (e.g. main's tree from ``git archive``),
loaded beside this one as a second package, on the same client arrays, interleaved in the same
repetitions: on a shared machine that cancels most of the load that separate runs would see.

**Memory** (the aggregate step, a fresh process per size). For each number of clients N, a
LocalStore in a temporary folder gets a round plan and N HetLoRA uploads of the same shapes and
ranks; then a fresh interpreter runs ``hetlora_core.steps.aggregate.aggregate_task`` (what the KFP
aggregate task runs) and reports its peak RSS (VmHWM), its peak RSS after the imports, and the
step's seconds. The step reads the uploads twice and holds one group at a time, so the peak should
not grow with N. ``--code DIR`` measures the step of another checkout (e.g. an older commit's tree)
on the same uploads.

Aggregation is numpy (the aggregate step loads no torch); ``--threads`` sets numpy's BLAS threads,
which OpenBLAS reads once, when numpy loads -- so it is applied before the first numpy import, and
passed to the step's subprocess.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

_pre = argparse.ArgumentParser(add_help=False)
_pre.add_argument("--threads", type=int, default=1)
THREADS = _pre.parse_known_args()[0].threads
if THREADS:
    os.environ["OPENBLAS_NUM_THREADS"] = str(THREADS)

import numpy as np  # noqa: E402
from _common import ROOT, machine, median, table, timed, write  # noqa: E402

from hetlora_core.adapter import LoraAdapter  # noqa: E402
from hetlora_core.config import StrategyConfig  # noqa: E402
from hetlora_core.strategies import ClientUpdate, aggregate, average_factors, client_weights  # noqa: E402

LAYERS, HIDDEN, KV, R_MIN, R_MAX, SCALE = 30, 576, 192, 2, 16, 2.0


def shapes(layers: int = LAYERS) -> dict[str, tuple[int, int]]:
    """(out, in) of every q/v module of SmolLM2-135M (or its first ``layers`` layers)."""
    return {f"model.layers.{i}.self_attn.{p}": (o, HIDDEN) for i in range(layers) for p, o in (("q_proj", HIDDEN), ("v_proj", KV))}

STRATEGIES = ("hetlora", "zero_pad", "recon_svd")


def client_ranks(n: int, seed: int = 0) -> tuple[np.random.Generator, list[int]]:
    g = np.random.default_rng(seed)
    return g, [int(r) for r in g.integers(R_MIN, R_MAX + 1, n)]


def one_client(g: np.random.Generator, r: int, shp: dict[str, tuple[int, int]]) -> tuple[LoraAdapter, np.ndarray]:
    """A rank-``r`` adapter whose A/B are views into one flat float32 buffer (returned too)."""
    size = sum(r * i + o * r for o, i in shp.values())
    flat = g.standard_normal(size, np.float32) * 0.02
    A, B, off = {}, {}, 0
    for m, (o, i) in shp.items():
        A[m] = flat[off:off + r * i].reshape(r, i)
        off += r * i
        B[m] = flat[off:off + o * r].reshape(o, r)
        off += o * r
    return LoraAdapter(A, B, SCALE), flat


def make_clients(n: int, layers: int = LAYERS, seed: int = 0) -> tuple[list[ClientUpdate], list[np.ndarray], LoraAdapter]:
    """n clients with mixed ranks; A/B are views into one flat float32 buffer per client."""
    shp = shapes(layers)
    g, ranks = client_ranks(n, seed)
    updates, flats = [], []
    for k, r in enumerate(ranks):
        a, flat = one_client(g, r, shp)
        updates.append(ClientUpdate(f"c{k:04d}", a, 100 + k % 50))
        flats.append(flat)
    prev = LoraAdapter({m: np.zeros((R_MAX, i), np.float32) for m, (o, i) in shp.items()},
                       {m: np.zeros((o, R_MAX), np.float32) for m, (o, i) in shp.items()}, SCALE)
    return updates, flats, prev


def numpy_sum(flats: list[np.ndarray]) -> np.ndarray:
    """The memory-bandwidth floor: read every client byte once, add into one accumulator."""
    acc = np.zeros(max(f.size for f in flats), dtype=np.float32)
    for f in flats:
        np.add(acc[:f.size], f, out=acc[:f.size])
    return acc


# ------------------------------------------------------------------ time


def load_other(code: Path) -> Any:
    """``hetlora_core`` of another checkout as the package ``hetlora_core_before`` (its modules import
    each other relatively, so they bind to that copy, not to this checkout's)."""
    spec = importlib.util.spec_from_file_location("hetlora_core_before", code / "hetlora_core" / "__init__.py",
                                                  submodule_search_locations=[str(code / "hetlora_core")])
    if spec is None or spec.loader is None:
        raise SystemExit(f"--compare: no hetlora_core package under {code}")
    pkg = importlib.util.module_from_spec(spec)
    sys.modules["hetlora_core_before"] = pkg
    spec.loader.exec_module(pkg)
    return pkg


def other_cases(code: Path, updates: list[ClientUpdate], prev: LoraAdapter) -> dict[str, Any]:
    """``<strategy>@before``: the other checkout's ``aggregate`` on the same arrays, wrapped in its
    own classes (methods such as ``delta_norms`` must be its own)."""
    load_other(code)
    import importlib

    ad, st, cf = (importlib.import_module(f"hetlora_core_before.{m}") for m in ("adapter", "strategies", "config"))
    ups = [st.ClientUpdate(u.client_id, ad.LoraAdapter(u.adapter.A, u.adapter.B, u.adapter.scale), u.num_samples) for u in updates]
    old_prev = ad.LoraAdapter(prev.A, prev.B, prev.scale)
    return {f"{s}@before": (lambda s=s: st.aggregate(old_prev, ups, cf.StrategyConfig(name=s), R_MAX)) for s in STRATEGIES}


def bench_size(n: int, reps: int, max_s: float, layers: int = LAYERS, only: list[str] | None = None,
               compare: Path | None = None) -> dict:
    updates, flats, prev = make_clients(n, layers)
    nbytes = sum(f.nbytes for f in flats)
    cfgs = {s: StrategyConfig(name=s) for s in STRATEGIES}
    het = cfgs["hetlora"]
    cases = {"numpy_sum": lambda: numpy_sum(flats)}
    cases |= {s: (lambda s=s: aggregate(prev, updates, cfgs[s], R_MAX)) for s in STRATEGIES}
    if compare is not None:
        cases |= other_cases(compare, updates, prev)
    p, _ = client_weights(updates, het)
    cases["hetlora:weights"] = lambda: client_weights(updates, het)
    cases["hetlora:averaging"] = lambda: average_factors(prev, updates, p, het, R_MAX)
    if only:
        cases = {k: v for k, v in cases.items() if k == "numpy_sum" or k in only or k.split("@")[0] in only and "@" in k}
    times: dict[str, list[float]] = {k: [] for k in cases}
    for rep in range(reps):  # interleaved: every case once per repetition
        for name, fn in cases.items():
            if rep > 0 and times[name] and times[name][0] > max_s:
                continue  # too slow to repeat at this size; one measurement is reported
            times[name].append(timed(fn)[0])
    base = median(times["numpy_sum"])
    rows = {name: {"ms": 1e3 * median(t), "reps": len(t), "ratio_vs_numpy": median(t) / base,
                   "GBps": nbytes / median(t) / 1e9} for name, t in times.items()}
    return {"clients": n, "bytes": nbytes, "mean_rank": sum(u.adapter.rank for u in updates) / n, "cases": rows,
            "raw_s": times}


# ------------------------------------------------------------------ memory of the aggregate step

# Peak RSS is read as VmHWM from /proc/self/status, not ru_maxrss: on Linux ru_maxrss survives
# fork + exec, so a child started from this (large) process would report this process's RSS.
STEP = r"""
import json, sys, time
def kb(field):
    return next(int(ln.split()[1]) for ln in open("/proc/self/status") if ln.startswith(field + ":"))
from hetlora_core.steps.aggregate import aggregate_task
rss0 = kb("VmHWM")
t = time.perf_counter()
out = json.loads(aggregate_task(sys.argv[1], 0, []))
print(json.dumps({"peak_rss_kb": kb("VmHWM"), "import_rss_kb": rss0, "seconds": time.perf_counter() - t,
                  "participants": len(out["participants"]), "dropped": out["dropped"]}))
"""


def step_rss(n: int, layers: int, code: Path, tmp: Path) -> dict:
    """Write a plan and n uploads to a LocalStore under ``tmp``, run the aggregate step of ``code``
    over them in a fresh interpreter, return its memory figures."""
    from hetlora_core import store as st
    from hetlora_core.config import config_from_dict
    from hetlora_core.steps.plan import plan_round

    g, ranks = client_ranks(n)
    ids = [f"c{k:04d}" for k in range(n)]
    cfg = config_from_dict({"experiment": "rss", "store": {"root": str(tmp)}, "model": {"lora_scale": SCALE},
                            "ranks": {"r_min": R_MIN, "r_max": R_MAX, "assignment": "explicit", "explicit": ranks},
                            "data": {"num_clients": n}, "federation": {"clients_per_round": n, "quorum": 1.0}})
    store = st.open_store(cfg.store)
    plan = plan_round(cfg, store, ids, 0)
    shp, nbytes = shapes(layers), 0
    for c in plan.clients:  # one upload in memory at a time
        data = one_client(g, c.rank, shp)[0].to_bytes()
        nbytes += len(data)
        st.put_artifact(store, st.client_prefix("rss", 0, c.client_id), data, {"num_samples": 100 + int(c.client_id[1:]) % 50})
    env = {**os.environ, "PYTHONPATH": str(code)}  # OPENBLAS_NUM_THREADS as set above
    proc = subprocess.run([sys.executable, "-c", STEP, cfg.to_json()], cwd=code, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"aggregate step failed for {n} clients:\n{proc.stderr[-3000:]}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    if res["participants"] != n:
        raise RuntimeError(f"aggregate step dropped clients: {res['dropped']}")
    return {"clients": n, "upload_bytes": nbytes, **res}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="4 of the 30 layers, 2 repetitions")
    ap.add_argument("--layers", type=int, help=f"transformer layers of q/v modules (default {LAYERS}, quick 4)")
    ap.add_argument("--sizes", type=int, nargs="+", help="numbers of clients (default 10 100 1000)")
    ap.add_argument("--reps", type=int, help="repetitions per case (default 3, quick 2)")
    ap.add_argument("--max-seconds", type=float, default=20.0, help="a case whose first run exceeds this is not repeated")
    ap.add_argument("--cases", nargs="+", help="time only these cases (numpy_sum always runs), e.g. hetlora:averaging")
    ap.add_argument("--no-time", action="store_true", help="skip the timing part")
    ap.add_argument("--no-rss", action="store_true", help="skip the aggregate step's peak-memory part")
    ap.add_argument("--compare", type=Path, help="also time this checkout's aggregate (cases <strategy>@before), interleaved")
    ap.add_argument("--code", type=Path, default=ROOT,
                    help="checkout whose aggregate step the memory part runs (default: this one)")
    ap.add_argument("--threads", type=int, default=1,
                    help="numpy BLAS threads (default 1, like numpy's add; 0: OpenBLAS's default). With 2 threads on a "
                         "loaded 2-core VM, the SVD ran 15-40x slower than with one (spin-waiting threads)")
    ap.add_argument("--name", help="output name (default aggregation, or aggregation-quick)")
    ap.add_argument("--out", default=None, help="output folder (default bench-out/)")
    args = ap.parse_args()
    sizes = args.sizes or [10, 100, 1000]
    reps = args.reps or (2 if args.quick else 3)
    layers = args.layers or (4 if args.quick else LAYERS)
    info = machine()
    results, rss = [], []
    if not args.no_time:
        for n in sizes:
            r = bench_size(n, reps, args.max_seconds, layers, args.cases, args.compare.resolve() if args.compare else None)
            results.append(r)
            print(f"\n{n} clients, {layers} layers, {r['bytes'] / 1e6:.1f} MB of float32 factors (mean rank {r['mean_rank']:.1f}):")
            print(table(["case", "ms", "ratio vs numpy sum", "GB/s", "reps"],
                        [[k, v["ms"], v["ratio_vs_numpy"], v["GBps"], v["reps"]] for k, v in r["cases"].items()]))
    if not args.no_rss:
        for n in sizes:
            with tempfile.TemporaryDirectory(prefix="bench-agg-rss-") as tmp:
                rss.append(step_rss(n, layers, args.code.resolve(), Path(tmp)))
        print(f"\naggregate step (hetlora, {layers} layers), a fresh process per size, code {args.code.resolve()}:")
        print(table(["clients", "uploads MB", "RSS after imports MB", "peak RSS MB", "step s"],
                    [[r["clients"], r["upload_bytes"] / 1e6, r["import_rss_kb"] / 1024, r["peak_rss_kb"] / 1024, r["seconds"]]
                     for r in rss]))
    write(args.name or ("aggregation-quick" if args.quick else "aggregation"),
          {"bench": "aggregation", "quick": args.quick, "reps": reps, "machine": info, "results": results, "step_rss": rss,
           "shapes": f"SmolLM2-135M q/v: {layers} layers x (576x576, 192x576); ranks U[2,16], r_max 16",
           "layers": layers, "threads": THREADS, "code": str(args.code.resolve()),
           "compare": str(args.compare.resolve()) if args.compare else None}, args.out)


if __name__ == "__main__":
    main()
