"""LoRA adapter state: the A and B factors of every target module as one typed object.

Shapes (HETLORA.md notation): for a module with frozen weight ``W0 (d x l)`` (out x in),
``A (r x l)`` and ``B (d x r)``; the update is ``dW = s * B @ A`` with ONE scale ``s`` for every
rank, so truncating a global adapter keeps the update its leading components stand for.

Serialisation is safetensors only: a pickle payload can execute code on load, so this module never
calls ``torch.load`` and rejects files that look like pickles with a message that says so.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

FORMAT = "hetlora-adapter/1"
MAX_HEADER_BYTES = 16 * 1024 * 1024  # a real header is a few KiB; larger ones are hostile
Ranks = int | Mapping[str, int]


class AdapterError(ValueError):
    """An adapter (file or object) is invalid; the message says what, where, and how to fix it."""


# module name -> (out_features, in_features) of the frozen weight, from the base model
AdapterSpec = dict[str, tuple[int, int]]


def spec_from_model(model: torch.nn.Module, target_modules: tuple[str, ...]) -> AdapterSpec:
    """Every ``nn.Linear`` whose last name part is in ``target_modules``, with its (out, in)."""
    spec = {
        name: (m.out_features, m.in_features)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in target_modules
    }
    if not spec:
        raise AdapterError(f"no nn.Linear named {list(target_modules)} in the model; check model.target_modules")
    return dict(sorted(spec.items()))


@dataclass
class LoraAdapter:
    """A[m]: (r_m, in_m) and B[m]: (out_m, r_m) per module m, and the rank-independent scale."""

    A: dict[str, torch.Tensor]
    B: dict[str, torch.Tensor]
    scale: float

    # ------------------------------------------------------------------ shape facts
    @property
    def modules(self) -> list[str]:
        return sorted(self.A)

    @property
    def ranks(self) -> dict[str, int]:
        return {m: int(self.A[m].shape[0]) for m in self.modules}

    @property
    def rank(self) -> int:
        """The largest module rank (all modules share it unless pruning decides per module)."""
        return max(self.ranks.values())

    def num_params(self) -> int:
        return sum(self.A[m].numel() + self.B[m].numel() for m in self.modules)

    def nbytes(self) -> int:
        return sum(self.A[m].nbytes + self.B[m].nbytes for m in self.modules)

    def delta(self, module: str) -> torch.Tensor:
        """dW = s * B @ A, shape (out, in)."""
        return self.scale * (self.B[module] @ self.A[module])

    def delta_norms(self) -> dict[str, float]:
        """||s B A||_F per module, in float64, without forming the (out x in) product:
        ||B A||_F^2 = sum((B^T B) * (A A^T)), two r x r Gram matrices (~9x faster at r = 16)."""
        out = {}
        for m in self.modules:
            a, b = self.A[m].double(), self.B[m].double()
            sq = float(((b.T @ b) * (a @ a.T)).sum())
            out[m] = abs(self.scale) * max(sq, 0.0) ** 0.5
        return out

    def clone(self) -> LoraAdapter:
        return LoraAdapter({m: t.clone() for m, t in self.A.items()}, {m: t.clone() for m, t in self.B.items()}, self.scale)

    # ------------------------------------------------------------------ truncate / pad
    def truncate(self, ranks: Ranks) -> LoraAdapter:
        """Keep the leading ``r`` components: ``B[:, :r]``, ``A[:r, :]`` (server -> client)."""
        A, B = {}, {}
        for m in self.modules:
            r = _rank_for(ranks, m)
            if r > self.A[m].shape[0]:
                raise AdapterError(f"cannot truncate module {m} of rank {self.A[m].shape[0]} to larger rank {r}; use pad()")
            A[m], B[m] = self.A[m][:r].clone(), self.B[m][:, :r].clone()
        return LoraAdapter(A, B, self.scale)

    def pad(self, r_max: int) -> LoraAdapter:
        """Zero-pad every module to rank ``r_max``; ``B @ A`` is unchanged exactly."""
        A, B = {}, {}
        for m in self.modules:
            a, b = self.A[m], self.B[m]
            r = a.shape[0]
            if r > r_max:
                raise AdapterError(f"module {m} has rank {r} > r_max {r_max}")
            A[m] = torch.cat([a, a.new_zeros(r_max - r, a.shape[1])], 0)
            B[m] = torch.cat([b, b.new_zeros(b.shape[0], r_max - r)], 1)
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
                if t.dtype != torch.float32:
                    raise AdapterError(f"{m}.{name}: dtype {t.dtype}, expected torch.float32")
                if t.dim() != 2:
                    raise AdapterError(f"{m}.{name}: expected a 2-D tensor, got shape {tuple(t.shape)}")
                if not torch.isfinite(t).all():
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
        for m in self.modules:
            tensors[f"{m}.lora_A"] = self.A[m].contiguous()
            tensors[f"{m}.lora_B"] = self.B[m].contiguous()
        meta = {"format": FORMAT, "scale": repr(float(self.scale)), **(extra_metadata or {})}
        return canonical_safetensors(st_save(tensors, metadata=meta))

    @classmethod
    def from_bytes(cls, data: bytes, spec: AdapterSpec | None = None, r_min: int = 1, r_max: int | None = None,
                   scale: float | None = None, where: str = "adapter") -> LoraAdapter:
        """Parse and validate safetensors bytes; ``where`` names the source in error messages."""
        meta = read_safetensors_metadata(data, where)
        if meta.get("format") != FORMAT:
            raise AdapterError(f"{where}: metadata format is {meta.get('format')!r}, expected {FORMAT!r} (not a HetLoRA adapter)")
        try:
            tensors = st_load(data)
            file_scale = float(meta["scale"])
        except (SafetensorError, KeyError, ValueError) as e:
            raise AdapterError(f"{where}: unreadable safetensors payload: {e}") from None
        if scale is not None and not math.isclose(file_scale, scale, rel_tol=1e-9):
            raise AdapterError(f"{where}: LoRA scale {file_scale} differs from model.lora_scale {scale}")
        A, B = {}, {}
        for key, t in tensors.items():
            mod, _, kind = key.rpartition(".")
            if kind == "lora_A":
                A[mod] = t
            elif kind == "lora_B":
                B[mod] = t
            else:
                raise AdapterError(f"{where}: unexpected tensor {key!r}; keys must end in .lora_A or .lora_B")
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
    return struct.pack("<Q", len(text)) + text + data[8 + n:]


def read_safetensors_metadata(data: bytes, where: str = "adapter") -> dict[str, str]:
    """Check the safetensors framing by hand before parsing: 8-byte little-endian header length,
    then a JSON header. Catches pickles, truncation and oversized headers with a clear message."""
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
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict):
        raise AdapterError(f"{where}: safetensors __metadata__ must be a JSON object, got {type(meta).__name__}")
    return {str(k): str(v) for k, v in meta.items()}


def _rank_for(ranks: Ranks, module: str) -> int:
    return int(ranks) if isinstance(ranks, int) else int(ranks[module])


def init_global(spec: AdapterSpec, r_max: int, scale: float, seed: int) -> LoraAdapter:
    """The round-0 global adapter, initialised as peft does: B = 0 and A ~ U(-1/sqrt(in), 1/sqrt(in))
    (kaiming-uniform with a = sqrt(5)) from a recorded seed, so dW = 0 at round 0."""
    g = torch.Generator().manual_seed(seed)
    A, B = {}, {}
    for m, (out_f, in_f) in spec.items():
        bound = 1.0 / math.sqrt(in_f)
        A[m] = (torch.rand(r_max, in_f, generator=g) * 2 - 1) * bound
        B[m] = torch.zeros(out_f, r_max)
    return LoraAdapter(A, B, scale)
