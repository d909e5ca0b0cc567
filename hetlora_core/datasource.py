"""Per-client data folders: ``<data.path>/<client_id>/`` on a local disk or under an S3 prefix.

Torch-free on purpose: the driver and the model-free plan step list the run's clients from folder
names alone (``client_ids``), without reading any client's files or importing a tokenizer.

Isolation is the point of this module. A client's train task opens only its own folder: every read
goes through ``DataSource.read(client_id, name)``, whose key is ``<path>/<client_id>/<name>`` with a
validated id, and nothing here lists or reads another client's folder. The clients' files are
untrusted input (one folder per device or silo): sizes are capped before reading, symbolic links
are refused, and every error names the client and file.

Layout of one client folder (other files are ignored, so a README may sit beside the data):

* ``train.jsonl`` and/or ``*.txt`` (a text file is one text record; ``eval.txt`` excluded): training data
* ``eval.jsonl`` or ``eval.txt`` (optional): held-out data; without it the training records are
  split deterministically by ``data.heldout_fraction`` (a contiguous tail, see ``folder_data``).
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .corpus import DataError

if TYPE_CHECKING:
    from .config import DataConfig, HetLoRAConfig, StoreConfig
    from .store.base import Store

TRAIN_JSONL, EVAL_NAMES = "train.jsonl", ("eval.jsonl", "eval.txt")
MAX_FILES_PER_CLIENT = 256  # a folder with more files is rejected (bounded listing and reading)
# Security: the id becomes a path segment (local folder, S3 key, store key of the client's uploads):
# a safe character set, no leading dot (hidden folders, '.', '..'), bounded length.
_CLIENT_ID = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$")


def check_client_id(name: str, where: str) -> str:
    """``name`` if it is a valid client id, else DataError naming the folder and the rule."""
    if not _CLIENT_ID.match(name) or ".." in name:
        raise DataError(f"client folder {name!r} in {where}: a client folder name must use only letters, digits, "
                        "'.', '_' or '-', must not start with '.' or contain '..', and be at most 128 characters; "
                        "rename the folder (its name is the client id)")
    return name


@dataclass(frozen=True)
class ClientFiles:
    """The raw bytes of one client's data files, by role (train / eval), each as (file label, bytes)."""

    client_id: str
    train: tuple[tuple[str, bytes], ...]
    eval: tuple[tuple[str, bytes], ...]


class DataSource:
    """One data root (local directory or S3 prefix). Subclasses list names and read bytes."""

    root: str

    def list_client_ids(self) -> list[str]:
        """Sorted, validated client folder names (names only: no file is opened)."""
        raise NotImplementedError

    def list_files(self, client_id: str) -> list[str]:
        """File names directly inside one client's folder."""
        raise NotImplementedError

    def read(self, client_id: str, name: str, max_bytes: int) -> bytes:
        """One file of one client, at most ``max_bytes`` (DataError naming the file when larger)."""
        raise NotImplementedError

    def label(self, client_id: str, name: str) -> str:
        """How errors name a file: ``<root>/<client>/<name>``."""
        return f"{self.root.rstrip('/')}/{client_id}/{name}"

    def read_client(self, client_id: str, cfg: DataConfig) -> ClientFiles:
        """Every data file of ``client_id`` (only its folder is listed and read)."""
        check_client_id(client_id, self.root)
        names = self.list_files(client_id)
        if len(names) > MAX_FILES_PER_CLIENT:
            raise DataError(f"{self.label(client_id, '')} holds {len(names)} files, more than {MAX_FILES_PER_CLIENT}")
        train_names = ([TRAIN_JSONL] if TRAIN_JSONL in names else []) + sorted(
            n for n in names if n.endswith(".txt") and n not in EVAL_NAMES)
        eval_names = [n for n in EVAL_NAMES if n in names]
        if not train_names:
            raise DataError(f"client {client_id}: no training data in {self.label(client_id, '')} "
                            f"(expected {TRAIN_JSONL} or *.txt; found {sorted(names)[:10]})")
        if len(eval_names) > 1:
            raise DataError(f"client {client_id}: both eval.jsonl and eval.txt in {self.label(client_id, '')}; keep one")

        def get(ns: list[str]) -> tuple[tuple[str, bytes], ...]:
            return tuple((self.label(client_id, n), self.read(client_id, n, cfg.max_file_bytes)) for n in ns)

        return ClientFiles(client_id, get(train_names), get(eval_names))


