"""LoraAdapter: truncation, padding, safetensors I/O and every validation error."""

from __future__ import annotations

import io
import math
import pickle

import numpy as np
import pytest
import torch
from safetensors.numpy import save as st_save

from hetlora_core.adapter import AdapterError, LoraAdapter, init_global

SPEC = {"l0.q_proj": (6, 5), "l0.v_proj": (4, 5)}


def rand_adapter(rank: int, seed: int = 0, scale: float = 2.0, spec=SPEC) -> LoraAdapter:
    g = np.random.default_rng(seed)
    return LoraAdapter({m: g.standard_normal((rank, i), np.float32) for m, (o, i) in spec.items()},
                       {m: g.standard_normal((o, rank), np.float32) for m, (o, i) in spec.items()}, scale)


def test_truncate_keeps_leading_components():
    a = rand_adapter(6)
    t = a.truncate(3)
    assert t.ranks == {m: 3 for m in SPEC}
    for m in SPEC:
        assert np.array_equal(t.A[m], a.A[m][:3])
        assert np.array_equal(t.B[m], a.B[m][:, :3])
        # B A of the truncation is the sum of the first three rank-one components
        ref = sum(np.outer(a.B[m][:, j], a.A[m][j]) for j in range(3))
        assert np.allclose(t.B[m] @ t.A[m], ref, atol=1e-6)


def test_pad_preserves_product_exactly_and_round_trips():
    a = rand_adapter(3)
    p = a.pad(8)
    assert p.ranks == {m: 8 for m in SPEC}
    for m in SPEC:
        assert np.array_equal(p.B[m] @ p.A[m], a.B[m] @ a.A[m])
        assert np.count_nonzero(p.A[m][3:]) == 0 and np.count_nonzero(p.B[m][:, 3:]) == 0
    back = p.truncate(3)
    assert all(np.array_equal(back.A[m], a.A[m]) for m in SPEC)


def test_truncate_per_module_and_errors():
    a = rand_adapter(4)
    t = a.truncate({"l0.q_proj": 2, "l0.v_proj": 4})
    assert t.ranks == {"l0.q_proj": 2, "l0.v_proj": 4} and t.rank == 4
    with pytest.raises(AdapterError, match="larger rank"):
        a.truncate(5)
    with pytest.raises(AdapterError, match="r_max"):
        a.pad(2)


def test_init_global_like_peft():
    g = init_global(SPEC, 8, 2.0, seed=3)
    assert all(np.count_nonzero(g.B[m]) == 0 for m in SPEC)
    assert all(np.abs(g.A[m]).max() <= 1 / math.sqrt(5) for m in SPEC)
    assert all(g.A[m].dtype == g.B[m].dtype == np.float32 for m in SPEC)
    assert np.array_equal(init_global(SPEC, 8, 2.0, seed=3).A["l0.q_proj"], g.A["l0.q_proj"])
    assert not np.array_equal(init_global(SPEC, 8, 2.0, seed=4).A["l0.q_proj"], g.A["l0.q_proj"])


def test_safetensors_round_trip():
    a = rand_adapter(4, scale=1.5)
    b = LoraAdapter.from_bytes(a.to_bytes(), SPEC, 1, 8, 1.5)
    assert b.scale == 1.5 and all(np.array_equal(a.A[m], b.A[m]) and np.array_equal(a.B[m], b.B[m]) for m in SPEC)


def _raw(tensors: dict, meta=None) -> bytes:
    return st_save(tensors, metadata=meta or {"format": "hetlora-adapter/1", "scale": "2.0"})


@pytest.mark.parametrize("mutate, message", [
    (lambda t: t.update({"l0.k_proj.lora_A": np.zeros((2, 5), np.float32), "l0.k_proj.lora_B": np.zeros((6, 2), np.float32)}),
     "unknown module"),
    (lambda t: [t.pop("l0.v_proj.lora_A"), t.pop("l0.v_proj.lora_B")], "missing module"),
    (lambda t: t.update({"l0.q_proj.lora_A": np.zeros((4, 7), np.float32)}), "does not match the base model"),
    (lambda t: t.update({"l0.q_proj.lora_B": np.zeros((6, 3), np.float32)}), "lora_A has rank 4 but lora_B has rank 3"),
    (lambda t: t.update({"l0.q_proj.lora_A": np.full((4, 5), np.nan, np.float32)}), "NaN or Inf"),
    (lambda t: t.update({"l0.v_proj.lora_B": np.full((4, 4), np.inf, np.float32)}), "NaN or Inf"),
    (lambda t: t.update({"l0.q_proj.lora_A": np.zeros((4, 5), np.float16)}), "dtype torch.float16, expected torch.float32"),
    (lambda t: t.update({"l0.q_proj.bias": np.zeros(4, np.float32)}), "unexpected tensor"),
])
def test_bad_tensors_rejected_with_message(mutate, message):
    t = {f"{m}.lora_{k}": v for m in SPEC for k, v in (("A", rand_adapter(4).A[m]), ("B", rand_adapter(4).B[m]))}
    mutate(t)
    with pytest.raises(AdapterError, match=message):
        LoraAdapter.from_bytes(_raw(t), SPEC, 1, 8, 2.0)


