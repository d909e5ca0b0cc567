"""One prepared check of the CUDA paths (and QLoRA), for a GPU machine with no hub and no PyPI.

    python benchmarks/gpu_check.py [--out DIR] [--budget-s 420]   # on the GPU box: JSON to DIR (default $OUT)
    python benchmarks/gpu_check.py --cpu-only --out DIR            # here / in CI: the same code, tiny sizes

Needs only torch, transformers and peft plus this source tree (no tokenizer, no corpus, no cache:
models are random Llamas built from a LlamaConfig in code; client data are random token ids), so
it runs where nothing can be downloaded and only a few MiB of files are carried. Steps:

1. parity: the HetLoRA client loop (``hetlora_core.client.train_lora``) on a tiny Llama, float32,
   same seeds, on CPU and on CUDA (TF32 off): train loss and the trained adapter must agree;
2. bf16 autocast and float16 + GradScaler on CUDA through the same loop (finite, close to float32);
3. QLoRA (``model.quantize: 4bit``) if bitsandbytes imports, else "skipped: no bitsandbytes";
4. throughput: training tokens/s and peak GPU memory of the client loop for growing random Llamas
   (SmolLM2-135M shape, Llama-3.2-1B shape, a ~3B shape) while the time budget lasts;
5. evaluation: the gpu profile's held-out evaluation of 24 clients (512 tokens each, 128-token
   windows) with the clients' windows batched together (``evaluation.evaluate``) against one forward
   per client (what it did before), same numbers required.

Writes ``gpu_check.json`` (or ``gpu_check-cpu.json``) with the card's name and every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from hetlora_core.adapter import LoraAdapter, init_global  # noqa: E402
from hetlora_core.client import train_lora  # noqa: E402
from hetlora_core.config import HetLoRAConfig, load_config, replace  # noqa: E402
from hetlora_core.data import ClientData  # noqa: E402
from hetlora_core.peft_bridge import spec_from_model  # noqa: E402

# name -> (hidden, layers, heads, kv_heads, intermediate, vocab): shapes of real models, random weights
SHAPES = {
    "tiny": (64, 2, 4, 2, 128, 512),
    "smollm2-135m-shape": (576, 30, 9, 3, 1536, 49152),
    "llama3.2-1b-shape": (2048, 16, 32, 8, 8192, 128256),
    "llama3.2-3b-shape": (3072, 28, 24, 8, 8192, 128256),
}


def build(shape: str, device: str, seed: int = 0, init_on_device: bool = True) -> torch.nn.Module:
    """A random Llama of ``shape`` on ``device``, frozen, float32, eval mode (what models.py hands out).
    ``init_on_device=False`` draws the weights on the CPU first (identical on every device: parity)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    h, n, heads, kv, inter, vocab = SHAPES[shape]
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=h, intermediate_size=inter, num_hidden_layers=n, num_attention_heads=heads,
                      num_key_value_heads=kv, max_position_embeddings=4096, tie_word_embeddings=shape != "llama3.2-3b-shape")
    torch.manual_seed(seed)
    with torch.device(device if init_on_device else "cpu"):  # in place: a 3B model never passes through host memory
        model = LlamaForCausalLM(cfg).to(torch.float32)  # type: ignore[arg-type]  # functools.wraps on .to
    model = model.to(device)  # type: ignore[arg-type]
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    model.config.use_cache = False
    return model


