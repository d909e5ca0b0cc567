"""The aggregation kernels against straightforward float64 references: batched Gram norms
(norms.py), the chunked float32 weighted sums (reduce.py) and the Gram-eigh SVD (svd.py)."""

from __future__ import annotations

import numpy as np
import pytest

from hetlora_core import ckernels, norms, reduce
from hetlora_core.adapter import LoraAdapter
from hetlora_core.svd import top_svd

SHAPES = {"q": (12, 9), "v": (5, 9), "w": (9, 4)}  # module -> (out, in)


@pytest.fixture(params=[True, False], ids=["compiled", "numpy"])
def compiled(request, monkeypatch) -> bool:
    """Both routes: the compiled kernels (where this machine builds them) and numpy's."""
    monkeypatch.setattr(ckernels, "OFF", not request.param)
    if request.param and not ckernels.available():
        pytest.skip("no C compiler here: the compiled kernels are not built")
    return request.param


def adapters(seed: int, k: int, dtype: type = np.float32) -> list[LoraAdapter]:
    g = np.random.default_rng(seed)
    out = []
    for c in range(k):
        r = int(g.integers(1, 6))
        ranks = {m: max(1, r - i) if c % 3 == 0 else r for i, m in enumerate(SHAPES)}  # some per-module ranks
        A: dict[str, np.ndarray] = {m: g.standard_normal((ranks[m], i)).astype(dtype) for m, (o, i) in SHAPES.items()}
        B: dict[str, np.ndarray] = {m: g.standard_normal((o, ranks[m])).astype(dtype) for m, (o, i) in SHAPES.items()}
        out.append(LoraAdapter(A, B, float(g.uniform(0.5, 2.0))))
    return out


def dense_norm(a: LoraAdapter, m: str) -> float:
    return float(np.linalg.norm(a.scale * a.B[m].astype(np.float64) @ a.A[m].astype(np.float64)))


@pytest.mark.parametrize("chunk_bytes", [None, 1])  # default chunks; one client per chunk
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_delta_norms_match_the_dense_product_and_do_not_depend_on_the_batch(chunk_bytes, dtype, monkeypatch, compiled):
    if chunk_bytes:
        monkeypatch.setattr(norms, "CHUNK_BYTES", chunk_bytes)
    ads = adapters(0, 23, dtype)
    batch = norms.delta_norms_many([(a.A, a.B, a.scale) for a in ads])
    for a, got in zip(ads, batch, strict=True):
        assert list(got) == a.modules  # sorted: callers sum these in dict order
        assert got == pytest.approx({m: dense_norm(a, m) for m in SHAPES}, rel=1e-6)
        assert got == a.delta_norms()  # one adapter is a batch of one: the same bits (streaming step == aggregate)


def test_delta_norms_recompute_in_float64_where_b_a_cancels(monkeypatch, compiled):
    """A = [a; a + e], B = [b, -b]: B A = -b e^T, ~1e-3 of |a| |b| here. The float32 Gram entries
    round at ~1e-7 of |a|^2 |b|^2, a visible share of ||B A||^2 ~ 1e-6 |a|^2 |b|^2; the cancellation
    test sends such a module to float64."""
    g = np.random.default_rng(1)
    a, b = g.standard_normal(64), g.standard_normal(48)
    A = {"m": np.stack([a, a + 1e-3 * g.standard_normal(64)]).astype(np.float32)}
    B = {"m": np.stack([b, -b], axis=1).astype(np.float32)}
    ref = float(np.linalg.norm(B["m"].astype(np.float64) @ A["m"].astype(np.float64)))
    assert norms.delta_norms_many([(A, B, 1.0)])[0]["m"] == pytest.approx(ref, rel=1e-6)
    monkeypatch.setattr(norms, "CANCELLATION", 0.0)  # no fallback: float32 alone is visibly off
    assert norms.delta_norms_many([(A, B, 1.0)])[0]["m"] != pytest.approx(ref, rel=1e-3)


