"""Client training throughput (tokens/s) with vs without HetLoRA's tail regulariser, as a ratio
from one run (target >= 0.95), on the real SmolLM2-135M.

    .venv/bin/python benchmarks/bench_regulariser.py            # SmolLM2, batch 8 x 128, rank 16, q/v
    .venv/bin/python benchmarks/bench_regulariser.py --quick    # the tiny Llama, seconds

Both arms run ``hetlora_core.client.train_lora`` (the real client code path: peft attach, AdamW
steps, extract, detach) on the same client, adapter and batches; they differ only in
``pruning.enabled``. Repetitions alternate A, B, A, B, ... and the medians are compared.

End-to-end tokens/s on a shared machine is noisy (a few %), far noisier than the regulariser's
cost, so the script also times the regulariser alone (forward + backward over the live peft
tensors, averaged over many calls) and reports the ratio it implies: step / (step + reg).

dtype: ``--dtype auto`` (default) uses bf16 autocast only where the CPU has bf16 matmul units
(AVX512-BF16 or AMX); elsewhere bf16 autocast made a SmolLM2 step ~10x slower than float32
(an AVX2 EPYC: 117-177 s vs 10-15 s for 4 x 64 tokens), so float32 is what a client would run.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from _common import ROOT, machine, median, native_bf16, table, write  # noqa: E402

from hetlora_core import peft_bridge, runtime  # noqa: E402
from hetlora_core.adapter import init_global  # noqa: E402
from hetlora_core.client import train_lora  # noqa: E402
from hetlora_core.config import load_config  # noqa: E402
from hetlora_core.peft_bridge import spec_from_model  # noqa: E402
from hetlora_core.regulariser import regulariser  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny Llama (configs/smoke.yaml), batch 8 x 32")
    ap.add_argument("--reps", type=int, help="A/B pairs (default 3)")
    ap.add_argument("--steps", type=int, help="local steps per train_lora call (default 2, quick 3)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, help="sequence length (default 128, quick 32)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--lam", type=float, default=0.01, help="pruning.lam (the cost does not depend on it)")
    ap.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: on a shared 2-core VM, 2 MKL threads ran a SmolLM2 step 2-3x slower)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    reps, steps = args.reps or 3, args.steps or (3 if args.quick else 2)
    seq = args.seq or (32 if args.quick else 128)
    bf16 = native_bf16() if args.dtype == "auto" else args.dtype == "bf16"
    torch.set_num_threads(args.threads)
    base = load_config(ROOT / "configs/smoke.yaml" if args.quick else None)
    over = {"data.seq_len": seq, "data.num_clients": 2, "federation.clients_per_round": 1, "data.eval_max_tokens": max(seq, 256),
            "training.batch_size": args.batch, "training.local_steps": steps, "training.bf16": bf16,
            "training.threads": args.threads, "training.lr": 1e-3, "pruning.lam": args.lam,
            "ranks.r_max": max(args.rank, base.ranks.r_max), "ranks.assignment": "uniform"}
    if not args.quick:
        over["data.max_chars"] = 20000
    on = load_config(ROOT / "configs/smoke.yaml" if args.quick else None, over)
    off = load_config(ROOT / "configs/smoke.yaml" if args.quick else None, {**over, "pruning.enabled": False})
    model, client = runtime.model(on), next(iter(runtime.clients(on).values()))
    received = init_global(spec_from_model(model, on.model.target_modules), args.rank, on.model.lora_scale, 0)
    g = np.random.default_rng(1)
    received.B = {m: g.standard_normal(b.shape, np.float32) * 0.01 for m, b in received.B.items()}  # mid-training state

    train_lora(model, received, client, off, 0)  # warm-up (allocator, peft import paths, caches)
    tps: dict[str, list[float]] = {"with": [], "without": []}
    for rep in range(reps):  # A/B interleaved; the order alternates to cancel drift within a pair
        for arm in (("with", "without") if rep % 2 == 0 else ("without", "with")):
            r = train_lora(model, received, client, on if arm == "with" else off, 0)
            if arm == "with":
                assert r.reg_loss > 0, "the regulariser did not run"
            tps[arm].append(r.num_tokens / r.seconds)
            print(f"  rep {rep} {arm:>7} regulariser: {tps[arm][-1]:8.1f} tokens/s", flush=True)

    # The regulariser alone, on the live peft tensors, forward + backward.
    pm = peft_bridge.attach(model, received)
    try:
        A, B = peft_bridge.lora_tensors(pm)
        params = peft_bridge.lora_parameters(pm)
        ranks = received.ranks
        n = 20 if not args.quick else 200
        t = time.perf_counter()
        for _ in range(n):
            reg = regulariser(A, B, ranks, on.pruning, on.ranks.r_min)
            reg.backward()
            for p in params:
                p.grad = None
        reg_s = (time.perf_counter() - t) / n
    finally:
        peft_bridge.detach(pm)

    w, wo = median(tps["with"]), median(tps["without"])
    step_s = args.batch * seq / wo
    res = {
        "bench": "regulariser", "quick": args.quick, "model": on.model.name, "batch": args.batch, "seq_len": seq,
        "rank": args.rank, "modules": len(received.modules), "bf16": bf16, "threads": args.threads, "reps": reps,
        "steps_per_call": steps, "tokens_per_s_with": w, "tokens_per_s_without": wo, "ratio": w / wo,
        "raw_tokens_per_s": tps, "regulariser_fwd_bwd_s": reg_s, "step_s_without": step_s,
        "implied_ratio": step_s / (step_s + reg_s), "target": 0.95, "machine": machine(),
    }
    print(f"\n{on.model.name}, batch {args.batch} x {seq}, rank {args.rank}, {len(received.modules)} modules, "
          f"{'bf16 autocast' if bf16 else 'float32'}, {args.threads} thread(s), {reps} A/B pairs of {steps} steps")
    print(table(["", "tokens/s (median)", "ratio", "target"],
                [["without regulariser", wo, 1.0, ""], ["with regulariser", w, w / wo, ">= 0.95"]]))
    print(f"regulariser alone: {reg_s * 1e3:.2f} ms per step (forward + backward) vs {step_s:.2f} s per training step "
          f"-> implied ratio {res['implied_ratio']:.4f}")
    write("regulariser-quick" if args.quick else "regulariser", res, args.out)


if __name__ == "__main__":
    main()