def fake_client(vocab: int, tokens: int, seed: int = 0) -> ClientData:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (tokens,), generator=g)
    return ClientData("gpu-check--client", "gpu-check", "client", ids[: tokens * 4 // 5], ids[tokens * 4 // 5:], tokens)


def client_cfg(device: str, dtype: str, batch: int, seq: int, steps: int, quantize: str = "none") -> HetLoRAConfig:
    """The client loop reads only training/data/precision settings from it; the model is passed in."""
    return load_config(None, {"model.name": "smollm2-135m", "model.device": device, "model.dtype": dtype, "model.quantize": quantize,
                              "training.batch_size": batch, "training.local_steps": steps, "data.seq_len": seq,
                              "data.eval_max_tokens": max(seq, 256), "ranks.r_max": 16, "ranks.assignment": "uniform"})


def adapter_for(model: torch.nn.Module, rank: int) -> LoraAdapter:
    return init_global(spec_from_model(model, ("q_proj", "v_proj")), rank, 2.0, 0)


def rel_fro(a: LoraAdapter, b: LoraAdapter) -> float:
    """||a - b|| / ||a|| over all factors (Frobenius): robust to Adam's sign flips on near-zero gradients."""
    import numpy as np

    num = sum(float(np.sum((a.A[m] - b.A[m]) ** 2) + np.sum((a.B[m] - b.B[m]) ** 2)) for m in a.A)
    den = sum(float(np.sum(a.A[m] ** 2) + np.sum(a.B[m] ** 2)) for m in a.A)
    return (num / den) ** 0.5


def parity(has_cuda: bool) -> dict[str, Any]:
    """Same seeds, float32, CPU vs CUDA through the client loop."""
    out: dict[str, Any] = {}
    runs = {}
    for dev in ["cpu", "cuda"] if has_cuda else ["cpu"]:
        m = build("tiny", dev, init_on_device=False)
        client = fake_client(SHAPES["tiny"][5], 4096)
        r = train_lora(m, adapter_for(m, 8), client, client_cfg(dev, "float32", 4, 64, 5), 0)
        runs[dev] = r
        out[f"{dev}_train_loss"] = r.train_loss
    if has_cuda:
        a, b = runs["cpu"].adapter, runs["cuda"].adapter
        assert a is not None and b is not None
        out["loss_abs_diff"] = abs(runs["cpu"].train_loss - runs["cuda"].train_loss)
        out["adapter_rel_diff"] = rel_fro(a, b)
        out["ok"] = out["loss_abs_diff"] < 1e-4 and out["adapter_rel_diff"] < 1e-3
    else:
        out["cuda"] = "skipped: no CUDA"
        out["ok"] = bool(torch.isfinite(torch.tensor(runs["cpu"].train_loss)))
    return out


def low_precision(has_cuda: bool) -> dict[str, Any]:
    """bf16 autocast and float16 + GradScaler through the client loop: finite and near float32."""
    if not has_cuda:
        return {"skipped": "no CUDA"}
    out: dict[str, Any] = {}
    client = fake_client(SHAPES["tiny"][5], 4096)
    ref = None
    for dt in ("float32", "bfloat16", "float16"):
        m = build("tiny", "cuda", init_on_device=False)  # the same weights for every dtype
        r = train_lora(m, adapter_for(m, 8), client, client_cfg("cuda", dt, 4, 64, 5), 0)
        ref = r.train_loss if ref is None else ref
        out[dt] = {"train_loss": r.train_loss, "rel_to_float32": abs(r.train_loss - ref) / ref}
    out["ok"] = all(out[d]["rel_to_float32"] < 0.05 for d in ("bfloat16", "float16"))
    return out


def qlora(has_cuda: bool) -> dict[str, Any]:
    """The tiny Llama saved and reloaded in NF4 through precision.from_pretrained_kwargs, trained."""
    import importlib.util

    if not has_cuda:
        return {"skipped": "no CUDA"}
    if importlib.util.find_spec("bitsandbytes") is None:
        return {"skipped": "no bitsandbytes"}
    from transformers import AutoModelForCausalLM

    from hetlora_core import precision

    cfg = client_cfg("cuda", "auto", 4, 64, 5, quantize="4bit")
    with tempfile.TemporaryDirectory() as tmp:
        build("smollm2-135m-shape", "cpu").save_pretrained(tmp)
        m = AutoModelForCausalLM.from_pretrained(tmp, **precision.from_pretrained_kwargs(cfg.model))
    m = precision.place(m, cfg.model, precision.resolve(cfg))
    client = fake_client(SHAPES["smollm2-135m-shape"][5], 8192)
    r = train_lora(m, adapter_for(m, 8), client, cfg, 0)
    assert r.adapter is not None
    dtypes = {str(a.dtype) for a in r.adapter.A.values()}
    return {"train_loss": r.train_loss, "adapter_dtypes": sorted(dtypes), "precision": precision.resolve(cfg).as_dict(),
            "peak_gpu_bytes": torch.cuda.max_memory_allocated(), "ok": dtypes == {"float32"} and r.train_loss == r.train_loss}


def throughput(shapes: list[str], device: str, dtype: str, batch: int, seq: int, steps: int, deadline: float) -> list[dict[str, Any]]:
    """Training tokens/s and peak memory of the client loop, one warm-up update then a timed one."""
    rows = []
    for shape in shapes:
        if time.monotonic() > deadline:
            rows.append({"shape": shape, "skipped": "time budget spent"})
            continue
        try:
            if device == "cuda":
                torch.cuda.empty_cache()
            m = build(shape, device)
            n = sum(p.numel() for p in m.parameters())
            client = fake_client(SHAPES[shape][5], batch * seq * 8)
            cfg = client_cfg(device, dtype, batch, seq, steps)
            g = adapter_for(m, 16)
            train_lora(m, g, client, client_cfg(device, dtype, batch, seq, 1), 0)  # warm-up
            if device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t = time.perf_counter()
            r = train_lora(m, g, client, cfg, 1)
            if device == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t
            rows.append({"shape": shape, "params": n, "dtype": dtype, "batch": batch, "seq": seq, "steps": steps,
                         "tokens_per_s": r.num_tokens / dt, "step_seconds": dt / steps, "train_loss": r.train_loss,
                         "peak_gpu_bytes": torch.cuda.max_memory_allocated() if device == "cuda" else None})
            print(f"  {shape}: {n / 1e6:,.0f} M params, {r.num_tokens / dt:,.0f} tokens/s", flush=True)
            del m
        except torch.cuda.OutOfMemoryError as e:  # the largest that fits is the answer
            rows.append({"shape": shape, "skipped": f"out of memory: {str(e)[:200]}"})
    return rows


def eval_batching(shape: str, device: str, dtype: str, clients: int, tokens: int, seq: int) -> dict[str, Any]:
    """Seconds of one held-out evaluation of ``clients`` clients, batched vs one forward per client.
    Both must agree: to 1e-4 in float32; in bf16 the passes' shapes differ (4 vs 32 rows), so their
    kernels round differently, and 2e-2 is allowed (as for bf16 against float32 above)."""
    import math

    from hetlora_core import peft_bridge
    from hetlora_core.data import eval_batch
    from hetlora_core.evaluation import evaluate, nll
    from hetlora_core.precision import resolve

    m = build(shape, device)
    cs = [fake_client(SHAPES[shape][5], tokens * 5, seed=i) for i in range(clients)]
    cs = [ClientData(f"c{i}", c.play, c.role, c.train_ids, c.heldout_ids, c.num_chars) for i, c in enumerate(cs)]
    cfg = replace(client_cfg(device, dtype, 8, seq, 1), **{"data.eval_max_tokens": tokens})
    g, prec = adapter_for(m, 16), resolve(cfg)

    def per_client() -> float:
        """Mean NLL per token with one forward per client (the evaluation before batching)."""
        pm = peft_bridge.attach(m, g)
        try:
            sums = [nll(pm, eval_batch(c, cfg.data), prec) for c in cs]
        finally:
            peft_bridge.detach(pm)
        return sum(s for s, _ in sums) / sum(n for _, n in sums)

    def timed(fn: Callable[[], float]) -> tuple[float, float]:
        fn()  # warm-up
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        v = fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t, v

    t_old, mean_nll_old = timed(per_client)
    t_new, ppl_new = timed(lambda: evaluate(m, g, cs, cfg).ppl)
    diff = abs(ppl_new / math.exp(mean_nll_old) - 1)
    return {"shape": shape, "dtype": dtype, "clients": clients, "tokens_per_client": tokens, "seq": seq,
            "per_client_s": t_old, "batched_s": t_new, "speedup": t_old / t_new, "ppl_rel_diff": diff,
            "ok": diff < (2e-2 if dtype == "bfloat16" else 1e-4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu-only", action="store_true", help="no CUDA checks even where CUDA exists; tiny sizes")
    ap.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "bench-out"))
    ap.add_argument("--budget-s", type=float, default=420.0, help="stop starting larger throughput models after this")
    args = ap.parse_args()
    start = time.monotonic()
    has_cuda = torch.cuda.is_available() and not args.cpu_only
    torch.backends.cuda.matmul.allow_tf32 = False  # parity: float32 matmuls in float32 on the GPU too
    torch.backends.cudnn.allow_tf32 = False
    res: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda, "has_cuda": has_cuda,
                           "device_name": torch.cuda.get_device_name(0) if has_cuda else "cpu"}
    try:
        import peft
        import transformers

        res["transformers"], res["peft"] = transformers.__version__, peft.__version__
    except ImportError as e:
        res["import_error"] = str(e)
    print(f"gpu_check on {res['device_name']} (torch {res['torch']})", flush=True)
    res["parity"] = parity(has_cuda)
    print(f"parity: {res['parity']}", flush=True)
    res["low_precision"] = low_precision(has_cuda)
    print(f"bf16/fp16: {res['low_precision']}", flush=True)
    try:
        res["qlora"] = qlora(has_cuda)
    except Exception as e:  # noqa: BLE001 - report, do not lose the other figures
        res["qlora"] = {"error": f"{type(e).__name__}: {e}"[:500], "ok": False}
    print(f"qlora: {res['qlora']}", flush=True)
    try:  # before the throughput models: short, and its figure matters more than the 3B row
        res["eval_batching"] = (eval_batching("smollm2-135m-shape", "cuda", "bfloat16", 24, 512, 128) if has_cuda
                                else eval_batching("tiny", "cpu", "float32", 6, 64, 16))
    except Exception as e:  # noqa: BLE001 - report, do not lose the other figures
        res["eval_batching"] = {"error": f"{type(e).__name__}: {e}"[:500], "ok": False}
    print(f"evaluation: {res['eval_batching']}", flush=True)
    if has_cuda:
        torch.backends.cuda.matmul.allow_tf32 = True  # what a real run would use for float32 leftovers
        res["throughput"] = throughput(["smollm2-135m-shape", "llama3.2-1b-shape", "llama3.2-3b-shape"], "cuda", "bfloat16",
                                       8, 512, 5, start + args.budget_s)
    else:
        res["throughput"] = throughput(["tiny"], "cpu", "float32", 4, 64, 3, start + args.budget_s)
    res["seconds"] = time.monotonic() - start
    res["ok"] = all(v.get("ok", True) for k, v in res.items() if k in ("parity", "low_precision", "qlora", "eval_batching") and isinstance(v, dict))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / ("gpu_check.json" if has_cuda else "gpu_check-cpu.json")
    path.write_text(json.dumps(res, indent=1, sort_keys=True))
    print(f"wrote {path}; ok={res['ok']} in {res['seconds']:.0f} s")
    sys.exit(0 if res["ok"] else 1)


if __name__ == "__main__":
    main()
