"""Small compiled kernels of the aggregation, built from the C source below with the system C
compiler on first use, cached on disk and bound with ``ctypes``; ``kernels()`` is None where that is not
possible (no compiler, not Linux/macOS, ``HETLORA_CKERNELS=0``, ``OFF`` in tests), and the callers
(``norms``, ``svd``) then run the numpy code they had before. numpy + the standard library only: the
aggregate step loads no torch and gains no dependency.

Why compiled code: HetLoRA's sparsity weights need two r x r Gram matrices per client and module
(``norms``), and numpy runs them as one small BLAS call each (OpenBLAS: 4-25 GFLOP/s at r <= 16,
odd ranks ~2x slower): they were about half of HetLoRA's aggregation time at 1000 SmolLM2 clients.
Here both Grams of a client are one loop nest over its factors (B^T B without a transposing copy),
~2-3x faster. The factor averaging (``reduce.weighted_pair_into``) copied every client's factors into
a float32 stack for one GEMV per chunk (the copy alone ~1.5x the numpy floor at 1000 clients);
``wsum_into`` reads them where they are and adds eight clients per pass into the float64 sum, and
HetLoRA's Grams read the same chunk just before, so it comes from cache the second time.

How the arrays are passed: a ctypes pointer per array (``x.ctypes.data``) costs ~3 us, as much as
reading the array, so the C code gets the addresses of the numpy array objects (``id``) and reads
their data pointer, shape and strides from numpy's public ``PyArrayObject_fields`` layout, after the
header whose size ``object.__basicsize__`` gives. ``_probed`` checks that layout against numpy's own
values on test arrays first (else: numpy route), Python checks each object's type and dtype, and the
C code checks every array's shape, contiguity and alignment before reading any of them.

Build: ``cc -O3 -march=native -funroll-loops`` (compiled on the machine that runs it; the cache key holds the CPU's
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
import sys
from collections.abc import Sequence
from functools import cache
from pathlib import Path

import numpy as np

OFF = False  # tests: force the numpy route
FLAGS = ("-O3", "-march=native", "-funroll-loops", "-shared", "-fPIC", "-std=gnu11")  # unrolled: Grams ~25% faster (A/B, r 5..16)

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
/* ---- kernels over the clients' own arrays (no stack copy): each is passed as the address of its numpy
   array object, whose fields data, nd, dimensions, strides follow the object header (numpy's public
   PyArrayObject_fields; numpy's own PyArray_DATA reads them so). ``off`` is that header's size, probed by
   ckernels.py against numpy's values before any call. Every array is checked here (2-D, the expected
   shape, C-contiguous, 4-byte aligned; its Python type and float32 dtype were checked by the caller)
   before anything is read: -1 if any fails, and nothing is written. */
struct np_fields { char *data; int nd; long *dims; long *strides; };

static const float *arr2(const char *obj, long off, long d0, long d1) {
    const struct np_fields *h = (const struct np_fields *)(obj + off);
    if (h->nd != 2 || h->dims[0] != d0 || h->dims[1] != d1) return 0;
    if ((d0 > 1 && h->strides[0] != d1 * 4) || (d1 > 1 && h->strides[1] != 4)) return 0;
    if ((unsigned long)h->data % 4) return 0;
    return (const float *)h->data;
}

/* the probe: data pointer, nd, dims[0], dims[1], strides[0], strides[1] of one array object */
void probe(long off, const char *obj, long *out) {
    const struct np_fields *h = (const struct np_fields *)(obj + off);
    out[0] = (long)h->data; out[1] = h->nd;
    if (h->nd == 2) { out[2] = h->dims[0]; out[3] = h->dims[1]; out[4] = h->strides[0]; out[5] = h->strides[1]; }
}

/* 0 if all c array objects are C-contiguous float32 (d0 x d1) as arr2 checks, else -1 */
long check_objs(long off, long c, long d0, long d1, const long *xs) {
    for (long k = 0; k < c; k++)
        if (!arr2((const char *)xs[k], off, d0, d1)) return -1;
    return 0;
}

/* gram_sq over c clients' A_k (r x in) and B_k (out x r) given as array objects; work: 2 r^2 floats */
long gram_sq_objs(long off, long c, long r, long in, long out, const long *xa, const long *xb, double *sq, double *diag,
                  float *work) {
    for (long k = 0; k < c; k++)
        if (!arr2((const char *)xa[k], off, r, in) || !arr2((const char *)xb[k], off, out, r)) return -1;
    for (long k = 0; k < c; k++)
        gram_sq(1, r, in, out, arr2((const char *)xa[k], off, r, in), arr2((const char *)xb[k], off, out, r), sq + k,
                diag + k, work);
    return 0;
}

/* acc (d0 x d1 float64, C order) += sum_k w[k] x_k for c float32 arrays x_k (d0 x d1): eight clients per pass
   over acc (acc + (w0 x0 + ... + w7 x7), summed left to right), then the last c % 8 one by one, in float64
   (the products of float32 entries and finite weights below ~1e270 cannot overflow; the old float32 route
   needed its weights scaled). A caller that splits clients into calls at multiples of 8 gets the same bits. */
long wsum_objs(long off, long c, long d0, long d1, const long *xs, const double *w, double *acc) {
    for (long k = 0; k < c; k++)
        if (!arr2((const char *)xs[k], off, d0, d1)) return -1;
    long n = d0 * d1, k = 0;
    for (; k + 8 <= c; k += 8) {
        const float *x[8];
        double v[8];
        for (int u = 0; u < 8; u++) { x[u] = arr2((const char *)xs[k + u], off, d0, d1); v[u] = w[k + u]; }
        for (long e = 0; e < n; e++)
            acc[e] += ((((((v[0] * (double)x[0][e] + v[1] * (double)x[1][e]) + v[2] * (double)x[2][e]) + v[3] * (double)x[3][e])
                       + v[4] * (double)x[4][e]) + v[5] * (double)x[5][e]) + v[6] * (double)x[6][e]) + v[7] * (double)x[7][e];
    }
    for (; k < c; k++) {
        const float *x0 = arr2((const char *)xs[k], off, d0, d1);
        double w0 = w[k];
        for (long e = 0; e < n; e++) acc[e] += w0 * (double)x0[e];
    }
    return 0;
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
    import subprocess  # only here: a task that finds the library cached never imports these
    import tempfile

    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        src, lib = Path(tmp) / "k.c", Path(tmp) / "k.so"
        src.write_text(SOURCE)
        try:
            subprocess.run([cc, *FLAGS, "-o", str(lib), str(src), "-lm"], check=True, capture_output=True, timeout=120)
        except subprocess.SubprocessError as e:  # a failing or hanging compiler: no kernels, numpy instead
            raise OSError(f"building the aggregation kernels failed: {e}") from e
        os.chmod(lib, 0o644)
        os.replace(lib, target)  # atomic: a concurrent process sees the old file or the whole new one


def kernels() -> ctypes.PyDLL | None:
    """The compiled kernels (built on first use), or None: the callers then use numpy."""
    return None if OFF else _kernels()


@cache
def _kernels() -> ctypes.PyDLL | None:
    if os.environ.get("HETLORA_CKERNELS", "1") == "0" or sys.platform not in ("linux", "darwin"):
        return None
    import shutil

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
        lib = ctypes.PyDLL(str(target))  # PyDLL: calls keep the GIL, so no other thread can reshape an array mid-call
    except OSError:  # no writable cache, a failing compiler, an unloadable file: numpy instead
        return None
    lg, p = ctypes.c_long, ctypes.c_void_p
    lib.gram_sq.argtypes = [lg, lg, lg, lg, p, p, p, p, p]
    lib.gram_sq.restype = None
    lib.probe.argtypes = [lg, p, p]
    lib.probe.restype = None
    lib.gram_sq_objs.argtypes = [lg, lg, lg, lg, lg, p, p, p, p, p]
    lib.gram_sq_objs.restype = lg
    lib.wsum_objs.argtypes = [lg, lg, lg, lg, p, p, p]
    lib.wsum_objs.restype = lg
    lib.check_objs.argtypes = [lg, lg, lg, lg, p]
    lib.check_objs.restype = lg
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


# The size of a Python object's header: numpy's array fields follow it (a debug or free-threaded
# interpreter has a larger one; ``_objs`` checks what the C code reads before trusting it).
_HEAD = object.__basicsize__


def _objs() -> ctypes.PyDLL | None:
    """The kernels that read numpy arrays by object address, where a probe of a few arrays (shapes,
    strides, offsets into a buffer) reads back exactly numpy's own values; else None."""
    return None if OFF else _probed()


