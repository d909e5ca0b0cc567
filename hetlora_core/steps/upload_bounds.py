"""How many bytes a round-0 client upload may have, decided before any object is read.

From round 1 on, the committed global fixes every tensor's shape, so ``Method.max_upload_bytes``
is exact. Round 0 has no global and the aggregate step is model-free (no torch, no model config):
the bound comes from what the round's other clients claim. An honest LoRA upload's size is
proportional to its rank (plus a small header), so a client planned at rank r may claim at most
twice the *largest* of its peers' bytes-per-rank times r (full fine-tuning: twice the largest peer
size), plus 1 MiB. Excluding the client itself means no one can raise their own bound; taking the
largest peer (not the median) means a minority cannot *lower* an honest client's bound by claiming
tiny sizes: it would take every peer. With fewer than two peers nothing trustworthy is left to
compare with (in a 2-client round the only peer may be the attacker), so ``store.max_upload_mb``,
which caps every round-0 upload, is the only bound. The bound protects the step's memory only;
an upload it lets through is still validated like any other.
Security: an oversized claim is refused before its object is touched (``get_artifact(max_bytes)``).
"""

from __future__ import annotations

from .. import store as st
from ..config import HetLoRAConfig
from ..methods import Method
from .plan import RoundPlan

SLACK_BYTES = 1 << 20
FACTOR = 2.0
MIN_PEERS = 2  # below this the peers may all be one attacker: only store.max_upload_mb bounds


def round0_bounds(cfg: HetLoRAConfig, method: Method, store: st.Store, plan: RoundPlan) -> dict[str, int]:
    """client id -> the most bytes its round-0 upload may have (read from the manifests only)."""
    cap = int(cfg.store.max_upload_mb * (1 << 20))
    per: dict[str, float] = {}  # bytes per rank (LoRA) or bytes (others) each client claims
    for c in plan.clients:
        try:
            man = st.get_manifest(store, st.client_prefix(cfg.experiment, plan.round, c.client_id))
        except st.StoreUnavailable:
            raise
        except st.StoreError:
            continue  # a bad manifest drops its client in the first pass anyway
        if man is not None:
            per[c.client_id] = man["size"] / max(1, c.rank) if method.trains_lora else float(man["size"])
    bounds = {}
    for c in plan.clients:
        peers = [v for k, v in per.items() if k != c.client_id]
        if len(peers) < MIN_PEERS:
            bounds[c.client_id] = cap
            continue
        unit = max(peers) * (c.rank if method.trains_lora else 1)
        bounds[c.client_id] = min(cap, int(FACTOR * unit) + SLACK_BYTES)
    return bounds
