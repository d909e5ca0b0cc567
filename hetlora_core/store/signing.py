"""Server state that client tasks cannot forge: an HMAC-SHA256 by a server key (issue 13).

What is signed: everything only the server writes and the run then trusts: the round plan
(``plan_key``), the global manifests (``global_prefix``: the commit, whose ``sha256`` covers the
adapter's bytes), the round's metrics (``eval_key``) and the baseline (``baseline_key``). The signed
content binds the kind, the experiment and the round index (``server_signature``), so a genuine
document copied under another key (round 0's global saved as round 1, one experiment's plan under
another) is rejected as a replay. ``config_key`` is not signed: the driver compares it with its own
config and never takes a setting from it, so a forged one can only make a resume refuse to run.

Who holds the key, who verifies (the design choice, for a symmetric MAC):

* The driver (``hetlora simulate`` / ``run`` / ``submit``) and the server tasks (aggregate,
  evaluate) hold it: from the environment variable ``store.server_key_env`` (in the cluster, the
  Secret ``kubeflow.server_key_secret``, mounted on server tasks only: pipelines/platform.py). They
  sign what they write and verify every piece of server state they read: the driver the previous
  global it plans from and resumes at, and what results.json is built from; aggregate the plan
  (who may take part, at which rank) and the previous global (the base of the new one); evaluate
  the global it scores. That is where a forgery hurts: a round committed with a client list, rank
  or base the server never chose, or a resume that trusts a round nobody aggregated.
* Client tasks (train, prune, evaluate-client) never get the key: anyone who can check an HMAC
  can also make one, so a client holding it could forge. They read plans and globals unverified.
  On MinIO they are protected by the store roles instead (``store/roles.py``): client credentials
  cannot write plans, globals or metrics, so what a client reads there is what the server wrote.
  On a single-key store (plain S3, SeaweedFS) a malicious client can feed other clients a forged
  plan or global, which at worst spoils their uploads (the robust aggregation's concern), but it
  cannot get a forged plan or global past aggregation, into the committed history, or into results.
  An asymmetric signature (Ed25519) would let clients verify too; it needs the ``cryptography``
  package as a declared dependency, which the issue did not ask for: HMAC uses the stdlib only.

No key (``store.signing``): ``required`` makes every server write fail with ``ServerKeyError``
naming the variable. ``auto`` (the default) signs and verifies whenever the key is set, and local
drivers (simulate, kfp.local) make one per store (``local_key_path``: a 0600 file beside a local
store's folder, never in it; OUT/server.key for an S3 store), so the default demo is protected; a run with no key at all is
neither signed nor verified, as before this module. A reader holding the key rejects unsigned state.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .artifacts import MAX_MANIFEST_BYTES, get_artifact, get_json, get_manifest, put_json
from .base import ForgedState, ServerKeyError, Store
from .layout import global_prefix

if TYPE_CHECKING:
    from hetlora_core.config import StoreConfig

FIELD = "server_signature"  # {"kind", "experiment", "round", "hmac"} inside every signed document
KEY_FILE = "server.key"  # a local driver's generated key for an S3 store: in the output directory
KEY_SUFFIX = ".server.key"  # ...for a local store: <store.root>.server.key, beside the store folder (never in it)
MIN_KEY_CHARS = 32
DEFAULT_ENV = "HETLORA_SERVER_KEY"
KINDS = ("plan", "global", "eval", "baseline")

__all__ = ["DEFAULT_ENV", "FIELD", "KEY_FILE", "check", "get_global", "get_global_manifest", "get_signed_json",
           "local_key_path", "local_server_key", "put_signed_json", "seal", "sealer", "server_key", "verify"]


# ---------------------------------------------------------------- the key


def server_key(cfg: StoreConfig) -> bytes | None:
    """The server key from ``cfg.server_key_env``; None when unset or empty (client tasks get it
    set empty). ``ServerKeyError`` when it is too short to be a secret."""
    value = os.environ.get(cfg.server_key_env, "")
    if not value:
        return None
    if len(value) < MIN_KEY_CHARS:  # never echo the value, not even its beginning
        raise ServerKeyError(f"{cfg.server_key_env} holds {len(value)} characters; a server key needs at least {MIN_KEY_CHARS} "
                             "(e.g. `openssl rand -hex 32`)")
    return value.encode()


def _writer_key(cfg: StoreConfig, what: str) -> bytes | None:
    key = server_key(cfg)
    if key is None and cfg.signing == "required":
        raise ServerKeyError(f"cannot write {what}: store.signing is 'required' and {cfg.server_key_env} is not set. Only the "
                             f"driver and the server tasks hold it (in the cluster the Secret kubeflow.server_key_secret, key "
                             f"'key'); set {cfg.server_key_env} to the same value here, or use store.signing: auto")
    return key


# ---------------------------------------------------------------- sign and verify documents


def _binding(kind: str, experiment: str, rnd: int) -> dict[str, Any]:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return {"kind": kind, "experiment": experiment, "round": int(rnd)}


def _mac(doc: dict[str, Any], binding: dict[str, Any], key: bytes) -> str:
    # Canonical JSON of the document with the binding in place of the signature: a float or key
    # order that round-trips through json gives the same bytes on every reader.
    body = {k: v for k, v in doc.items() if k != FIELD}
    text = json.dumps({**body, FIELD: binding}, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hmac.new(key, text.encode(), hashlib.sha256).hexdigest()


def seal(doc: dict[str, Any], key: bytes, kind: str, experiment: str, rnd: int) -> dict[str, Any]:
    """``doc`` with its server signature (kind, experiment, round and the HMAC over all of it)."""
    binding = _binding(kind, experiment, rnd)
    return {**{k: v for k, v in doc.items() if k != FIELD}, FIELD: {**binding, "hmac": _mac(doc, binding, key)}}


def sealer(cfg: StoreConfig, kind: str, experiment: str, rnd: int) -> Callable[[dict[str, Any]], dict[str, Any]] | None:
    """``put_artifact``'s ``seal`` for server state: signs with the server key; None when there is
    no key and ``store.signing`` is auto (unsigned, as before)."""
    key = _writer_key(cfg, f"the {kind} of round {rnd} of {experiment}")
    if key is None:
        return None
    return lambda doc: seal(doc, key, kind, experiment, rnd)


def verify(doc: dict[str, Any], where: str, key: bytes, kind: str, experiment: str, rnd: int, env: str = DEFAULT_ENV) -> dict[str, Any]:
    """``doc`` if its signature is by ``key`` and binds (kind, experiment, round) of ``where``;
    ``ForgedState`` naming ``where``, what mismatched and the fix otherwise."""
    want = _binding(kind, experiment, rnd)
    sig = doc.get(FIELD)
    redo = f"delete {where} and rerun the same command to redo it (the store keeps everything committed before it)"
    if not isinstance(sig, dict) or not isinstance(sig.get("hmac"), str):
        raise ForgedState(
            f"{where} carries no server signature (expected: the {kind} of round {rnd} of {experiment!r}, signed with "
            f"{env}). A client task or anyone without the server key wrote it, or it was written with no key (a run "
            f"recorded before signing existed, or store.signing: auto with {env} unset). If you trust every writer of this "
            f"store, run with {env} unset (under Kubeflow also with kubeflow.server_key_secret empty); otherwise {redo}")
    got = {k: sig.get(k) for k in want}
    # Security: compare_digest, so the check takes the same time however many digits match.
    # (on bytes: compare_digest refuses non-ASCII str, and a forger chooses this string)
    if not hmac.compare_digest(sig["hmac"].encode(), _mac(doc, got, key).encode()):
        raise ForgedState(f"{where}: its server signature does not match its content: it was changed or forged by someone "
                          f"without the server key, or this process holds another key than the writer ({env}); {redo}")
    if got != want:  # a genuine document of another round, experiment or kind: a replay
        mism = ", ".join(f"{k} {got[k]!r} (expected {want[k]!r})" for k in want if got[k] != want[k])
        raise ForgedState(f"{where} is a validly signed copy of other server state: signed for {mism}. A replay (e.g. an "
                          f"earlier round's global saved under this round); {redo}")
    return doc


def check(cfg: StoreConfig, doc: dict[str, Any], where: str, kind: str, experiment: str, rnd: int) -> dict[str, Any]:
    """``verify`` with this process's server key; ``doc`` unchecked when it holds none (client
    tasks, runs without a key: see the module docstring)."""
    key = server_key(cfg)
    return doc if key is None else verify(doc, where, key, kind, experiment, rnd, cfg.server_key_env)


# ---------------------------------------------------------------- signed reads and writes


def put_signed_json(store: Store, cfg: StoreConfig, key: str, obj: dict[str, Any], kind: str, experiment: str, rnd: int) -> None:
    """``put_json`` of server state, signed (unsigned only with no key under ``store.signing: auto``)."""
    seal_fn = sealer(cfg, kind, experiment, rnd)
    put_json(store, key, seal_fn(obj) if seal_fn else obj)


def get_signed_json(store: Store, cfg: StoreConfig, key: str, kind: str, experiment: str, rnd: int,
                    max_bytes: int = MAX_MANIFEST_BYTES) -> dict[str, Any] | None:
    """``get_json`` of server state, verified when this process holds the server key."""
    doc = get_json(store, key, max_bytes=max_bytes)
    return None if doc is None else check(cfg, doc, key, kind, experiment, rnd)


def get_global_manifest(store: Store, cfg: StoreConfig, experiment: str, rnd: int) -> dict[str, Any] | None:
    """The committed global manifest of round ``rnd`` (None: not committed), verified when this
    process holds the server key."""
    prefix = global_prefix(experiment, rnd)
    man = get_manifest(store, prefix)
    return None if man is None else check(cfg, man, f"{prefix}/manifest.json", "global", experiment, rnd)


def get_global(store: Store, cfg: StoreConfig, experiment: str, rnd: int) -> tuple[bytes, dict[str, Any]]:
    """The global adapter of round ``rnd`` and its manifest: the bytes checked against the
    manifest's sha256, and the manifest against the server signature (when this process holds it)."""
    prefix = global_prefix(experiment, rnd)
    data, man = get_artifact(store, prefix)
    return data, check(cfg, man, f"{prefix}/manifest.json", "global", experiment, rnd)