def test_in_memory_arrays_validated():
    """What code builds is checked like what a file holds: numpy float32, 2-D, finite."""
    a = rand_adapter(2)
    a.A["l0.q_proj"] = a.A["l0.q_proj"].astype(np.float64)
    with pytest.raises(AdapterError, match=r"l0.q_proj.lora_A: dtype float64, expected float32"):
        a.validate(SPEC)
    a.A["l0.q_proj"] = torch.zeros(2, 5)
    with pytest.raises(AdapterError, match=r"l0.q_proj.lora_A: expected a numpy array, got torch.Tensor"):
        a.validate(SPEC)


def test_loaded_arrays_are_writable_and_strided_arrays_serialise_by_value():
    a = rand_adapter(3)
    a.B["l0.q_proj"] = np.asfortranarray(a.B["l0.q_proj"])  # same values, column-major buffer
    b = LoraAdapter.from_bytes(a.to_bytes(), SPEC)
    assert all(np.array_equal(a.B[m], b.B[m]) and np.array_equal(a.A[m], b.A[m]) for m in SPEC)
    b.B["l0.q_proj"][0, 0] = 1.0  # not a read-only view of the bytes


def test_rank_out_of_range_rejected():
    with pytest.raises(AdapterError, match=r"rank 12 is outside \[r_min, r_max\] = \[2, 8\]"):
        LoraAdapter.from_bytes(rand_adapter(12).to_bytes(), SPEC, 2, 8, 2.0)
    with pytest.raises(AdapterError, match=r"rank 1 is outside"):
        LoraAdapter.from_bytes(rand_adapter(1).to_bytes(), SPEC, 2, 8, 2.0)


def test_not_safetensors_rejected():
    good = rand_adapter(4).to_bytes()
    with pytest.raises(AdapterError, match="pickle"):
        LoraAdapter.from_bytes(pickle.dumps({"x": 1}), SPEC)
    buf = io.BytesIO()
    torch.save({"l0.q_proj.lora_A": torch.zeros(2, 5)}, buf)  # what a .bin / .pt adapter is
    with pytest.raises(AdapterError, match="pickle"):
        LoraAdapter.from_bytes(buf.getvalue(), SPEC)
    with pytest.raises(AdapterError, match="truncated"):
        LoraAdapter.from_bytes(good[:40], SPEC)
    with pytest.raises(AdapterError, match="too short"):
        LoraAdapter.from_bytes(b"abc", SPEC)
    with pytest.raises(AdapterError, match="exceeds"):
        LoraAdapter.from_bytes((2**40).to_bytes(8, "little") + b"{}", SPEC)
    with pytest.raises(AdapterError, match="not JSON"):
        LoraAdapter.from_bytes((4).to_bytes(8, "little") + b"\xff\xfe\x00\x01", SPEC)
    with pytest.raises(AdapterError, match="unreadable|truncated"):
        LoraAdapter.from_bytes(good[:-10], SPEC)


def test_wrong_format_and_scale_rejected():
    t = {f"{m}.lora_A": rand_adapter(2).A[m] for m in SPEC} | {f"{m}.lora_B": rand_adapter(2).B[m] for m in SPEC}
    with pytest.raises(AdapterError, match="not a HetLoRA adapter"):
        LoraAdapter.from_bytes(st_save(t), SPEC)
    with pytest.raises(AdapterError, match="differs from model.lora_scale"):
        LoraAdapter.from_bytes(rand_adapter(2, scale=3.0).to_bytes(), SPEC, scale=2.0)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64])
@pytest.mark.parametrize("metadata", [None, {}, {"z": "1", "format": "x"}])
def test_encode_canonical_is_canonical_safetensors_byte_for_byte(dtype, metadata):
    """encode_canonical writes what safetensors + canonical_safetensors write, without their copies:
    names in safetensors' order (non-ASCII included), 0-d and empty tensors, strided views and
    big-endian arrays by value; mixed dtypes take safetensors' own path, with the same result."""
    from hetlora_core.adapter import canonical_safetensors, encode_canonical

    rng = np.random.default_rng(0)
    t = {"b.w": rng.random((3, 4)).astype(dtype), "a": rng.random(()).astype(dtype), "z.e": np.zeros((0, 5), dtype),
         "\u00e9": rng.random(7).astype(dtype), "A": rng.random((2, 2, 2)).astype(dtype)[:, ::2],
         "be": rng.random(3).astype(np.dtype(dtype).newbyteorder(">"))}
    for tensors in (t, {**t, "mixed": np.ones(2, np.float32 if dtype != np.float32 else np.float64)}):
        plain = {k: v.astype(v.dtype.newbyteorder("<"), order="C") for k, v in tensors.items()}
        data = encode_canonical(tensors, metadata)
        assert data == canonical_safetensors(st_save(plain, metadata=metadata))
        from safetensors.numpy import load
        back = load(data)
        assert sorted(back) == sorted(tensors) and all(np.array_equal(back[k], v) and back[k].shape == v.shape
                                                       for k, v in tensors.items())
