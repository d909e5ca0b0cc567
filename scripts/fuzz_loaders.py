#!/usr/bin/env python
"""Fuzz the loaders that read untrusted bytes: adapters and manifests.

Targets (everything a client upload or a store object goes through before it is trusted):

* ``adapter``:  ``read_safetensors_metadata`` and ``LoraAdapter.from_bytes`` (with and without the
  base model's spec) on structured mutations of valid adapters: bit flips, truncations, inserted and
  deleted bytes, a wrong header length, header JSON edits (dtype, shape, data_offsets, metadata,
  extra keys) and random JSON headers.
* ``manifest``: ``store.parse_manifest`` and ``store.get_artifact`` on a ``LocalStore`` with
  mutated manifests: random JSON, field edits, bit flips, truncations, and a payload that may or
  may not match.

The only allowed outcomes: a valid result (an adapter that validates and round-trips; a manifest
whose object, sha256 and size are well-formed and whose payload matches), or ``AdapterError`` /
``StoreError``. Any other exception is a bug (hypothesis shrinks it and prints the input); a call
that takes longer than ``--hang-seconds`` is a hang: faulthandler prints "Timeout (...)!" and every
thread's stack, and the process exits 1 at once (it works even if the hang is inside native code).

    python scripts/fuzz_loaders.py --seconds 60            # both targets, one minute
    python scripts/fuzz_loaders.py --seconds 600 --target adapter --seed 1

Exit 0: no finding (a JSON summary on stdout); 1: a finding (the falsifying input is printed) or a hang.
"""

from __future__ import annotations

import argparse
import faulthandler
import hashlib
import json
import struct
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as hs
from safetensors.numpy import save as st_save

from hetlora_core import store as st
from hetlora_core.adapter import FORMAT, AdapterError, LoraAdapter, read_safetensors_metadata

SPEC = {"layers.0.q_proj": (16, 16), "layers.0.v_proj": (8, 16)}
R_MIN, R_MAX, SCALE = 1, 8, 2.0
DTYPES = ["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3", "F8_E5M2", "F8_E8M0", "F4",
          "F6_E2M3", "C64", "U64", "U32", "U16", "", "f32", "F32 ", "\u00e9"]
stats: Counter[str] = Counter()


# ---------------------------------------------------------------- seeds


def seed_adapters() -> list[bytes]:
    out = []
    for rank, seed_ in ((1, 0), (4, 1), (8, 2)):
        g = np.random.default_rng(seed_)
        t = {}
        for m, (o, i) in SPEC.items():
            t[f"{m}.lora_A"] = g.standard_normal((rank, i), np.float32)
            t[f"{m}.lora_B"] = g.standard_normal((o, rank), np.float32)
        out.append(st_save(t, metadata={"format": FORMAT, "scale": repr(SCALE)}))
    return out


SEEDS = seed_adapters()


