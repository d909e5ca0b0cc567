"""Warm task server for local runs: the task side (``delegate``) and the driver side (``local_server``).

Under kfp.local every pipeline task is a fresh ``python -m kfp.dsl.executor_main`` process, and a
model-side task (train, evaluate, evaluate-client) pays about 10 s of imports (torch, transformers,
peft: transformers' own import graph, not trimmable from here) before any real work. The local
driver therefore starts one server process per run (``hetlora_core.warm_server``) that imports all
of that once and forks a child per task, like gunicorn's preload or multiprocessing's forkserver.
The child takes the task's environment, working directory and stdout/stderr (passed as file
descriptors), runs the step function and sends back its JSON result or its exception; a child that
exits hard makes the task exit with the same code. The task process itself stays what kfp.local
started: a failure of the optimisation never fails a task, the task just runs the step in-process.

The task side delegates only when ``HETLORA_WARM_SOCKET`` names a socket: the local driver sets it
in its own environment for the run (kfp.local tasks inherit it); under Kubeflow it is never set, and
the steps run in-process exactly as before. This module imports only the standard library, so the
check costs a task nothing.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

SOCKET_ENV = "HETLORA_WARM_SOCKET"
HEADER = struct.Struct("!4sI")  # magic, payload length
MAGIC = b"HLW1"
MAX_FRAME = 64 << 20  # a request holds one config and one environment: far below this
# AF_UNIX paths are limited to 108 bytes (sun_path) on Linux; keep a margin.
MAX_SOCKET_PATH = 100
# How long a task waits for the server to fork its child (the server's preload, ~10 s, included).
START_TIMEOUT_S = 120.0

# The steps the server runs: name -> "module:function", plus those its driver registers at its start
# (``WarmServer(steps=...)``: the local pipeline runner's kfp executor, which runs the component file
# the task names, as the task process itself would). A request names a step, never a module; the
# boundary is the socket: only a process of this user reaches it (warm_server._same_user, 0700 dir).
STEPS: dict[str, str] = {
    "train": "hetlora_core.steps.train:train_task",
    "evaluate": "hetlora_core.steps.evaluate:evaluate_task",
    "evaluate_client": "hetlora_core.steps.evaluate_client:evaluate_client_task",
    # Model-free: their task would spend ~0.35 s importing numpy, the config and the store for work
    # that often takes less; run_step delegates them before importing anything of the step.
    "prune": "hetlora_core.steps.prune:prune_task",
    "aggregate": "hetlora_core.steps.aggregate:aggregate_task",
}

log = logging.getLogger("hetlora")

# True inside the server and its children (warm_server sets it): a step running there never
# delegates again, whatever the task's environment says.
serving = False


class RemoteTraceback(Exception):
    """The traceback of an exception raised inside the warm server's child, as text (chained as
    the cause of the exception the task re-raises, so the task's log shows where it happened)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


# ---------------------------------------------------------------------------- framing


def send_frame(sock: socket.socket, obj: Any) -> None:
    data = json.dumps(obj).encode()
    sock.sendall(HEADER.pack(MAGIC, len(data)) + data)


def recv_exact(sock: socket.socket, n: int, head: bytes = b"") -> bytes | None:
    """``n`` bytes (``head`` already read counts), or None when the peer closed first."""
    buf = bytearray(head)
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def recv_frame(sock: socket.socket, head: bytes = b"") -> dict[str, Any] | None:
    """One JSON object; None on a clean close before it; ValueError on a malformed frame."""
    header = recv_exact(sock, HEADER.size, head)
    if header is None:
        return None
    magic, n = HEADER.unpack(header)
    if magic != MAGIC or n > MAX_FRAME:
        raise ValueError(f"not a warm-server frame (magic {magic!r}, {n} bytes)")
    data = recv_exact(sock, n)
    if data is None:
        return None
    obj = json.loads(data)
    if not isinstance(obj, dict):
        raise ValueError("a warm-server frame holds a JSON object")
    return obj


# ---------------------------------------------------------------------------- task side