def test_delta_norms_of_zero_factors_are_zero(compiled):
    A = {"m": np.ones((3, 4), np.float32)}
    assert norms.delta_norms_many([(A, {"m": np.zeros((5, 3), np.float32)}, 2.0)]) == [{"m": 0.0}]


@pytest.mark.parametrize("chunk_bytes", [None, 1, 200])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("scale", [1.0, 1e30])  # weights far outside float32's range are scaled, not overflowed
def test_weighted_pair_into_matches_float64_reference(chunk_bytes, transposed, scale, monkeypatch, compiled):
    if chunk_bytes:
        monkeypatch.setattr(reduce, "CHUNK_BYTES", chunk_bytes)
        monkeypatch.setattr(reduce, "CHUNK_BYTES_C", chunk_bytes)
    g = np.random.default_rng(2)
    xa = [g.standard_normal((3, 5)).astype(np.float32) for _ in range(13)]
    xb = [g.standard_normal((7, 3)).astype(np.float32) for _ in range(13)]
    w = scale * g.random(13)
    start_a, start_b = g.standard_normal((3, 5)), g.standard_normal((7, 3))
    acc_a = start_a.copy()
    acc_b = np.ascontiguousarray(start_b.T).T if transposed else start_b.copy()  # a transposed view, as bt[:r].T
    reduce.weighted_pair_into(acc_a, acc_b, xa, xb, w, reduce.Scratch(np.float32))
    ref_a = start_a + sum(wk * x.astype(np.float64) for wk, x in zip(w, xa, strict=True))
    ref_b = start_b + sum(wk * x.astype(np.float64) for wk, x in zip(w, xb, strict=True))
    np.testing.assert_allclose(acc_a, ref_a, rtol=1e-6, atol=1e-6 * scale)
    np.testing.assert_allclose(acc_b, ref_b, rtol=1e-6, atol=1e-6 * scale)


