"""``hetlora store roles``: the two MinIO users (server, client) and the server key, as files that
``kubectl create secret generic NAME --from-env-file=FILE`` turns into the three Secrets
(store/roles.py, store/signing.py; docs in manifests/base/minio/secret.template.yaml)."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import click

ADMIN_ENV = ("MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD")
SERVER_FILE, CLIENT_FILE, KEY_FILE = "server.env", "client.env", "server-key.env"


def _read_env_file(path: Path) -> dict[str, str]:
    if not path.is_file():
        return {}
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)


def _write_secret_file(path: Path, text: str) -> None:
    # Security: created 0600 (O_EXCL after removing an old one), so the keys are never readable by others.
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def register(main: click.Group) -> None:
    """Add ``store roles`` to the ``hetlora`` CLI group."""
    from .cli import config_option, fail, load_cfg, set_option

    @main.group()
    def store() -> None:
        """The object store: roles (server and client credentials) and the server key."""

    @store.command("roles")
    @config_option
    @set_option
    @click.option("--out", "-o", type=click.Path(file_okay=False), required=True,
                  help=f"Folder for {SERVER_FILE}, {CLIENT_FILE}, {KEY_FILE} (mode 0600; existing ones are kept, not rotated).")
    def store_roles(config: str | None, sets: tuple[str, ...], out: str) -> None:
        """Create the server and client users of store.bucket on MinIO (admin credentials from
        MINIO_ROOT_USER / MINIO_ROOT_PASSWORD) and a server key; write them as env files for the
        Secrets kubeflow.store_secret, kubeflow.client_store_secret and kubeflow.server_key_secret."""
        from .store import StoreError
        from .store.roles import Credentials, ensure_roles

        cfg = load_cfg(config, sets)
        if cfg.store.kind != "s3":
            fail("store roles needs store.kind: s3 (a MinIO endpoint); see configs/kind.yaml")
        user, password = (os.environ.get(v, "") for v in ADMIN_ENV)
        if not (user and password):
            fail(f"set {ADMIN_ENV[0]} and {ADMIN_ENV[1]} to the MinIO root credentials (in the cluster: the Secret "
                 f"{cfg.kubeflow.store_secret} that the MinIO StatefulSet reads)")
        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        old = {name: _read_env_file(folder / name) for name in (SERVER_FILE, CLIENT_FILE, KEY_FILE)}
        try:
            # Folder data on S3 (data.path: s3://bucket/prefix) is read by the client tasks: their role reads that bucket too.
            data_bucket = cfg.data.path[5:].split("/", 1)[0] if cfg.data.path.startswith("s3://") else ""
            server, client = ensure_roles(cfg.store.endpoint, Credentials(user, password), cfg.store.bucket, secure=cfg.store.secure,
                                          server_secret=old[SERVER_FILE].get("secretkey"), client_secret=old[CLIENT_FILE].get("secretkey"),
                                          read_buckets=[data_bucket] if data_bucket else [])
        except StoreError as e:
            fail(str(e))
        _write_secret_file(folder / SERVER_FILE, server.env_file())
        _write_secret_file(folder / CLIENT_FILE, client.env_file())
        if not old[KEY_FILE].get("key"):
            _write_secret_file(folder / KEY_FILE, f"key={secrets.token_hex(32)}\n")
        ns = cfg.kubeflow.namespace
        click.echo(f"users {server.access_key} (server) and {client.access_key} (client) of bucket {cfg.store.bucket} are ready; "
                   f"secrets written to {folder} (0600). Create the Secrets in the tasks' namespace, then delete the files "
                   "(if kubeflow.store_secret also holds MinIO's root credentials, give the server role a new Secret name "
                   "and set kubeflow.store_secret to it):")
        for secret, name in ((cfg.kubeflow.store_secret, SERVER_FILE), (cfg.kubeflow.client_store_secret or "hetlora-store-client", CLIENT_FILE),
                             (cfg.kubeflow.server_key_secret or "hetlora-server-key", KEY_FILE)):
            click.echo(f"  kubectl -n {ns} create secret generic {secret} --from-env-file={folder / name}")
