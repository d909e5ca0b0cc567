"""Local training FLOP/s of one HetLoRA client against this CPU's measured matmul peak.

    .venv/bin/python benchmarks/bench_flops.py            # SmolLM2-135M, batch 8 x 128, rank 16, q/v
    .venv/bin/python benchmarks/bench_flops.py --quick    # the tiny Llama

* Work per step: counted with ``torch.utils.flop_counter.FlopCounterMode`` over one forward +
  backward of the peft-wrapped model (what the client really executes: the frozen base needs
  input gradients but no weight gradients, so LoRA training is ~4 N FLOPs per token, not the
  6 N of full training); the 6 N T and 4 N T approximations are reported beside it.
* Time per step: ``hetlora_core.client.train_lora`` (the real client path) over several steps, for
  the defaults and, interleaved in the same run, for the path they replaced as the baseline: the
  model's own loss over the whole batch's logits (``training.chunked_loss: false``) and its own
  attention kernel (``model.attention: sdpa``) and the frozen weights cast by autocast in every
  forward, plus each change alone (lm_loss.py, the eager kernel of attention.py, frozen_cast.py).
  ``--seq 512 --batch 2`` / ``--seq 1024 --batch 1`` measure where ``model.attention: auto`` stops
  taking the eager kernel (attention.CPU_EAGER_MAX_LEN).
* ``defaults + compiled decoder layers``: the defaults with every decoder layer wrapped by
  ``torch.compile`` (inductor fuses the norms, RoPE, SiLU, softmax and casts around the products).
  That is ``training.compile: true`` (compiled.py): how far fusing the non-matmul work moves the step,
  at the price of its compile time (reported: the first call, compile + one step, once per process),
  against the matmul floor below. ``--no-compile`` leaves it out; where inductor cannot build (no C++
  compiler) the reason is reported instead.
* Peak: the best of repeated ``torch.matmul`` of large square matrices, in float32 and bf16, with
  the same thread count, measured before and after the training run (the best is the limit).
* Matmul floor (``_matmul_floor.py``): the defaults' step recorded below autograd and each of its
  matrix products replayed alone at its real shapes and strides. ``counted FLOPs / floor / peak`` is
  the ceiling of this step's utilisation on this machine: what it would reach if everything but
  the products took no time. A target above the ceiling is out of reach of any fusion of the rest.

The ratio that matters is achieved FLOP/s / peak in the dtype the client trains in. On CPUs without
bf16 matmul units (no AVX512-BF16/AMX) the bf16 "peak" is far below float32's, and ``--dtype auto``
trains in float32; the bf16 peak is still measured and reported, as asked, for comparison.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from _common import ROOT, machine, native_bf16, table, write  # noqa: E402
from _matmul_floor import floor  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from hetlora_core import attention, compiled, frozen_cast, lm_loss, peft_bridge, runtime  # noqa: E402
from hetlora_core.adapter import init_global  # noqa: E402
from hetlora_core.client import autocast, train_lora  # noqa: E402
from hetlora_core.config import load_config, replace  # noqa: E402


def matmul_peak(dtype: torch.dtype, max_n: int, reps: int = 3, budget_s: float = 1.0) -> dict:
    """Best GFLOP/s of n x n @ n x n; n doubles from 256 while one product takes < budget_s / 4."""
    n, best, sizes = 256, 0.0, {}
    while True:
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        torch.matmul(a, b)  # warm-up
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            torch.matmul(a, b)
            ts.append(time.perf_counter() - t)
        gf = 2 * n ** 3 / min(ts) / 1e9
        sizes[n], best = gf, max(best, gf)
        if n >= max_n or min(ts) > budget_s / 4:
            return {"gflops": best, "by_size": sizes}
        n *= 2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny Llama, batch 8 x 32, matmuls up to 1024")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, help="sequence length (default 128, quick 32)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, help="timed local steps (default 3, quick 5)")
    ap.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto",
                    help="training dtype (auto: bf16 autocast only with AVX512-BF16/AMX)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for both training and the peak (default 1)")
    ap.add_argument("--max-n", type=int, help="largest peak matmul (default 2048, quick 1024)")
    ap.add_argument("--reps", type=int, default=2, help="interleaved repetitions of every variant (median taken)")
    ap.add_argument("--chunks", type=int, nargs="*", default=[], metavar="TOKENS",
                    help="extra variants: the defaults with the chunked loss at TOKENS tokens a chunk (lm_loss.CHUNK_TOKENS)")
    ap.add_argument("--no-compile", action="store_true", help="leave out the compiled-decoder-layers variant")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    seq, steps = args.seq or (32 if args.quick else 128), args.steps or (5 if args.quick else 3)
    max_n = args.max_n or (1024 if args.quick else 2048)
    bf16 = native_bf16() if args.dtype == "auto" else args.dtype == "bf16"
    torch.set_num_threads(args.threads)

    peaks_before = {"fp32": matmul_peak(torch.float32, max_n), "bf16": matmul_peak(torch.bfloat16, max_n)}

    cfg = load_config(ROOT / "configs/smoke.yaml" if args.quick else None, {
        "data.seq_len": seq, "data.num_clients": 2, "federation.clients_per_round": 1,
        "data.eval_max_tokens": max(seq, 256), "training.batch_size": args.batch, "training.local_steps": steps,
        # long windows: roles with enough text that every client holds one (the default 5000-8000 characters do not at 512)
        **({"data.min_chars": 16000, "data.max_chars": 30000} if seq > 256 and not args.quick else {}),
        "training.bf16": bf16, "training.threads": args.threads, "ranks.r_max": max(16, args.rank),
        "ranks.assignment": "uniform"})
    model, client = runtime.model(cfg), next(iter(runtime.clients(cfg).values()))
    received = init_global(peft_bridge.spec_from_model(model, cfg.model.target_modules), args.rank, cfg.model.lora_scale, 0)
    n_base = sum(p.numel() for p in model.parameters())  # tied embeddings counted once (= lm_head)
    n_lora = received.num_params()

    # FLOPs of one training step, counted on the model the client runs.
    pm = peft_bridge.attach(model, received)
    try:
        x = client.train_ids[: args.batch * seq].reshape(args.batch, seq)
        pm.train()
        with FlopCounterMode(display=False) as fc:
            with autocast(cfg):
                loss = pm(input_ids=x, labels=x).loss
            loss.float().backward()
        counted = fc.get_total_flops()
        pm.eval()
    finally:
        peft_bridge.detach(pm)

    before = {"training.chunked_loss": False, "model.attention": "sdpa"}
    variants = {  # name -> (overrides, frozen weights cast once); the first is the baseline, the last the defaults
        "model's loss, sdpa, cast per forward (before)": (before, False),
        "chunked loss only": ({**before, "training.chunked_loss": True}, False),
        "eager attention only": ({**before, "model.attention": "eager"}, False),
        "frozen weights cast once only": (before, True),
        "defaults (all three)": ({"training.chunked_loss": True, "model.attention": "auto"}, True),
    }
    chunk_of = {f"defaults, {n}-token loss chunks": n for n in args.chunks}
    variants |= {name: variants["defaults (all three)"] for name in chunk_of}
    compiled_name = "defaults + compiled decoder layers"
    compile_error = None if args.no_compile else compiled.unusable("cpu")
    if not args.no_compile and compile_error is None:
        ov, held = variants["defaults (all three)"]
        variants[compiled_name] = ({**ov, "training.compile": True}, held)
    held_in, default_chunk = frozen_cast.held_in, lm_loss.CHUNK_TOKENS

    def step(name: str, local_steps: int) -> float:
        ov, held = variants[name]
        frozen_cast.held_in = held_in if held else (lambda *a, **k: contextlib.nullcontext())  # type: ignore[assignment]
        lm_loss.CHUNK_TOKENS = chunk_of.get(name, default_chunk)
        try:
            return train_lora(model, received, client, replace(cfg, **{**ov, "training.local_steps": local_steps}), 0).seconds
        finally:
            frozen_cast.held_in, lm_loss.CHUNK_TOKENS = held_in, default_chunk

    times: dict[str, list[float]] = {k: [] for k in variants}
    compile_s = None
    for name in variants:  # warm-up: first-call set-up of each path (for the compiled one: its compile)
        t0 = time.perf_counter()
        step(name, 1)
        if name == compiled_name:
            compile_s = time.perf_counter() - t0
    for _ in range(args.reps):
        for name in variants:
            times[name].append(step(name, steps) / steps)
    mm = floor(lambda: step("defaults (all three)", 1))  # one step's products, replayed alone
    step_of = {k: statistics.median(v) for k, v in times.items()}
    step_s = step_of["defaults (all three)"]
    tokens = args.batch * seq
    peaks_after = {"fp32": matmul_peak(torch.float32, max_n), "bf16": matmul_peak(torch.bfloat16, max_n)}
    peak = {k: max(peaks_before[k]["gflops"], peaks_after[k]["gflops"]) for k in peaks_before}
    achieved = counted / step_s / 1e9
    train_dtype = "bf16" if bf16 else "fp32"
    res = {
        "bench": "flops", "quick": args.quick, "model": cfg.model.name, "batch": args.batch, "seq_len": seq,
        "rank": args.rank, "train_dtype": train_dtype, "threads": args.threads, "steps": steps,
        "params_base": n_base, "params_lora": n_lora, "flops_per_step_counted": counted,
        "flops_per_step_6NT": 6 * n_base * tokens, "flops_per_step_4NT": 4 * n_base * tokens,
        "step_seconds": step_s, "tokens_per_s": tokens / step_s, "achieved_gflops": achieved,
        "achieved_gflops_6NT": 6 * n_base * tokens / step_s / 1e9,
        "peak_gflops": peak, "peaks_before": peaks_before, "peaks_after": peaks_after,
        "ratio_vs_peak_train_dtype": achieved / peak[train_dtype],
        "ratio_vs_fp32_peak": achieved / peak["fp32"], "ratio_vs_bf16_peak": achieved / peak["bf16"],
        "variants": {k: {"step_seconds": v, "steps": times[k], "vs_before": v / step_of["model's loss, sdpa, cast per forward (before)"],
                         "ratio_vs_peak_train_dtype": counted / v / 1e9 / peak[train_dtype]} for k, v in step_of.items()},
        "compile_seconds": compile_s, "compile_error": compile_error,
        "matmul_floor_seconds": mm["seconds"], "matmul_floor_flops": mm["flops"],
        "matmul_share_of_step": mm["seconds"] / step_s,
        "ratio_ceiling_vs_peak_train_dtype": counted / mm["seconds"] / 1e9 / peak[train_dtype],
        "matmul_products": mm["products"], "fused_not_replayed": mm["fused_not_replayed"],
        "attention_auto": attention.choose("auto", "cpu", "bfloat16" if bf16 else "float32", seq) or "model's own",
        "machine": machine(),
    }
    print(f"\n{cfg.model.name} ({n_base / 1e6:.1f} M params, LoRA {n_lora / 1e6:.2f} M), batch {args.batch} x {seq}, "
          f"rank {args.rank}, training in {train_dtype}, {args.threads} thread(s)")
    print(f"one step: {counted / 1e9:.1f} GFLOP counted (6NT {6 * n_base * tokens / 1e9:.1f}, 4NT "
          f"{4 * n_base * tokens / 1e9:.1f}), {step_s:.2f} s, {tokens / step_s:.1f} tokens/s")
    print(table(["", "GFLOP/s", "ratio"], [
        ["client training (counted FLOPs)", achieved, ""],
        ["matmul peak fp32", peak["fp32"], achieved / peak["fp32"]],
        ["matmul peak bf16", peak["bf16"], achieved / peak["bf16"]],
    ]))
    print(table(["step variant", "s / step", "vs before", "ratio to peak"], [
        [k, v["step_seconds"], v["vs_before"], v["ratio_vs_peak_train_dtype"]] for k, v in res["variants"].items()]))
    if compile_s is not None:
        print(f"compiled decoder layers: first call (compile + 1 step) {compile_s:.1f} s, once per process")
    elif compile_error:
        print(f"compiled decoder layers: left out, torch.compile failed: {compile_error}")
    print(f"matmul floor: the step's {sum(r['count'] for r in mm['products'])} products alone take {mm['seconds']:.2f} s "
          f"({mm['seconds'] / step_s:.0%} of the step, {mm['flops'] / 1e9:.1f} GFLOP): utilisation ceiling "
          f"{res['ratio_ceiling_vs_peak_train_dtype']:.3f} of the {train_dtype} peak"
          + (f"; fused kernels not replayed: {mm['fused_not_replayed']}" if mm["fused_not_replayed"] else ""))
    print(table(["product (sizes, transposed)", "count", "s", "GFLOP/s"], [
        [f"{r['op']} {r['sizes']} {r['transposed']}", r["count"], r["seconds"], r["gflops"]] for r in mm["products"][:8]]))
    if not native_bf16():
        print("note: no AVX512-BF16/AMX on this CPU: bf16 matmul is emulated and slower than float32, so the "
              "float32 peak is the physical limit for the client's work here")
    write("flops-quick" if args.quick else "flops", res, args.out)


if __name__ == "__main__":
    main()
