"""Attaching LoRA adapters the way a pruning run does: peft's injection every time (``reuse=False``)
against the kept layers of ``peft_bridge.attach(reuse=True)``, as a ratio of medians from one run.

    .venv/bin/python benchmarks/bench_attach.py            # SmolLM2 (60 q/v modules), the gpu profile's ranks
    .venv/bin/python benchmarks/bench_attach.py --quick    # the tiny Llama, seconds

One repetition is one "round" of an in-process HetLoRA run after some pruning: every client's
training attach at its own rank and every own-rank evaluation attach, over ``--shapes`` distinct
ranks (5..50), each attached ``--per-shape`` times, with an attach + detach and no forward pass
(the forward costs the same either way). The first repetition of the kept arm pays each shape's
injection once, as a run's first rounds do; the median is the steady state. Both arms must give the
same logits for one shape (checked once), so the kept arm cannot win by skipping the weights.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from _common import ROOT, machine, median, table, timed, write  # noqa: E402

from hetlora_core import peft_bridge, runtime  # noqa: E402
from hetlora_core.adapter import LoraAdapter, init_global  # noqa: E402
from hetlora_core.config import load_config  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny Llama (configs/smoke.yaml)")
    ap.add_argument("--reps", type=int, default=5, help="repetitions of each arm (interleaved)")
    ap.add_argument("--shapes", type=int, default=12, help="distinct ranks attached in a repetition")
    ap.add_argument("--per-shape", type=int, default=3, help="attaches of each rank in a repetition")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = load_config(ROOT / "configs/smoke.yaml" if args.quick else None, {})
    model = runtime.model(cfg)
    r_max = 8 if args.quick else 50
    g = init_global(peft_bridge.spec_from_model(model, cfg.model.target_modules), r_max, cfg.model.lora_scale, 1)
    g.B = {m: np.random.default_rng(0).standard_normal(b.shape).astype(np.float32) * 0.01 for m, b in g.B.items()}
    ranks = sorted({int(r) for r in np.linspace(1 if args.quick else 5, r_max, args.shapes)})
    adapters: list[LoraAdapter] = [g.truncate(r) for r in ranks for _ in range(args.per_shape)]
    x = torch.randint(0, 100, (1, 8), generator=torch.Generator().manual_seed(0))

    def logits(reuse: bool) -> torch.Tensor:
        pm = peft_bridge.attach(model, adapters[-1], reuse=reuse)
        try:
            with torch.no_grad():
                return pm(input_ids=x).logits
        finally:
            peft_bridge.detach(pm)

    peft_bridge._KEPT.clear()
    logits(True)  # injects and keeps this shape
    peft_bridge.detach(peft_bridge.attach(model, adapters[0], reuse=True))  # another shape in between
    if not torch.equal(logits(False), logits(True)):  # the second: the kept layers, put back
        raise SystemExit("the arms disagree: kept layers give other logits than a fresh attach")
    peft_bridge._KEPT.clear()

    def one_round(reuse: bool) -> None:
        for a in adapters:
            peft_bridge.detach(peft_bridge.attach(model, a, reuse=reuse))

    arms = {"inject": lambda: one_round(False), "kept": lambda: one_round(True)}
    times: dict[str, list[float]] = {a: [] for a in arms}
    for rep in range(args.reps):
        for a in (list(arms) if rep % 2 == 0 else list(arms)[::-1]):
            times[a].append(timed(arms[a])[0])
        print(f"  rep {rep}: inject {times['inject'][-1]:.2f} s, kept {times['kept'][-1]:.2f} s", flush=True)
    old, new = median(times["inject"]), median(times["kept"])
    n = len(adapters)
    res = {"bench": "attach", "quick": args.quick, "model": cfg.model.name, "modules": len(g.modules), "ranks": ranks,
           "attaches_per_rep": n, "reps": args.reps, "inject_s": old, "kept_s": new, "ratio": new / old,
           "first_kept_s": times["kept"][0], "raw_s": times, "machine": machine()}
    print(f"\n{res['model']}: {len(g.modules)} LoRA modules, {len(ranks)} ranks x {args.per_shape} attaches per repetition, "
          f"{args.reps} repetitions per arm (the kept arm's first, with every injection: {times['kept'][0]:.2f} s)")
    print(table(["", "seconds per repetition (median)", "ms per attach", "ratio"],
                [["peft injection every time", old, 1000 * old / n, 1.0], ["kept layers", new, 1000 * new / n, new / old]]))
    write("attach-quick" if args.quick else "attach", res, args.out)


if __name__ == "__main__":
    main()
