"""LoRA adapter state: the A and B factors of every target module as one typed object.

Shapes (HETLORA.md notation): for a module with frozen weight ``W0 (d x l)`` (out x in),
``A (r x l)`` and ``B (d x r)``; the update is ``dW = s * B @ A`` with ONE scale ``s`` for every
rank, so truncating a global adapter keeps the update its leading components stand for.

The factors are float32 numpy arrays, so the model-free steps (plan, self-prune, aggregate) load
no torch; the torch side (``peft_bridge``, ``client``, ``evaluation``) converts at its boundary.

Serialisation is safetensors only: a pickle payload can execute code on load, so this module never
unpickles and rejects files that look like pickles with a message that says so.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from .norms import delta_norms_many

FORMAT = "hetlora-adapter/1"
MAX_HEADER_BYTES = 16 * 1024 * 1024  # a real header is a few KiB; larger ones are hostile
Ranks = int | Mapping[str, int]
# safetensors dtype codes as torch spells them: adapter files are written by torch/peft users, and the
# numpy loader cannot even represent some of them (bfloat16, float8), so file dtypes are checked by code.
_FILE_DTYPES = {"F64": "torch.float64", "F16": "torch.float16", "BF16": "torch.bfloat16", "I64": "torch.int64",
                "I32": "torch.int32", "I16": "torch.int16", "I8": "torch.int8", "U8": "torch.uint8", "BOOL": "torch.bool"}


class AdapterError(ValueError):
    """An adapter (file or object) is invalid; the message says what, where, and how to fix it."""


# module name -> (out_features, in_features) of the frozen weight, from the base model
# (``peft_bridge.spec_from_model``; it needs torch, so it lives on the torch side)
AdapterSpec = dict[str, tuple[int, int]]


@dataclass
class LoraAdapter:
    """A[m]: (r_m, in_m) and B[m]: (out_m, r_m) float32 arrays per module m, and the rank-independent scale."""

    A: dict[str, np.ndarray]
    B: dict[str, np.ndarray]
    scale: float

    # ------------------------------------------------------------------ shape facts
    @property
    def modules(self) -> list[str]:
        return sorted(self.A)

    @property
    def ranks(self) -> dict[str, int]:
        A = self.A  # read per client and module by the aggregation (1000s of calls): no property or int() per entry
        return {m: A[m].shape[0] for m in sorted(A)}

    @property
    def rank(self) -> int:
        """The largest module rank (all modules share it unless pruning decides per module)."""
        return max(self.ranks.values())

    def num_params(self) -> int:
        return sum(self.A[m].size + self.B[m].size for m in self.modules)

    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.A.values()) + sum(b.nbytes for b in self.B.values())

    def delta(self, module: str) -> np.ndarray:
        """dW = s * B @ A, shape (out, in)."""
        return self.scale * (self.B[module] @ self.A[module])

    def delta_norms(self) -> dict[str, float]:
        """||s B A||_F per module without forming the (out x in) product: two r x r Gram matrices,
        ||B A||_F^2 = sum((B^T B) * (A A^T)), float32 Grams with a float64 fallback where B A nearly
        cancels (``norms.delta_norms_many``, the batched kernel; one adapter is a batch of one, so
        the streaming aggregate step and the in-memory aggregation get the same bits)."""
        return delta_norms_many([(self.A, self.B, self.scale)])[0]

    def clone(self) -> LoraAdapter:
        return LoraAdapter({m: t.copy() for m, t in self.A.items()}, {m: t.copy() for m, t in self.B.items()}, self.scale)

    # ------------------------------------------------------------------ truncate / pad
    def truncate(self, ranks: Ranks) -> LoraAdapter:
        """Keep the leading ``r`` components: ``B[:, :r]``, ``A[:r, :]`` (server -> client)."""
        A, B = {}, {}
        for m in self.modules:
            r = _rank_for(ranks, m)
            if r > self.A[m].shape[0]:
                raise AdapterError(f"cannot truncate module {m} of rank {self.A[m].shape[0]} to larger rank {r}; use pad()")
            A[m], B[m] = self.A[m][:r].copy(), self.B[m][:, :r].copy()
        return LoraAdapter(A, B, self.scale)

    def pad(self, r_max: int) -> LoraAdapter:
        """Zero-pad every module to rank ``r_max``; ``B @ A`` is unchanged exactly."""
        A, B = {}, {}
        for m in self.modules:
            a, b = self.A[m], self.B[m]
            r = a.shape[0]
            if r > r_max:
                raise AdapterError(f"module {m} has rank {r} > r_max {r_max}")
            A[m], B[m] = np.pad(a, ((0, r_max - r), (0, 0))), np.pad(b, ((0, 0), (0, r_max - r)))
        return LoraAdapter(A, B, self.scale)

    # ------------------------------------------------------------------ validation
    def validate(self, spec: AdapterSpec | None = None, r_min: int = 1, r_max: int | None = None) -> None:
        """Raise AdapterError naming the module and the problem; return None when valid."""
        if set(self.A) != set(self.B):
            raise AdapterError(f"modules with A but no B (or B but no A): {sorted(set(self.A) ^ set(self.B))}")
        if not self.A:
            raise AdapterError("adapter has no modules")
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise AdapterError(f"scale must be a finite positive number, got {self.scale}")
        if spec is not None:
            unknown, missing = sorted(set(self.A) - set(spec)), sorted(set(spec) - set(self.A))
            if unknown:
                raise AdapterError(f"unknown module(s) {unknown[:3]}{'...' if len(unknown) > 3 else ''}: not targets of the base model")
            if missing:
                raise AdapterError(f"missing module(s) {missing[:3]}{'...' if len(missing) > 3 else ''} ({len(missing)} in all)")
        for m in self.modules:
            a, b = self.A[m], self.B[m]
            for name, t in (("lora_A", a), ("lora_B", b)):
                if not isinstance(t, np.ndarray):
                    raise AdapterError(f"{m}.{name}: expected a numpy array, got {type(t).__module__}.{type(t).__name__}")
                if t.dtype != np.float32:
                    raise AdapterError(f"{m}.{name}: dtype {t.dtype}, expected float32")
                if t.ndim != 2:
                    raise AdapterError(f"{m}.{name}: expected a 2-D tensor, got shape {t.shape}")
                if not np.isfinite(t).all():
                    raise AdapterError(f"{m}.{name}: contains NaN or Inf; the client update diverged (lower training.lr)")
            r = a.shape[0]
            if b.shape[1] != r:
                raise AdapterError(f"{m}: lora_A has rank {r} but lora_B has rank {b.shape[1]} (A is r x in, B is out x r)")
            if spec is not None and (b.shape[0], a.shape[1]) != spec[m]:
                raise AdapterError(f"{m}: shape out x in = {b.shape[0]} x {a.shape[1]} does not match the base model's {spec[m][0]} x {spec[m][1]}")
            if r < r_min or (r_max is not None and r > r_max):
                raise AdapterError(f"{m}: rank {r} is outside [r_min, r_max] = [{r_min}, {r_max}]")

    # ------------------------------------------------------------------ safetensors I/O
    def to_bytes(self, extra_metadata: Mapping[str, str] | None = None) -> bytes:
        tensors = {}
        for m in self.modules:  # safetensors.numpy writes the raw buffer: a strided view would be saved scrambled
            tensors[f"{m}.lora_A"] = np.ascontiguousarray(self.A[m])
            tensors[f"{m}.lora_B"] = np.ascontiguousarray(self.B[m])
        meta = {"format": FORMAT, "scale": repr(float(self.scale)), **(extra_metadata or {})}
        return canonical_safetensors(st_save(tensors, metadata=meta))

    @classmethod
    def from_bytes(cls, data: bytes, spec: AdapterSpec | None = None, r_min: int = 1, r_max: int | None = None,
                   scale: float | None = None, where: str = "adapter") -> LoraAdapter:
        """Parse and validate safetensors bytes; ``where`` names the source in error messages.

        Tensor names and dtypes are checked on the header, before loading: numpy has no bfloat16 or
        float8, so a wrong dtype would otherwise surface as an unreadable payload. The arrays are
        writable copies (the loader's views of ``data`` are read-only)."""
        header = _read_header(data, where)
        meta = _metadata(header, where)
        if meta.get("format") != FORMAT:
            raise AdapterError(f"{where}: metadata format is {meta.get('format')!r}, expected {FORMAT!r} (not a HetLoRA adapter)")
        for key in sorted(k for k in header if k != "__metadata__"):
            if key.rpartition(".")[2] not in ("lora_A", "lora_B"):
                raise AdapterError(f"{where}: unexpected tensor {key!r}; keys must end in .lora_A or .lora_B")
            code = header[key].get("dtype") if isinstance(header[key], dict) else None
            if isinstance(code, str) and code != "F32":
                raise AdapterError(f"{where}: {key}: dtype {_FILE_DTYPES.get(code, code)}, expected torch.float32")
        try:
            tensors = st_load(data)
            file_scale = float(meta["scale"])
        except (SafetensorError, KeyError, ValueError) as e:
            raise AdapterError(f"{where}: unreadable safetensors payload: {e}") from None
        if scale is not None and not math.isclose(file_scale, scale, rel_tol=1e-9):
            raise AdapterError(f"{where}: LoRA scale {file_scale} differs from model.lora_scale {scale}")
        A: dict[str, np.ndarray] = {}
        B: dict[str, np.ndarray] = {}
        for key, t in tensors.items():  # every key ends in .lora_A or .lora_B (checked on the header above)
            mod, _, kind = key.rpartition(".")
            (A if kind == "lora_A" else B)[mod] = t.copy()
        adapter = cls(A, B, file_scale)
        try:
            adapter.validate(spec, r_min, r_max)
        except AdapterError as e:
            raise AdapterError(f"{where}: {e}") from None
        return adapter

    def save(self, path: str | Path) -> None:
        Path(path).write_bytes(self.to_bytes())

    @classmethod
    def load(cls, path: str | Path, **kw) -> LoraAdapter:
        p = Path(path)
        if not p.is_file():
            raise AdapterError(f"{p}: no such file")
        return cls.from_bytes(p.read_bytes(), where=str(p), **kw)


def canonical_safetensors(data: bytes) -> bytes:
    """The same safetensors file with a deterministic header: ``__metadata__`` keys sorted, tensor
    entries in data order. safetensors serialises the metadata from a Rust HashMap, whose order
    changes from call to call, so equal adapters would otherwise get different bytes and sha256s
    (breaking byte-identical resume and content checks). Offsets are relative to the data section,
    so re-padding the header does not move any tensor."""
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    meta = header.pop("__metadata__", None)
    ordered = {"__metadata__": dict(sorted(meta.items()))} if meta is not None else {}
    ordered.update(sorted(header.items(), key=lambda kv: (kv[1]["data_offsets"], kv[0])))
    text = json.dumps(ordered, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # keep the data section 8-byte aligned, as safetensors does
    # One copy of the (possibly 0.5 GB) data section, not two (a slice, then a concatenation).
    return b"".join((struct.pack("<Q", len(text)), text, memoryview(data)[8 + n:]))


# numpy dtype -> safetensors dtype name, for ``encode_canonical`` (the dtypes this project writes).
_ST_DTYPES = {np.dtype("<f4"): "F32", np.dtype("<f8"): "F64", np.dtype("<f2"): "F16"}


def encode_canonical(tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> bytes:
    """``canonical_safetensors(safetensors.numpy.save(tensors, metadata))``, byte for byte, written
    directly: one copy of the data instead of three (safetensors' buffer, its Python bytes, the
    canonical concatenation), which for a full model's 0.5 GB delta is most of an upload's CPU time.
    Only for tensors of one dtype, where safetensors orders the data by name (it sorts by dtype,
    then name); anything else goes through safetensors itself."""
    # safetensors stores little-endian C-order data; its numpy save writes a strided view's
    # underlying buffer, not its values, so every array is made so first (a no-op for most).
    plain = {k: np.asarray(v, dtype=v.dtype.newbyteorder("<"), order="C") for k, v in tensors.items()}
    dtypes = {v.dtype for v in plain.values()}
    if len(dtypes) != 1 or next(iter(dtypes)) not in _ST_DTYPES:
        return canonical_safetensors(st_save(plain, metadata=metadata))
    name = _ST_DTYPES[next(iter(dtypes))]
    header: dict[str, Any] = {"__metadata__": dict(sorted(metadata.items()))} if metadata is not None else {}
    views, offset = [], 0
    for k in sorted(plain):
        a = plain[k]
        header[k] = {"dtype": name, "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        views.append(a.reshape(-1).view(np.uint8).data)  # a buffer of the bytes, 0-d and empty arrays too
        offset += a.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return b"".join([struct.pack("<Q", len(text)), text, *views])


def read_safetensors_metadata(data: bytes, where: str = "adapter") -> dict[str, str]:
    """Check the safetensors framing by hand before parsing: 8-byte little-endian header length,
    then a JSON header. Catches pickles, truncation and oversized headers with a clear message."""
    return _metadata(_read_header(data, where), where)


def _read_header(data: bytes, where: str) -> dict:
    """The parsed JSON header after the framing checks of ``read_safetensors_metadata``."""
    if data[:2] in (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05") or data[:2] == b"PK":
        raise AdapterError(f"{where}: looks like a pickle/torch.save file; only safetensors is accepted "
                           "(pickle can run arbitrary code on load). Re-save with safetensors.torch.save_file")
    if len(data) < 8:
        raise AdapterError(f"{where}: {len(data)} bytes is too short to be a safetensors file")
    (n,) = struct.unpack("<Q", data[:8])
    if n > MAX_HEADER_BYTES:
        raise AdapterError(f"{where}: safetensors header of {n} bytes exceeds the {MAX_HEADER_BYTES}-byte limit")
    if 8 + n > len(data):
        raise AdapterError(f"{where}: truncated file: header says {n} bytes but only {len(data) - 8} follow")
    try:
        header = json.loads(data[8:8 + n])
    except (ValueError, RecursionError):  # bad JSON or UTF-8, an over-long integer, hostile nesting depth
        raise AdapterError(f"{where}: not a safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise AdapterError(f"{where}: not a safetensors file (header is not a JSON object)")
    ends = [e["data_offsets"][1] for k, e in header.items() if k != "__metadata__" and isinstance(e, dict)
            and isinstance(e.get("data_offsets"), list) and len(e["data_offsets"]) == 2 and isinstance(e["data_offsets"][1], int)]
    if ends and max(ends) > len(data) - 8 - n:
        raise AdapterError(f"{where}: truncated file: the tensors need {max(ends)} bytes after the header but only "
                           f"{len(data) - 8 - n} follow")
    return header


def _metadata(header: dict, where: str) -> dict[str, str]:
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict):
        raise AdapterError(f"{where}: safetensors __metadata__ must be a JSON object, got {type(meta).__name__}")
    return {str(k): str(v) for k, v in meta.items()}


def _rank_for(ranks: Ranks, module: str) -> int:
    return int(ranks) if isinstance(ranks, int) else int(ranks[module])


def init_global(spec: AdapterSpec, r_max: int, scale: float, seed: int) -> LoraAdapter:
    """The round-0 global adapter, initialised as peft does: B = 0 and A ~ U(-1/sqrt(in), 1/sqrt(in))
    (kaiming-uniform with a = sqrt(5)) from a recorded seed, so dW = 0 at round 0. One generator
    draws the modules in ``spec`` order, so the same spec and seed give the same bytes anywhere."""
    rng = np.random.default_rng(seed)
    A, B = {}, {}
    for m, (out_f, in_f) in spec.items():
        bound = 1.0 / math.sqrt(in_f)
        A[m] = rng.uniform(-bound, bound, (r_max, in_f)).astype(np.float32)
        B[m] = np.zeros((out_f, r_max), np.float32)
    return LoraAdapter(A, B, scale)
