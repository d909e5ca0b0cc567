"""Prune step (client, model-free): the self-pruning decision on one client's trained update.

Compares the tail score as received and as trained (HETLORA.md step 4) and writes the client's
final upload and its manifest (the client's commit). Needs no model, so it is a cheap task.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from .. import store as st
from ..adapter import AdapterError
from ..config import HetLoRAConfig
from ..faults import failpoint
from ..methods import UploadError, method_for
from .common import config_of, load_global


@dataclass
class PruneReport:
    client_id: str
    # "ok" | "skipped" (no trained update) | "failed" (a corrupt trained update or manifest; a method that
    # does not prune never reads its object, so a corrupt one is "ok" here and dropped by the server)
    status: str
    reason: str = ""
    rank_before: int | None = None
    rank_after: int | None = None
    sha256: str = ""


def prune(cfg: HetLoRAConfig, store: st.Store, rnd: int, client_id: str) -> PruneReport:
    exp, method = cfg.experiment, method_for(cfg)
    trained_prefix, upload_prefix = st.trained_prefix(exp, rnd, client_id), st.client_prefix(exp, rnd, client_id)
    try:
        man = st.get_manifest(store, trained_prefix)
        if man is None:
            return PruneReport(client_id, "skipped", "no trained update")
        extra: dict[str, object] = {"rank_after": man["rank_before"], "pruned": False}
        if not method.prunes:
            # Nothing to decide (full fine-tuning, HomLoRA, ...): the trained object becomes the upload
            # as it is, copied by the store (a local store: a hard link), never read here; for full
            # fine-tuning a read, a hash and a write are three passes over 0.5 GB that change nothing.
            # Security: nothing is trusted for that: this is the client's own (untrusted) side, and the
            # server checks every upload against its sha256, decodes and validates it (steps/aggregate.py).
            try:
                out = st.copy_artifact(store, trained_prefix, upload_prefix, {**man, **extra, "bytes_up": man["size"]})
            except st.NotFound as e:  # the object went missing behind its manifest
                return PruneReport(client_id, "failed", str(e))
        else:
            data, man = st.get_artifact(store, trained_prefix)
            trained = method.decode(data, None, where=trained_prefix)
            received_ranks = {k: int(v) for k, v in man["received_ranks"].items()}
            received = method.receive(load_global(cfg, store, rnd, method.spec_of(trained)), received_ranks)
            final, d = method.prune(received, trained)
            if d is not None:
                ranks = method.client_ranks(final)
                extra = {"rank_after": max(ranks.values()), "module_ranks": ranks if len(set(ranks.values())) > 1 else None,
                         "pruned": d.pruned, "components_pruned": d.components_pruned,
                         "score_before": d.score_before, "score_after": d.score_after}
            payload = data if final is trained else method.encode(final)
            out = st.put_artifact(store, upload_prefix, payload, {**man, **extra, "bytes_up": len(payload)})
    except (AdapterError, UploadError, st.ChecksumMismatch, st.InvalidManifest, st.ObjectTooLarge) as e:  # drops the client, not the round
        return PruneReport(client_id, "failed", str(e))
    failpoint("prune_done", round=rnd, client=client_id)
    return PruneReport(client_id, "ok", rank_before=out["rank_before"], rank_after=out["rank_after"], sha256=out["sha256"])


def prune_task(config_json: str, round_index: int, client_id: str) -> str:
    """The prune component's body: JSON config in, JSON report out."""
    cfg = config_of(config_json)
    return json.dumps(asdict(prune(cfg, st.open_store(cfg.store), int(round_index), client_id)))