def delegate(step: str, *args: str | int | float | list[str], registered: bool = False) -> str | None:
    """Run ``step`` (a name in STEPS) with ``args`` in a child of the warm server and return its
    result; None when there is no server to ask (the caller then runs the step in-process).
    ``registered``: ``step`` is one the driver registered when it started the server (``WarmServer``'s
    ``steps``), so this process's STEPS need not name it.

    Raises the step's exception (the same class where it is a builtin or hetlora_core exception
    that takes its arguments back, else RuntimeError naming it); exits this process with the child's
    code when the child exited without a result (``os._exit``, a signal: an OOM kill looks the same)."""
    path = os.environ.get(SOCKET_ENV, "")
    if not path or serving or (step not in STEPS and not registered):
        return None
    t0 = time.perf_counter()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except OSError as e:
        sock.close()
        log.warning("warm task server %s unreachable (%s): running %s in this process", path, e, step)
        return None
    with sock:
        sys.stdout.flush()
        sys.stderr.flush()
        request = {"step": step, "args": list(args), "env": dict(os.environ), "cwd": os.getcwd()}
        try:
            data = json.dumps(request).encode()
            # The child writes to this task's own stdout/stderr (kfp.local's log of this task).
            socket.send_fds(sock, [HEADER.pack(MAGIC, len(data))], [1, 2])
            sock.sendall(data)
            # A server that does not take the task in time (stuck, or preloading on a starved
            # machine) is not waited for: the step runs here, and closing the connection kills a
            # child forked later before it starts (its watcher sees the closed connection).
            sock.settimeout(START_TIMEOUT_S)
            reply = recv_frame(sock)
            if reply is not None and reply.get("kind") == "started":
                sock.settimeout(None)  # the step itself may take as long as it takes
                reply = recv_frame(sock)
        except (OSError, ValueError) as e:
            log.warning("warm task server %s failed (%s): running %s in this process", path, e, step)
            return None
        if reply is not None and reply.get("kind") == "unavailable":  # a server without this step
            log.warning("warm task server %s cannot run %s (%s): running it in this process", path, step, reply.get("message"))
            return None
        if reply is None:
            # Closed with no word: the server died before or while forking (a child that was running
            # reports through the server). The step runs again here, as a retried task would.
            log.warning("warm task server %s closed the connection: running %s in this process", path, step)
            return None
        return _outcome(step, reply, time.perf_counter() - t0)


def run_step(step: str, *args: str | int | float | list[str]) -> str:
    """A model-free component's body: ``step`` (a name in STEPS) in the warm server's child when the
    local run has one, else imported and run in this process (the cluster, or no server). The step
    module is imported only when it runs here, so a delegated task imports nothing of it."""
    if (out := delegate(step, *args)) is not None:
        return out
    return str(step_function(step)(*args))


def step_function(step: str) -> Callable[..., Any]:
    """The function STEPS names for ``step`` (imported now): what the server's child and run_step call."""
    module, _, attr = STEPS[step].partition(":")
    fn: Callable[..., Any] = getattr(importlib.import_module(module), attr)
    return fn


def _outcome(step: str, reply: dict[str, Any], seconds: float) -> str:
    kind = reply.get("kind")
    if kind == "result":
        log.info("%s ran in the warm task server (%.2f s)", step, seconds)
        return str(reply["value"])
    if kind == "error":
        raise _exception(reply)
    code = int(reply.get("code", 70))
    sys.stdout.flush()
    sys.stderr.flush()
    if code < 0:  # killed by a signal: die by the same one (SIGKILL for an OOM kill)
        with contextlib.suppress(OSError, ValueError):  # SIGKILL's handler cannot be set (nor needs to be)
            signal.signal(-code, signal.SIG_DFL)
        with contextlib.suppress(OSError, ValueError):
            os.kill(os.getpid(), -code)
            time.sleep(5)
        code = 128 - code
    os._exit(code)


def _exception_class(module: Any, qualname: Any) -> type[Exception] | None:
    """The class the child raised, when it is a builtin or one of ours (nothing else is imported
    on the word of a reply)."""
    if not isinstance(module, str) or not isinstance(qualname, str):
        return None
    if module != "builtins" and not module.startswith("hetlora_core."):
        return None
    try:
        obj: Any = importlib.import_module(module)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError):
        return None
    return obj if isinstance(obj, type) and issubclass(obj, Exception) else None


def _exception(reply: dict[str, Any]) -> Exception:
    """The exception to raise in the task for an ``error`` reply."""
    cls, args = _exception_class(reply.get("module"), reply.get("type")), reply.get("args")
    exc: Exception | None = None
    if cls is not None:
        try:
            exc = cls(*args) if isinstance(args, list) else cls(str(reply.get("message", "")))
        except Exception:  # noqa: BLE001 - a constructor with another signature: RuntimeError below
            exc = None
    if exc is None:
        exc = RuntimeError(f"{reply.get('type')}: {reply.get('message')}")
    exc.__cause__ = RemoteTraceback(str(reply.get("traceback", "")))
    return exc


# ---------------------------------------------------------------------------- driver side


