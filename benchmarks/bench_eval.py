"""Held-out evaluation (``evaluation.evaluate``) as it runs now, against what it did before, as ratios
of medians from one run:

* every client's text windows batched together against one forward pass per client;
* the output layer a chunk of tokens at a time on the decoder's hidden states (lm_loss.target_logprobs,
  the default) against the model's own logits over whole passes (``training.chunked_loss: false``):
  at SmolLM2's 49,152-token vocabulary a pass of 8 x 128 tokens made ~300 MB of logits and their
  float32 log-softmax, fresh memory that every pass faulted in again.

    .venv/bin/python benchmarks/bench_eval.py            # default config: SmolLM2, 6 clients, 256 tokens each
    .venv/bin/python benchmarks/bench_eval.py --quick    # the tiny Llama, seconds

Every arm runs on the same model, adapter (the round-0 global at r_max with random B) and clients;
repetitions alternate the arms and the perplexities must agree (batched and per client to 1e-5: rows
do not depend on each other; chunked and whole to 1e-3 in bf16, where a product's rounding may
differ with its shape, 1e-5 in float32). On a GPU the batching is the point (a small model's forward
costs about the same for 4 rows as for 32; benchmarks/gpu_check.py times the gpu profile there).
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
from hetlora_core.config import load_config, replace  # noqa: E402
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

    whole = replace(cfg, **{"training.chunked_loss": False})  # the model's own logits over whole passes

    def per_client() -> float:  # before both changes: one forward per client, its own logits
        pm = peft_bridge.attach(model, g)
        try:
            sums = [nll(pm, eval_batch(c, cfg.data), prec, chunked=False) for c in clients]
        finally:
            peft_bridge.detach(pm)
        return math.exp(sum(s for s, _ in sums) / sum(n for _, n in sums))

    arms = {"per_client": per_client, "batched_whole": lambda: evaluate(model, g, clients, whole).ppl,
            "batched": lambda: evaluate(model, g, clients, cfg).ppl}
    times: dict[str, list[float]] = {a: [] for a in arms}
    ppl: dict[str, float] = {}
    for fn in arms.values():  # warm-up: peft import paths, allocator, the chunked path's one check
        fn()
    for rep in range(args.reps):
        for a in (list(arms) if rep % 2 == 0 else list(arms)[::-1]):
            s, ppl[a] = timed(arms[a])
            times[a].append(s)
        print(f"  rep {rep}: " + ", ".join(f"{a} {times[a][-1]:.2f} s" for a in arms), flush=True)
    if abs(ppl["batched_whole"] / ppl["per_client"] - 1) > 1e-5:
        raise SystemExit(f"the arms disagree: perplexity {ppl['batched_whole']} batched vs {ppl['per_client']} per client")
    tol = 1e-5 if prec.dtype == "float32" else 1e-3
    if abs(ppl["batched"] / ppl["batched_whole"] - 1) > tol:
        raise SystemExit(f"the arms disagree: perplexity {ppl['batched']} chunked vs {ppl['batched_whole']} whole logits")
    old, mid, new = (median(times[a]) for a in arms)
    windows = sum(_rows(eval_batch(c, cfg.data)) for c in clients)
    res = {"bench": "eval", "quick": args.quick, "model": cfg.model.name, "clients": len(clients),
           "windows": windows, "seq_len": cfg.data.seq_len, "threads": torch.get_num_threads(), "reps": args.reps,
           "precision": prec.dtype, "per_client_s": old, "batched_whole_s": mid, "batched_s": new, "ratio": new / old,
           "chunked_ratio": new / mid, "ppl": ppl, "raw_s": times, "machine": machine()}
    print(f"\n{res['model']}: {len(clients)} clients, {windows} windows of {cfg.data.seq_len} tokens, "
          f"{res['threads']} thread(s), {prec.dtype}, {args.reps} repetitions per arm; perplexity {ppl['batched']:.4f} "
          f"(whole logits {ppl['batched_whole']:.4f})")
    print(table(["", "seconds (median)", "ratio"], [["one forward per client, whole logits (before)", old, 1.0],
                                                    ["batched, whole logits", mid, mid / old],
                                                    ["batched, output layer in chunks (now)", new, new / old]]))
    write("eval-quick" if args.quick else "eval", res, args.out)


if __name__ == "__main__":
    main()
