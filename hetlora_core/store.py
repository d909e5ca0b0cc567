"""Where adapters and manifests live: a local directory or any S3 (MinIO, SeaweedFS, AWS).

Layout of one experiment (keys use '/', the same in both stores)::

    <experiment>/round-0000/global/adapter.safetensors   global adapter after round 0
    <experiment>/round-0000/global/manifest.json         written LAST: its presence commits the round
    <experiment>/round-0000/clients/<client_id>/adapter.safetensors
    <experiment>/round-0000/clients/<client_id>/manifest.json   a client counts once this exists
    <experiment>/round-0001/...

Commit protocol: ``put_artifact`` writes the object first and its ``manifest.json`` second; the
manifest carries the object's name, size and sha256. A reader goes through the manifest, so an
object without a manifest (a crash between the two writes) is invisible, and a torn or corrupted
object is caught by the checksum. ``last_committed_round`` only counts rounds whose *global*
manifest exists, so the driver resumes from the store and a half-written round is simply redone.
Writes are idempotent: re-running a put overwrites the same keys.

Keys are relative ``a/b/c`` paths; '..', '.', empty segments, absolute paths and backslashes are
rejected in every store (path traversal). ``list``/``delete_prefix`` take a *directory* prefix:
``list("a/b")`` means everything under ``a/b/`` (never ``a/bc``).

``S3Store`` lives in ``store_s3.py`` (imported lazily, so a local run never touches the network
stack); credentials come only from the environment, never from config or arguments.
"""

from __future__ import annotations

import abc
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hetlora_core.faults import failpoint

if TYPE_CHECKING:
    from hetlora_core.config import StoreConfig
    from hetlora_core.store_s3 import S3Store

MANIFEST = "manifest.json"
MAX_MANIFEST_BYTES = 1024 * 1024  # manifests are small JSON; anything larger is rejected unread
_TMP_PREFIX = ".hetlora-tmp-"  # LocalStore temp files; never listed, never valid key segments
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")

__all__ = [
    "StoreError", "StoreUnavailable", "StoreAuthError", "ChecksumMismatch", "NotFound", "InvalidManifest",
    "ObjectTooLarge",
    "Store", "LocalStore", "S3Store", "open_store", "validate_key",
    "put_artifact", "get_artifact", "get_manifest",
    "round_prefix", "global_prefix", "client_prefix", "last_committed_round", "list_client_prefixes",
]


# ---------------------------------------------------------------- errors


class StoreError(RuntimeError):
    """Any store failure; the message names the store, the key and what to do."""


class StoreUnavailable(StoreError):
    """The endpoint cannot be reached (refused, reset, timeouts, 5xx) within the retry deadline."""


class StoreAuthError(StoreError):
    """The store rejected the credentials (never retried)."""


class ChecksumMismatch(StoreError):
    """An object's size or sha256 differs from its manifest."""


class NotFound(StoreError):
    """The key does not exist."""


class InvalidManifest(StoreError):
    """A manifest is not a JSON object with the required keys, or is larger than 1 MiB."""


class ObjectTooLarge(StoreError):
    """``get_bytes(key, max_bytes=...)`` found a larger object (it is not read)."""


# ---------------------------------------------------------------- keys


def validate_key(key: str, *, what: str = "key") -> str:
    """Return ``key`` if it is a safe relative ``a/b/c`` key, else raise ``ValueError``."""
    if not isinstance(key, str) or not key:
        raise ValueError(f"store {what} must be a non-empty string, got {key!r}")
    if key.startswith("/") or "\\" in key or re.match(r"^[A-Za-z]:(/|$)", key):
        raise ValueError(f"store {what} {key!r} must be a relative path like 'exp/round-0000/x' (absolute path rejected)")
    if any(ord(c) < 32 or c == "\x7f" for c in key) or len(key) > 1024:
        raise ValueError(f"store {what} {key!r} contains control characters or is longer than 1024 characters")
    for part in key.split("/"):
        if part in ("", ".", ".."):
            raise ValueError(f"store {what} {key!r} has an empty, '.' or '..' segment (path traversal rejected)")
        if part.startswith(_TMP_PREFIX):
            raise ValueError(f"store {what} {key!r}: segments starting with {_TMP_PREFIX!r} are reserved")
    return key


def _dir_prefix(prefix: str) -> str:
    """'' (everything) or a validated prefix ending in '/'."""
    stripped = prefix.rstrip("/") if isinstance(prefix, str) else prefix
    return "" if stripped == "" else validate_key(stripped, what="prefix") + "/"


# ---------------------------------------------------------------- the interface


