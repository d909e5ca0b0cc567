"""``S3Store``: any S3 API (MinIO, SeaweedFS, AWS) through the ``minio`` client.

Credentials come ONLY from the environment: HETLORA_S3_ACCESS_KEY / HETLORA_S3_SECRET_KEY, else
AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (+ optional AWS_SESSION_TOKEN). They are handed to the
client and never stored on this object, logged or put in a message. HETLORA_S3_CA_BUNDLE optionally
names a CA file for TLS (``secure=True``) to a server with a private CA.

Transient failures (connection refused/reset, timeouts, 5xx, SlowDown, a server still starting)
are retried with bounded exponential backoff and jitter until ``retry_deadline_s`` has passed, then
``StoreUnavailable`` names the endpoint and the last error. urllib3 itself never retries (its
retries would hide time from our deadline); connect and read timeouts are inside the deadline, and
each attempt is bounded by the time left (``store.deadline``: an endpoint that trickles bytes
never trips a read timeout), plus time for the payload at ``MIN_TRANSFER_BYTES_PER_S`` when its
size is known. Auth errors are never retried.
"""

from __future__ import annotations

import http.client
import io
import logging
import os
import random
import ssl
import time
from collections.abc import Callable
from typing import Any, TypeVar

import certifi
import urllib3
from minio import Minio
from minio.commonconfig import CopySource
from minio.deleteobjects import DeleteObject
from minio.error import InvalidResponseError, S3Error, ServerError
from minio.helpers import MAX_PART_SIZE, MIN_PART_SIZE, check_bucket_name

# Only the base module: this file is imported lazily (by open_store / ``st.S3Store``) and must not
# pull the rest of the package back in (no import cycle).
from . import deadline
from .base import (
    NotFound,
    ObjectTooLarge,
    Store,
    StoreAuthError,
    StoreError,
    StoreFull,
    StorePermissionError,
    StoreUnavailable,
    dir_prefix,
    validate_key,
)

log = logging.getLogger("hetlora.store")
T = TypeVar("T")

ENV_ACCESS, ENV_SECRET, ENV_CA = "HETLORA_S3_ACCESS_KEY", "HETLORA_S3_SECRET_KEY", "HETLORA_S3_CA_BUNDLE"
AUTH_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken",
              "InvalidSecurity", "AuthorizationHeaderMalformed"}
DENIED_CODES = {"AccessDenied", "AllAccessDisabled"}  # valid (or no) credentials, but not for this
# A full server is not transient (507 would otherwise be retried until the deadline and reported as
# "Is the server running?"): it is said at once, by name.
FULL_CODES = {"XMinioStorageFull", "XMinioAdminBucketQuotaExceeded", "QuotaExceeded", "XMinioDiskFull"}
NOT_FOUND_CODES = {"NoSuchKey", "NoSuchObject", "ResourceNotFound"}
TRANSIENT_CODES = {"SlowDown", "RequestTimeout", "InternalError", "ServiceUnavailable", "XMinioServerNotInitialized",
                   "XMinioReadQuorum", "XMinioWriteQuorum", "OperationTimedOut"}
BACKOFF_START_S, BACKOFF_CAP_S = 0.1, 2.0
READ_TIMEOUT_S = 30.0
# A transfer of known size may take longer than the retry deadline at this rate (an adapter of
# 100 MiB: 100 s more); slower than that, the endpoint counts as hung.
MIN_TRANSFER_BYTES_PER_S = 1 << 20


