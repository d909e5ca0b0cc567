"""Client training and evaluation throughput with the vocabulary cut to the corpus' tokens
(``model.vocab: corpus``) against SmolLM2's full vocabulary, as ratios from one run.

    .venv/bin/python benchmarks/bench_vocab.py            # SmolLM2, the bench profile's shapes
    .venv/bin/python benchmarks/bench_vocab.py --quick    # the tiny Llama, seconds

Both arms run the real client code (``client.train_lora``) and ``evaluation.evaluate`` on the same
client text, adapter and seeds; they differ only in ``model.vocab``. Repetitions alternate
A, B, A, B, ... and medians are compared (the machine is shared). The output layer is about a fifth
of SmolLM2's forward FLOPs (576 x 49,152 per token), so the expected gain is bounded by that share.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from _common import ROOT, machine, median, table, timed, write  # noqa: E402

from hetlora_core import runtime  # noqa: E402
from hetlora_core.adapter import init_global  # noqa: E402
from hetlora_core.client import train_lora  # noqa: E402
from hetlora_core.config import load_config  # noqa: E402
from hetlora_core.evaluation import evaluate  # noqa: E402
from hetlora_core.peft_bridge import spec_from_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny Llama (configs/smoke.yaml)")
    ap.add_argument("--reps", type=int, default=3, help="A/B pairs")
    ap.add_argument("--steps", type=int, default=4, help="local steps per train_lora call")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: robust on a shared 2-core VM)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    src = ROOT / "configs/smoke.yaml" if args.quick else None
    over = {"training.batch_size": args.batch, "training.local_steps": args.steps, "training.threads": args.threads,
            "ranks.r_max": max(args.rank, 2), "ranks.assignment": "uniform", "data.num_clients": 2,
            "federation.clients_per_round": 1}
    cfgs = {v: load_config(src, {**over, "model.vocab": v}) for v in ("full", "corpus")}
    models = {v: runtime.model(c) for v, c in cfgs.items()}
    data = {v: next(iter(runtime.clients(c).values())) for v, c in cfgs.items()}
    received = init_global(spec_from_model(models["full"], cfgs["full"].model.target_modules), args.rank,
                           cfgs["full"].model.lora_scale, 0)
    for v in cfgs:  # warm-up: allocator, peft import paths
        train_lora(models[v], received, data[v], cfgs[v], 0)
    train_tps: dict[str, list[float]] = {"full": [], "corpus": []}
    eval_tps: dict[str, list[float]] = {"full": [], "corpus": []}
    for rep in range(args.reps):
        for v in (("full", "corpus") if rep % 2 == 0 else ("corpus", "full")):
            r = train_lora(models[v], received, data[v], cfgs[v], 0)
            train_tps[v].append(r.num_tokens / r.seconds)
            s, ev = timed(functools.partial(evaluate, models[v], received, [data[v]], cfgs[v]))  # binds this v
            eval_tps[v].append(ev.tokens / s)
            print(f"  rep {rep} {v:>6}: train {train_tps[v][-1]:8.1f} tok/s, eval {eval_tps[v][-1]:8.1f} tok/s", flush=True)
    tf, tc = median(train_tps["full"]), median(train_tps["corpus"])
    ef, ec = median(eval_tps["full"]), median(eval_tps["corpus"])
    res = {"bench": "vocab", "quick": args.quick, "model": cfgs["full"].model.name,
           "vocab_full": models["full"].config.vocab_size, "vocab_corpus": models["corpus"].config.vocab_size,
           "batch": args.batch, "seq_len": cfgs["full"].data.seq_len, "rank": args.rank, "steps": args.steps,
           "threads": args.threads, "reps": args.reps, "train_tokens_per_s": {"full": tf, "corpus": tc},
           "eval_tokens_per_s": {"full": ef, "corpus": ec}, "train_ratio": tc / tf, "eval_ratio": ec / ef,
           "raw": {"train": train_tps, "eval": eval_tps}, "machine": machine()}
    print(f"\n{res['model']}: vocabulary {res['vocab_full']:,} -> {res['vocab_corpus']:,} tokens; batch {args.batch} x "
          f"{res['seq_len']}, rank {args.rank}, {args.threads} thread(s), {args.reps} A/B pairs")
    print(table(["", "full vocab tok/s", "corpus vocab tok/s", "speed-up"],
                [["training", tf, tc, tc / tf], ["evaluation", ef, ec, ec / ef]]))
    write("vocab-quick" if args.quick else "vocab", res, args.out)


if __name__ == "__main__":
    main()
