"""A wall-clock bound on one S3 attempt, for ``S3Store``'s retry deadline.

urllib3's read timeout bounds each socket read, not a response: an endpoint (a broken proxy, a
half-dead server) that trickles one byte every few seconds never trips it, and the store call
would hang for as long as the bytes keep coming. So every attempt runs inside ``Attempt``: the
connections it takes from the pool are registered with it, and a timer shuts their sockets down
when the attempt's time is up. The blocked read then returns at once, the attempt fails and
``Attempt.cut`` tells the caller it was the deadline, not the server, that ended it.

Registration is per thread (``threading.local``): the minio client is synchronous, so the thread
that runs an attempt is the one that takes its connections; other threads' attempts are untouched.
"""

from __future__ import annotations

import socket
import threading
import time
from types import TracebackType
from typing import Any

import urllib3
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

_current = threading.local()


class Attempt:
    """``with Attempt(seconds) as a:`` bounds the S3 requests made in the block by this thread."""

    def __init__(self, seconds: float) -> None:
        self._lock = threading.Lock()
        self._conns: list[Any] = []
        self.fired = False  # the time is up
        self.cut = False  # ... and a live connection of this attempt was shut because of it
        self._timer: threading.Timer | None = None
        self._seconds = max(0.0, seconds)
        self._end = time.monotonic() + self._seconds

    def __enter__(self) -> Attempt:
        _current.attempt = self
        self._arm(self._seconds)
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        _current.attempt = None
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()

    def _arm(self, seconds: float) -> None:
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
            if self.fired:
                return
            self._end = time.monotonic() + seconds
            self._timer = threading.Timer(seconds, self._fire)
            self._timer.daemon = True
            self._timer.start()

    def extend(self, seconds: float) -> None:
        """Allow ``seconds`` more than the current bound (a transfer of known size may take longer than
        the deadline)."""
        self._arm(max(0.0, self._end - time.monotonic()) + seconds)

    def track(self, conn: Any) -> None:
        with self._lock:
            if conn not in self._conns:
                self._conns.append(conn)
            if self.fired:
                self.cut |= _shut(conn)

    def _fire(self) -> None:
        with self._lock:
            self.fired = True
            for conn in self._conns:
                self.cut |= _shut(conn)


def _shut(conn: Any) -> bool:
    """Shut ``conn``'s socket down; whether there was one to shut."""
    sock = getattr(conn, "sock", None)
    if sock is None:
        return False  # not connected (refused, or still connecting: the connect timeout bounds that)
    try:
        sock.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in recv/send on it
    except OSError:
        return False  # already closed
    return True


def current() -> Attempt | None:
    """The attempt running in this thread, if any."""
    return getattr(_current, "attempt", None)


def _track(conn: Any) -> None:
    a = current()
    if a is not None:
        a.track(conn)


class BoundedHTTPConnection(HTTPConnection):
    def connect(self) -> None:
        super().connect()
        _track(self)  # a fresh socket: shut at once if the attempt's time is already up


class BoundedHTTPSConnection(HTTPSConnection):
    def connect(self) -> None:
        super().connect()
        _track(self)


class _Pool(HTTPConnectionPool):
    ConnectionCls = BoundedHTTPConnection

    def _get_conn(self, timeout: float | None = None) -> Any:
        conn = super()._get_conn(timeout)
        _track(conn)  # a reused connection is never connected again: register it here
        return conn


class _SPool(HTTPSConnectionPool):
    ConnectionCls = BoundedHTTPSConnection

    def _get_conn(self, timeout: float | None = None) -> Any:
        conn = super()._get_conn(timeout)
        _track(conn)
        return conn


def pool_manager(**kw: Any) -> urllib3.PoolManager:
    """A ``urllib3.PoolManager`` whose connections obey the running ``Attempt``."""
    pm = urllib3.PoolManager(**kw)
    pm.pool_classes_by_scheme = {"http": _Pool, "https": _SPool}
    return pm
