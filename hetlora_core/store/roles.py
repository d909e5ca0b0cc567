"""Two store roles on MinIO: the server's credentials and the clients' (issue 13).

``ensure_roles`` (``hetlora store roles``) makes, through MinIO's admin API with the root
credentials, one bucket and two users with IAM policies:

* the **server** user (driver, plan, aggregate, evaluate): everything in the bucket;
* the **client** user (train, prune, evaluate-client): reads the bucket, writes only under
  ``<exp>/round-*/clients/*`` (uploads, trained updates) and ``<exp>/round-*/eval/clients/*``
  (federated evaluation sums), deletes nothing. So a client task cannot write a plan, a global,
  the round's metrics, the baseline or the run's config: the server state it reads on MinIO is
  the server's, although it cannot check the server's HMAC (store/signing.py says why).

Client tasks get the client user's keys from the Secret ``kubeflow.client_store_secret``, server
tasks the server user's from ``kubeflow.store_secret`` (pipelines/platform.py). Stores with one key
only (plain S3 without IAM, SeaweedFS) rely on the HMAC alone.

The patterns come from the layout functions (never spelled here: tests/test_layout_ownership.py),
with ``*`` for the experiment, the round number and the client id. An S3 ``*`` also matches '/',
so a pattern is only as strict as the layout: every key under a round's ``clients/`` or
``eval/clients/`` is a client's own to write, and no server key contains either segment.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .base import StoreError
from .layout import client_eval_key, client_prefix, round_name

SERVER_USER, CLIENT_USER = "hetlora-server", "hetlora-client"

__all__ = ["CLIENT_USER", "SERVER_USER", "Credentials", "client_policy", "client_write_patterns", "ensure_roles", "server_policy"]


@dataclass(frozen=True)
class Credentials:
    """One role's S3 keys. ``repr`` never shows the secret."""

    access_key: str
    secret_key: str

    def __repr__(self) -> str:
        return f"Credentials(access_key={self.access_key!r}, secret_key=***)"

    def env_file(self) -> str:
        """``accesskey=...``/``secretkey=...`` lines: ``kubectl create secret generic NAME --from-env-file``."""
        return f"accesskey={self.access_key}\nsecretkey={self.secret_key}\n"


def client_write_patterns() -> list[str]:
    """Object-key patterns a client may write, built from the layout with wildcards."""
    exp, cid = "EXP", "CID"
    rnd = round_name(0)
    star = {exp: "*", rnd: round_name(0).rstrip("0") + "*", cid: "*"}

    def wild(key: str) -> str:
        for literal, pattern in star.items():
            key = key.replace(literal, pattern)
        return key

    return [wild(f"{client_prefix(exp, 0, cid)}/*"), wild(client_eval_key(exp, 0, cid))]


def _arn(bucket: str, key: str = "") -> str:
    return f"arn:aws:s3:::{bucket}" + (f"/{key}" if key else "")


def server_policy(bucket: str) -> dict[str, Any]:
    """The server role: the whole bucket (it writes plans, globals, metrics, config; creates the bucket)."""
    return {"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": ["s3:*"], "Resource": [_arn(bucket), _arn(bucket, "*")]}]}


def client_policy(bucket: str, read_buckets: Sequence[str] = ()) -> dict[str, Any]:
    """The client role: list and read the bucket (and ``read_buckets``: folder data, ``data.path``);
    put objects only under the client patterns of ``bucket``.
    Security: no s3:DeleteObject, no s3:PutObject elsewhere: server state is out of a client's reach."""
    readable = [bucket, *[b for b in read_buckets if b != bucket]]
    return {"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": ["s3:GetBucketLocation", "s3:ListBucket"], "Resource": [_arn(b) for b in readable]},
        {"Effect": "Allow", "Action": ["s3:GetObject"], "Resource": [_arn(b, "*") for b in readable]},
        {"Effect": "Allow", "Action": ["s3:PutObject"], "Resource": [_arn(bucket, p) for p in client_write_patterns()]}]}


def _admin(endpoint: str, admin: Credentials, secure: bool) -> Any:
    from minio import MinioAdmin  # lazy: the network stack only where roles are made
    from minio.credentials import StaticProvider

    return MinioAdmin(endpoint=endpoint, credentials=StaticProvider(admin.access_key, admin.secret_key), secure=secure)


def ensure_roles(endpoint: str, admin: Credentials, bucket: str, *, secure: bool = False,
                 server_secret: str | None = None, client_secret: str | None = None,
                 server_user: str = SERVER_USER, client_user: str = CLIENT_USER,
                 read_buckets: Sequence[str] = ()) -> tuple[Credentials, Credentials]:
    """Create (or update) the bucket, both policies and both users; returns (server, client)
    credentials. A secret not given is a new random one (rerunning rotates it: pass the current
    ones to keep them). ``read_buckets``: more buckets clients read (folder data in its own bucket).
    Idempotent otherwise. ``StoreError`` naming the endpoint on failure."""
    from minio import Minio
    from minio.error import MinioAdminException, S3Error

    server = Credentials(server_user, server_secret or secrets.token_urlsafe(30))
    client = Credentials(client_user, client_secret or secrets.token_urlsafe(30))
    where = f"MinIO admin API at {'https' if secure else 'http'}://{endpoint}"
    try:
        s3 = Minio(endpoint, access_key=admin.access_key, secret_key=admin.secret_key, secure=secure)
        if not s3.bucket_exists(bucket):
            s3.make_bucket(bucket)  # private: no bucket policy, nothing anonymous
        adm = _admin(endpoint, admin, secure)
        for creds, policy in ((server, server_policy(bucket)), (client, client_policy(bucket, read_buckets))):
            name = f"{creds.access_key}-{bucket}"
            adm.policy_add(name, policy=json.loads(json.dumps(policy)))
            adm.user_add(creds.access_key, creds.secret_key)
            adm.policy_set(name, user=creds.access_key)  # replaces the user's policies: exactly this one
    except (MinioAdminException, S3Error, ValueError) as e:
        raise StoreError(f"{where}: could not create the store roles for bucket {bucket}: {str(e)[:300]}. Use the MinIO "
                         "root credentials (MINIO_ROOT_USER / MINIO_ROOT_PASSWORD)") from None
    except OSError as e:
        raise StoreError(f"{where} is unreachable: {e}") from None
    return server, client
