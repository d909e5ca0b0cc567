"""The bad-input corpus: malformed adapters, manifests and configs, generated (never committed).

Each case is ``(name, payload, expected)``: ``expected`` is a regular expression the error message
must match (what is wrong), and the tests also check the message names where (the file, the key,
the module or the config field). ``python tests/corpus/generate.py OUT`` writes every case to OUT
(adapters as ``*.safetensors``, manifests as ``*.manifest.json``, configs as ``*.yaml``), e.g. to
seed the fuzzer or to try ``hetlora inspect`` by hand.
"""

from __future__ import annotations

import io
import json
import pickle
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save as st_save

# The "model" the corpus is checked against: two target modules, ranks in [R_MIN, R_MAX].
Q, V = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"
SPEC = {Q: (16, 16), V: (8, 16)}  # module -> (out, in)
R_MIN, R_MAX, SCALE = 2, 8, 2.0
FORMAT = "hetlora-adapter/1"


@dataclass
class Case:
    name: str
    data: bytes
    expected: str  # regex the message must match
    where: str = ""  # a module / key / field the message must also name ("" = the file name only)
    needs_spec: bool = False  # only detectable against the base model's modules and shapes
    kwargs: dict = field(default_factory=dict)


def tensors(rank: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for m, (o, i) in SPEC.items():
        out[f"{m}.lora_A"] = torch.randn(rank, i, generator=g)
        out[f"{m}.lora_B"] = torch.randn(o, rank, generator=g) * 0.01
    return out


def save(t: dict[str, torch.Tensor], meta: dict[str, str] | None = None) -> bytes:
    return st_save({k: v.contiguous() for k, v in t.items()},
                   metadata={"format": FORMAT, "scale": repr(SCALE)} if meta is None else meta)


def valid_adapter(rank: int = 4, seed: int = 0) -> bytes:
    return save(tensors(rank, seed))


def _with(**changes: torch.Tensor | None) -> dict[str, torch.Tensor]:
    t = tensors()
    for k, v in changes.items():
        key = k.replace("__", ".")
        key = {"qA": f"{Q}.lora_A", "qB": f"{Q}.lora_B", "vA": f"{V}.lora_A", "vB": f"{V}.lora_B"}.get(key, key)
        if v is None:
            t.pop(key)
        else:
            t[key] = v
    return t


def _header(header: bytes, n: int | None = None, body: bytes = b"") -> bytes:
    return struct.pack("<Q", len(header) if n is None else n) + header + body


def adapter_cases() -> list[Case]:
    good = valid_adapter()
    nan_b = tensors()[f"{Q}.lora_B"].clone()
    nan_b[3, 1] = float("nan")
    inf_a = tensors()[f"{V}.lora_A"].clone()
    inf_a[0, 0] = float("inf")
    buf = io.BytesIO()
    torch.save(tensors(), buf)  # a zip-based torch.save file (what a .bin / .pt adapter is)
    n_hdr = struct.unpack("<Q", good[:8])[0]
    return [
        # shapes and ranks
        Case("wrong_shape", save(_with(qB=torch.randn(17, 4))), r"shape out x in = 17 x 16 does not match the base model's 16 x 16",
             Q, needs_spec=True),
        Case("rank_mismatch_A_B", save(_with(qB=torch.randn(16, 3))), r"lora_A has rank 4 but lora_B has rank 3", Q),
        Case("not_2d", save(_with(vA=torch.randn(4, 16, 1))), r"lora_A: expected a 2-D tensor, got shape \(4, 16, 1\)", V),
        Case("rank_above_r_max", valid_adapter(rank=16), r"rank 16 is outside \[r_min, r_max\] = \[2, 8\]", Q),
        Case("rank_below_r_min", valid_adapter(rank=1), r"rank 1 is outside \[r_min, r_max\] = \[2, 8\]", Q),
        # values
        Case("nan", save(_with(qB=nan_b)), r"lora_B: contains NaN or Inf", Q),
        Case("inf", save(_with(vA=inf_a)), r"lora_A: contains NaN or Inf", V),
        Case("scale_nan", save(tensors(), {"format": FORMAT, "scale": "nan"}), r"scale must be a finite positive number, got nan"),
        Case("scale_negative", save(tensors(), {"format": FORMAT, "scale": "-2.0"}), r"scale must be a finite positive number, got -2.0"),
        Case("scale_not_a_number", save(tensors(), {"format": FORMAT, "scale": "two"}), r"unreadable safetensors payload: could not convert"),
        Case("scale_differs", save(tensors(), {"format": FORMAT, "scale": "4.0"}), r"LoRA scale 4.0 differs from model.lora_scale 2.0",
             kwargs={"scale": SCALE}),
        # dtypes
        Case("dtype_float16", save({k: v.half() for k, v in tensors().items()}), r"dtype torch.float16, expected torch.float32", Q),
        Case("dtype_bfloat16", save(_with(vB=torch.zeros(8, 4, dtype=torch.bfloat16))), r"lora_B: dtype torch.bfloat16, expected torch.float32", V),
        Case("dtype_int64", save(_with(qA=torch.zeros(4, 16, dtype=torch.int64))), r"lora_A: dtype torch.int64, expected torch.float32", Q),
        # modules
        Case("extra_module", save({**tensors(), "model.layers.0.self_attn.k_proj.lora_A": torch.randn(4, 16),
                                   "model.layers.0.self_attn.k_proj.lora_B": torch.randn(16, 4)}),
             r"unknown module\(s\) \['model.layers.0.self_attn.k_proj'\]: not targets of the base model", needs_spec=True),
        Case("missing_module", save(_with(vA=None, vB=None)), r"missing module\(s\) \['model.layers.0.self_attn.v_proj'\]",
             needs_spec=True),
        Case("A_without_B", save(_with(vB=None)), r"modules with A but no B \(or B but no A\): \['model.layers.0.self_attn.v_proj'\]"),
        Case("foreign_tensor_name", save({**tensors(), f"{Q}.weight": torch.randn(16, 16)}),
             r"unexpected tensor 'model.layers.0.self_attn.q_proj.weight'; keys must end in .lora_A or .lora_B"),
        Case("no_tensors", save({}), r"adapter has no modules"),
        # framing
        Case("empty_file", b"", r"0 bytes is too short to be a safetensors file"),
        Case("truncated_header", good[: 8 + n_hdr // 2], r"truncated file: header says \d+ bytes but only \d+ follow"),
        Case("truncated_data", good[:-100], r"truncated file: the tensors need \d+ bytes after the header but only \d+ follow"),
        Case("oversized_header", _header(b"{}", n=1 << 40), r"safetensors header of 1099511627776 bytes exceeds the 16777216-byte limit"),
        Case("header_not_json", _header(b"\x00\x01garbage{"), r"not a safetensors file \(header is not JSON\)"),
        Case("header_json_array", _header(b"[1, 2, 3]"), r"not a safetensors file \(header is not a JSON object\)"),
        Case("header_deeply_nested", _header(b"[" * 100_000 + b"]" * 100_000), r"header is not JSON"),
        Case("metadata_not_object", _header(json.dumps({"__metadata__": ["format"]}).encode()),
             r"__metadata__ must be a JSON object, got list"),
        Case("not_a_hetlora_adapter", save(tensors(), {"format": "pt"}), r"metadata format is 'pt', expected 'hetlora-adapter/1'"),
        Case("peft_adapter_without_metadata", st_save(tensors()), r"metadata format is None, expected 'hetlora-adapter/1'"),
        # code execution attempts
        Case("torch_save_renamed", buf.getvalue(), r"looks like a pickle/torch.save file; only safetensors is accepted"),
        Case("pickle_renamed", pickle.dumps(tensors(), protocol=4), r"looks like a pickle/torch.save file"),
        Case("pickle_protocol2_renamed", pickle.dumps({"a": 1}, protocol=2), r"looks like a pickle/torch.save file"),
    ]


# ---------------------------------------------------------------- manifests (store.get_artifact)

PAYLOAD = b"adapter bytes"


def manifest_cases() -> list[Case]:
    """Manifests for a prefix whose ``adapter.safetensors`` holds PAYLOAD."""
    import hashlib

    sha = hashlib.sha256(PAYLOAD).hexdigest()
    ok = {"object": "adapter.safetensors", "sha256": sha, "size": len(PAYLOAD)}

    def j(obj: object) -> bytes:
        return json.dumps(obj).encode()

    return [
        Case("not_json", b"this is not json", r"is not valid UTF-8 JSON", kwargs={"exc": "InvalidManifest"}),
        Case("not_utf8", b"\xff\xfe\x00{", r"is not valid UTF-8 JSON", kwargs={"exc": "InvalidManifest"}),
        Case("json_array", j([ok]), r"must be a JSON object, got list", kwargs={"exc": "InvalidManifest"}),
        Case("json_string", j("manifest"), r"must be a JSON object, got str", kwargs={"exc": "InvalidManifest"}),
        Case("missing_sha256", j({k: v for k, v in ok.items() if k != "sha256"}), r"lacks required key\(s\) \['sha256'\]",
             kwargs={"exc": "InvalidManifest"}),
        Case("missing_everything", j({}), r"lacks required key\(s\) \['object', 'sha256', 'size'\]", kwargs={"exc": "InvalidManifest"}),
        Case("sha256_not_hex", j({**ok, "sha256": "z" * 64}), r"'sha256' must be 64 lowercase hex digits", kwargs={"exc": "InvalidManifest"}),
        Case("sha256_wrong", j({**ok, "sha256": "0" * 64}), r"sha256 mismatch: expected 0{64}, got " + sha, kwargs={"exc": "ChecksumMismatch"}),
        Case("size_wrong", j({**ok, "size": 999}), rf"size mismatch: expected 999 bytes, got {len(PAYLOAD)}", kwargs={"exc": "ChecksumMismatch"}),
        Case("size_negative", j({**ok, "size": -1}), r"'size' must be a non-negative integer, got -1", kwargs={"exc": "InvalidManifest"}),
        Case("size_bool", j({**ok, "size": True}), r"'size' must be a non-negative integer, got True", kwargs={"exc": "InvalidManifest"}),
        Case("size_float", j({**ok, "size": 13.0}), r"'size' must be a non-negative integer, got 13.0", kwargs={"exc": "InvalidManifest"}),
        Case("object_path_traversal", j({**ok, "object": "../../../etc/passwd"}),
             r"'object' must be a file name next to the manifest, got '../../../etc/passwd'", kwargs={"exc": "InvalidManifest"}),
        Case("object_is_manifest", j({**ok, "object": "manifest.json"}), r"'object' must be a file name next to the manifest",
             kwargs={"exc": "InvalidManifest"}),
        Case("object_missing", j({**ok, "object": "gone.safetensors"}), r"gone.safetensors not found", kwargs={"exc": "NotFound"}),
        Case("huge", b'{"object": "adapter.safetensors", "pad": "' + b"x" * (1 << 20) + b'"}',
             r"is larger than 1048576 bytes; refusing to parse it", kwargs={"exc": "InvalidManifest"}),
        Case("deeply_nested", b"[" * 200_000 + b"]" * 200_000, r"is not valid UTF-8 JSON", kwargs={"exc": "InvalidManifest"}),
        Case("integer_too_long", b'{"size": ' + b"9" * 5000 + b"}", r"is not valid UTF-8 JSON", kwargs={"exc": "InvalidManifest"}),
    ]


# ---------------------------------------------------------------- configs (load_config)


def config_cases() -> list[Case]:
    """YAML configs; ``where`` is the field the message must name."""
    y = str.encode
    return [
        Case("unknown_top_level_key", y("trainig: {lr: 0.001}\n"),
             r"config: <root>: unknown key\(s\) \['trainig'\]; allowed: \[.*'training'", "<root>"),
        Case("unknown_nested_key", y("training: {step: 3}\n"),
             r"config: training: unknown key\(s\) \['step'\]; allowed: \[.*'local_steps'", "training"),
        Case("negative_steps", y("training: {local_steps: -3}\n"), r"config: training.local_steps: must be >= 1, got -3", "training.local_steps"),
        Case("zero_batch", y("training: {batch_size: 0}\n"), r"config: training.batch_size: must be >= 1, got 0", "training.batch_size"),
        Case("r_min_above_r_max", y("ranks: {r_min: 8, r_max: 4}\n"), r"config: ranks.r_min: r_min \(8\) must be <= r_max \(4\)", "ranks.r_min"),
        Case("empty_tiers", y("ranks: {tiers: []}\n"), r"config: ranks.tiers: is empty; give at least one tier", "ranks.tiers"),
        Case("tier_rank_outside", y("ranks: {r_max: 8, tiers: [{name: big, rank: 32}]}\n"),
             r"config: ranks.tiers\[big\].rank: 32 is outside \[r_min, r_max\] = \[2, 8\]", "ranks.tiers[big].rank"),
        Case("tier_without_rank", y("ranks: {tiers: [{name: small}]}\n"),
             r"config: ranks.tiers\[0\]: .*missing 1 required positional argument: 'rank'", "ranks.tiers[0]"),
        Case("duplicate_tiers", y("ranks: {tiers: [{name: a, rank: 2}, {name: a, rank: 4}]}\n"),
             r"config: ranks.tiers: tier names must be unique", "ranks.tiers"),
        Case("lr_not_a_number", y("training: {lr: fast}\n"), r"config: training.lr: must be a number, got 'fast'", "training.lr"),
        Case("lr_nan", y("training: {lr: .nan}\n"), r"config: training.lr: must be finite, got nan", "training.lr"),
        Case("steps_fractional", y("training: {local_steps: 2.5}\n"),
             r"config: training.local_steps: must be an integer, got 2.5", "training.local_steps"),
        Case("bool_as_int", y("federation: {rounds: true}\n"), r"config: federation.rounds: must be an integer, got True", "federation.rounds"),
        Case("quorum_zero", y("federation: {quorum: 0}\n"), r"config: federation.quorum: must be in \(0, 1\], got 0", "federation.quorum"),
        Case("client_timeout_negative", y("federation: {client_timeout_s: -5}\n"),
             r"config: federation.client_timeout_s: must be >= 1, got -5", "federation.client_timeout_s"),
        Case("retry_deadline_zero", y("store: {retry_deadline_s: 0}\n"),
             r"config: store.retry_deadline_s: must be > 0, got 0", "store.retry_deadline_s"),
        Case("strategy_unknown", y("strategy: {name: fedprox}\n"),
             r"config: strategy.name: must be one of \['hetlora'.*got 'fedprox'", "strategy.name"),
        Case("s3_without_endpoint", y("store: {kind: s3}\n"), r"config: store.endpoint: is required for kind: s3", "store.endpoint"),
        Case("s3_endpoint_with_scheme", y("store: {kind: s3, endpoint: 'http://minio:9000'}\n"),
             r"config: store.endpoint: is host:port without a scheme", "store.endpoint"),
        Case("section_not_a_mapping", y("training: 5\n"), r"config: training: must be a mapping, got int", "training"),
        Case("root_is_a_list", y("- a\n- b\n"), r"config: <root>: must be a mapping, got list", "<root>"),
        Case("not_yaml", y("training: {lr: [1, 2\n"), r"is not valid YAML", ""),
        Case("more_clients_per_round_than_clients", y("data: {num_clients: 2}\nfederation: {clients_per_round: 4}\n"),
             r"config: federation.clients_per_round: 4 exceeds data.num_clients \(2\)", "federation.clients_per_round"),
    ]


def write_all(out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for suffix, cases in ((".safetensors", adapter_cases()), (".manifest.json", manifest_cases()), (".yaml", config_cases())):
        for c in cases:
            p = out / f"{c.name}{suffix}"
            p.write_bytes(c.data)
            written.append(p)
    return written


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python tests/corpus/generate.py OUT_DIR")
    files = write_all(Path(sys.argv[1]))
    print(f"{len(files)} files written to {sys.argv[1]}")
