"""Training tokens/s with ``model.dtype: auto`` against float32 (and bf16 explicitly) on this machine,
and the model FLOP utilisation against this machine's measured matmul peak of each dtype.

    .venv/bin/python benchmarks/bench_precision.py          # SmolLM2-135M, batch 8 x 128, rank 16, q/v
    .venv/bin/python benchmarks/bench_precision.py --quick  # the tiny Llama

``auto`` is what hetlora_core.precision decides here (printed with its reason). On a CPU without
native bf16 (no amx_bf16/avx512_bf16) auto is float32, so bf16 is also timed explicitly: that
ratio is why auto chose float32. Each dtype runs the real client path (``train_lora``), warm-up
first, the dtypes interleaved repetition by repetition; medians. FLOPs per step are counted once
(FlopCounterMode over forward + backward of the peft-wrapped model: the same work in every dtype)
and divided by the step time; the peak is the best square matmul in that dtype (bench_flops.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from _common import ROOT, machine, median, table, write  # noqa: E402
from bench_flops import matmul_peak  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from hetlora_core import peft_bridge, precision, runtime  # noqa: E402
from hetlora_core.adapter import init_global  # noqa: E402
from hetlora_core.client import train_lora  # noqa: E402
from hetlora_core.config import load_config, replace  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny Llama, batch 4 x 32, matmuls up to 512")
    ap.add_argument("--batch", type=int, help="default 8 (quick 4)")
    ap.add_argument("--seq", type=int, help="sequence length (default 128, quick 32)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=2, help="local steps per timed update")
    ap.add_argument("--reps", type=int, help="timed updates per dtype, interleaved (default 3, quick 2)")
    ap.add_argument("--bf16-reps", type=int, help="timed updates of explicit bf16 (default: --reps). 1: no warm-up "
                    "either (emulated bf16 on an AVX2 CPU takes minutes per SmolLM2 step; a warm-up's < 1 s does not matter)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-n", type=int, help="largest peak matmul (default 2048, quick 512)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    batch, seq = args.batch or (4 if args.quick else 8), args.seq or (32 if args.quick else 128)
    reps, max_n = args.reps or (2 if args.quick else 3), args.max_n or (512 if args.quick else 2048)
    torch.set_num_threads(args.threads)

    base = load_config(ROOT / "configs/smoke.yaml" if args.quick else None, {
        "data.seq_len": seq, "data.num_clients": 2, "federation.clients_per_round": 1,
        "data.eval_max_tokens": max(seq, 256), "training.batch_size": batch, "training.local_steps": args.steps,
        "training.bf16": None, "training.threads": args.threads, "ranks.r_max": max(16, args.rank),
        "ranks.assignment": "uniform", "model.device": "cpu"})
    auto = precision.resolve(base)
    cfgs = {name: replace(base, **{"model.dtype": dt}) for name, dt in
            (("auto", "auto"), ("float32", "float32"), ("bfloat16", "bfloat16"))}
    dtype_of = {name: precision.resolve(c).dtype for name, c in cfgs.items()}
    model, client = runtime.model(base), next(iter(runtime.clients(base).values()))
    received = init_global(peft_bridge.spec_from_model(model, base.model.target_modules), args.rank, base.model.lora_scale, 0)

    pm = peft_bridge.attach(model, received)  # FLOPs of one step, counted on the model the client runs
    try:
        x = client.train_ids[: batch * seq].reshape(batch, seq)
        pm.train()
        with FlopCounterMode(display=False) as fc:
            pm(input_ids=x, labels=x).loss.backward()
        flops = fc.get_total_flops()
        pm.eval()
    finally:
        peft_bridge.detach(pm)

    peak = {dt: matmul_peak(getattr(torch, dt), max_n)["gflops"] for dt in ("float32", "bfloat16")}
    bf16_reps = args.bf16_reps or reps
    for n, c in cfgs.items():  # warm-up (allocations, autocast caches)
        if not (n == "bfloat16" and bf16_reps == 1):
            train_lora(model, received, client, replace(c, **{"training.local_steps": 1}), 0)
    times: dict[str, list[float]] = {n: [] for n in cfgs}
    for i in range(reps):
        for n, c in cfgs.items():
            if n != "bfloat16" or i < bf16_reps:
                times[n].append(train_lora(model, received, client, c, 0).seconds / args.steps)
    peak = {dt: max(v, matmul_peak(getattr(torch, dt), max_n)["gflops"]) for dt, v in peak.items()}  # best of before/after

    tokens = batch * seq
    rows, per = [], {}
    for n in cfgs:
        step = median(times[n])
        dt = dtype_of[n]
        per[n] = {"dtype": dt, "step_seconds": step, "tokens_per_s": tokens / step, "achieved_gflops": flops / step / 1e9,
                  "mfu_vs_own_peak": flops / step / 1e9 / peak[dt], "step_seconds_all": times[n]}
        rows.append([n if n == dt else f"{n} (= {dt})", tokens / step, flops / step / 1e9, peak[dt], per[n]["mfu_vs_own_peak"]])
    res = {
        "bench": "precision", "quick": args.quick, "model": base.model.name, "batch": batch, "seq_len": seq, "rank": args.rank,
        "threads": args.threads, "steps": args.steps, "reps": reps, "bf16_reps": bf16_reps, "flops_per_step_counted": flops,
        "auto_decision": auto.as_dict(), "peak_gflops": peak, "by_dtype": per,
        "auto_vs_float32": per["auto"]["tokens_per_s"] / per["float32"]["tokens_per_s"],
        "bf16_vs_float32": per["bfloat16"]["tokens_per_s"] / per["float32"]["tokens_per_s"],
        "machine": machine(),
    }
    print(f"\n{base.model.name}, batch {batch} x {seq}, rank {args.rank}, {args.threads} thread(s); "
          f"auto -> {auto.device} {auto.dtype}: {auto.reason}")
    print(table(["dtype", "tokens/s", "GFLOP/s", "peak GFLOP/s", "MFU"], rows))
    print(f"auto / float32 tokens/s: {res['auto_vs_float32']:.2f}x; bf16 / float32: {res['bf16_vs_float32']:.3f}x")
    write("precision-quick" if args.quick else "precision", res, args.out)


if __name__ == "__main__":
    main()
