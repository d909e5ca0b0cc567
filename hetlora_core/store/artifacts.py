"""Artifacts (an object plus its manifest) and small JSON documents on any ``Store``.

Commit protocol: ``put_artifact`` writes the object first and its ``manifest.json`` second; the
manifest carries the object's name, size and sha256. A reader goes through the manifest, so an
object without a manifest (a crash between the two writes) is invisible, and a torn or corrupted
object is caught by the checksum. Writes are idempotent: re-running a put overwrites the same keys.

Security: manifests and documents are JSON only, never pickle or any format that runs code on
load, and they are size-limited before they are parsed.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from typing import Any

from hetlora_core.faults import failpoint

from .base import ChecksumMismatch, InvalidJSON, InvalidManifest, NotFound, ObjectTooLarge, Store, validate_key

MANIFEST = "manifest.json"
ADAPTER = "adapter.safetensors"  # put_artifact's default object name
MAX_MANIFEST_BYTES = 1024 * 1024  # manifests are small JSON; anything larger is rejected unread
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")

__all__ = [
    "ADAPTER",
    "MANIFEST",
    "MAX_MANIFEST_BYTES",
    "copy_artifact",
    "drop_payload",
    "get_artifact",
    "get_json",
    "get_manifest",
    "parse_manifest",
    "put_artifact",
    "put_json",
]


def _check_filename(filename: str) -> None:
    if not isinstance(filename, str) or "/" in filename or filename == MANIFEST:
        raise ValueError(f"artifact filename must be one path segment other than {MANIFEST!r}, got {filename!r}")
    validate_key(filename, what="filename")


def _manifest_key(prefix: str) -> str:
    return f"{validate_key(prefix.rstrip('/'), what='prefix')}/{MANIFEST}"


def put_artifact(store: Store, prefix: str, payload: bytes, manifest: dict[str, Any],
                 filename: str = ADAPTER, seal: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> dict[str, Any]:
    """Write ``<prefix>/<filename>``, then ``<prefix>/manifest.json`` (the commit) holding
    ``manifest`` plus ``object``, ``sha256`` and ``size``. Returns the manifest as written.
    ``seal`` (server state: ``signing.sealer``) gets the complete manifest, sha256 included, and
    returns it signed, so the signature also covers the object's bytes."""
    prefix = validate_key(prefix.rstrip("/"), what="prefix")
    _check_filename(filename)
    if not isinstance(manifest, dict):
        raise TypeError(f"manifest must be a dict, got {type(manifest).__name__}")
    payload = bytes(payload)
    full = {**manifest, "object": filename, "sha256": hashlib.sha256(payload).hexdigest(), "size": len(payload)}
    if seal is not None:
        full = seal(full)
    return _commit(store, prefix, full, lambda: store.put_bytes(f"{prefix}/{filename}", payload))


def _commit(store: Store, prefix: str, full: dict[str, Any], write_object: Callable[[], None]) -> dict[str, Any]:
    """The commit protocol of ``put_artifact`` and ``copy_artifact``: the manifest checked (JSON,
    size limit) before anything is written, then the object, then the manifest (the commit)."""
    text = json.dumps(full, sort_keys=True, indent=2).encode()  # raises TypeError if not JSON-able
    if len(text) > MAX_MANIFEST_BYTES:
        raise ValueError(f"manifest for {prefix} is {len(text)} bytes; the limit is {MAX_MANIFEST_BYTES}")
    write_object()
    failpoint("put_artifact_between", key=prefix)
    store.put_bytes(f"{prefix}/{MANIFEST}", text)  # LAST: its presence commits the artifact
    return full


def copy_artifact(store: Store, src_prefix: str, prefix: str, manifest: dict[str, Any]) -> dict[str, Any]:
    """``put_artifact`` at ``prefix`` of the object committed under ``src_prefix``, without reading it:
    the store copies it (``Store.copy``; a local store makes a hard link) and the new manifest holds
    ``manifest`` plus the source's ``object``, ``sha256`` and ``size``. ``NotFound`` if the source has
    no manifest. The bytes are not verified here: every reader checks them against that sha256
    (``get_artifact``), so a corrupt source is rejected where it is read, as it would have been."""
    prefix, src_prefix = validate_key(prefix.rstrip("/"), what="prefix"), validate_key(src_prefix.rstrip("/"), what="prefix")
    src = get_manifest(store, src_prefix)
    if src is None:
        raise NotFound(f"no {MANIFEST} under {src_prefix} in {store.describe()} (artifact not committed)")
    full = {**manifest, "object": src["object"], "sha256": src["sha256"], "size": src["size"]}
    return _commit(store, prefix, full, lambda: store.copy(f"{src_prefix}/{src['object']}", f"{prefix}/{src['object']}",
                                                           max_bytes=src["size"]))


def _load_object(key: str, raw: bytes, error: type[InvalidJSON]) -> dict[str, Any]:
    """``raw`` parsed as a JSON object, else ``error`` naming ``key`` (never echoing much of the input)."""
    # Security: json only (no pickle); hostile nesting depth and over-long integers end as a clean error.
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as e:  # bad UTF-8/JSON, an over-long integer, hostile nesting depth
        raise error(f"{key} is not valid UTF-8 JSON: {str(e)[:200]}") from None
    if not isinstance(obj, dict):
        raise error(f"{key} must be a JSON object, got {type(obj).__name__}")
    return obj