class Store(abc.ABC):
    """Bytes under string keys. Implementations are safe to share between threads."""

    @abc.abstractmethod
    def put_bytes(self, key: str, data: bytes) -> None:
        """Write ``data`` at ``key`` (whole object, atomic; overwrites)."""

    @abc.abstractmethod
    def get_bytes(self, key: str, *, max_bytes: int | None = None) -> bytes:
        """Read ``key``; ``NotFound`` if absent; ``ObjectTooLarge`` if larger than ``max_bytes``."""

    @abc.abstractmethod
    def exists(self, key: str) -> bool: ...

    @abc.abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """Sorted keys under the directory ``prefix`` ('' = all)."""

    @abc.abstractmethod
    def delete_prefix(self, prefix: str) -> None:
        """Delete every key under the directory ``prefix`` (which must be non-empty)."""

    @abc.abstractmethod
    def describe(self) -> str:
        """Where this store is, for messages and logs (never a secret)."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.describe()}>"


class LocalStore(Store):
    """A directory. Writes go to a temp file in the target folder, then ``os.replace`` (atomic on
    POSIX), so a reader never sees a partial object."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser().absolute()
        self.root.mkdir(parents=True, exist_ok=True)

    def describe(self) -> str:
        return f"local directory {self.root}"

    def _path(self, key: str) -> Path:
        validate_key(key)
        path = self.root / key
        # Defence in depth: a symlink inside the store must not lead outside it.
        real_root, real = os.path.realpath(self.root), os.path.realpath(path)
        if os.path.commonpath([real_root, real]) != real_root:
            raise ValueError(f"store key {key!r} resolves outside {self.root} (path traversal rejected)")
        return path

    def put_bytes(self, key: str, data: bytes) -> None:
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_TMP_PREFIX)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide the object from other readers
                os.replace(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError as e:
            raise StoreError(f"cannot write {key} in {self.describe()}: {e}") from e

    def get_bytes(self, key: str, *, max_bytes: int | None = None) -> bytes:
        path = self._path(key)
        try:
            with open(path, "rb") as f:
                if max_bytes is not None and os.fstat(f.fileno()).st_size > max_bytes:
                    raise ObjectTooLarge(f"{key} in {self.describe()} is larger than {max_bytes} bytes")
                return f.read()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise NotFound(f"{key} not found in {self.describe()}") from None
        except OSError as e:
            raise StoreError(f"cannot read {key} in {self.describe()}: {e}") from e

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str = "") -> list[str]:
        prefix = _dir_prefix(prefix)
        base = self._path(prefix.rstrip("/")) if prefix else self.root
        keys = []
        for dirpath, _dirs, files in os.walk(base):
            rel = Path(dirpath).relative_to(self.root).as_posix()
            for name in files:
                if not name.startswith(_TMP_PREFIX):
                    keys.append(name if rel == "." else f"{rel}/{name}")
        return sorted(keys)

    def delete_prefix(self, prefix: str) -> None:
        prefix = _dir_prefix(prefix)
        if not prefix:
            raise ValueError("delete_prefix needs a non-empty prefix (refusing to delete the whole store)")
        base = self._path(prefix.rstrip("/"))
        if base.is_dir():
            try:
                shutil.rmtree(base)
            except OSError as e:
                raise StoreError(f"cannot delete {prefix} in {self.describe()}: {e}") from e


def open_store(cfg: StoreConfig) -> Store:
    """The store ``cfg`` describes. S3 credentials come from the environment (see ``store_s3``)."""
    if cfg.kind == "local":
        return LocalStore(cfg.root)
    if cfg.kind == "s3":
        from hetlora_core.store_s3 import S3Store

        return S3Store(cfg.endpoint, cfg.bucket, secure=cfg.secure, region=cfg.region,
                       retry_deadline_s=cfg.retry_deadline_s)
    raise ValueError(f"store.kind must be 'local' or 's3', got {cfg.kind!r}")


def __getattr__(name: str) -> Any:  # lazy ``from hetlora_core.store import S3Store``
    if name == "S3Store":
        from hetlora_core.store_s3 import S3Store

        return S3Store
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---------------------------------------------------------------- artifacts and manifests


def _check_filename(filename: str) -> None:
    if not isinstance(filename, str) or "/" in filename or filename == MANIFEST:
        raise ValueError(f"artifact filename must be one path segment other than {MANIFEST!r}, got {filename!r}")
    validate_key(filename, what="filename")


def put_artifact(store: Store, prefix: str, payload: bytes, manifest: dict[str, Any],
                 filename: str = "adapter.safetensors") -> dict[str, Any]:
    """Write ``<prefix>/<filename>``, then ``<prefix>/manifest.json`` (the commit) holding
    ``manifest`` plus ``object``, ``sha256`` and ``size``. Returns the manifest as written."""
    prefix = validate_key(prefix.rstrip("/"), what="prefix")
    _check_filename(filename)
    if not isinstance(manifest, dict):
        raise TypeError(f"manifest must be a dict, got {type(manifest).__name__}")
    payload = bytes(payload)
    full = {**manifest, "object": filename, "sha256": hashlib.sha256(payload).hexdigest(), "size": len(payload)}
    text = json.dumps(full, sort_keys=True, indent=2).encode()  # raises TypeError if not JSON-able
    if len(text) > MAX_MANIFEST_BYTES:
        raise ValueError(f"manifest for {prefix} is {len(text)} bytes; the limit is {MAX_MANIFEST_BYTES}")
    store.put_bytes(f"{prefix}/{filename}", payload)
    failpoint("put_artifact_between", key=prefix)
    store.put_bytes(f"{prefix}/{MANIFEST}", text)  # LAST: its presence commits the artifact
    return full


