"""Bytes per round (uploaded + downloaded) for HetLoRA with the default tiers against full
fine-tuning of SmolLM2-135M, computed from the adapter shapes, and cross-checked against what a
smoke ``simulate`` run records in its results.json.

    .venv/bin/python benchmarks/bench_bytes.py            # + cross-check runs (tiny model, ~1 min)
    .venv/bin/python benchmarks/bench_bytes.py --quick    # + one short cross-check run

Shapes come from SmolLM2's config (instantiated on the meta device: no weights are read). A
client at rank r downloads the global truncated to r and uploads its trained (possibly pruned)
adapter: float32 A (r x in) and B (out x r) for every target module, ``4 r sum(in + out)`` bytes,
plus the safetensors header on upload. Full fine-tuning sends a float32 delta of every parameter
both ways (tied embeddings once), as ``hetlora_core`` does. A round is ``clients_per_round``
clients; with tiers the expected bytes use each tier's share of the clients.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from _common import ROOT, machine, table, write  # noqa: E402

from hetlora_core.adapter import LoraAdapter  # noqa: E402
from hetlora_core.config import HetLoRAConfig, load_config  # noqa: E402
from hetlora_core.peft_bridge import spec_from_model  # noqa: E402


def meta_model(cfg: HetLoRAConfig) -> torch.nn.Module:
    """The base model's module tree without weights (SmolLM2 from its cached config.json)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from hetlora_core import models

    if cfg.model.name == "smollm2-135m":
        folder = models.cache_dir() / models._MODEL_DIR
        if not (folder / "config.json").is_file():
            models.load_base_model(cfg.model)  # builds the cache once (~40 s)
        mcfg = AutoConfig.from_pretrained(str(folder))
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(mcfg)
    return models.load_base_model(cfg.model)[0]


def adapter_bytes(spec: dict[str, tuple[int, int]], r: int) -> int:
    return 4 * r * sum(o + i for o, i in spec.values())


def header_bytes(spec: dict[str, tuple[int, int]], r: int, scale: float) -> int:
    """Upload overhead: the safetensors header of a real serialised rank-r adapter."""
    a = LoraAdapter({m: np.zeros((r, i), np.float32) for m, (o, i) in spec.items()},
                    {m: np.zeros((o, r), np.float32) for m, (o, i) in spec.items()}, scale)
    return len(a.to_bytes()) - a.nbytes()


def analytic(cfg: HetLoRAConfig) -> dict:
    model = meta_model(cfg)
    spec = spec_from_model(model, cfg.model.target_modules)
    n_full = sum(p.numel() for p in model.parameters())
    full = 4 * n_full
    hdr = {r: header_bytes(spec, r, cfg.model.lora_scale) for r in {t.rank for t in cfg.ranks.tiers} | {cfg.ranks.r_min, cfg.ranks.r_max}}
    m = cfg.federation.clients_per_round
    tiers = cfg.ranks.tiers
    share = {t.name: t.fraction / sum(x.fraction for x in tiers) for t in tiers}
    rows = []

    def row(name: str, r: float, down: float, up: float, params: float) -> None:
        rows.append({"method": name, "rank": r, "trainable_params": params, "down_per_client": down,
                     "up_per_client": up, "per_round": m * (down + up), "ratio_vs_full_ft": (down + up) / (2 * full)})

    for t in tiers:
        b = adapter_bytes(spec, t.rank)
        row(f"HetLoRA tier {t.name}", t.rank, b, b + hdr[t.rank], b / 4)
    mean_r = sum(share[t.name] * t.rank for t in tiers)
    down = sum(share[t.name] * adapter_bytes(spec, t.rank) for t in tiers)
    up = sum(share[t.name] * (adapter_bytes(spec, t.rank) + hdr[t.rank]) for t in tiers)
    row("HetLoRA (tiers, expected)", mean_r, down, up, down / 4)
    for r in (cfg.ranks.r_min, cfg.ranks.r_max):
        b = adapter_bytes(spec, r)
        row(f"HomLoRA r={r}", r, b, b + hdr[r], b / 4)
    row("full fine-tuning", 0, full, full, n_full)
    return {"model": cfg.model.name, "modules": len(spec), "sum_in_plus_out": sum(o + i for o, i in spec.values()),
            "params_full": n_full, "clients_per_round": m, "tiers": {t.name: t.rank for t in tiers}, "rows": rows}


