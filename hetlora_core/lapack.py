"""The leading eigenpairs of a symmetric float64 matrix through LAPACK's ``dsyevr`` (a subset of the
spectrum), from the LAPACK numpy itself is linked against; ``numpy.linalg.eigh`` where that is not
reachable. numpy only (the aggregate step loads no torch, and scipy is not a dependency).

Why: Recon+SVD takes its top-r singular triplets from the eigendecomposition of a 576 x 576 Gram
matrix per SmolLM2 q_proj module. ``numpy.linalg.eigh`` (``dsyevd``) computes all 576 eigenvectors:
64 ms on one EPYC core, about half of it after the tridiagonal reduction; ``dsyevr`` for the top 16
takes 28 ms (same eigenpairs to ~1e-15). That was ~5x the aggregation's numpy bandwidth floor at 1000
clients, of the 20x allowed.

How: numpy's wheels bundle OpenBLAS with LAPACKE (``scipy_LAPACKE_dsyevr64_`` in numpy 2's
``scipy-openblas64``, ``LAPACKE_dsyevr64_`` in older ILP64 builds); it is already mapped into this
process, so ``ctypes`` binds the symbol from the library numpy loaded. Any other build (MKL,
Accelerate, a 32-bit-integer LAPACK without LAPACKE) takes the ``eigh`` route: the same eigenpairs up
to rounding. ``LAPACK_OFF`` (tests) forces that route.
"""

from __future__ import annotations

import ctypes
import os
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

LAPACK_COL_MAJOR = 102
# symbol names of LAPACKE's dsyevr with 64-bit integers, in the OpenBLAS builds numpy's wheels bundle
SYMBOLS = ("scipy_LAPACKE_dsyevr64_", "LAPACKE_dsyevr64_")
LAPACK_OFF = False  # tests: force numpy.linalg.eigh


@cache
def _dsyevr() -> Any | None:
    """LAPACKE_dsyevr (64-bit integers) from the OpenBLAS numpy loaded, or None.

    Security: only a library already mapped into this process by numpy's own import (read from
    /proc/self/maps, whose paths the kernel writes) is opened -- no search path, no environment
    variable, no file a user or an upload could name -- so no new code is loaded, only a symbol of
    code that is already running is looked up."""
    np.linalg.eigh(np.eye(2))  # numpy loads its LAPACK at import; a call makes sure it is mapped
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:  # not Linux
        return None
    paths = sorted({ln.split(None, 5)[5] for ln in maps.splitlines()
                    if len(ln.split(None, 5)) == 6 and "openblas" in os.path.basename(ln.split(None, 5)[5]).lower()})
    i64 = ctypes.c_int64
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for name in SYMBOLS:
            fn = getattr(lib, name, None)
            if fn is None:
                continue
            dp, ip = ctypes.POINTER(ctypes.c_double), ctypes.POINTER(i64)
            fn.restype = i64
            fn.argtypes = [ctypes.c_int, ctypes.c_char, ctypes.c_char, ctypes.c_char, i64, dp, i64, ctypes.c_double,
                           ctypes.c_double, i64, i64, ctypes.c_double, ip, dp, dp, i64, ip]
            return fn
    return None


def top_eigh(sym: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` largest eigenvalues (descending) of the symmetric float64 ``sym`` (n x n) and their
    eigenvectors as columns (n x k). A LAPACK call that reports a failure falls back to ``eigh`` (on
    the untouched input: LAPACK works on a copy), never to a wrong answer."""
    n = sym.shape[0]
    k = min(k, n)
    fn = None if LAPACK_OFF or k <= 0 else _dsyevr()
    if fn is not None and sym.dtype == np.float64 and sym.flags.c_contiguous and sym.shape == (n, n):
        dp = ctypes.POINTER(ctypes.c_double)
        w, z = np.empty(n), np.empty((k, n))  # z: column-major n x k, one eigenvector per row here
        found, isuppz = ctypes.c_int64(0), np.empty(2 * k, np.int64)
        # column-major on a C-ordered symmetric matrix: its transpose, the same matrix
        work = sym.copy()  # dsyevr overwrites its input
        info = fn(LAPACK_COL_MAJOR, b"V", b"I", b"L", n, work.ctypes.data_as(dp), n, 0.0, 0.0, n - k + 1, n, 0.0,
                  ctypes.byref(found), w.ctypes.data_as(dp), z.ctypes.data_as(dp), n,
                  isuppz.ctypes.data_as(ctypes.POINTER(ctypes.c_int64)))
        if info == 0 and found.value == k:
            return w[:k][::-1].copy(), np.ascontiguousarray(z[::-1].T)
    vals, vecs = np.linalg.eigh(sym)  # ascending
    return vals[::-1][:k].copy(), np.ascontiguousarray(vecs[:, ::-1][:, :k])