@cache
def _probed() -> ctypes.PyDLL | None:
    lib = _kernels()
    if lib is None or ctypes.sizeof(ctypes.c_long) != 8 or sys.implementation.name != "cpython":
        return None
    base = np.zeros((7, 13), np.float32)
    out = np.zeros(6, np.int64)
    for x in (base, base[2:5], base[:, 3:4].copy(), np.zeros((1, 5), np.float32)):
        lib.probe(_HEAD, id(x), out.ctypes.data)
        if out.tolist() != [x.ctypes.data, 2, *x.shape, *x.strides]:
            return None
    return lib


def _addresses(xs: Sequence[np.ndarray]) -> np.ndarray | None:
    """The object addresses of ``xs`` for the ``*_objs`` kernels, or None unless every one is a
    float32 ndarray (the C side checks shape, strides and alignment; these, only Python can)."""
    for x in xs:
        if type(x) is not np.ndarray or x.dtype != _F32:
            return None
    return np.fromiter(map(id, xs), np.int64, len(xs))


def gram_sq_list(xa: Sequence[np.ndarray], xb: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray] | None:
    """``gram_sq`` of the clients' own arrays ``xa`` (each r x in) and ``xb`` (each out x r), no stack
    copy; the same bits as ``gram_sq`` of their stacks (the same code per client). None where not possible."""
    lib = _objs()
    if lib is None or not xa or len(xa) != len(xb) or xa[0].ndim != 2 or xb[0].ndim != 2:
        return None
    (r, in_f), out_f = xa[0].shape, xb[0].shape[0]
    pa, pb = _addresses(xa), _addresses(xb)
    if r == 0 or in_f == 0 or out_f == 0 or pa is None or pb is None:
        return None
    c = len(xa)
    sq, diag, work = np.empty(c), np.empty(c), np.empty(2 * r * r, np.float32)
    if lib.gram_sq_objs(_HEAD, c, r, in_f, out_f, pa.ctypes.data, pb.ctypes.data, sq.ctypes.data, diag.ctypes.data, work.ctypes.data):
        return None
    return sq, diag


