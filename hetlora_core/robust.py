"""Robust aggregation: what the server does, beyond the paper, so that no single client can poison the
global (issue 13, part 4; docs/reliability.md "Robust aggregation (a departure from the paper)").

The paper trusts every upload. Three defences, all model-free (numpy; the aggregate step loads no torch):

* **Norm outliers** (``strategy.norm_ratio``, on by default): a client whose update norm, or the norm
  of either LoRA factor, is more than ``norm_ratio`` times the round's median is *dropped* (not
  clipped: an update that far from every other client's is not a noisy honest update, and a clipped
  one would still steer the global by ``norm_ratio`` honest clients' worth; a drop goes through the
  same path as every other bad upload: a reason, the quorum, the weights recomputed without it).
  Decided from the first pass's numbers alone, before any weight is computed (``norm_outliers``).
* **Whole-update clipping** (``strategy.clip_norm``): factor averaging averages A and B separately,
  so bounding ``||s B_k A_k||`` (which scaling B does) leaves the cross terms ``B_j A_k`` of the
  global unbounded: a client that inflates A (or hides a huge B behind a zero row of A) moves the
  global by orders of magnitude. ``factor_clip`` bounds each factor's *change* from what the client
  received as well (``FactorClip``), so the global's update stays within a small multiple of C.
* **The new global is checked before it is committed** (``check_global``): every value finite and
  its update norm sane, else the round fails (``RoundRejected``) with the previous global intact.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from .adapter import LoraAdapter

Norms = dict[str, float]  # "update" (||s B A||_F or ||delta||_F over every tensor), and for LoRA "A", "B"


class RoundRejected(RuntimeError):
    """The aggregated global failed its checks; nothing was committed and the previous global stands."""


# What the aggregation math itself can raise on extreme (finite) inputs: a round failure, not a crash.
AGGREGATION_FAULTS = (np.linalg.LinAlgError, ArithmeticError)


def _sq(x: np.ndarray) -> float:
    """||x||_F^2 by a float32 dot (4x faster than a float64 copy), redone in float64 when it overflows:
    a finite upload of 1e20s has a sum of squares beyond float32 (only a hostile one gets there). For
    the norm-ratio test, where a relative error of 1e-6 is immaterial."""
    with np.errstate(over="ignore", invalid="ignore"):
        v = float(np.dot(x.ravel(), x.ravel()))
    if math.isfinite(v):
        return v
    y = x.astype(np.float64).ravel()
    return float(np.dot(y, y))


def _sq64(x: np.ndarray) -> float:
    """||x||_F^2 in float64: the clip factors change the aggregated bytes, so they are computed as
    exactly as the weights are."""
    y = x.astype(np.float64, copy=False).ravel()
    return float(np.dot(y, y))


def lora_norms(a: LoraAdapter, delta_norms: Mapping[str, float] | None = None) -> Norms:
    """The update norm ``sqrt(sum_m ||s B_m A_m||_F^2)`` and the factor norms ``||A||_F``, ``||B||_F``
    over every module. Both factors are watched: the product alone cannot see a client that scales A
    up and B down by the same factor, whose A then enters the factor average at full size."""
    dn = a.delta_norms() if delta_norms is None else delta_norms
    return {"update": math.sqrt(sum(v * v for v in dn.values())),
            "A": math.sqrt(sum(_sq(x) for x in a.A.values())), "B": math.sqrt(sum(_sq(x) for x in a.B.values()))}


def tensor_norms(delta: Mapping[str, np.ndarray]) -> Norms:
    """Full fine-tuning: the norm of the whole weight delta."""
    return {"update": math.sqrt(sum(_sq(x) for x in delta.values()))}


def lower_median(xs: list[float]) -> float:
    """The lower of the two middle values for an even count: with 2 clients it is the smaller norm, so
    one poisoned client of two cannot raise the reference it is compared with (a mean of the middle
    two would make it half its own norm), and k of 2k poisoned clients cannot either."""
    s = sorted(xs)
    return s[(len(s) - 1) // 2]


def norm_outliers(norms: Mapping[str, Norms], ranks: Mapping[str, float], ratio: float | None,
                  floor: Mapping[str, float] | None = None) -> dict[str, str]:
    """client -> why it is dropped, for every client with a norm above ``ratio`` x the round's median.

    Norms are compared per rank component (divided by ``sqrt(rank)``): a rank-64 client is not an
    outlier among rank-4 clients for its rank alone. The reference is the lower median of the round's
    values; when it is 0 (e.g. most clients sent B = 0, an untrained update) it is the lower median of
    the positive values instead, so a zero median neither drops every client that moved at all nor
    lets any norm through; with no positive value there is nothing to compare. One client alone is
    its own median: never an outlier. ``ratio=None`` disables the check.

    ``floor`` (per kind, per rank component): a reference the *server* trusts, the previous global's
    norms (round 0: the seeded initial A). Security: the median is the clients' word, and clients can
    lower it as well as raise it: with two clients, one uploading a tiny update would make the honest
    one "ten times the median" and get it dropped. The reference is therefore never below the floor,
    and with fewer than three clients a kind without a positive floor is not judged at all (two
    values cannot say which is the outlier; ``clip_norm`` and the check of the new global remain)."""
    if ratio is None or len(norms) < 2:
        return {}
    floor = floor or {}
    out: dict[str, str] = {}
    kinds = sorted({k for d in norms.values() for k in d}, key=lambda k: (k != "update", k))  # the update first
    for kind in kinds:
        per = {c: d[kind] / math.sqrt(max(ranks.get(c, 1.0), 1.0)) for c, d in norms.items() if kind in d}
        trusted = floor.get(kind, 0.0)
        if len(per) < 3 and not trusted > 0:
            continue
        ref = lower_median(list(per.values()))
        if not ref > 0:
            pos = [v for v in per.values() if v > 0]
            ref = lower_median(pos) if pos else 0.0
        ref = max(ref, trusted)
        if not ref > 0:
            continue
        for c, v in per.items():
            if c not in out and not v <= ratio * ref:  # NaN compares False: dropped too
                what = "update norm" if kind == "update" else f"norm of {kind}"
                out[c] = (f"{what} per rank component {v:.4g} is more than strategy.norm_ratio={ratio:g} times the "
                          f"round's median {ref:.4g} (a poisoned or diverged update; raise or null strategy.norm_ratio "
                          "if honest clients differ this much)")
    return out


def check_global(rnd: int, values: list[np.ndarray], norm: float, client_max: float, ratio: float | None) -> None:
    """Raise ``RoundRejected`` unless every value of the new global is finite and, with ``ratio`` set,
    its update norm is at most ``ratio`` x ``client_max``, the largest accepted client's (or the previous
    global's, if larger): an average of the clients' updates cannot honestly exceed the largest of them
    by much; factor averaging's cross terms can, which is what an attack that slipped past the
    per-client checks would look like."""
    bad = sum(int(np.size(v) - np.count_nonzero(np.isfinite(v))) for v in values)
    why = ""
    if bad:
        why = f"{bad} non-finite value(s) in the aggregated global (the clients' weighted sum overflowed float32)"
    elif not math.isfinite(norm):
        why = f"its update norm is {norm}"
    elif ratio is not None and norm > ratio * client_max and norm > 0:
        why = (f"its update norm {norm:.4g} is more than strategy.norm_ratio={ratio:g} times the largest accepted "
               f"client's ({client_max:.4g}): factor averaging's cross terms blew up")
    if why:
        raise RoundRejected(f"round {rnd}: the aggregated global is not committed: {why}. The previous global is "
                            "unchanged; the round fails and can be rerun (check the clients' updates, or set "
                            "strategy.clip_norm)")


# ---------------------------------------------------------------- whole-update clipping (factor averaging)


@dataclass(frozen=True)
class FactorClip:
    """Scales of a client's factor *changes*: ``A' = A_r + a (A - A_r)``, ``B' = B_r + b (B - B_r)``,
    where ``A_r``, ``B_r`` are what it received (the previous global truncated to its ranks); 1.0 =
    unchanged."""

    a: float = 1.0
    b: float = 1.0


def _spectral(xs: Mapping[str, np.ndarray], rows: bool) -> dict[str, float]:
    """||x||_2 of every matrix, from its small Gram matrix (``x x^T`` of an r x n A if ``rows``, else
    ``x^T x`` of an n x r B), matrices of equal shapes stacked into one batched matmul and eigvalsh
    (one small call per module costs more in overhead than in flops); in
    float64 (the clip factors change the aggregated bytes)."""
    same: dict[tuple[int, ...], list[str]] = {}
    for m, x in xs.items():
        same.setdefault(x.shape, []).append(m)
    out: dict[str, float] = {}
    for shape, ms in same.items():
        if 0 in shape:
            out.update(dict.fromkeys(ms, 0.0))
            continue
        x = np.stack([xs[m] for m in ms]).astype(np.float64)
        g = x @ x.transpose(0, 2, 1) if rows else x.transpose(0, 2, 1) @ x
        top = np.linalg.eigvalsh(g)[:, -1]
        out.update({m: math.sqrt(max(float(v), 0.0)) for m, v in zip(ms, top, strict=True)})
    return out


def factor_clip(a: LoraAdapter, received: LoraAdapter, clip_norm: float) -> FactorClip | None:
    """How much of each factor's change to keep so that, besides ``||s B A|| <= C`` (the B scaling of
    ``strategies.clip_factor``, applied after this):

    * B's change moves ``s B A`` by at most C on the A received: ``|s| ||dB||_F ||A_r||_2 <= C``;
    * A's change moves it by at most C on the B received, ``|s| ||B_r||_2 ||dA||_F <= C``, and is at
      most the norm of the A received, ``||dA||_F <= ||A_r||_F`` (round 0 has B_r = 0, so only this
      bounds A then; LoRA's A is a near-frozen random projection that honest training moves little).

    Sums over modules are taken in quadrature, as the update norm is. With every client so bounded,
    the global's update (a weighted average of the factors) is at most about ``C (2 + sqrt(r_max))``
    whatever the cross terms. None when nothing needs clipping."""
    s = abs(a.scale)
    da2 = ar2 = eb2 = ea2 = 0.0
    sa, sb = _spectral(received.A, rows=True), _spectral(received.B, rows=False)
    for m in a.modules:
        # float64 differences: two finite float32 values can differ by more than float32 holds
        nda2, ndb2 = _sq64(a.A[m].astype(np.float64) - received.A[m]), _sq64(a.B[m].astype(np.float64) - received.B[m])
        da2, ar2 = da2 + nda2, ar2 + _sq64(received.A[m])
        eb2 += s * s * ndb2 * sa[m] ** 2
        ea2 += s * s * nda2 * sb[m] ** 2
    ta = min(1.0, math.sqrt(ar2 / da2) if da2 > 0 else 1.0, clip_norm / math.sqrt(ea2) if ea2 > 0 else 1.0)
    tb = min(1.0, clip_norm / math.sqrt(eb2) if eb2 > 0 else 1.0)
    return None if ta >= 1.0 and tb >= 1.0 else FactorClip(ta, tb)


def apply_factor_clip(a: LoraAdapter, received: LoraAdapter, fc: FactorClip | None) -> LoraAdapter:
    """The adapter with its factor changes scaled by ``fc`` (a new object), or itself."""
    if fc is None:
        return a
    def toward(x: np.ndarray, r: np.ndarray, t: float) -> np.ndarray:
        return x if t == 1.0 else (r + t * (x.astype(np.float64) - r)).astype(np.float32)  # float64, as in factor_clip

    return LoraAdapter({m: toward(a.A[m], received.A[m], fc.a) for m in a.modules},
                       {m: toward(a.B[m], received.B[m], fc.b) for m in a.modules}, a.scale)
