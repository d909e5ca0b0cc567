"""The warm task server process (``python -m hetlora_core.warm_server --socket PATH``): imports torch,
transformers, peft, the model classes, the model-side steps and the steps its driver registers
(``--step``: the local runner's kfp executor, so kfp too) once, then forks one child per task
connection; the child becomes the task (its environment, working directory, stdout and stderr) and
runs the step. The protocol and the task side are in ``hetlora_core.warm``.

Fork safety: OpenMP's thread pool and the tokenizers' Rayon pool do not survive a fork once used, and
neither does a CUDA context. So this process never encodes text, never touches CUDA, and runs torch
with one thread (an OpenMP region of one thread starts no pool); it forks from its one thread. Beyond
the imports it loads the run's base model (``--config``) when that is fork-safe
(:func:`model_preload_refusal`): every child then shares those weights copy-on-write (a child's writes, e.g. peft wrapping
its modules, stay in its own copied pages) and skips the load. The child then does what a fresh task process does
after its imports (set its torch threads from hetlora_core.threads, find the model in the process
cache, keyed on the same model section).

Security: the driver starts this process without the server key or store credentials in its
environment (``warm.server_env``): every child, client tasks' included, is a copy of its memory. The
socket is 0600 in a 0700 directory, and a peer of another user is refused (SO_PEERCRED).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import json
import logging
import os
import select
import signal
import socket
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, NoReturn

from . import warm
from .warm_up import release_free_heap, warm_up

# What a model-side task imports on its way to the real work, beyond the steps themselves
# (each step imports most of these lazily). A name missing in this version is skipped.
PRELOAD = (
    "torch", "transformers", "peft", "safetensors.torch",
    "transformers.models.auto.modeling_auto", "transformers.models.auto.tokenization_auto",
    "transformers.models.llama.modeling_llama", "transformers.models.llama.configuration_llama",
    "transformers.tokenization_utils_fast", "transformers.generation.utils", "peft.tuners.lora",
    "hetlora_core.runtime", "hetlora_core.models", "hetlora_core.client", "hetlora_core.evaluation",
    "hetlora_core.peft_bridge", "hetlora_core.precision", "hetlora_core.rouge", "hetlora_core.reporting",
    "hetlora_core.folder_data", "hetlora_core.data", "hetlora_core.vocab", "hetlora_core.threads",
    # Every step opens the store and most decode adapters: left to the child, importing the S3 client
    # (minio, urllib3, pycryptodome) was most of a prune task's time in the server (its executor
    # 0.18-0.22 s before, 0.08-0.13 s after: the task logs of bench_pipeline_overhead.py --keep).
    # Importing them starts no thread and opens no connection: the children still share only code.
    "hetlora_core.store.s3", "hetlora_core.methods.lora", "hetlora_core.methods.full_ft", "hetlora_core.strategies",
)
# torch's thread count before preload_model set it to one (0: untouched, nothing to restore).
fresh_threads = 0
# kfp's executor configures logging like this (kfp/dsl/executor_main.py) before a step runs.
KFP_LOG_FORMAT = "[KFP Executor %(asctime)s %(levelname)s]: %(message)s"


def preload() -> list[str]:
    """Import PRELOAD and every step module; returns the names that failed to import."""
    failed = []
    for name in (*PRELOAD, *(spec.split(":")[0] for spec in warm.STEPS.values())):
        try:
            importlib.import_module(name)
        except ImportError:
            failed.append(name)
    return failed


# Device nodes of GPUs torch may use (NVIDIA, AMD ROCm, WSL): with one present, even asking torch
# whether a GPU is there may start a context the children could not use.
GPU_DEVICE_NODES = ("nvidia*", "kfd", "dxg")
# The environment that decides which model folder a process loads (models._cached_folder): a child
# whose task says otherwise than the server did must not use the server's preloaded model.
MODEL_ENV = ("HETLORA_CACHE", "HETLORA_PREBUILT_CACHE", "HF_HOME", "HF_HUB_CACHE")


def gpu_present() -> bool:
    """A GPU torch could use: a device node (GPU_DEVICE_NODES), or a Mac (MPS)."""
    return sys.platform == "darwin" or any(any(Path("/dev").glob(g)) for g in GPU_DEVICE_NODES)


def model_preload_refusal(cfg: Any) -> str | None:
    """Why the base model of ``cfg`` must not be loaded before forking (None: it may). CUDA: a
    context does not survive a fork, and with a GPU device node present (GPU_DEVICE_NODES) even
    asking torch whether a GPU is there may start one; 4-bit weights need CUDA; ``model.vocab: corpus`` needs the
    tokenised corpus (the tokenizer's thread pool must not run before a fork)."""
    if cfg.model.device == "cuda" or cfg.model.quantize != "none":
        return f"model.device {cfg.model.device}, model.quantize {cfg.model.quantize}: needs CUDA"
    if cfg.model.device == "auto" and gpu_present():
        return "a GPU device is present (model.device auto may pick it)"
    if cfg.model.vocab != "full":
        return f"model.vocab {cfg.model.vocab}: needs the tokenised corpus"
    return None


def preload_model(config_path: str) -> str:
    """Load the run's base model into this process's cache (hetlora_core.runtime), or say why not."""
    import torch

    from . import peft_bridge, runtime
    from .config import config_from_dict

    cfg = config_from_dict(json.loads(Path(config_path).read_text()))
    refusal = model_preload_refusal(cfg)
    if refusal:
        return f"base model not preloaded ({refusal})"
    global fresh_threads
    fresh_threads = torch.get_num_threads()  # what a fresh process has: each child gets it back
    torch.set_num_threads(1)  # one thread: no OpenMP pool exists when the children fork
    with contextlib.suppress(ImportError):  # nor tqdm's monitor thread (started by the first progress bar)
        import tqdm

        tqdm.tqdm.monitor_interval = 0
    t0 = time.perf_counter()
    model = runtime.model(cfg)
    note = f"base model {cfg.model.name} preloaded in {time.perf_counter() - t0:.2f} s"
    if not cfg.local.warm_up:
        return f"{note}; no warm-up (local.warm_up: false)"
    if gpu_present():  # model.device: cpu on a GPU machine: a backward here would start a thread per GPU
        return f"{note}; no warm-up (a GPU device is present)"
    try:
        return f"{note}; {warm_up(cfg, model)}"
    except Exception as e:  # noqa: BLE001 - the tasks then load the model themselves, as without a preload
        runtime.forget_models()
        peft_bridge.forget_kept()
        return f"base model not preloaded: its warm-up failed: {type(e).__name__}: {e}"


def os_threads() -> int:
    """This process's OS threads (1 expected before a fork)."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return threading.active_count()


def _same_user(conn: socket.socket) -> bool:
    """Security: only this user's processes may ask for a task (the directory's 0700 says the same)."""
    opt = getattr(socket, "SO_PEERCRED", None)
    if opt is None:
        return True
    import struct

    _pid, uid, _gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, opt, struct.calcsize("3i")))
    return uid == os.getuid()


def _watch(conn: socket.socket, done: threading.Event) -> None:
    """Kill this child when its task goes away: the task sends nothing after its request, so the
    end of the stream (or an error) means the task process died or gave up."""
    try:
        while conn.recv(4096):
            pass
    except OSError:
        pass
    if not done.is_set():
        os.kill(os.getpid(), signal.SIGKILL)


def _jsonable_args(e: BaseException) -> list[Any] | None:
    return list(e.args) if all(isinstance(a, (str, int, float, bool)) or a is None for a in e.args) else None


def _fresh_process_state() -> None:
    """The state a fresh task process starts with: torch's default thread count (the server ran on
    one to load the model), torch's default generator at its initial seed, numpy's global one from
    fresh entropy (Python's ``random`` reseeds itself at a fork). The steps seed their own
    generators and set their threads; this keeps anything they leave as it is in a task process."""
    torch = sys.modules.get("torch")
    if torch is not None:
        if fresh_threads:
            torch.set_num_threads(fresh_threads)
        torch.manual_seed(torch.initial_seed())
    np = sys.modules.get("numpy")
    if np is not None:
        np.random.seed()


def child(conn: socket.socket, close: list[Any]) -> NoReturn:
    """The forked child: become the task, run its step, reply, exit. Never returns."""
    code = 70
    try:
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGCHLD, signal.SIGTERM):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for obj in close:
            obj.close()
        msg, fds, _flags, _addr = socket.recv_fds(conn, warm.HEADER.size, 2)
        if not msg:
            os._exit(0)
        request = warm.recv_frame(conn, msg)
        if request is None or len(fds) != 2:
            raise ValueError(f"incomplete request ({len(fds)} file descriptors)")
        # Become the task: its stdout/stderr (its log under kfp.local), its environment (a client
        # task's empty server key stays empty), its working directory.
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
        for fd, target in zip(fds, (1, 2), strict=True):
            os.dup2(fd, target)
            os.close(fd)
        server_model_env = [os.environ.get(k) for k in MODEL_ENV]
        os.environ.clear()
        os.environ.update({str(k): str(v) for k, v in dict(request["env"]).items()})
        if [os.environ.get(k) for k in MODEL_ENV] != server_model_env and "hetlora_core.runtime" in sys.modules:
            sys.modules["hetlora_core.runtime"]._model.cache_clear()  # loads what the task's own environment names
        os.chdir(str(request["cwd"]))
        _fresh_process_state()
        step = str(request["step"])
        try:
            fn = warm.step_function(step)
        except (KeyError, ImportError, AttributeError) as e:  # not a step of this server: the task runs it itself
            warm.send_frame(conn, {"kind": "unavailable", "message": f"{type(e).__name__}: {e}"})
            os._exit(0)
        done = threading.Event()
        threading.Thread(target=_watch, args=(conn, done), daemon=True).start()
        warm.send_frame(conn, {"kind": "started", "pid": os.getpid()})
        try:
            reply = {"kind": "result", "value": fn(*list(request["args"]))}
        except SystemExit as e:  # as in the task process: the process exits with the code
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(e.code if isinstance(e.code, int) else (0 if e.code is None else 1))
        except BaseException as e:  # noqa: BLE001 - every failure goes back to the task
            reply = {"kind": "error", "type": type(e).__qualname__, "module": type(e).__module__, "args": _jsonable_args(e),
                     "message": str(e), "traceback": "".join(traceback.format_exception(e))}
        sys.stdout.flush()
        sys.stderr.flush()
        done.set()
        warm.send_frame(conn, reply)
        code = 0
    except BaseException:  # noqa: BLE001 - a broken request: said on the task's stderr when we have it
        with contextlib.suppress(BaseException):
            traceback.print_exc()
            sys.stderr.flush()
    finally:
        os._exit(code)


def _report_exits(children: dict[int, socket.socket]) -> None:
    """Reap finished children and tell each one's task how it ended (the task exits with that code
    when it got no result; after a result it no longer listens)."""
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        conn = children.pop(pid, None)
        if conn is None:
            continue
        with contextlib.suppress(OSError):
            conn.setblocking(False)
            warm.send_frame(conn, {"kind": "exit", "code": os.waitstatus_to_exitcode(status)})
        conn.close()


def serve(path: str, parent: int | None = None, do_preload: bool = True, config_path: str | None = None,
          steps: dict[str, str] | None = None) -> None:
    """Listen on ``path`` and fork a child per connection until SIGTERM or the parent is gone.
    ``steps``: the driver's own steps (name -> "module:function"), added to ``warm.STEPS`` here and
    preloaded with them."""
    warm.serving = True
    warm.STEPS.update(steps or {})
    logging.basicConfig(stream=sys.stdout, format=KFP_LOG_FORMAT, level=logging.INFO)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)  # Security: the socket is created 0600 (its directory is 0700 too)
    try:
        listener.bind(path)
    finally:
        os.umask(old)
    listener.listen(64)  # from here tasks may connect; they wait in the backlog until preloaded
    t0 = time.perf_counter()
    # Copy-on-write: the children share the preloaded heap. A garbage collection in a child would
    # write the GC header of every inherited object (copying all their pages, and walking them:
    # measured 1 s more for a tokenizer load), so they go to the permanent generation, as the gc
    # docs advise for a pre-fork server: collected never, shared always.
    gc.disable()
    failed = preload() if do_preload else []
    model_note = ""
    if do_preload and config_path:
        try:
            model_note = "; " + preload_model(config_path)
        except Exception as e:  # noqa: BLE001 - the tasks then load it themselves, and say why if they cannot
            model_note = f"; base model not preloaded: {type(e).__name__}: {e}"
    gc.collect()
    gc.freeze()
    gc.enable()
    release_free_heap()  # after the last collection: what it freed must not be copied by every child (warm_up.py)
    print(f"warm task server {os.getpid()}: listening on {path}; preloaded in {time.perf_counter() - t0:.2f} s"
          + (f" (not importable: {', '.join(failed)})" if failed else "") + model_note + f"; {os_threads()} OS thread(s)", flush=True)
    wake_r, wake_w = socket.socketpair()
    wake_r.setblocking(False)
    wake_w.setblocking(False)
    signal.set_wakeup_fd(wake_w.fileno())
    signal.signal(signal.SIGCHLD, lambda *_: None)
    stop = False

    def on_term(*_: Any) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    children: dict[int, socket.socket] = {}
    try:
        while not stop and (parent is None or os.getppid() == parent):
            ready, _, _ = select.select([listener, wake_r], [], [], 1.0)
            if wake_r in ready:
                with contextlib.suppress(OSError):
                    wake_r.recv(4096)
            if listener in ready and not stop:
                try:
                    conn, _ = listener.accept()
                except OSError as e:  # EMFILE, ECONNABORTED...: that task gets no answer and runs in-process
                    print(f"warm server: accept failed: {e}", file=sys.stderr, flush=True)
                    conn = None
                if conn is not None:
                    try:
                        if not _same_user(conn):
                            conn.close()
                        else:
                            sys.stdout.flush()
                            sys.stderr.flush()
                            pid = os.fork()
                            if pid == 0:
                                child(conn, [listener, wake_r, wake_w, *children.values()])
                            children[pid] = conn
                    except OSError as e:
                        # A failed fork (EAGAIN under a pids limit, ENOMEM) fails this one request only:
                        # the task sees the connection close with no word and runs the step itself;
                        # the tasks already running in children are untouched.
                        print(f"warm server: could not serve a task: {e}", file=sys.stderr, flush=True)
                        conn.close()
            _report_exits(children)
    finally:
        for pid in list(children):  # tasks still running when the run stops: their children go with it
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
            with contextlib.suppress(OSError):
                children[pid].setblocking(False)
                warm.send_frame(children[pid], {"kind": "exit", "code": -signal.SIGKILL})
            children.pop(pid).close()
        with contextlib.suppress(OSError):
            os.unlink(path)


def _step(text: str) -> tuple[str, str]:
    """``NAME=MODULE:FUNCTION`` -> (name, "module:function")."""
    name, _, spec = text.partition("=")
    module, _, function = spec.partition(":")
    if not (name.isidentifier() and function.isidentifier() and all(p.isidentifier() for p in module.split("."))):
        raise argparse.ArgumentTypeError(f"--step {text!r}: expected NAME=MODULE:FUNCTION")
    return name, spec


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="warm task server for local runs (started by the local driver)")
    ap.add_argument("--socket", required=True)
    ap.add_argument("--parent", type=int, default=None, help="exit when this process (the driver) is gone")
    ap.add_argument("--no-preload", action="store_true", help="import nothing ahead (tests)")
    ap.add_argument("--config", default=None, help="the run's config (JSON): its base model is loaded ahead when fork-safe")
    ap.add_argument("--step", action="append", default=[], type=_step, metavar="NAME=MODULE:FUNCTION",
                    help="a step of the driver's own beside warm.STEPS (repeatable; its module is preloaded)")
    args = ap.parse_args(argv)
    serve(args.socket, args.parent, not args.no_preload, args.config, dict(args.step))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # no interpreter teardown of torch & co (seconds): nothing is left to clean up


if __name__ == "__main__":
    main()
