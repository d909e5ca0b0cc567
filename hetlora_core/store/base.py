"""The store's foundations: errors, key validation, the ``Store`` interface and ``atomic_write``.

Everything else in the package imports this module and nothing here imports them back, so the
local store, the S3 store and the artifact/layout helpers have no import cycle between them.

Keys are relative ``a/b/c`` paths; '..', '.', empty segments, absolute paths, backslashes and
control characters are rejected in every store (path traversal). ``list``/``delete_prefix`` take a
*directory* prefix: ``list("a/b")`` means everything under ``a/b/`` (never ``a/bc``).
"""

from __future__ import annotations

import abc
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path

TMP_PREFIX = ".hetlora-tmp-"  # temp files of atomic_write; never listed by LocalStore, never valid key segments
MAX_KEY_CHARS = 1024  # S3's own limit; a longer key is a bug or an attack, never a real layout key

__all__ = [
    "TMP_PREFIX",
    "ChecksumMismatch",
    "ForgedState",
    "InvalidJSON",
    "InvalidManifest",
    "NotFound",
    "ObjectTooLarge",
    "ServerKeyError",
    "Store",
    "StoreAuthError",
    "StoreError",
    "StoreFull",
    "StorePermissionError",
    "StoreUnavailable",
    "atomic_write",
    "dir_prefix",
    "validate_key",
]


# ---------------------------------------------------------------- errors


class StoreError(RuntimeError):
    """Any store failure; the message names the store, the key and what to do."""


class StoreUnavailable(StoreError):
    """The endpoint cannot be reached (refused, reset, timeouts, 5xx) within the retry deadline."""


class StoreAuthError(StoreError):
    """The store rejected the credentials (never retried)."""


class StorePermissionError(StoreAuthError):
    """The store refused this operation on this key although it may answer others (S3 AccessDenied,
    a local EACCES/EPERM/EROFS): the credentials' policy or the directory lacks the right. Never retried."""


class StoreFull(StoreError):
    """No space left for a write (MinIO XMinioStorageFull, a bucket quota, a local ENOSPC/EDQUOT). Never retried."""


class ChecksumMismatch(StoreError):
    """An object's size or sha256 differs from its manifest."""


class NotFound(StoreError):
    """The key does not exist."""


class InvalidJSON(StoreError):
    """A JSON document of the store is not a JSON object, is not valid UTF-8 JSON, or is too large."""


class InvalidManifest(InvalidJSON):
    """A manifest is not a JSON object with the required keys, or is larger than 1 MiB."""


class ObjectTooLarge(StoreError):
    """``get_bytes(key, max_bytes=...)`` found a larger object (it is not read)."""


class ForgedState(StoreError):
    """Server state (a plan, a global manifest, round metrics) whose server signature is missing,
    wrong, or made for another key (a replay); the message names the key, what mismatched and the fix."""


class ServerKeyError(StoreError):
    """The server key that signs server state is missing where it is required, or unusable."""


# ---------------------------------------------------------------- keys


def validate_key(key: str, *, what: str = "key") -> str:
    """Return ``key`` if it is a safe relative ``a/b/c`` key, else raise ``ValueError``.

    Every store calls this on every key it is given, so a hostile client id or manifest can never
    name a file outside the store's directory or bucket prefix.
    """
    if not isinstance(key, str) or not key:
        raise ValueError(f"store {what} must be a non-empty string, got {key!r}")
    # Security: absolute POSIX paths, Windows drive letters and backslashes would escape the root.
    if key.startswith("/") or "\\" in key or re.match(r"^[A-Za-z]:(/|$)", key):
        raise ValueError(f"store {what} {key!r} must be a relative path like 'exp/round-0000/x' (absolute path rejected)")
    if any(ord(c) < 32 or c == "\x7f" for c in key) or len(key) > MAX_KEY_CHARS:
        raise ValueError(f"store {what} {key!r} contains control characters or is longer than {MAX_KEY_CHARS} characters")
    for part in key.split("/"):
        # Security: '..' is path traversal; '' and '.' would alias another key in a local directory.
        if part in ("", ".", ".."):
            raise ValueError(f"store {what} {key!r} has an empty, '.' or '..' segment (path traversal rejected)")
        if part.startswith(TMP_PREFIX):
            raise ValueError(f"store {what} {key!r}: segments starting with {TMP_PREFIX!r} are reserved")
    return key


def dir_prefix(prefix: str) -> str:
    """'' (everything) or a validated prefix ending in '/', so ``a/b`` never matches ``a/bc``."""
    stripped = prefix.rstrip("/") if isinstance(prefix, str) else prefix
    return "" if stripped == "" else validate_key(stripped, what="prefix") + "/"


# ---------------------------------------------------------------- atomic file writes


Writer = Callable[[str], object]


def atomic_write(path: str | os.PathLike[str], data: bytes | bytearray | memoryview | Writer, mode: int = 0o644,
                 fsync: bool = True) -> None:
    """Write ``path`` so that a reader sees either the old file or the whole new one, never a part.

    ``data`` is the content, or a callable that writes the content to the temp path it is given
    (for writers that want a file name, such as ``safetensors.torch.save_file``). The temp file is
    created in the target's folder (``os.replace`` is atomic only within one filesystem), flushed
    to disk, given ``mode`` and renamed over the target; on any failure it is removed and the
    error re-raised (``OSError`` as such: callers wrap it in their own error). The parent folder
    is created if missing. The folder itself is not fsync'd: a killed process leaves old or new,
    a power loss right after the rename may leave the old file. ``fsync=False`` (a scratch store,
    ``store.fsync``) skips the flush to disk: a killed process still leaves old or new, a power
    loss may leave an empty or partial file (which the manifest's sha256 then rejects).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Security: mkstemp creates the file O_EXCL with mode 0600 and an unguessable name, so no other
    # user can read the partial content or plant a file (or symlink) we would then write through.
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=TMP_PREFIX)
    try:
        if callable(data):
            os.close(fd)
            data(tmp)
            if fsync:
                _fsync_file(tmp)  # the writer may have replaced the file: sync what is at ``tmp`` now
        else:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                if fsync:
                    os.fsync(f.fileno())
        os.chmod(tmp, mode)  # mkstemp's 0600 would hide the file from the other readers of a shared cache/store
        # os.replace swaps the directory entry: a symlink at ``target`` is replaced, never followed.
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
    def exists(self, key: str) -> bool:
        """Whether an object is stored at ``key`` (a mere directory prefix is not)."""

    @abc.abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """Sorted keys under the directory ``prefix`` ('' = all)."""

    @abc.abstractmethod
    def delete_prefix(self, prefix: str) -> None:
        """Delete every key under the directory ``prefix`` (which must be non-empty)."""

    def copy(self, src: str, dst: str, *, max_bytes: int | None = None) -> None:
        """Write at ``dst`` the object stored at ``src`` (whole, atomic; overwrites), ``NotFound`` if
        absent, ``ObjectTooLarge`` above ``max_bytes``. This default reads and writes the bytes; a
        store that can copy without moving them through this process overrides it."""
        self.put_bytes(dst, self.get_bytes(src, max_bytes=max_bytes))

    def delete(self, key: str) -> None:
        """Delete the object at ``key``; a missing key is a no-op (idempotent, like every write).

        Not abstract so that a third-party ``Store`` written before this method existed still
        instantiates; it only fails when asked to delete."""
        raise NotImplementedError(f"{type(self).__name__} cannot delete single keys")

    @abc.abstractmethod
    def describe(self) -> str:
        """Where this store is, for messages and logs (never a secret)."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.describe()}>"
