"""Server aggregation time against the number of clients, per strategy, as a ratio to a
memory-bandwidth baseline: numpy summing the very same client bytes (one in-place add per client).

    .venv/bin/python benchmarks/bench_aggregation.py            # 10, 100, 1000 clients
    .venv/bin/python benchmarks/bench_aggregation.py --quick    # 10, 100 clients, 4 layers, 2 repetitions

Shapes are SmolLM2-135M's q/v LoRA modules: 30 layers x (q_proj 576 x 576, v_proj 192 x 576; --quick: 4 layers),
client ranks uniform in [2, 16], r_max 16 (1000 clients hold ~2.1 GB of float32 factors). Every
client's A and B tensors are views into one flat buffer per client, and the baseline adds those
buffers, so the baseline reads exactly the bytes the strategies read. Repetitions interleave the
baseline and each strategy; medians are reported.

Also timed, to locate the cost: HetLoRA's two parts (sparsity weights = ||B_k A_k||_F per client
and module, via r x r Gram matrices; factor averaging, one weighted add per client tensor through a
reused scratch buffer -- both were proposals measured here first, now project code), and one
*proposed* replacement that is not project code: ``recon_concat`` (Recon+SVD's sum of dW_k as one
GEMM [w_k B_k]_k @ [A_k]_k per module).

Aggregation is numpy (the aggregate step loads no torch); ``--threads`` sets numpy's BLAS threads,
which OpenBLAS reads once, when numpy loads -- so it is applied before the first numpy import.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

_pre = argparse.ArgumentParser(add_help=False)
_pre.add_argument("--threads", type=int, default=1)
THREADS = _pre.parse_known_args()[0].threads
if THREADS:
    os.environ["OPENBLAS_NUM_THREADS"] = str(THREADS)

import numpy as np  # noqa: E402
from _common import machine, median, table, timed, write  # noqa: E402

from hetlora_core.adapter import LoraAdapter  # noqa: E402
from hetlora_core.config import StrategyConfig  # noqa: E402
from hetlora_core.strategies import ClientUpdate, aggregate, average_factors, client_weights, svd_factor  # noqa: E402

LAYERS, HIDDEN, KV, R_MIN, R_MAX, SCALE = 30, 576, 192, 2, 16, 2.0


def shapes(layers: int = LAYERS) -> dict[str, tuple[int, int]]:
    """(out, in) of every q/v module of SmolLM2-135M (or its first ``layers`` layers)."""
    return {f"model.layers.{i}.self_attn.{p}": (o, HIDDEN) for i in range(layers) for p, o in (("q_proj", HIDDEN), ("v_proj", KV))}

STRATEGIES = ("hetlora", "zero_pad", "recon_svd")


def make_clients(n: int, layers: int = LAYERS, seed: int = 0) -> tuple[list[ClientUpdate], list[np.ndarray], LoraAdapter]:
    """n clients with mixed ranks; A/B are views into one flat float32 buffer per client."""
    shp = shapes(layers)
    g = np.random.default_rng(seed)
    ranks = g.integers(R_MIN, R_MAX + 1, n).tolist()
    updates, flats = [], []
    for k, r in enumerate(ranks):
        size = sum(r * i + o * r for o, i in shp.values())
        flat = g.standard_normal(size, np.float32) * 0.02
        A, B, off = {}, {}, 0
        for m, (o, i) in shp.items():
            A[m] = flat[off:off + r * i].reshape(r, i)
            off += r * i
            B[m] = flat[off:off + o * r].reshape(o, r)
            off += o * r
        updates.append(ClientUpdate(f"c{k:04d}", LoraAdapter(A, B, SCALE), 100 + k % 50))
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


# ------------------------------------------------------------------ proposed (not project code)


def recon_concat(updates: list[ClientUpdate], prev: LoraAdapter) -> LoraAdapter:
    """Recon+SVD with dW = [w_k s B_k]_k @ [A_k]_k: one GEMM per module instead of K products."""
    n = np.array([u.num_samples for u in updates], dtype=np.float64)
    w = n / n.sum()
    A_g, B_g = {}, {}
    for m in prev.modules:
        Bc = np.concatenate([u.adapter.B[m] * (wk * u.adapter.scale) for wk, u in zip(w, updates, strict=True)], 1)
        Ac = np.concatenate([u.adapter.A[m] for u in updates], 0).astype(np.float64)
        A_g[m], B_g[m] = svd_factor(Bc @ Ac, R_MAX, prev.scale)
    return LoraAdapter(A_g, B_g, prev.scale)


# ------------------------------------------------------------------ driver


def bench_size(n: int, reps: int, max_s: float, with_proposed: bool, layers: int = LAYERS,
               only: list[str] | None = None) -> dict:
    updates, flats, prev = make_clients(n, layers)
    nbytes = sum(f.nbytes for f in flats)
    cfgs = {s: StrategyConfig(name=s) for s in STRATEGIES}
    het = cfgs["hetlora"]
    cases = {"numpy_sum": lambda: numpy_sum(flats)}
    cases |= {s: (lambda s=s: aggregate(prev, updates, cfgs[s], R_MAX)) for s in STRATEGIES}
    p, _ = client_weights(updates, het)
    cases["hetlora:weights"] = lambda: client_weights(updates, het)
    cases["hetlora:averaging"] = lambda: average_factors(prev, updates, p, het, R_MAX)
    if with_proposed:
        cases["proposed:recon_concat"] = lambda: recon_concat(updates, prev)
        # the proposal computes the same numbers (checked once, outside the timing)
        a, _ = aggregate(prev, updates[:5], cfgs["recon_svd"], R_MAX)
        b = recon_concat(updates[:5], prev)
        m0 = prev.modules[0]
        assert np.allclose(a.delta(m0), b.delta(m0), atol=1e-6)
    if only:
        cases = {k: v for k, v in cases.items() if k == "numpy_sum" or k in only}
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="10 and 100 clients, 4 of the 30 layers, 2 repetitions")
    ap.add_argument("--layers", type=int, help=f"transformer layers of q/v modules (default {LAYERS}, quick 4)")
    ap.add_argument("--sizes", type=int, nargs="+", help="numbers of clients (default 10 100 1000)")
    ap.add_argument("--reps", type=int, help="repetitions per case (default 3, quick 2)")
    ap.add_argument("--max-seconds", type=float, default=20.0, help="a case whose first run exceeds this is not repeated")
    ap.add_argument("--no-proposed", action="store_true", help="skip timing the proposed replacements")
    ap.add_argument("--cases", nargs="+", help="time only these cases (numpy_sum always runs), e.g. hetlora:averaging")
    ap.add_argument("--threads", type=int, default=1,
                    help="numpy BLAS threads (default 1, like numpy's add; 0: OpenBLAS's default). With 2 threads on a "
                         "loaded 2-core VM, the SVD ran 15-40x slower than with one (spin-waiting threads)")
    ap.add_argument("--out", default=None, help="output folder (default bench-out/)")
    args = ap.parse_args()
    sizes = args.sizes or ([10, 100] if args.quick else [10, 100, 1000])
    reps = args.reps or (2 if args.quick else 3)
    layers = args.layers or (4 if args.quick else LAYERS)
    info = machine()
    results = []
    for n in sizes:
        r = bench_size(n, reps, args.max_seconds, not args.no_proposed, layers, args.cases)
        results.append(r)
        print(f"\n{n} clients, {layers} layers, {r['bytes'] / 1e6:.1f} MB of float32 factors (mean rank {r['mean_rank']:.1f}):")
        print(table(["case", "ms", "ratio vs numpy sum", "GB/s", "reps"],
                    [[k, v["ms"], v["ratio_vs_numpy"], v["GBps"], v["reps"]] for k, v in r["cases"].items()]))
    write("aggregation-quick" if args.quick else "aggregation",
          {"bench": "aggregation", "quick": args.quick, "reps": reps, "machine": info, "results": results,
           "shapes": f"SmolLM2-135M q/v: {layers} layers x (576x576, 192x576); ranks U[2,16], r_max 16",
           "layers": layers, "threads": THREADS}, args.out)


if __name__ == "__main__":
    main()
