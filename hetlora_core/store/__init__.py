"""Where adapters, manifests and metrics live: a local directory or any S3 (MinIO, SeaweedFS, AWS).

``from hetlora_core import store as st`` gives the whole public API:

* ``base``: the errors, ``validate_key``, the ``Store`` interface and ``atomic_write`` (the
  project's one atomic file-write helper);
* ``local``: ``LocalStore``; ``s3``: ``S3Store`` (imported lazily on first use of ``st.S3Store``
  or ``open_store`` of an s3 config, so a local run never imports the network stack; credentials
  come only from the environment);
* ``artifacts``: ``put_artifact`` / ``get_artifact`` / ``get_manifest`` (the commit protocol: the
  manifest, with size and sha256, is written last) and ``get_json`` / ``put_json``;
* ``layout``: every key of the layout (``config_key``, ``round_prefix``, ``global_prefix``, ...),
  ``last_committed_round`` and the README table (``layout_table``);
* ``signing``: the server key's HMAC on server state (plans, globals, metrics): ``st.signing.*``;
  ``roles`` (not imported here: it needs MinIO's admin client) makes the server and client users.

Import order is base <- local, s3, artifacts <- layout <- this module: no cycle.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from . import signing
from .artifacts import (
    ADAPTER,
    MANIFEST,
    MAX_MANIFEST_BYTES,
    copy_artifact,
    drop_payload,
    get_artifact,
    get_json,
    get_manifest,
    parse_manifest,
    put_artifact,
    put_json,
)
from .base import (
    TMP_PREFIX,
    ChecksumMismatch,
    ForgedState,
    InvalidJSON,
    InvalidManifest,
    NotFound,
    ObjectTooLarge,
    ServerKeyError,
    Store,
    StoreAuthError,
    StoreError,
    StoreFull,
    StorePermissionError,
    StoreUnavailable,
    atomic_write,
    dir_prefix,
    validate_key,
)
from .factory import open_store
from .layout import (
    baseline_key,
    check_segment,
    client_eval_key,
    client_prefix,
    config_key,
    eval_key,
    experiments,
    global_prefix,
    last_committed_round,
    layout_table,
    list_client_ids,
    list_client_prefixes,
    plan_key,
    refusal_key,
    round_name,
    round_prefix,
    trained_prefix,
)
from .local import LocalStore

if TYPE_CHECKING:
    from .s3 import S3Store

__all__ = [
    "ADAPTER",
    "MANIFEST",
    "MAX_MANIFEST_BYTES",
    "TMP_PREFIX",
    "ChecksumMismatch",
    "ForgedState",
    "InvalidJSON",
    "InvalidManifest",
    "LocalStore",
    "NotFound",
    "ObjectTooLarge",
    "S3Store",
    "ServerKeyError",
    "Store",
    "StoreAuthError",
    "StoreError",
    "StoreFull",
    "StorePermissionError",
    "StoreUnavailable",
    "atomic_write",
    "baseline_key",
    "check_segment",
    "client_prefix",
    "config_key",
    "dir_prefix",
    "copy_artifact",
    "drop_payload",
    "client_eval_key",
    "eval_key",
    "experiments",
    "get_artifact",
    "get_json",
    "get_manifest",
    "global_prefix",
    "last_committed_round",
    "layout_table",
    "list_client_ids",
    "list_client_prefixes",
    "open_store",
    "parse_manifest",
    "plan_key",
    "refusal_key",
    "put_artifact",
    "put_json",
    "round_name",
    "round_prefix",
    "signing",
    "trained_prefix",
    "validate_key",
]


def __getattr__(name: str) -> Any:  # lazy ``st.S3Store`` / ``from hetlora_core.store import S3Store``
    if name == "S3Store":
        from .s3 import S3Store

        return S3Store
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
