"""One full fine-tuning client's upload through a local store, as a round moves it: the delta
encoded and put by the train step, made the client's upload by the prune step, read twice (with
sha256 and decode) by the aggregate step. Two arms from one run, interleaved, and a floor:

- before: safetensors' own save + ``canonical_safetensors`` (three copies of the data), the prune
  step reading, hashing, decoding and writing the bytes again, every write fsync'd (the code up
  to 2026-11-27);
- now: ``encode_canonical`` (one copy), the prune step's ``copy_artifact`` (a hard link in a local
  store), and no fsync where the store is a scratch one (``store.fsync: false``, the gpu profile);
  ``--fsync`` keeps the flush, to see what the code alone changed;
- kept: "now" with the aggregate step keeping the validated upload (``strategy.keep_uploads_mb``),
  so it reads, hashes and decodes it once instead of twice;
- floor: the same bytes written once and read once (no encoding, hashing or decoding).

    .venv/bin/python benchmarks/bench_upload_path.py           # SmolLM2's size: 134.5M float32 parameters (538 MB)
    .venv/bin/python benchmarks/bench_upload_path.py --quick   # 10M parameters, seconds

The server-side reads are the same code in both arms: what differs is what the client side and
the store do. Disk: ~1.2 GB under the system temp folder while an arm runs.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
from _common import machine, median, table, timed, write  # noqa: E402
from safetensors.numpy import save as st_save  # noqa: E402

from hetlora_core import store as st  # noqa: E402
from hetlora_core.adapter import canonical_safetensors  # noqa: E402
from hetlora_core.config import config_from_dict  # noqa: E402
from hetlora_core.methods import method_for  # noqa: E402
from hetlora_core.methods.full_ft import FORMAT  # noqa: E402

SMOLLM2_PARAMS = 134_515_008  # SmolLM2-135M's parameters (tied embeddings counted once)
TRAINED, UPLOAD = st.trained_prefix("e", 0, "c0"), st.client_prefix("e", 0, "c0")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="10M parameters instead of SmolLM2's 134.5M")
    ap.add_argument("--reps", type=int, default=5, help="repetitions of each arm (interleaved)")
    ap.add_argument("--fsync", action="store_true", help="the new arm fsyncs its writes too (store.fsync: true)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    n = 10_000_000 if args.quick else SMOLLM2_PARAMS
    rng = np.random.default_rng(0)
    # 30 "layers" and a remainder: what matters is the bytes, not the shapes.
    sizes = [n // 31] * 30 + [n - 30 * (n // 31)]
    state = {f"model.layers.{i:02d}.weight": (rng.standard_normal(k, dtype=np.float32) * 1e-3) for i, k in enumerate(sizes)}
    spec = {k: v.shape for k, v in state.items()}
    method = method_for(config_from_dict({"strategy": {"name": "full_ft"}}))
    meta = {"client_id": "c0", "num_samples": 10, "rank_before": 1}

    def aggregate_reads(store: st.Store, kept: bool = False) -> None:
        data, man = st.get_artifact(store, UPLOAD)  # first pass
        method.decode(data, spec, where=UPLOAD)
        if kept:  # strategy.keep_uploads_mb: the first pass's tensors are aggregated, no second read
            return
        again = store.get_bytes(f"{UPLOAD}/{man['object']}", max_bytes=man["size"])  # second pass
        assert hashlib.sha256(again).hexdigest() == man["sha256"]
        method.decode(again, spec, where=UPLOAD)

    def before(store: st.Store) -> None:
        payload = canonical_safetensors(st_save(state, metadata={"format": FORMAT}))
        st.put_artifact(store, TRAINED, payload, meta)
        data, man = st.get_artifact(store, TRAINED)  # the prune step, as it was
        method.decode(data, None, where=TRAINED)
        st.put_artifact(store, UPLOAD, data, {**man, "bytes_up": len(data)})
        aggregate_reads(store)

    def now(store: st.Store, kept: bool = False) -> None:
        payload = method.encode(state)
        st.put_artifact(store, TRAINED, payload, meta)
        man = st.get_manifest(store, TRAINED)
        assert man is not None
        st.copy_artifact(store, TRAINED, UPLOAD, {**man, "bytes_up": man["size"]})
        aggregate_reads(store, kept)

    payload = method.encode(state)
    if payload != canonical_safetensors(st_save(state, metadata={"format": FORMAT})):
        raise SystemExit("the arms disagree: encode_canonical gives other bytes than safetensors + canonical_safetensors")
    nbytes = len(payload)

    def floor(root: Path) -> None:
        (root / "f").write_bytes(payload)
        (root / "f").read_bytes()

    arms: dict[str, Callable[[Path], None]] = {"before": lambda root: before(st.LocalStore(root, fsync=True)),
                                               "now": lambda root: now(st.LocalStore(root, fsync=args.fsync)),
                                               "kept": lambda root: now(st.LocalStore(root, fsync=args.fsync), kept=True),
                                               "floor": floor}
    times: dict[str, list[float]] = {a: [] for a in arms}
    for rep in range(args.reps):
        for a in (list(arms) if rep % 2 == 0 else list(arms)[::-1]):
            root = Path(tempfile.mkdtemp(prefix="hetlora-bench-upload-"))
            try:
                times[a].append(timed(partial(arms[a], root))[0])
            finally:
                shutil.rmtree(root, ignore_errors=True)
        print(f"  rep {rep}: " + ", ".join(f"{a} {times[a][-1]:.2f} s" for a in arms), flush=True)
    old, new, kept, low = (median(times[a]) for a in arms)
    res = {"bench": "upload_path", "quick": args.quick, "params": n, "bytes": nbytes, "reps": args.reps,
           "new_fsync": args.fsync, "before_s": old, "now_s": new, "kept_s": kept, "floor_s": low, "ratio": new / old,
           "kept_ratio": kept / old,
           "raw_s": times, "machine": machine()}
    print(f"\n{n:,} float32 parameters ({nbytes / 1e6:.0f} MB) per upload, {args.reps} repetitions per arm; "
          f"new arm fsync: {args.fsync}")
    print(table(["", "seconds per client upload (median)", "ratio to before"],
                [["before (safetensors + canonical copy, prune re-reads and re-writes, fsync)", old, 1.0],
                 ["now (one-copy encode, prune = store copy" + (", fsync)" if args.fsync else ", no fsync)"), new, new / old],
                 ["now, and the aggregate step keeps the upload (strategy.keep_uploads_mb: one read)", kept, kept / old],
                 ["floor (write once + read once)", low, low / old]]))
    write("upload_path" + ("-quick" if args.quick else "") + ("-fsync" if args.fsync else ""), res, args.out)


if __name__ == "__main__":
    main()