def _parse_manifest(key: str, raw: bytes) -> dict[str, Any]:
    # Security: manifests are JSON only, never pickle or any format that can run code on load.
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as e:  # bad UTF-8/JSON, an over-long integer, hostile nesting depth
        raise InvalidManifest(f"{key} is not valid UTF-8 JSON: {str(e)[:200]}") from None
    if not isinstance(obj, dict):
        raise InvalidManifest(f"{key} must be a JSON object, got {type(obj).__name__}")
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
    if not name_ok:
        raise InvalidManifest(f"{key}: 'object' must be a file name next to the manifest, got {repr(obj_name)[:100]}")
    if not isinstance(sha, str) or not _SHA256_RE.match(sha):
        raise InvalidManifest(f"{key}: 'sha256' must be 64 lowercase hex digits, got {sha!r}")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise InvalidManifest(f"{key}: 'size' must be a non-negative integer, got {size!r}")
    return obj


def get_manifest(store: Store, prefix: str) -> dict[str, Any] | None:
    """The validated manifest under ``prefix``, or None when there is none (not committed)."""
    key = f"{validate_key(prefix.rstrip('/'), what='prefix')}/{MANIFEST}"
    try:
        raw = store.get_bytes(key, max_bytes=MAX_MANIFEST_BYTES)
    except NotFound:
        return None
    except ObjectTooLarge:
        raise InvalidManifest(f"{key} is larger than {MAX_MANIFEST_BYTES} bytes; refusing to parse it") from None
    if len(raw) > MAX_MANIFEST_BYTES:  # a store that ignores max_bytes
        raise InvalidManifest(f"{key} is larger than {MAX_MANIFEST_BYTES} bytes; refusing to parse it")
    return _parse_manifest(key, raw)


def get_artifact(store: Store, prefix: str) -> tuple[bytes, dict[str, Any]]:
    """Read the manifest, then its object; verify size and sha256. ``NotFound`` if no manifest."""
    manifest = get_manifest(store, prefix)
    if manifest is None:
        raise NotFound(f"no {MANIFEST} under {prefix} in {store.describe()} (artifact not committed)")
    key = f"{prefix.rstrip('/')}/{manifest['object']}"
    data = store.get_bytes(key)
    if len(data) != manifest["size"]:
        raise ChecksumMismatch(f"{key}: size mismatch: expected {manifest['size']} bytes, got {len(data)}")
    got = hashlib.sha256(data).hexdigest()
    if got != manifest["sha256"]:
        raise ChecksumMismatch(f"{key}: sha256 mismatch: expected {manifest['sha256']}, got {got}")
    return data, manifest


# ---------------------------------------------------------------- layout


def _check_segment(value: str, what: str) -> str:
    if not isinstance(value, str) or "/" in value:
        raise ValueError(f"{what} must be a string without '/', got {value!r}")
    return validate_key(value, what=what)


def round_prefix(experiment: str, rnd: int) -> str:
    if not isinstance(rnd, int) or isinstance(rnd, bool) or rnd < 0:
        raise ValueError(f"round must be a non-negative integer, got {rnd!r}")
    return f"{_check_segment(experiment, 'experiment')}/round-{rnd:04d}"


def global_prefix(experiment: str, rnd: int) -> str:
    return f"{round_prefix(experiment, rnd)}/global"


def client_prefix(experiment: str, rnd: int, client_id: str) -> str:
    return f"{round_prefix(experiment, rnd)}/clients/{_check_segment(str(client_id), 'client_id')}"


def last_committed_round(store: Store, experiment: str) -> int:
    """The highest round whose global manifest exists (the commit), or -1 when none."""
    pattern = re.compile(rf"^{re.escape(_check_segment(experiment, 'experiment'))}/round-(\d{{4,}})/global/{re.escape(MANIFEST)}$")
    rounds = [int(m.group(1)) for k in store.list(experiment) if (m := pattern.match(k))]
    return max(rounds, default=-1)


def list_client_prefixes(store: Store, experiment: str, rnd: int) -> list[str]:
    """Sorted client prefixes of round ``rnd`` that have a manifest (that have reported)."""
    base = f"{round_prefix(experiment, rnd)}/clients/"
    return sorted(k[: -len(MANIFEST) - 1] for k in store.list(base)
                  if k.endswith("/" + MANIFEST) and k[len(base):].count("/") == 1)
