"""Small compiled kernels of the aggregation, built from the C source below with the system C
compiler on first use, cached on disk and bound with ``ctypes``; ``kernels()`` is None where that is not
possible (no compiler, not Linux/macOS, ``HETLORA_CKERNELS=0``, ``OFF`` in tests), and the callers
(``norms``, ``svd``) then run the numpy code they had before. numpy + the standard library only: the
aggregate step loads no torch and gains no dependency.

Why compiled code: HetLoRA's sparsity weights need two r x r Gram matrices per client and module
(``norms``), and numpy runs them as one small BLAS call each (OpenBLAS: 4-25 GFLOP/s at r <= 16,
odd ranks ~2x slower): they were about half of HetLoRA's aggregation time at 1000 SmolLM2 clients.
Here both Grams of a client are one loop nest over its factors (B^T B without a transposing copy),
~2-3x faster (that halved the weights' share of the aggregation).

Build: ``cc -O3 -march=native`` (compiled on the machine that runs it; the cache key holds the CPU's
flags, so a home folder shared by different CPUs gets one build each) into ``$HETLORA_CACHE`` or
``~/.cache/hetlora``, written to a temporary name and renamed (concurrent first uses are safe). A
cold build takes ~0.4 s once per machine and cache; later processes load the cached library (~1 ms).
The component image has no C compiler: there the numpy code runs, unchanged.

Security: the library is built only from this module's own source (no flags, paths or code from the
environment or from uploads), and loaded only from a cache file owned by this user and writable by no
one else. The C code trusts its arguments, so every wrapper below checks shapes, dtypes, contiguity
and sizes of everything it passes (a malformed upload is refused here, or already by
``LoraAdapter``); anything unexpected takes the numpy route instead of the compiled one.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from functools import cache
from pathlib import Path

import numpy as np

OFF = False  # tests: force the numpy route
FLAGS = ("-O3", "-march=native", "-shared", "-fPIC", "-std=gnu11")

SOURCE = r"""/* Small compiled kernels of the aggregation (hetlora_core/ckernels.py builds this file with the system C
   compiler on first use and binds it with ctypes; numpy does the same work where no compiler is found).

   Security: these functions trust their arguments. ckernels.py checks every shape, dtype, contiguity and
   buffer size against the arrays it passes before each call (uploads are untrusted: a malformed shape must
   be refused there, never reach a loop here), and every read below stays inside the buffers so described. */
#include <math.h>

typedef float v8 __attribute__((vector_size(32)));
typedef float v8u __attribute__((vector_size(32), aligned(4))); /* unaligned loads: numpy only guarantees 4 bytes */

static inline v8 ld(const float *p) { return *(const v8u *)p; }
static inline float hsum(v8 v) { return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7])); }

/* G (r x r) = X X^T for X: r rows of n floats. Blocks of 4 x 2 rows (8 vector accumulators, 6 loads per 8
   FMAs); row indices past r are clamped to r - 1 (re-reading a valid row) and their results dropped. */
static void gram_rows(const float *X, long r, long n, float *G) {
    long n8 = n & ~7L;
    for (long i = 0; i < r; i += 4) {
        const float *a[4];
        for (int u = 0; u < 4; u++) a[u] = X + (i + u < r ? i + u : r - 1) * n;
        for (long j = 0; j <= i + 3 && j < r; j += 2) {
            const float *b0 = X + j * n, *b1 = X + (j + 1 < r ? j + 1 : r - 1) * n;
            v8 c00 = {0}, c01 = {0}, c10 = {0}, c11 = {0}, c20 = {0}, c21 = {0}, c30 = {0}, c31 = {0};
            for (long k = 0; k < n8; k += 8) {
                v8 y0 = ld(b0 + k), y1 = ld(b1 + k), x;
                x = ld(a[0] + k); c00 += x * y0; c01 += x * y1;
                x = ld(a[1] + k); c10 += x * y0; c11 += x * y1;
                x = ld(a[2] + k); c20 += x * y0; c21 += x * y1;
                x = ld(a[3] + k); c30 += x * y0; c31 += x * y1;
            }
            float s[4][2] = {{hsum(c00), hsum(c01)}, {hsum(c10), hsum(c11)}, {hsum(c20), hsum(c21)}, {hsum(c30), hsum(c31)}};
            const float *bs[2] = {b0, b1};
            for (long k = n8; k < n; k++)
                for (int u = 0; u < 4; u++)
                    for (int v = 0; v < 2; v++) s[u][v] += a[u][k] * bs[v][k];
            for (int u = 0; u < 4; u++)
                for (int v = 0; v < 2; v++)
                    if (i + u < r && j + v <= i + u) { G[(i + u) * r + j + v] = s[u][v]; G[(j + v) * r + i + u] = s[u][v]; }
        }
    }
}

/* G (r x r) = B^T B for B: n rows of r floats, without a transposing copy: per row o,
   acc[u] += B[o, ib + u] * B[o, jb : jb + 8]. Lanes past column r hold the next row's values and are dropped;
   the last rows, where an 8-float load would pass the end of B, go through a zero-padded copy, so nothing
   outside B is read. */
