"""``lapack.top_eigh``: the k leading eigenpairs through LAPACK's dsyevr (numpy's own OpenBLAS) agree
with ``numpy.linalg.eigh``'s, and the eigh route (other numpy builds) gives the same answer."""

from __future__ import annotations

import numpy as np
import pytest

from hetlora_core import lapack


def _check(sym: np.ndarray, k: int, vals: np.ndarray, vecs: np.ndarray) -> None:
    ref_vals, ref_vecs = np.linalg.eigh(sym)
    ref_vals, ref_vecs = ref_vals[::-1][:k], ref_vecs[:, ::-1][:, :k]
    scale = max(abs(ref_vals[0]), 1.0)
    np.testing.assert_allclose(vals, ref_vals, atol=1e-12 * scale)
    assert vecs.shape == (sym.shape[0], k) and vecs.flags.c_contiguous
    np.testing.assert_allclose(vecs.T @ vecs, np.eye(k), atol=1e-10)  # orthonormal
    np.testing.assert_allclose(sym @ vecs, vecs * vals, atol=1e-10 * scale)  # eigenpairs


@pytest.mark.parametrize("off", [False, True])
@pytest.mark.parametrize("n, k, rank", [(40, 6, None), (40, 40, None), (30, 5, 3), (1, 1, None)])
def test_top_eigh_gives_the_leading_eigenpairs(off, n, k, rank, monkeypatch):
    monkeypatch.setattr(lapack, "LAPACK_OFF", off)
    g = np.random.default_rng(n + k)
    d = g.standard_normal((n, n if rank is None else rank))
    sym = d @ d.T  # rank-deficient for rank=3: a zero eigenvalue of multiplicity n - 3
    before = sym.copy()
    vals, vecs = lapack.top_eigh(sym, k)
    assert np.array_equal(sym, before)  # the input is left alone
    _check(sym, k, vals, vecs)


def test_top_eigh_of_zero_is_zero_values_and_orthonormal_vectors():
    vals, vecs = lapack.top_eigh(np.zeros((7, 7)), 3)
    assert not vals.any()
    np.testing.assert_allclose(vecs.T @ vecs, np.eye(3), atol=1e-12)


def test_numpy_wheel_lapack_is_found_on_linux():
    """numpy's wheels bundle OpenBLAS with LAPACKE: where this test runs (Linux, pip numpy) the fast
    route is taken, so the benchmark figures measure it."""
    import sys

    if not sys.platform.startswith("linux") or "openblas" not in str(np.show_config(mode="dicts")).lower():
        pytest.skip("not numpy's OpenBLAS wheel on Linux")
    assert lapack._dsyevr() is not None
