"""How often clients self-prune with the tail regulariser in the loss (``pruning.form: loss``, the
default until these figures) vs as a proximal step after each AdamW step (``pruning.form: proximal``), and what it does
to held-out perplexity, over a few rounds of an in-process ``hetlora simulate``.

    nice .venv/bin/python benchmarks/bench_pruning_form.py                 # tiny Llama, 8 rounds, lam 0.01 (~1-2 min)
    nice .venv/bin/python benchmarks/bench_pruning_form.py --quick         # tiny Llama, 2 rounds (CI smoke)
    nice .venv/bin/python benchmarks/bench_pruning_form.py --lam 0.01 0.1  # a lam sweep
    nice .venv/bin/python benchmarks/bench_pruning_form.py --config configs/realistic.yaml --rounds 3 \\
        --set data.eval_max_tokens=256                                     # SmolLM2 (tens of minutes on 2 cores)

Arms, on the same config, seed, client selection and batches: ``off`` (``pruning.enabled: false``,
"HetLoRA w/o pruning"), then ``loss`` and ``proximal`` at each lam. A client is *eligible* in a
round when it trains at a rank above ``ranks.r_min`` (only those can prune); the prune rate is
prune events / eligible client-rounds. Round 0 never prunes (the received B is zero, so the tail
score cannot go down), so it is counted out. The numbers are measurements, not asserted.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from _common import ROOT, table, write  # noqa: E402

from hetlora_core.config import HetLoRAConfig, load_config, replace  # noqa: E402
from hetlora_core.simulate import simulate  # noqa: E402


def summarise(cfg: HetLoRAConfig, results: dict[str, Any]) -> dict[str, Any]:
    """Prune events, eligible client-rounds (round >= 1, rank above r_min) and the perplexities."""
    r_min, events, eligible, per_round = cfg.ranks.r_min, 0, 0, []
    for rnd in results["rounds"][1:]:
        reports = rnd["clients"]
        elig = sum(1 for r in reports.values() if r.get("rank_before", 0) > r_min)
        n = len(rnd["prune_events"])
        events, eligible = events + n, eligible + elig
        per_round.append(f"{n}/{elig}")
    last = results["rounds"][-1]
    ranks = last["client_ranks"]
    return {"prune_events": events, "eligible": eligible, "prune_rate": events / eligible if eligible else 0.0,
            "per_round": per_round, "mean_final_rank": sum(ranks.values()) / max(1, len(ranks)),
            "final_ranks": ranks, "baseline_ppl": results["baseline_ppl"], "global_ppl": last["global_ppl"],
            "personal_ppl": last["personal_ppl"], "ppl_by_round": [r["global_ppl"] for r in results["rounds"]],
            "train_loss_last": last["train_loss"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2 rounds on the tiny Llama (a smoke run, not a measurement)")
    ap.add_argument("--config", default=str(ROOT / "configs/smoke.yaml"), help="base config (default: the tiny Llama smoke config)")
    ap.add_argument("--rounds", type=int, help="federation.rounds (default 8, quick 2)")
    ap.add_argument("--lam", type=float, nargs="+", default=[0.01], help="pruning.lam values for both forms")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="more config overrides (YAML scalars), e.g. training.local_steps=5")
    ap.add_argument("--no-off", action="store_true", help="skip the pruning-off arm (saves a third of the time)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the machine is shared)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import yaml

    over: dict[str, Any] = {"federation.rounds": args.rounds or (2 if args.quick else 8), "training.threads": args.threads}
    over.update({k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.sets)})
    base = load_config(args.config, over)
    arms: list[tuple[str, HetLoRAConfig]] = [] if args.no_off else [("off", replace(base, **{"pruning.enabled": False, "experiment": "form-off"}))]
    for lam in args.lam:
        for form in ("loss", "proximal"):
            arms.append((f"{form} lam={lam:g}", replace(base, **{"pruning.form": form, "pruning.lam": lam,
                                                                 "experiment": f"form-{form}-{lam:g}".replace(".", "p")})))
    rows, out = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, cfg in arms:
            print(f"=== {name}", flush=True)
            s = summarise(cfg, simulate(cfg, Path(tmp) / cfg.experiment, progress=False))
            out[name] = s
            rows.append([name, f"{s['prune_events']}/{s['eligible']}", s["prune_rate"], " ".join(s["per_round"]),
                         s["mean_final_rank"], s["global_ppl"], s["personal_ppl"]])
    print(table(["arm", "pruned/eligible", "rate", "per round (from round 1)", "mean final rank", "global ppl", "own-rank ppl"], rows))
    write("pruning_form" + ("-quick" if args.quick else ""),
          {"config": args.config, "rounds": over["federation.rounds"], "overrides": over, "arms": out}, args.out)


if __name__ == "__main__":
    main()