def available() -> bool:
    """Whether the kernels over the clients' own arrays run here (``addresses``, ``wsum_into``)."""
    return _objs() is not None


def addresses(xs: Sequence[np.ndarray], shape: tuple[int, int]) -> np.ndarray | None:
    """The object addresses of ``xs`` for ``wsum_into``, or None unless the kernels run here and every
    one is a C-contiguous, aligned float32 ndarray of ``shape`` (checked all at once, so a caller can
    decide its route before it starts)."""
    lib = _objs()
    px = None if lib is None or len(shape) != 2 or min(shape) < 1 else _addresses(xs)
    if lib is None or px is None or lib.check_objs(_HEAD, len(xs), shape[0], shape[1], px.ctypes.data):
        return None
    return px


def wsum_into(acc: np.ndarray, px: np.ndarray, w: np.ndarray) -> bool:
    """``acc += sum_k w[k] * x_k`` in float64 for the float32 arrays ``x_k`` (of ``acc``'s 2-D shape)
    whose ``addresses`` are ``px``, read in place (no stack copy); False (``acc`` untouched) where not
    possible. Keep the arrays referenced while calling (their addresses do not)."""
    lib = _objs()
    if lib is None or acc.ndim != 2 or acc.dtype != np.float64 or not acc.flags.c_contiguous or acc.size == 0:
        return False
    w = np.ascontiguousarray(w, dtype=np.float64)
    if px.dtype != np.int64 or not px.flags.c_contiguous or w.shape != (len(px),):
        return False
    return lib.wsum_objs(_HEAD, len(px), acc.shape[0], acc.shape[1], px.ctypes.data, w.ctypes.data, acc.ctypes.data) == 0