def _credentials() -> tuple[str, str, str | None]:
    """(access, secret, session token) from the environment; StoreAuthError naming the variables."""
    for ak, sk in ((ENV_ACCESS, ENV_SECRET), ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")):
        a, s = os.environ.get(ak, ""), os.environ.get(sk, "")
        if a and s:
            return a, s, (os.environ.get("AWS_SESSION_TOKEN") or None) if ak.startswith("AWS") else None
        if a or s:
            raise StoreAuthError(f"{ak if a else sk} is set but {sk if a else ak} is not: set both")
    raise StoreAuthError(f"no S3 credentials in the environment: set {ENV_ACCESS} and {ENV_SECRET} "
                         "(or AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY); in the cluster they come from a Secret")


def _pool(connect_timeout: float, read_timeout: float) -> urllib3.PoolManager:
    ca = os.environ.get(ENV_CA, "")
    if ca and not os.path.isfile(ca):
        raise StoreError(f"{ENV_CA}={ca} is not a file: point it at the PEM CA bundle of the S3 endpoint")
    return deadline.pool_manager(
        timeout=urllib3.Timeout(connect=connect_timeout, read=read_timeout),
        maxsize=16,
        cert_reqs="CERT_REQUIRED",
        ca_certs=ca or os.environ.get("SSL_CERT_FILE") or certifi.where(),
        retries=False,  # no urllib3-level retries: S3Store._retry owns retrying and its deadline
    )


def _is_timeout(e: BaseException) -> bool:
    """A connect or read timeout (urllib3 2's NewConnectionError, a refusal, subclasses ConnectTimeoutError)."""
    if isinstance(e, urllib3.exceptions.NewConnectionError):
        return False
    return isinstance(e, (TimeoutError, urllib3.exceptions.TimeoutError))


class S3Store(Store):
    """A bucket on an S3 endpoint (``host:port``). Creates the bucket if missing."""

    def __init__(self, endpoint: str, bucket: str, secure: bool = False, region: str = "",
                 retry_deadline_s: float = 60.0, credentials: tuple[str, str] | None = None,
                 create_bucket: bool = True) -> None:
        """``credentials`` (access, secret) is for callers that hold them already (``hetlora
        preflight`` reads the cluster's Secret); otherwise they come from the environment. They are
        never part of a config, so a config can be logged and compiled into YAML safely.
        ``create_bucket=False`` is for readers of data the user put there (``data.path``): a
        missing bucket is then their mistake to hear about, not something to create."""
        if not endpoint or "://" in endpoint or "/" in endpoint:
            raise ValueError(f"store.endpoint must be host:port without scheme or path, got {endpoint!r}")
        try:
            check_bucket_name(bucket)
        except ValueError as e:
            raise ValueError(f"store.bucket {bucket!r} is not a valid S3 bucket name: {e}") from None
        if not retry_deadline_s > 0:
            raise ValueError(f"store.retry_deadline_s must be > 0, got {retry_deadline_s}")
        self.endpoint, self.bucket, self.secure, self.region = endpoint, bucket, secure, region
        self.retry_deadline_s = float(retry_deadline_s)
        access, secret, token = (*credentials, None) if credentials else _credentials()
        connect = min(3.0, max(0.25, self.retry_deadline_s / 4))
        self._client = Minio(endpoint, access_key=access, secret_key=secret, session_token=token,
                             secure=secure, region=region or None,
                             http_client=_pool(connect, min(READ_TIMEOUT_S, self.retry_deadline_s)))
        if create_bucket:
            self._retry("create bucket", bucket, self._ensure_bucket)

    def describe(self) -> str:
        scheme = "https" if self.secure else "http"
        return f"s3 bucket {self.bucket} at {scheme}://{self.endpoint}" + (f" (region {self.region})" if self.region else "")

    def _ensure_bucket(self) -> None:
        if self._client.bucket_exists(self.bucket):
            return
        try:
            # Private on purpose: no bucket policy is set, so nothing in it is anonymously readable.
            self._client.make_bucket(self.bucket, location=self.region or None)
            log.info("created bucket %s at %s", self.bucket, self.endpoint)
        except S3Error as e:
            if e.code != "BucketAlreadyOwnedByYou":  # a concurrent creator won the race: fine
                raise

    # ------------------------------------------------------------ retrying

    def _classify(self, e: BaseException, op: str, key: str) -> StoreError | None:
        """The StoreError to raise now, or None when ``e`` is transient (retry)."""
        where = f"{op} {key} on {self.describe()}"
        fix = "check store.endpoint (host:port of the S3 API, not the console) and store.secure (TLS)"
        if isinstance(e, S3Error):
            status = getattr(e.response, "status", 0) or 0
            if e.code in FULL_CODES or status == 507:
                return StoreFull(f"{where} failed: the server has no space left ({e.code}: {e.message}); free space on "
                                 f"its drives or raise the quota of bucket {self.bucket}")
            if e.code in DENIED_CODES:
                return StorePermissionError(
                    f"{where}: permission denied ({e.code}): the credentials in {ENV_ACCESS} (or AWS_ACCESS_KEY_ID) may "
                    f"not {op} this key (or none were sent); check that user's policy on bucket {self.bucket}")
            if e.code in AUTH_CODES:
                return StoreAuthError(
                    f"{where}: the server rejected the credentials ({e.code}): check {ENV_ACCESS} / {ENV_SECRET} "
                    f"(or AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY) and the user's access to bucket {self.bucket}")
            if e.code in NOT_FOUND_CODES:
                return NotFound(f"{key} not found in {self.describe()}")
            if status >= 500 or status == 429 or e.code in TRANSIENT_CODES:
                return None
            return StoreError(f"{where} failed: {e.code}: {e.message}")
        if isinstance(e, ServerError):
            if e.status_code == 507:  # Insufficient Storage without an S3 error body
                return StoreFull(f"{where} failed: the server has no space left (HTTP 507); free space on its drives")
            return None if e.status_code >= 500 or e.status_code == 429 else StoreError(f"{where} failed: {e}")
        if isinstance(e, InvalidResponseError):  # not an S3 answer: a proxy, the console, http vs https
            if "HTTP status code 5" in str(e) or "Response code: 5" in str(e):
                return None
            return StoreUnavailable(f"{where}: the endpoint did not answer like S3 ({str(e)[:300]}); {fix}")
        if isinstance(e, urllib3.exceptions.SSLError):
            reason = str(e)
            if isinstance(e.__context__, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY" in reason \
                    or "WRONG_VERSION_NUMBER" in reason or "wrong version number" in reason:
                return StoreUnavailable(
                    f"{where}: TLS failed: {reason}. If the server uses a private CA set {ENV_CA}=/path/ca.pem; "
                    "if it speaks plain HTTP set store.secure: false")
            return None
        if isinstance(e, (urllib3.exceptions.HTTPError, http.client.HTTPException, ConnectionError, TimeoutError)):
            return None  # refused, reset, timed out, torn response
        return None if isinstance(e, OSError) else StoreError(f"{where} failed: {type(e).__name__}: {e}")

    def _retry(self, op: str, key: str, fn: Callable[[], T], payload_bytes: int = 0) -> T:
        start = time.monotonic()
        end, attempt = start + self.retry_deadline_s, 0
        while True:
            attempt += 1
            # Each attempt ends by the deadline (plus its payload's transfer time), whatever the server does.
            bound = deadline.Attempt(max(0.0, end - time.monotonic()) + payload_bytes / MIN_TRANSFER_BYTES_PER_S)
            try:
                with bound:
                    return fn()
            except StoreError:
                raise
            except Exception as e:  # classified below; unknown kinds are raised, never swallowed
                timed_out = bound.cut or _is_timeout(e)
                err = None if bound.cut else self._classify(e, op, key)
                if err is not None:
                    raise err from e
                remaining = end - time.monotonic()
                if remaining <= 0 or bound.cut:
                    why = ("timed out: no complete answer" if timed_out else "failed") + \
                        f" after {attempt} attempt(s) over {time.monotonic() - start:.1f} s"
                    hint = ("Is the endpoint an S3 server that answers (not a proxy that stalls)?" if timed_out
                            else "Is the server running?")
                    last = ("the last attempt was cut off unanswered at the deadline" if bound.cut
                            else f"last error: {type(e).__name__}: {e}")
                    raise StoreUnavailable(
                        f"{self.describe()} is unavailable: {op} {key} {why} (store.retry_deadline_s="
                        f"{self.retry_deadline_s:g}); {last}. {hint} Check store.endpoint "
                        f"({self.endpoint}) and store.secure ({self.secure})") from e
                step = min(BACKOFF_CAP_S, BACKOFF_START_S * 2 ** (attempt - 1))
                sleep = min(remaining, random.uniform(step / 2, step))  # jitter: concurrent clients spread out
                log.warning("%s: %s %s failed (%s: %s); retry %d in %.2f s", self.describe(), op, key,
                            type(e).__name__, str(e)[:200], attempt, sleep)
                time.sleep(sleep)

    # ------------------------------------------------------------ Store

    def put_bytes(self, key: str, data: bytes) -> None:
        validate_key(key)
        data = bytes(data)
        ctype = "application/json" if key.endswith(".json") else "application/octet-stream"
        # One part up to 5 GiB: a single PUT is atomic and retries cleanly (no half-done multipart).
        part = min(MAX_PART_SIZE, max(MIN_PART_SIZE, len(data)))
        self._retry("put", key, lambda: self._client.put_object(
            self.bucket, key, io.BytesIO(data), len(data), content_type=ctype, part_size=part), payload_bytes=len(data))

    def get_bytes(self, key: str, *, max_bytes: int | None = None) -> bytes:
        validate_key(key)

        def op() -> bytes:
            resp = self._client.get_object(self.bucket, key)
            try:
                length = resp.headers.get("content-length")
                bound = deadline.current()
                if bound is not None and length and length.isdigit():  # the body may take its transfer time
                    bound.extend(min(int(length), max_bytes if max_bytes is not None else int(length)) / MIN_TRANSFER_BYTES_PER_S)
                if max_bytes is not None:
                    data = b"" if length and int(length) > max_bytes else resp.read(max_bytes + 1)
                    if (length and int(length) > max_bytes) or len(data) > max_bytes:
                        raise ObjectTooLarge(f"{key} in {self.describe()} is larger than {max_bytes} bytes")
                    return data
                return resp.read()
            finally:
                resp.close()
                resp.release_conn()

        return self._retry("get", key, op)

    def copy(self, src: str, dst: str, *, max_bytes: int | None = None) -> None:
        """A server-side copy (S3 CopyObject): the bytes never pass through this process. It needs
        read on ``src`` and write on ``dst``, as reading and writing would. One CopyObject takes up
        to 5 GiB; a larger object goes the read-and-write way (where max_bytes allows it at all)."""
        validate_key(src), validate_key(dst)
        info = self._retry("stat", src, lambda: self._client.stat_object(self.bucket, src))
        size = info.size or 0
        if max_bytes is not None and size > max_bytes:
            raise ObjectTooLarge(f"{src} in {self.describe()} is larger than {max_bytes} bytes; not copied")
        if size > MAX_PART_SIZE:
            return super().copy(src, dst, max_bytes=max_bytes)
        # match_etag: the object whose size was just checked, not one swapped in since (the copy fails instead).
        source = CopySource(self.bucket, src, match_etag=info.etag)
        self._retry("copy", dst, lambda: self._client.copy_object(self.bucket, dst, source), payload_bytes=size)
        return None

    def exists(self, key: str) -> bool:
        validate_key(key)

        def op() -> bool:
            try:
                self._client.stat_object(self.bucket, key)
                return True
            except S3Error as e:
                if e.code in NOT_FOUND_CODES:
                    return False
                raise

        return self._retry("stat", key, op)

    def list(self, prefix: str = "") -> list[str]:
        p = dir_prefix(prefix)
        return self._retry("list", p or "/", lambda: sorted(
            o.object_name for o in self._client.list_objects(self.bucket, prefix=p or None, recursive=True)
            if not o.is_dir))

    def delete(self, key: str) -> None:
        validate_key(key)
        # S3 DELETE of a missing key succeeds, so this is idempotent like LocalStore.delete.
        self._retry("delete", key, lambda: self._client.remove_object(self.bucket, key))

    def delete_prefix(self, prefix: str) -> None:
        p = dir_prefix(prefix)
        if not p:
            raise ValueError("delete_prefix needs a non-empty prefix (refusing to delete the whole bucket)")

        def op() -> None:
            keys = [o.object_name for o in self._client.list_objects(self.bucket, prefix=p, recursive=True)]
            # remove_objects is lazy: nothing is deleted until its error iterator is consumed.
            errors = list(self._client.remove_objects(self.bucket, [DeleteObject(k) for k in keys]))
            if errors:
                raise StoreError(f"delete {p} on {self.describe()}: {len(errors)} object(s) not deleted, "
                                 f"first: {errors[0].name}: {errors[0].code} {errors[0].message}")

        self._retry("delete", p, op)

    def __getstate__(self) -> dict[str, Any]:
        # A pickled store must not carry the credentials; rebuild from the environment instead.
        raise TypeError("S3Store is not picklable (it would carry credentials); call open_store() in the worker")