# ---------------------------------------------------------------- local drivers


def local_key_path(cfg: StoreConfig, out_dir: str | Path) -> Path:
    """Where a local driver keeps its generated key. A local store's key lies beside the store folder
    (``<store.root>.server.key``): it follows the store it signs, whichever ``--out`` resumes it, and is
    never inside it (readable through the store). An S3 store driven from this machine: ``OUT/server.key``."""
    if cfg.kind == "local" and cfg.root:
        root = Path(cfg.root).expanduser()
        return root.parent / f"{root.name}{KEY_SUFFIX}"
    return Path(out_dir) / KEY_FILE


@contextmanager
def local_server_key(cfg: StoreConfig, out_dir: str | Path, fresh: bool) -> Iterator[str]:
    """For a local driver (simulate, kfp.local): the server key in ``cfg.server_key_env`` while the
    run lasts. A key already in the environment wins; else the file ``local_key_path`` names (made
    0600 with a new random key when absent and ``fresh``: a run that recorded state unsigned, before
    this existed, stays unsigned). Yields where the key came from ('' : none). kfp.local's task
    subprocesses inherit it; its client tasks get the variable set empty (pipelines/platform.py)."""
    env = cfg.server_key_env
    if os.environ.get(env):
        yield f"${env}"
        return
    path = local_key_path(cfg, out_dir)
    if not path.exists():
        if not fresh:
            yield ""
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        # Security: O_EXCL + 0600 from the start: never readable by others, never a planted file or symlink.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    if path.stat().st_mode & 0o077:
        raise ServerKeyError(f"{path} is readable by other users (mode {path.stat().st_mode & 0o777:o}); chmod 600 it")
    os.environ[env] = path.read_text().strip()
    try:
        yield str(path)
    finally:
        os.environ.pop(env, None)
