"""``LocalStore``: the store as a directory (``hetlora simulate``, ``hetlora run``, tests).

Writes go through ``atomic_write`` (temp file in the target folder, fsync, ``os.replace``), so a
reader, or a run resumed after a kill, never sees a partial object.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
from pathlib import Path

from .base import (
    TMP_PREFIX,
    NotFound,
    ObjectTooLarge,
    Store,
    StoreError,
    StoreFull,
    StorePermissionError,
    atomic_write,
    dir_prefix,
    validate_key,
)

_FULL = {errno.ENOSPC, errno.EDQUOT}
_DENIED = {errno.EACCES, errno.EPERM}


class LocalStore(Store):
    """A directory; keys are relative paths below it."""

    def __init__(self, root: str | os.PathLike[str], fsync: bool = True) -> None:
        self.root = Path(root).expanduser().absolute()
        self.fsync = fsync  # store.fsync: False only for scratch stores (atomic_write says what it risks)
        self.root.mkdir(parents=True, exist_ok=True)

    def describe(self) -> str:
        return f"local directory {self.root}"

    def _os_error(self, what: str, key: str, e: OSError) -> StoreError:
        """``e`` as the store error that names its cause (a full disk, a permission, a read-only
        filesystem) and the fix, not only an errno."""
        where = f"cannot {what} {key} in {self.describe()}"
        name = errno.errorcode.get(e.errno or 0, "OSError")
        if e.errno in _FULL:
            return StoreFull(f"{where}: the disk is full ({name}: {e.strerror}); free space on the filesystem of "
                             f"{self.root} or set store.root to a directory with room")
        if e.errno == errno.EROFS:
            return StorePermissionError(f"{where}: the filesystem is read-only ({name}); set store.root to a writable directory")
        if e.errno in _DENIED:
            return StorePermissionError(f"{where}: permission denied ({name}: {e.filename or self.root}); give the user "
                                        f"running this ({os.getuid()}) read and write access to {self.root}, or set store.root")
        return StoreError(f"{where}: {e}")

    def _path(self, key: str) -> Path:
        validate_key(key)
        path = self.root / key
        # Security, defence in depth: a symlink inside the store must not lead outside it.
        real_root, real = os.path.realpath(self.root), os.path.realpath(path)
        if os.path.commonpath([real_root, real]) != real_root:
            raise ValueError(f"store key {key!r} resolves outside {self.root} (path traversal rejected)")
        return path

    def put_bytes(self, key: str, data: bytes) -> None:
        path = self._path(key)
        try:
            atomic_write(path, bytes(data), fsync=self.fsync)
        except OSError as e:
            raise self._os_error("write", key, e) from e

    def get_bytes(self, key: str, *, max_bytes: int | None = None) -> bytes:
        path = self._path(key)
        try:
            with open(path, "rb") as f:
                # Checked on the open file (not a separate stat), so a swap between check and read cannot grow it.
                size = os.fstat(f.fileno()).st_size
                if max_bytes is not None and size > max_bytes:
                    raise ObjectTooLarge(f"{key} in {self.describe()} is larger than {max_bytes:,} bytes ({size:,} bytes); not read")
                # At most one byte more than allowed, whatever the file grows to while it is read.
                data = f.read() if max_bytes is None else f.read(max_bytes + 1)
                if max_bytes is not None and len(data) > max_bytes:
                    raise ObjectTooLarge(f"{key} in {self.describe()} grew past {max_bytes:,} bytes while being read")
                return data
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise NotFound(f"{key} not found in {self.describe()}") from None
        except OSError as e:
            raise self._os_error("read", key, e) from e

    def copy(self, src: str, dst: str, *, max_bytes: int | None = None) -> None:
        """A hard link: no byte is read or written. Safe because no object is ever written in place
        (``atomic_write`` renames a new file over a key), so neither key sees the other's later
        writes or deletes. Falls back to reading and writing where links cannot be made."""
        src_path, dst_path = self._path(src), self._path(dst)  # both checked inside the store
        try:
            info = os.stat(src_path, follow_symlinks=False)
        except (FileNotFoundError, NotADirectoryError):
            raise NotFound(f"{src} not found in {self.describe()}") from None
        if not stat.S_ISREG(info.st_mode):  # a symlink or a folder: read as get_bytes reads it (or refused)
            return super().copy(src, dst, max_bytes=max_bytes)
        if max_bytes is not None and info.st_size > max_bytes:
            raise ObjectTooLarge(f"{src} in {self.describe()} is larger than {max_bytes:,} bytes ({info.st_size:,} bytes); not copied")
        tmp = dst_path.parent / f"{TMP_PREFIX}{os.urandom(8).hex()}"
        try:
            dst_path.parent.mkdir(parents=True, exist_ok=True)
            os.link(src_path, tmp, follow_symlinks=False)
            os.replace(tmp, dst_path)  # atomic, like every write; a symlink at ``dst`` is replaced, never followed
            # ``dst`` already a link to the same file (the step run again): rename() then does nothing and
            # leaves the temp name, a hidden third link that would keep the bytes after both keys are dropped.
            tmp.unlink(missing_ok=True)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            if e.errno in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP):
                return super().copy(src, dst, max_bytes=max_bytes)  # a filesystem without hard links
            raise self._os_error("write", dst, e) from e
        return None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str = "") -> list[str]:
        prefix = dir_prefix(prefix)
        base = self._path(prefix.rstrip("/")) if prefix else self.root
        keys = []
        for dirpath, _dirs, files in os.walk(base):
            rel = Path(dirpath).relative_to(self.root).as_posix()
            for name in files:
                if not name.startswith(TMP_PREFIX):  # an in-flight (or crashed) atomic_write, not an object
                    keys.append(name if rel == "." else f"{rel}/{name}")
        return sorted(keys)

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            path.unlink()
        except FileNotFoundError:
            return
        except OSError as e:
            raise self._os_error("delete", key, e) from e

    def delete_prefix(self, prefix: str) -> None:
        prefix = dir_prefix(prefix)
        if not prefix:
            raise ValueError("delete_prefix needs a non-empty prefix (refusing to delete the whole store)")
        base = self._path(prefix.rstrip("/"))
        if base.is_dir():
            try:
                shutil.rmtree(base)
            except OSError as e:
                raise self._os_error("delete", prefix, e) from e
