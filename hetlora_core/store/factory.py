"""``open_store``: the store a config describes."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import Store
from .local import LocalStore

if TYPE_CHECKING:
    from hetlora_core.config import StoreConfig


def open_store(cfg: StoreConfig, credentials: tuple[str, str] | None = None) -> Store:
    """The store ``cfg`` describes. S3 credentials come from the environment (see ``store.s3``) or
    from the caller (``credentials``), never from ``cfg``, so a config can be logged, stored and
    compiled into YAML safely."""
    if cfg.kind == "local":
        if not cfg.root:
            # Never a silent default (the current directory): the store must be where the user thinks.
            from hetlora_core.config import ConfigError

            raise ConfigError("config: store.root: is empty, and this command has no run directory to put the store in: "
                              "set store.root to the local store's directory (e.g. --set store.root=runs/NAME/store, "
                              "the store/ of a `hetlora simulate/run --out runs/NAME`) or use store.kind: s3")
        return LocalStore(cfg.root, fsync=cfg.fsync)
    if cfg.kind == "s3":
        from .s3 import S3Store  # lazy: a local run never imports minio/urllib3

        return S3Store(cfg.endpoint, cfg.bucket, secure=cfg.secure, region=cfg.region,
                       retry_deadline_s=cfg.retry_deadline_s, credentials=credentials)
    raise ValueError(f"store.kind must be 'local' or 's3', got {cfg.kind!r}")