def split(data: bytes) -> tuple[dict[str, Any], bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def join(header: Any, body: bytes, length_delta: int = 0) -> bytes:
    h = json.dumps(header, separators=(",", ":")).encode()
    pad = (8 - len(h) % 8) % 8  # safetensors aligns the header with spaces
    h += b" " * pad
    return struct.pack("<Q", max(0, len(h) + length_delta)) + h + body


# ---------------------------------------------------------------- strategies

json_scalars = hs.none() | hs.booleans() | hs.integers(-2**70, 2**70) | hs.floats(allow_nan=True) | hs.text(max_size=20)
json_values = hs.recursive(json_scalars, lambda kids: hs.lists(kids, max_size=4) | hs.dictionaries(hs.text(max_size=10), kids, max_size=4),
                           max_leaves=12)
small_ints = hs.integers(-3, 40) | hs.integers(-2**63, 2**64)


@hs.composite
def byte_mutation(draw: hs.DrawFn, data: bytes) -> bytes:
    kind = draw(hs.sampled_from(["flip", "truncate", "insert", "delete", "overwrite_len"]))
    b = bytearray(data)
    if kind == "flip":
        for _ in range(draw(hs.integers(1, 8))):
            i = draw(hs.integers(0, len(b) - 1))
            b[i] ^= 1 << draw(hs.integers(0, 7))
    elif kind == "truncate":
        b = b[:draw(hs.integers(0, len(b)))]
    elif kind == "insert":
        i = draw(hs.integers(0, len(b)))
        b[i:i] = draw(hs.binary(min_size=1, max_size=64))
    elif kind == "delete":
        i = draw(hs.integers(0, len(b) - 1))
        del b[i:i + draw(hs.integers(1, 64))]
    else:
        b[:8] = struct.pack("<Q", draw(hs.integers(0, 2**64 - 1)))
    return bytes(b)


@hs.composite
def header_mutation(draw: hs.DrawFn, data: bytes) -> bytes:
    header, body = split(data)
    keys = [k for k in header if k != "__metadata__"]
    for _ in range(draw(hs.integers(1, 3))):
        edit = draw(hs.sampled_from(["dtype", "shape", "offsets", "metadata", "meta_value", "drop", "add", "rename", "entry"]))
        k = draw(hs.sampled_from(keys)) if keys else None
        if edit == "dtype" and isinstance(header.get(k), dict):
            header[k]["dtype"] = draw(hs.sampled_from(DTYPES))
        elif edit == "shape" and isinstance(header.get(k), dict):
            header[k]["shape"] = draw(hs.lists(small_ints, max_size=4))
        elif edit == "offsets" and isinstance(header.get(k), dict):
            header[k]["data_offsets"] = draw(hs.lists(small_ints, min_size=0, max_size=3))
        elif edit == "metadata":
            header["__metadata__"] = draw(json_values)
        elif edit == "meta_value":
            meta = header.get("__metadata__") if isinstance(header.get("__metadata__"), dict) else {}
            meta[draw(hs.sampled_from(["format", "scale", "x"]))] = draw(
                hs.sampled_from([FORMAT, "nan", "inf", "-1", "0", "1e308", "2.0", ""]) | hs.text(max_size=8))
            header["__metadata__"] = meta
        elif edit == "drop" and k in header:
            del header[k]
        elif edit == "add":
            header[draw(hs.sampled_from(["x.lora_A", "x.lora_B", "layers.0.q_proj.lora_A", "w", ""]))] = draw(
                json_values | hs.fixed_dictionaries({"dtype": hs.sampled_from(DTYPES), "shape": hs.lists(small_ints, max_size=3),
                                                     "data_offsets": hs.lists(small_ints, max_size=2)}))
        elif edit == "rename" and k in header:
            header[draw(hs.text(max_size=30))] = header.pop(k)
        elif edit == "entry" and k in header:
            header[k] = draw(json_values)
    return join(header, body, draw(hs.sampled_from([0, 0, 0, -1, 1, 8, -8])))


@hs.composite
def adapter_bytes(draw: hs.DrawFn) -> bytes:
    base = draw(hs.sampled_from(SEEDS))
    how = draw(hs.sampled_from(["bytes", "header", "header+bytes", "random_header", "random"]))
    if how == "bytes":
        return draw(byte_mutation(base))
    if how == "header":
        return draw(header_mutation(base))
    if how == "header+bytes":
        return draw(byte_mutation(draw(header_mutation(base))))
    if how == "random_header":
        return join(draw(json_values), draw(hs.binary(max_size=256)), draw(hs.integers(-16, 16)))
    return draw(hs.binary(max_size=512))


PAYLOAD = SEEDS[0]
GOOD_MANIFEST = {"object": "adapter.safetensors", "sha256": hashlib.sha256(PAYLOAD).hexdigest(), "size": len(PAYLOAD),
                 "round": 3, "num_samples": 10}


@hs.composite
def manifest_bytes(draw: hs.DrawFn) -> bytes:
    how = draw(hs.sampled_from(["field", "fields", "random_json", "bytes", "random"]))
    m: Any = dict(GOOD_MANIFEST)
    if how in ("field", "fields"):
        for _ in range(1 if how == "field" else draw(hs.integers(2, 4))):
            k = draw(hs.sampled_from(["object", "sha256", "size", "round", "extra"]))
            if draw(hs.booleans()) and k in m:
                del m[k]
            else:
                m[k] = draw(json_values | hs.sampled_from(["../x", "manifest.json", "", "adapter.safetensors", "a/b",
                                                           GOOD_MANIFEST["sha256"].upper(), "0" * 64, len(PAYLOAD) + 1, -1, True]))
        return json.dumps(m).encode()
    if how == "random_json":
        return json.dumps(draw(json_values)).encode()
    if how == "bytes":
        return draw(byte_mutation(json.dumps(m).encode()))
    return draw(hs.binary(max_size=256))


# ---------------------------------------------------------------- properties


class Guard:
    """faulthandler watchdog around one call: a hang dumps every stack and exits 1."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def __enter__(self) -> None:
        # The process's real stderr (fd 2): sys.stderr may be a capture object without a file descriptor.
        faulthandler.dump_traceback_later(self.seconds, exit=True, file=sys.__stderr__)

    def __exit__(self, *exc: object) -> None:
        faulthandler.cancel_dump_traceback_later()


def check_adapter(data: bytes, hang_s: float) -> None:
    with Guard(hang_s):
        try:
            meta = read_safetensors_metadata(data, "fuzz")
            assert isinstance(meta, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())
        except AdapterError:
            pass
        for spec in (None, SPEC):
            try:
                a = LoraAdapter.from_bytes(data, spec, R_MIN, R_MAX, where="fuzz")
            except AdapterError:
                stats["adapter: AdapterError"] += 1
                continue
            a.validate(spec, R_MIN, R_MAX)  # what was accepted is valid...
            again = LoraAdapter.from_bytes(a.to_bytes(), spec, R_MIN, R_MAX)  # ...and round-trips
            assert again.ranks == a.ranks and all(np.array_equal(again.A[m], a.A[m]) for m in a.modules)
            stats["adapter: valid"] += 1


def check_manifest(raw: bytes, payload: bytes, root: Path, hang_s: float) -> None:
    store = st.LocalStore(root)
    prefix = st.client_prefix("e", 0, "c")
    store.put_bytes(f"{prefix}/{st.ADAPTER}", payload)
    store.put_bytes(f"{prefix}/{st.MANIFEST}", raw)
    with Guard(hang_s):
        try:
            m = st.parse_manifest("k", raw)
            assert isinstance(m, dict) and isinstance(m["object"], str) and isinstance(m["size"], int)
        except st.InvalidManifest:
            pass
        try:
            data, man = st.get_artifact(store, prefix)
        except st.StoreError as e:
            stats[f"manifest: {type(e).__name__}"] += 1
            return
        assert hashlib.sha256(data).hexdigest() == man["sha256"] and len(data) == man["size"]
        stats["manifest: valid"] += 1


def run(seconds: float, target: str, seed_: int, hang_s: float, batch: int) -> int:
    end = time.monotonic() + seconds
    cfg = settings(max_examples=batch, deadline=None, database=None, derandomize=False, print_blob=True,
                   suppress_health_check=list(HealthCheck), phases=[Phase.generate, Phase.shrink])
    tmp = Path(tempfile.mkdtemp(prefix="hetlora-fuzz-"))

    @cfg
    @given(adapter_bytes())
    def fuzz_adapter(data: bytes) -> None:
        stats["examples: adapter"] += 1
        check_adapter(data, hang_s)

    @cfg
    @given(manifest_bytes(), hs.sampled_from([PAYLOAD, PAYLOAD[:-1], b""]))
    def fuzz_manifest(raw: bytes, payload: bytes) -> None:
        stats["examples: manifest"] += 1
        check_manifest(raw, payload, tmp, hang_s)

    targets = {"adapter": [fuzz_adapter], "manifest": [fuzz_manifest], "all": [fuzz_adapter, fuzz_manifest]}[target]
    t0, i = time.monotonic(), 0
    try:
        while time.monotonic() < end:
            for fn in targets:
                seed(seed_ * 1_000_003 + i)(fn)()  # one batch; a new seed per batch explores new inputs
                i += 1
    except Exception as e:  # noqa: BLE001 - a finding: hypothesis has printed the shrunk input
        traceback.print_exception(e, file=sys.stderr)  # with hypothesis' notes: the shrunk input and how to replay it
        print(f"FINDING: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(json.dumps({"seconds": round(time.monotonic() - t0, 1), "target": target, "seed": seed_, "batches": i,
                      **dict(sorted(stats.items()))}, indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=60.0, help="how long to fuzz (default 60)")
    p.add_argument("--target", choices=["adapter", "manifest", "all"], default="all")
    p.add_argument("--seed", type=int, default=0, help="base seed (runs with the same seed and batches repeat)")
    p.add_argument("--hang-seconds", type=float, default=10.0, help="one call taking longer than this is a hang (stacks dumped, exit 1)")
    p.add_argument("--batch", type=int, default=200, help="examples per hypothesis batch (time is checked between batches)")
    a = p.parse_args(argv)
    return run(a.seconds, a.target, a.seed, a.hang_seconds, a.batch)


if __name__ == "__main__":
    sys.exit(main())