def parse_manifest(key: str, raw: bytes) -> dict[str, Any]:
    """The manifest in ``raw`` (read from ``key``), validated; ``InvalidManifest`` naming ``key`` otherwise."""
    obj = _load_object(key, raw, InvalidManifest)
    missing = [k for k in ("object", "sha256", "size") if k not in obj]
    if missing:
        raise InvalidManifest(f"{key} lacks required key(s) {missing}")
    obj_name, sha, size = obj["object"], obj["sha256"], obj["size"]
    name_ok = isinstance(obj_name, str) and "/" not in obj_name and obj_name != MANIFEST
    if name_ok:
        try:
            validate_key(obj_name, what="object")  # also control characters, reserved temp names, length
        except ValueError:
            name_ok = False
    if not name_ok:  # Security: a manifest must not point a reader at any other key of the store
        raise InvalidManifest(f"{key}: 'object' must be a file name next to the manifest, got {repr(obj_name)[:100]}")
    if not isinstance(sha, str) or not _SHA256_RE.match(sha):
        raise InvalidManifest(f"{key}: 'sha256' must be 64 lowercase hex digits, got {sha!r}")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise InvalidManifest(f"{key}: 'size' must be a non-negative integer, got {size!r}")
    return obj


def _get_limited(store: Store, key: str, max_bytes: int, error: type[InvalidJSON]) -> bytes | None:
    """The bytes at ``key`` if at most ``max_bytes``; None if absent; ``error`` if larger (not parsed)."""
    try:
        raw = store.get_bytes(key, max_bytes=max_bytes)
    except NotFound:
        return None
    except ObjectTooLarge:
        raise error(f"{key} is larger than {max_bytes} bytes; refusing to parse it") from None
    if len(raw) > max_bytes:  # a store that ignores max_bytes
        raise error(f"{key} is larger than {max_bytes} bytes; refusing to parse it")
    return raw


def get_manifest(store: Store, prefix: str) -> dict[str, Any] | None:
    """The validated manifest under ``prefix``, or None when there is none (not committed)."""
    key = _manifest_key(prefix)
    raw = _get_limited(store, key, MAX_MANIFEST_BYTES, InvalidManifest)
    return None if raw is None else parse_manifest(key, raw)


def get_artifact(store: Store, prefix: str, max_bytes: int | None = None) -> tuple[bytes, dict[str, Any]]:
    """Read the manifest, then its object; verify size and sha256. ``NotFound`` if no manifest.

    Security: the object is read with its manifest's ``size`` as the limit, so an object larger
    than its manifest says is refused unread; ``max_bytes`` bounds what a manifest may claim
    (``ObjectTooLarge`` before the object is touched)."""
    manifest = get_manifest(store, prefix)
    if manifest is None:
        raise NotFound(f"no {MANIFEST} under {prefix} in {store.describe()} (artifact not committed)")
    key = f"{prefix.rstrip('/')}/{manifest['object']}"
    if max_bytes is not None and manifest["size"] > max_bytes:
        raise ObjectTooLarge(f"{key}: its manifest says {manifest['size']:,} bytes, more than the {max_bytes:,} an upload "
                             "of this shape and rank can have; not read")
    data = store.get_bytes(key, max_bytes=manifest["size"])
    if len(data) != manifest["size"]:
        raise ChecksumMismatch(f"{key}: size mismatch: expected {manifest['size']} bytes, got {len(data)}")
    got = hashlib.sha256(data).hexdigest()
    if got != manifest["sha256"]:
        raise ChecksumMismatch(f"{key}: sha256 mismatch: expected {manifest['sha256']}, got {got}")
    return data, manifest


def drop_payload(store: Store, prefix: str) -> bool:
    """Delete the object of the artifact under ``prefix`` but keep its manifest (the record results
    read), to free space once the payload is never read again. True if there was a manifest;
    ``get_artifact`` on the prefix then raises ``NotFound`` for the object."""
    manifest = get_manifest(store, prefix)
    if manifest is None:
        return False
    store.delete(f"{prefix.rstrip('/')}/{manifest['object']}")  # parse_manifest made 'object' a plain file name
    return True


def get_json(store: Store, key: str, max_bytes: int = MAX_MANIFEST_BYTES) -> dict[str, Any] | None:
    """The JSON object at ``key``, or None if absent. ``InvalidJSON`` naming the key if it is larger
    than ``max_bytes`` (not read past the limit), not UTF-8 JSON, or not an object."""
    validate_key(key)
    raw = _get_limited(store, key, max_bytes, InvalidJSON)
    return None if raw is None else _load_object(key, raw, InvalidJSON)


def put_json(store: Store, key: str, obj: dict[str, Any]) -> None:
    """Write ``obj`` at ``key`` as indented JSON with sorted keys (the same object gives the same bytes)."""
    if not isinstance(obj, dict):
        raise TypeError(f"put_json writes JSON objects, got {type(obj).__name__} for {key}")
    store.put_bytes(validate_key(key), json.dumps(obj, indent=1, sort_keys=True).encode())
