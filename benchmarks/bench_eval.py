"""Held-out evaluation with every client's text windows batched together (``evaluation.evaluate``)
against one forward pass per client (what it did before), as a ratio of medians from one run.

    .venv/bin/python benchmarks/bench_eval.py            # default config: SmolLM2, 6 clients, 256 tokens each
    .venv/bin/python benchmarks/bench_eval.py --quick    # the tiny Llama, seconds

Both arms run on the same model, adapter (the round-0 global at r_max with random B) and clients;
repetitions alternate the arms and the two perplexities must agree (to 1e-5: rows do not depend on
each other). On a CPU the gain is small (the forwards are compute-bound); on a GPU, where a small
model's forward costs about the same for 4 rows as for 32, it is the point (benchmarks/gpu_check.py
times the gpu profile's 24 clients there).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from _common import ROOT, machine, median, table, timed, write  # noqa: E402

from hetlora_core import peft_bridge, runtime  # noqa: E402
from hetlora_core.adapter import init_global  # noqa: E402
from hetlora_core.config import load_config  # noqa: E402
from hetlora_core.data import Batch, eval_batch  # noqa: E402
from hetlora_core.evaluation import evaluate, nll  # noqa: E402
from hetlora_core.precision import resolve  # noqa: E402


def _rows(x: torch.Tensor | Batch) -> int:
    return int(x.shape[0] if isinstance(x, torch.Tensor) else x.input_ids.shape[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny Llama (configs/smoke.yaml)")
    ap.add_argument("--reps", type=int, default=3, help="repetitions of each arm (interleaved)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: every CPU, as the evaluate step alone)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(ROOT / "configs/smoke.yaml" if args.quick else None, {})
    model, clients = runtime.model(cfg), list(runtime.clients(cfg).values())
    g = init_global(peft_bridge.spec_from_model(model, cfg.model.target_modules), cfg.ranks.r_max, cfg.model.lora_scale, 1)
    g.B = {m: np.random.default_rng(0).standard_normal(b.shape).astype(np.float32) * 0.01 for m, b in g.B.items()}
    prec = resolve(cfg)

    def per_client() -> float:
        pm = peft_bridge.attach(model, g)
        try:
            sums = [nll(pm, eval_batch(c, cfg.data), prec) for c in clients]
        finally:
            peft_bridge.detach(pm)
        return math.exp(sum(s for s, _ in sums) / sum(n for _, n in sums))

    arms = {"per_client": per_client, "batched": lambda: evaluate(model, g, clients, cfg).ppl}
    times: dict[str, list[float]] = {a: [] for a in arms}
    ppl: dict[str, float] = {}
    for fn in arms.values():  # warm-up: peft import paths, allocator
        fn()
    for rep in range(args.reps):
        for a in (list(arms) if rep % 2 == 0 else list(arms)[::-1]):
            s, ppl[a] = timed(arms[a])
            times[a].append(s)
        print(f"  rep {rep}: per-client {times['per_client'][-1]:.2f} s, batched {times['batched'][-1]:.2f} s", flush=True)
    if abs(ppl["batched"] / ppl["per_client"] - 1) > 1e-5:
        raise SystemExit(f"the arms disagree: perplexity {ppl['batched']} batched vs {ppl['per_client']} per client")
    old, new = median(times["per_client"]), median(times["batched"])
    windows = sum(_rows(eval_batch(c, cfg.data)) for c in clients)
    res = {"bench": "eval", "quick": args.quick, "model": cfg.model.name, "clients": len(clients),
           "windows": windows, "seq_len": cfg.data.seq_len, "threads": torch.get_num_threads(), "reps": args.reps,
           "per_client_s": old, "batched_s": new, "ratio": new / old, "ppl": ppl, "raw_s": times, "machine": machine()}
    print(f"\n{res['model']}: {len(clients)} clients, {windows} windows of {cfg.data.seq_len} tokens, "
          f"{res['threads']} thread(s), {args.reps} repetitions per arm; perplexity {ppl['batched']:.4f} both ways")
    print(table(["", "seconds (median)", "ratio"], [["one forward per client", old, 1.0], ["batched", new, new / old]]))
    write("eval-quick" if args.quick else "eval", res, args.out)


if __name__ == "__main__":
    main()