def cross_check(quick: bool) -> list[dict]:
    """Run the smoke config through ``simulate`` and compare results.json's bytes with the formula."""
    from hetlora_core import runtime
    from hetlora_core.simulate import simulate

    checks = []
    strategies = ["hetlora"] if quick else ["hetlora", "full_ft"]
    for strat in strategies:
        cfg = load_config(ROOT / "configs/smoke.yaml", {
            "experiment": f"bytes-{strat.replace('_', '-')}", "strategy.name": strat, "federation.rounds": 1 if quick else 2,
            "training.local_steps": 2, "training.batch_size": 2, "training.threads": 1, "data.eval_max_tokens": 32,
            "pruning.lam": 100.0, "pruning.gamma": 0.5})  # pruning on, so uploads can be smaller than downloads
        with tempfile.TemporaryDirectory() as tmp:
            res = simulate(cfg, tmp, progress=False)
        model = runtime.model(cfg)
        spec = spec_from_model(model, cfg.model.target_modules)
        full = 4 * sum(p.numel() for p in model.parameters())
        for rnd in res["rounds"]:
            want_down = want_up = 0
            for rep in rnd["clients"].values():
                if strat == "full_ft":
                    want_down += full
                    want_up += full  # plus the header, checked as a bound below
                else:
                    want_down += adapter_bytes(spec, rep["rank_before"])
                    want_up += adapter_bytes(spec, rep["rank_after"]) + header_bytes(spec, rep["rank_after"], cfg.model.lora_scale)
            ok_down = rnd["bytes_down"] == want_down
            ok_up = rnd["bytes_up"] == want_up if strat != "full_ft" else 0 <= rnd["bytes_up"] - want_up < 64 * 1024
            checks.append({"strategy": strat, "round": rnd["round"], "recorded_down": rnd["bytes_down"],
                           "formula_down": want_down, "recorded_up": rnd["bytes_up"], "formula_up": want_up,
                           "pruned": len(rnd["prune_events"]), "match": bool(ok_down and ok_up)})
    return checks


def mb(x: float) -> str:
    return f"{x / 1e6:,.2f} MB" if x < 1e9 else f"{x / 1e9:,.2f} GB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one short cross-check run instead of two")
    ap.add_argument("--config", default=None, help="config whose model, tiers and clients_per_round to use (default: defaults)")
    ap.add_argument("--no-check", action="store_true", help="skip the simulate cross-check")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = load_config(args.config)
    a = analytic(cfg)
    print(f"{a['model']}: {a['modules']} LoRA modules (sum of in + out = {a['sum_in_plus_out']:,}), "
          f"{a['params_full'] / 1e6:.1f} M parameters; {a['clients_per_round']} clients per round")
    print(table(["method", "rank", "trainable params", "down / client", "up / client", "per round", "ratio vs full FT"],
                [[r["method"], r["rank"], f"{r['trainable_params']:,.0f}", mb(r["down_per_client"]), mb(r["up_per_client"]),
                  mb(r["per_round"]), f"{r['ratio_vs_full_ft']:.5f}"] for r in a["rows"]]))
    checks = [] if args.no_check else cross_check(args.quick)
    if checks:
        print("\ncross-check against simulate's results.json (configs/smoke.yaml, tiny model):")
        print(table(["strategy", "round", "down recorded", "down formula", "up recorded", "up formula", "pruned", "match"],
                    [[c["strategy"], c["round"], c["recorded_down"], c["formula_down"], c["recorded_up"], c["formula_up"],
                      c["pruned"], c["match"]] for c in checks]))
    write("bytes-quick" if args.quick else "bytes", {"bench": "bytes", "quick": args.quick, "analytic": a,
                                                     "cross_check": checks, "machine": machine()}, args.out)
    if checks and not all(c["match"] for c in checks):
        sys.exit("bytes recorded by simulate differ from the formula")


if __name__ == "__main__":
    main()