class LocalSource(DataSource):
    def __init__(self, root: str) -> None:
        self.root = root
        self._root = Path(root).expanduser()  # "~/clients" as a shell would read it

    def list_client_ids(self) -> list[str]:
        if not self._root.is_dir():
            raise DataError(f"data.path {self.root} is not a directory (expected one sub-folder per client)")
        with os.scandir(self._root) as it:  # names and types only: no client file is opened
            names = sorted(e.name for e in it if e.is_dir(follow_symlinks=False))
        return [check_client_id(n, self.root) for n in names]

    def _folder(self, client_id: str) -> Path:
        folder = self._root / check_client_id(client_id, self.root)
        # Security: a client folder that is a symlink could point at another client's data or anywhere.
        if folder.is_symlink() or not folder.is_dir():
            raise DataError(f"client {client_id}: {folder} is missing or not a plain directory (symlinks are refused)")
        return folder

    def list_files(self, client_id: str) -> list[str]:
        with os.scandir(self._folder(client_id)) as it:
            # Everything but sub-folders: symlinks and special files are listed so that reading them
            # is refused by name (read), instead of being skipped without a word.
            return sorted(e.name for e in it if not e.is_dir(follow_symlinks=False))

    def read(self, client_id: str, name: str, max_bytes: int) -> bytes:
        path = self._folder(client_id) / name
        # Security: regular files only (no symlink out of the folder, no FIFO that blocks, no device),
        # checked on the opened descriptor: O_NOFOLLOW refuses a symlink and O_NONBLOCK keeps a FIFO
        # from blocking the open, so a file swapped between a check and the read changes nothing.
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
        except OSError as e:  # ELOOP: a symlink
            raise DataError(f"{path}: not a regular file, or not readable ({e.strerror}; symlinks are refused)") from None
        with os.fdopen(fd, "rb") as f:
            st_ = os.fstat(f.fileno())
            if not stat.S_ISREG(st_.st_mode):
                raise DataError(f"{path}: not a regular file (symlinks and special files are refused)")
            if st_.st_size > max_bytes:
                raise DataError(f"{path}: {st_.st_size} bytes, more than data.max_file_bytes={max_bytes}; split or shrink the file")
            data = f.read(max_bytes + 1)  # the file may grow while it is read
        if len(data) > max_bytes:
            raise DataError(f"{path}: more than data.max_file_bytes={max_bytes} bytes")
        return data


class S3Source(DataSource):
    """``s3://bucket/prefix``, read through an ``S3Store`` on the run's store endpoint (same
    credentials, retries and TLS settings as the store; the bucket is never created)."""

    def __init__(self, store: Store, bucket: str, prefix: str) -> None:
        self.root = f"s3://{bucket}/{prefix}".rstrip("/")
        self._store, self._prefix = store, prefix.strip("/")

    def _key(self, client_id: str, name: str = "") -> str:
        parts = [self._prefix, check_client_id(client_id, self.root)] + ([name] if name else [])
        return "/".join(p for p in parts if p)

    def list_client_ids(self) -> list[str]:
        start = f"{self._prefix}/" if self._prefix else ""
        names = {k[len(start):].split("/", 1)[0] for k in self._store.list(self._prefix) if "/" in k[len(start):]}
        return [check_client_id(n, self.root) for n in sorted(names)]

    def list_files(self, client_id: str) -> list[str]:
        start = self._key(client_id) + "/"
        return sorted(k[len(start):] for k in self._store.list(self._key(client_id)) if "/" not in k[len(start):])

    def read(self, client_id: str, name: str, max_bytes: int) -> bytes:
        from .store.base import ObjectTooLarge

        try:
            return self._store.get_bytes(self._key(client_id, name), max_bytes=max_bytes)
        except ObjectTooLarge:
            raise DataError(f"{self.label(client_id, name)}: more than data.max_file_bytes={max_bytes} bytes; "
                            "split or shrink the file") from None


def open_source(data: DataConfig, store: StoreConfig) -> DataSource:
    """The source ``data.path`` names: ``s3://bucket/prefix`` on ``store.endpoint``, else a directory."""
    if not data.path.startswith("s3://"):
        return LocalSource(data.path)
    from .store.s3 import S3Store  # lazy: local data never imports minio

    bucket, _, prefix = data.path[5:].partition("/")
    s3 = S3Store(store.endpoint, bucket, secure=store.secure, region=store.region,
                 retry_deadline_s=store.retry_deadline_s, create_bucket=False)
    return S3Source(s3, bucket, prefix)


def client_ids(cfg: HetLoRAConfig) -> list[str]:
    """The run's client ids, sorted, without opening any client file or importing torch.

    Shakespeare: the chosen roles. Folder: the sub-folder names of ``data.path``, whose number
    must equal ``data.num_clients`` (the config's cross-checks, e.g. ``ranks.explicit``, rely on
    it, and a missing or extra folder should stop the run before any round, not mid-way)."""
    if cfg.data.source == "shakespeare":
        from .corpus import client_ids as corpus_ids

        return corpus_ids(cfg.data)
    src = open_source(cfg.data, cfg.store)
    ids = src.list_client_ids()
    if len(ids) != cfg.data.num_clients:
        raise DataError(f"data.path {src.root} has {len(ids)} client folder(s) {ids[:20]} but data.num_clients is "
                        f"{cfg.data.num_clients}; set data.num_clients: {len(ids)}")
    return ids