def server_env(withhold: Iterable[str]) -> dict[str, str]:
    """This environment less the server key, the store credentials and ``withhold``.

    Security: client tasks are untrusted consumers of the server's memory image (each task's child
    is a fork of it), so nothing secret may be in it: no key, no credentials. A task's child gets
    the task's own environment back, so a server task still has its key and a client task not."""
    drop = {SOCKET_ENV, "HETLORA_SERVER_KEY", "HETLORA_S3_ACCESS_KEY", "HETLORA_S3_SECRET_KEY", "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "HETLORA_PUSHGATEWAY_URL", *withhold}
    return {k: v for k, v in os.environ.items() if k not in drop}


def _socket_dir(run_dir: Path) -> Path:
    """A fresh 0700 directory for the socket: under the run directory when the path fits in a
    Unix socket address, else under the system temp directory (also 0700, also removed at stop)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    d = Path(tempfile.mkdtemp(prefix="warm-", dir=run_dir))  # mkdtemp: mode 0700, a new name
    if len(str(d / "s").encode()) <= MAX_SOCKET_PATH:
        return d
    d.rmdir()
    return Path(tempfile.mkdtemp(prefix="hetlora-warm-"))


class WarmServer:
    """One warm server process: ``start`` it, point tasks at ``socket_path``, ``stop`` it."""

    def __init__(self, run_dir: str | Path, withhold: Iterable[str] = (), log_path: str | Path | None = None,
                 preload: bool = True, argv: list[str] | None = None, config_json: str | None = None,
                 steps: Mapping[str, str] | None = None) -> None:
        self.run_dir, self.withhold, self.preload = Path(run_dir), tuple(withhold), preload
        # Steps of the driver's own beside STEPS (name -> "module:function"), e.g. the local pipeline
        # runner's task executor: fixed when the server starts, by the driver, never by a request.
        self.steps = dict(steps or {})
        # The run's (credential-free) config: the server loads its base model once before forking
        # when that is fork-safe (warm_server.model_preload_refusal), so model tasks skip the load.
        self.config_json = config_json
        self.log_path = Path(log_path) if log_path else None
        self.argv = argv  # the server's command line; None: python -m hetlora_core.warm_server
        self.dir: Path | None = None
        self.socket_path = ""
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, wait_s: float = 30.0) -> bool:
        """Start the server; True once its socket listens (it then preloads: tasks that connect
        meanwhile wait in the backlog). False (logged) when it could not start."""
        self.dir = _socket_dir(self.run_dir)
        self.socket_path = str(self.dir / "s")
        # -P: the driver's working directory is not put first on the server's sys.path, so a folder there
        # named like a module (torch/, hetlora_core/) cannot replace what every task's child then runs.
        argv = self.argv or [sys.executable, "-P", "-m", "hetlora_core.warm_server"]
        argv = [*argv, "--socket", self.socket_path, "--parent", str(os.getpid())] + ([] if self.preload else ["--no-preload"])
        argv += [arg for name, spec in self.steps.items() for arg in ("--step", f"{name}={spec}")]
        if self.preload and self.config_json:
            config_path = self.dir / "config.json"  # in the 0700 socket directory, removed at stop
            config_path.write_text(self.config_json)
            argv += ["--config", str(config_path)]
        out: Any = subprocess.DEVNULL
        if self.log_path:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            out = open(self.log_path, "ab")  # noqa: SIM115 - the child holds it; closed below
        try:
            # A session of its own: a Ctrl-C at the terminal reaches the driver, which stops it.
            self.proc = subprocess.Popen(argv, env=server_env(self.withhold), stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        finally:
            if out is not subprocess.DEVNULL:
                out.close()
        deadline = time.monotonic() + wait_s
        while not os.path.exists(self.socket_path):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                log.warning("the warm task server did not start (log: %s): tasks run in their own processes",
                            self.log_path or "none")
                self.stop()
                return False
            time.sleep(0.01)
        return True

    def stop(self, grace_s: float = 5.0) -> None:
        """Stop the server (it kills the children still running) and remove its socket directory."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.dir is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.socket_path)
            with contextlib.suppress(OSError):
                os.unlink(self.dir / "config.json")
            with contextlib.suppress(OSError):
                self.dir.rmdir()


@contextlib.contextmanager
def local_server(run_dir: str | Path, withhold: Iterable[str] = (), enabled: bool = True,
                 log_path: str | Path | None = None, config_json: str | None = None,
                 steps: Mapping[str, str] | None = None) -> Iterator[str]:
    """For a local driver: a warm server for the run and ``HETLORA_WARM_SOCKET`` set in this
    process's environment while it lasts (kfp.local's tasks inherit it); yields the socket path
    ('' when disabled or not started). Stopped at the end, on an error and on KeyboardInterrupt.
    ``steps``: the driver's own steps beside STEPS (``WarmServer``)."""
    if not enabled:
        yield ""
        return
    server = WarmServer(run_dir, withhold, log_path, config_json=config_json, steps=steps)
    before = os.environ.get(SOCKET_ENV)
    try:
        if server.start():
            os.environ[SOCKET_ENV] = server.socket_path
        yield server.socket_path if server.proc and server.proc.poll() is None else ""
    finally:
        if before is None:
            os.environ.pop(SOCKET_ENV, None)
        else:
            os.environ[SOCKET_ENV] = before
        server.stop()