static void gram_cols(const float *B, long n, long r, float *G) {
    for (long jb = 0; jb < r; jb += 8) {
        long nj = r - jb < 8 ? r - jb : 8;
        long safe = n * r >= jb + 8 ? (n * r - jb - 8) / r + 1 : 0; /* rows o < safe: o * r + jb + 8 <= n * r */
        if (safe > n) safe = n;
        for (long ib = 0; ib <= jb; ib += 8) {
            long ni = r - ib < 8 ? r - ib : 8, idx[8];
            for (int u = 0; u < 8; u++) idx[u] = ib + (u < ni ? u : ni - 1);
            v8 acc[8] = {{0}};
            long o = 0;
            for (; o < safe; o++) {
                const float *row = B + o * r;
                v8 y = ld(row + jb);
                for (int u = 0; u < 8; u++) acc[u] += row[idx[u]] * y;
            }
            for (; o < n; o++) {
                const float *row = B + o * r;
                float tmp[8] = {0};
                for (long t = 0; t < nj; t++) tmp[t] = row[jb + t];
                v8 y = ld(tmp);
                for (int u = 0; u < 8; u++) acc[u] += row[idx[u]] * y;
            }
            for (long u = 0; u < ni; u++)
                for (long t = 0; t < nj; t++) { G[(ib + u) * r + jb + t] = acc[u][t]; G[(jb + t) * r + ib + u] = acc[u][t]; }
        }
    }
}

/* For c clients of stacks a (c, r, in) and b (c, out, r), float32, C order: float32 Grams G_a = A A^T,
   G_b = B^T B, then in float64 sq[k] = sum(G_a * G_b) (= ||B A||_F^2) and diag[k] = sum_i sqrt|G_a,ii G_b,ii|
   (the cancellation test's scale). work: 2 r^2 floats. */
void gram_sq(long c, long r, long in, long out, const float *a, const float *b, double *sq, double *diag, float *work) {
    float *ga = work, *gb = work + r * r;
    for (long k = 0; k < c; k++) {
        gram_rows(a + k * r * in, r, in, ga);
        gram_cols(b + k * out * r, out, r, gb);
        double s = 0.0, d = 0.0;
        for (long i = 0; i < r; i++) {
            double rs = 0.0;
            for (long j = 0; j < r; j++) rs += (double)ga[i * r + j] * (double)gb[i * r + j];
            s += rs;
            d += sqrt(fabs((double)ga[i * r + i] * (double)gb[i * r + i]));
        }
        sq[k] = s;
        diag[k] = d;
    }
}
"""

_F32 = np.dtype(np.float32)


def _cache_dir() -> Path:
    """``$HETLORA_CACHE`` or ``~/.cache/hetlora`` (as ``models.cache_dir``, which imports torch)."""
    env = os.environ.get("HETLORA_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "hetlora"


def _cpu_key() -> str:
    try:
        return next((ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith(("flags", "Features"))), "")
    except OSError:
        return ""


def _owned_private(path: Path) -> bool:
    """Ours and writable by no one else: only then is a cached library loaded (a file others could
    replace would run their code in this process)."""
    st = path.stat()
    return st.st_uid == os.getuid() and not st.st_mode & 0o022


def _build(cc: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        src, lib = Path(tmp) / "k.c", Path(tmp) / "k.so"
        src.write_text(SOURCE)
        subprocess.run([cc, *FLAGS, "-o", str(lib), str(src), "-lm"], check=True, capture_output=True, timeout=120)
        os.chmod(lib, 0o644)
        os.replace(lib, target)  # atomic: a concurrent process sees the old file or the whole new one


@cache
def kernels() -> ctypes.CDLL | None:
    """The compiled kernels (built on first use), or None: the callers then use numpy."""
    if OFF or os.environ.get("HETLORA_CKERNELS", "1") == "0" or sys.platform not in ("linux", "darwin"):
        return None
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    key = hashlib.sha256("\0".join([SOURCE, *FLAGS, cc or "", _cpu_key()]).encode()).hexdigest()[:16]
    target = _cache_dir() / f"ckernels-{key}.so"
    try:
        if not target.exists():
            if cc is None:
                return None
            _build(cc, target)
        if not _owned_private(target) or not _owned_private(target.parent):
            return None
        lib = ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError):
        return None
    lg, p = ctypes.c_long, ctypes.c_void_p
    lib.gram_sq.argtypes = [lg, lg, lg, lg, p, p, p, p, p]
    lib.gram_sq.restype = None
    return lib


def _c_f32(x: np.ndarray, shape: tuple[int, ...]) -> bool:
    return x.dtype == _F32 and x.shape == shape and x.flags.c_contiguous and x.flags.aligned


def gram_sq(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """``(sq, diag)`` float64 per client of stacks ``a`` (c, r, in), ``b`` (c, out, r) float32:
    ``sq = sum((A A^T) * (B^T B))`` from float32 Grams, ``diag = sum_i sqrt|(A A^T)_ii (B^T B)_ii|``;
    None where the kernels are unavailable or the arrays are not what the C code assumes."""
    lib = kernels()
    if lib is None or a.ndim != 3 or b.ndim != 3:
        return None
    c, r, in_f = a.shape
    out_f = b.shape[1]
    if c == 0 or r == 0 or not _c_f32(a, (c, r, in_f)) or not _c_f32(b, (c, out_f, r)):
        return None
    sq, diag, work = np.empty(c), np.empty(c), np.empty(2 * r * r, np.float32)
    lib.gram_sq(c, r, in_f, out_f, a.ctypes.data, b.ctypes.data, sq.ctypes.data, diag.ctypes.data, work.ctypes.data)
    return sq, diag