def test_weighted_pair_into_measures_weights_on_its_stacks(monkeypatch, compiled):
    """A ``Weigh`` sees every client once, in order, as its chunk's factors, and its weights are used:
    here HetLoRA's ||s B A||, equal bit for bit to ``delta_norms_many``'s."""
    monkeypatch.setattr(reduce, "CHUNK_BYTES", 500)  # several chunks
    monkeypatch.setattr(reduce, "CHUNK_BYTES_C", 500)
    g = np.random.default_rng(5)
    xa = [g.standard_normal((4, 6)).astype(np.float32) for _ in range(9)]
    xb = [g.standard_normal((5, 4)).astype(np.float32) for _ in range(9)]
    seen: list[float] = []

    def weigh(a: np.ndarray, b: np.ndarray, start: int) -> np.ndarray:
        assert start == len(seen) and 0 < len(a) == len(b) < 9 and a[0].shape == (4, 6) and b[0].shape == (5, 4)
        u = norms.stack_norms(a, b, np.full(len(a), 2.0))
        seen.extend(u.tolist())
        return u

    acc_a, acc_b = np.zeros((4, 6)), np.zeros((5, 4))
    reduce.weighted_pair_into(acc_a, acc_b, xa, xb, weigh, reduce.Scratch(np.float32))
    want = [d["m"] for d in norms.delta_norms_many([({"m": a}, {"m": b}, 2.0) for a, b in zip(xa, xb, strict=True)])]
    assert seen == want  # the same bits
    np.testing.assert_allclose(acc_a, sum(wk * a.astype(np.float64) for wk, a in zip(want, xa, strict=True)), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape", [(30, 30), (12, 40), (40, 12)])
@pytest.mark.parametrize("rank_of", [None, 3])  # full rank, or rank 3 (the rest of the spectrum zero)
def test_top_svd_matches_the_full_svd(shape, rank_of):
    g = np.random.default_rng(3)
    d = g.standard_normal(shape) if rank_of is None else g.standard_normal((shape[0], rank_of)) @ g.standard_normal((rank_of, shape[1]))
    k = 6
    U, S, Vh = top_svd(d, k)
    u, s, vh = np.linalg.svd(d, full_matrices=False)
    np.testing.assert_allclose(S, s[:k], rtol=1e-9, atol=1e-7 * s[0])
    best = (u[:, :k] * s[:k]) @ vh[:k]
    np.testing.assert_allclose((U * S) @ Vh, best, atol=1e-7 * s[0])
    live = S > 1e-6 * s[0]
    np.testing.assert_allclose(U[:, live].T @ U[:, live], np.eye(live.sum()), atol=1e-8)  # orthonormal singular vectors
    np.testing.assert_allclose(Vh[live] @ Vh[live].T, np.eye(live.sum()), atol=1e-8)


def test_top_svd_of_zero_is_zero_factors():
    U, S, Vh = top_svd(np.zeros((5, 8)), 3)
    assert not S.any() and np.isfinite(U).all() and not Vh.any()


def test_factors_near_float32_range_get_their_true_norm_not_nan(compiled):
    """An untrusted upload of 1e20-sized factors overflows a float32 Gram (inf, then nan): its norm is
    recomputed in float64, finite and equal to the dense float64 product's (the outlier check then
    judges a number)."""
    rng = np.random.default_rng(3)
    A = {"m": (1e20 * rng.standard_normal((4, 24))).astype(np.float32)}
    B = {"m": (1e20 * rng.standard_normal((16, 4))).astype(np.float32)}
    (got,) = norms.delta_norms_many([(A, B, 2.0)])
    want = 2.0 * np.linalg.norm(B["m"].astype(np.float64) @ A["m"].astype(np.float64))
    assert np.isfinite(got["m"]) and got["m"] == pytest.approx(want, rel=1e-9)


def test_recon_svd_dense_sum_of_huge_factors_stays_finite():
    """The dense Recon+SVD route's float32 GEMM would overflow on 1e20-sized factors; such a chunk runs
    in float64, so the sum is the true (finite) product."""
    from hetlora_core.svd import DeltaSums

    rng = np.random.default_rng(4)
    a = LoraAdapter({"m": (1e20 * rng.standard_normal((4, 24))).astype(np.float32)},
                    {"m": (1e20 * rng.standard_normal((16, 4))).astype(np.float32)}, 1.0)
    prev = LoraAdapter({"m": np.zeros((8, 24), np.float32)}, {"m": np.zeros((16, 8), np.float32)}, 1.0)
    sums = DeltaSums(prev, 8, {"m": 64})  # many components: the dense route
    assert "m" not in sums.low_rank
    sums.add_module("m", [a], np.array([1.0]))
    want = a.B["m"].astype(np.float64) @ a.A["m"].astype(np.float64)
    assert np.isfinite(sums.dense["m"]).all()
    np.testing.assert_allclose(sums.dense["m"], want, rtol=1e-9)


def test_pair_kernel_keeps_huge_uniform_factors_finite(compiled) -> None:
    """Chunk weights are scaled by their sum, not their max: four clients of 2e38 entries averaged
    with weight 1/4 stay finite in float32 (the review's reproducer; scaling by the max gave inf)."""
    from hetlora_core import reduce as red

    k, r, i, o = 4, 2, 3, 5
    xa = [np.full((r, i), 2e38, np.float32) for _ in range(k)]
    xb = [np.full((o, r), 2e38, np.float32) for _ in range(k)]
    aa, ab = np.zeros((r, i)), np.zeros((o, r))
    red.weighted_pair_into(aa, ab, xa, xb, np.full(k, 1.0 / k), red.Scratch(np.float32))
    assert np.isfinite(aa).all() and np.isfinite(ab).all()
    assert np.allclose(aa, 2e38, rtol=1e-6) and np.allclose(ab, 2e38, rtol=1e-6)


def test_compiled_kernels_refuse_malformed_arrays(compiled):
    """Uploads are untrusted: an array of the wrong shape, dtype, layout or type anywhere in a batch
    makes the compiled route refuse the whole batch (nothing is read or written through it), and the
    callers then take the numpy route, with the same results to float tolerance."""
    if not compiled:
        assert ckernels.addresses([np.zeros((2, 3), np.float32)], (2, 3)) is None
        return
    g = np.random.default_rng(8)
    good = [g.standard_normal((3, 5)).astype(np.float32) for _ in range(4)]
    assert ckernels.addresses(good, (3, 5)) is not None
    bad_cases = [
        np.zeros((3, 6), np.float32)[:, :5],  # not contiguous
        np.zeros((5, 3), np.float32),  # other shape, same size
        np.zeros((3, 5), np.float64),  # other dtype
        np.zeros((1, 3, 5), np.float32),  # other rank
        np.zeros((3, 5), np.float32).T.T[::-1],  # negative strides
        np.frombuffer(bytes(61), np.float32, 15, offset=1).reshape(3, 5),  # misaligned
    ]
    for bad in bad_cases:
        xs = [*good[:2], bad, *good[2:]]
        assert ckernels.addresses(xs, (3, 5)) is None, bad.strides
        acc = np.zeros((3, 5))
        assert ckernels.gram_sq_list(xs, [np.ones((4, 3), np.float32)] * len(xs)) is None
        reduce.weighted_pair_into(acc, np.zeros((4, 3)), good, [np.ones((4, 3), np.float32)] * 4, np.ones(4), reduce.Scratch(np.float32))
        if bad.shape == (3, 5) and bad.dtype == np.float32:  # a layout the numpy route takes: same sums
            want = np.zeros((3, 5))
            reduce.weighted_pair_into(want, np.zeros((4, 3)), xs, [np.ones((4, 3), np.float32)] * 5, np.ones(5), reduce.Scratch(np.float32))
            np.testing.assert_allclose(want, sum(x.astype(np.float64) for x in xs), rtol=1e-6)
    assert not ckernels.wsum_into(np.zeros((3, 4)), ckernels.addresses(good, (3, 5)), np.ones(4))  # accumulator of another shape


def test_compiled_and_numpy_routes_agree(monkeypatch):
    """The compiled Grams and weighted sums equal numpy's to float tolerance, for ranks above one
    vector (r > 8), inner sizes that are no multiple of 8 and single rows."""
    if not ckernels.available():
        pytest.skip("no C compiler here")
    g = np.random.default_rng(9)
    for r, i, o in ((1, 1, 1), (3, 13, 2), (9, 20, 17), (17, 33, 5), (16, 64, 1)):
        xa = [g.standard_normal((r, i)).astype(np.float32) for _ in range(11)]
        xb = [g.standard_normal((o, r)).astype(np.float32) for _ in range(11)]
        scales = g.uniform(0.5, 2, 11)
        got = norms.stack_norms(xa, xb, scales)
        want = np.array([s * np.linalg.norm(b.astype(np.float64) @ a.astype(np.float64)) for s, a, b in zip(scales, xa, xb, strict=True)])
        np.testing.assert_allclose(got, want, rtol=1e-6)
        w = g.random(11)
        acc_a, acc_b = np.zeros((r, i)), np.zeros((o, r))
        reduce.weighted_pair_into(acc_a, acc_b, xa, xb, w, reduce.Scratch(np.float32))
        monkeypatch.setattr(ckernels, "OFF", True)
        ref_a, ref_b = np.zeros((r, i)), np.zeros((o, r))
        reduce.weighted_pair_into(ref_a, ref_b, xa, xb, w, reduce.Scratch(np.float32))
        monkeypatch.setattr(ckernels, "OFF", False)
        np.testing.assert_allclose(acc_a, ref_a, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(acc_b, ref_b, rtol=1e-6, atol=1e-6)
