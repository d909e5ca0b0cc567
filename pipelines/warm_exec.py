"""A kfp.local task's whole executor in a child of the run's warm task server.

kfp.local starts every task as ``python -m kfp.dsl.executor_main ...``; that process imports kfp
(~0.3-0.8 s, most of a model-free task's start-up) only to load the component and call its body,
which then hands its step to the warm server (hetlora_core/warm.py) anyway. While a local run has a
warm server, ``tasks_via_server`` makes kfp.local start ``python -P -m hetlora_kfp.pipelines.warm_exec
-m kfp.dsl.executor_main ...`` instead: this module (standard library and hetlora_core.warm only)
asks the server to run kfp's executor with the same arguments in a child that already imported kfp,
torch and the steps (``pipelines/warm_executor.py``; the child becomes the task as for a step: its
environment, working directory, stdout and stderr). kfp.local sees the same process, exit code and
log; the component body runs in that child, where its step runs in-process (no second hop).

Anything else, or no server to ask, runs exactly what kfp.local asked for (``os.execv`` of this
interpreter with the same arguments). Under Kubeflow nothing here is used: the compiled pipeline
and its pods are unchanged.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hetlora_core import warm

from .task_logs import _replaced

if TYPE_CHECKING:
    from hetlora_core.config import HetLoRAConfig

# The server-side step (registered by the driver at the server's start: WarmServer(steps=...)).
STEP = "kfp_executor"
STEPS = {STEP: "hetlora_kfp.pipelines.warm_executor:run_executor"}
MODULE = "hetlora_kfp.pipelines.warm_exec"
EXECUTOR = ["-m", "kfp.dsl.executor_main"]


def main(argv: list[str] | None = None) -> None:
    """The task process: kfp's executor in the warm server's child, else the arguments as given."""
    args = sys.argv[1:] if argv is None else argv
    if args[:2] == EXECUTOR and os.environ.get(warm.SOCKET_ENV):
        t0 = time.perf_counter()
        try:
            done = warm.delegate(STEP, *args[2:], registered=True)
        except Exception as e:  # noqa: BLE001 - the component failed in the child: fail as python would
            cause = e.__cause__
            print(str(cause) if isinstance(cause, warm.RemoteTraceback) else f"{type(e).__name__}: {e}",
                  file=sys.stderr, flush=True)
            sys.exit(1)
        if done is not None:  # a child exited without a result already made this process exit with its code
            print(f"[hetlora] this task's executor ran in the warm task server ({time.perf_counter() - t0:.2f} s)", flush=True)
            sys.exit(0)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, *args])  # no server (or not kfp's executor): as kfp.local asked


@contextlib.contextmanager
def tasks_via_server() -> Iterator[bool]:
    """While a local pipeline runs: kfp.local starts its tasks through ``main`` when this process has a
    warm server (``HETLORA_WARM_SOCKET``); yields whether it does.

    kfp.local's SubprocessRunner puts the interpreter's path where the component's command says
    ``python3`` (``subprocess_task_handler.replace_python_executable``); the interpreter followed by
    ``-m`` this module goes there instead. A kfp without that function runs its tasks as before
    (tests/test_warm_exec.py pins the function, so an upgrade that drops it is noticed). Only the
    driver's own interpreter is rewritten (kfp.local's venv mode would name another, without hetlora)."""
    from kfp.local import subprocess_task_handler as handler

    original: Any = getattr(handler, "replace_python_executable", None)
    if original is None or not os.environ.get(warm.SOCKET_ENV):
        yield False
        return

    def through_server(full_command: list[str], new_executable: str) -> list[str]:
        if new_executable != sys.executable:
            return list(original(full_command, new_executable))
        # -P: the working directory is not put first on sys.path, so this module resolves as it does in
        # the driver whatever the task's directory holds (os.execv above runs kfp's command as given)
        return list(original(full_command, f"{new_executable} -P -m {MODULE}"))

    with _replaced(handler, "replace_python_executable", through_server):
        yield True


@contextlib.contextmanager
def run_server(cfg: HetLoRAConfig, out_dir: str | Path, enabled: bool = True) -> Iterator[str]:
    """The warm task server of the local run of ``cfg`` in ``out_dir`` (its log:
    ``out_dir/logs/warm-server.log``), from here until the block ends (also on an error or Ctrl-C);
    yields its socket path ('' when disabled or not started). ``run_local`` enters it itself unless
    told its caller did: ``hetlora run`` starts it before importing kfp and the runners, so the
    server's preload (~4 s of imports, the model, the warm-up) overlaps the driver's own start.
    Security: the server's environment holds neither the server key nor store credentials
    (warm.server_env withholds them; its config is the credential-free run config)."""
    from hetlora_core.run import local_config  # lazily: task processes import this module too

    out = Path(out_dir).resolve()
    with warm.local_server(out, (cfg.store.server_key_env,), enabled, out / "logs" / "warm-server.log",
                           local_config(cfg, out).to_json(), steps=STEPS) as path:
        yield path


if __name__ == "__main__":
    main()
