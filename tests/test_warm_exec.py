"""A kfp.local task's whole executor in the warm server's child (pipelines/warm_exec.py,
warm_executor.py): kfp.local's hook is where we patch it, the task process hands kfp's executor to
the server and exits as the executor did (output written, exit code, a failure's traceback in the
task's log), and without a server it runs exactly what kfp.local asked for.

The kfp.local round with and without the server (tests/test_warm.py) checks the same global bytes
with every task's executor in the server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from hetlora_kfp.pipelines import warm_exec

from hetlora_core import warm

SHIM = [sys.executable, "-P", "-m", warm_exec.MODULE]

# What kfp writes as a lightweight component's ephemeral module: its imports, then the function
# without its decorator (run under _KFP_RUNTIME=true, where kfp.dsl has no ``component``).
COMPONENT = '''
import kfp
from kfp import dsl
from kfp.dsl import *
from typing import *

def hello(name: str) -> str:
    import os
    import sys
    if name == "boom":
        raise ValueError("the component broke")
    return f"{name} {os.getppid()} {os.environ.get('TASK_ONLY')} {os.getcwd()} {'kubernetes' in sys.modules}"
'''


def env_without_server() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != warm.SOCKET_ENV}


def test_kfp_local_hook_is_patched_only_while_a_server_is_up(monkeypatch: pytest.MonkeyPatch) -> None:
    """kfp.local's SubprocessRunner still puts the interpreter where a component's command says
    python3 (a kfp upgrade that drops the function fails here); with a server the executor's command
    goes through warm_exec, without one and after the run it is kfp.local's own."""
    from hetlora_kfp.components import build
    from kfp.local import subprocess_task_handler as handler

    original = handler.replace_python_executable
    command = list(build("ghcr.io/hetlora/hetlora:test").prune.component_spec.implementation.container.command)
    assert any("python3 -m kfp.dsl.executor_main" in c for c in command), command
    monkeypatch.delenv(warm.SOCKET_ENV, raising=False)
    with warm_exec.tasks_via_server() as on:
        assert not on and handler.replace_python_executable is original
    monkeypatch.setenv(warm.SOCKET_ENV, "/nonexistent/s")
    with warm_exec.tasks_via_server() as on:
        assert on
        got = handler.replace_python_executable(command, sys.executable)
    assert handler.replace_python_executable is original
    assert any(f"{sys.executable} -P -m {warm_exec.MODULE} -m kfp.dsl.executor_main" in c for c in got), got
    assert got[-1] == command[-1]  # the component's source (kfp never rewrites it) is untouched


@pytest.mark.parametrize("socket_env", [None, "/nonexistent/s"])
def test_without_a_server_the_arguments_run_as_given(socket_env: str | None, tmp_path: Path) -> None:
    """No socket, a socket nobody listens on, or arguments other than kfp's executor: the same
    interpreter runs them, with their output and exit code."""
    env = env_without_server() | ({warm.SOCKET_ENV: socket_env} if socket_env else {})
    res = subprocess.run([*SHIM, "-c", "import sys; print(sys.argv[1:]); sys.exit(3)", "a", "b"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert (res.returncode, res.stdout.strip()) == (3, "['a', 'b']"), res.stderr
    res = subprocess.run([*SHIM, "-m", "kfp.dsl.executor_main", "--function_to_execute", "x", "--executor_input", "{}",
                          "--component_module_path", str(tmp_path / "missing.py")], env=env, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode != 0 and "missing" in res.stdout + res.stderr  # kfp's own executor ran (and failed) here


@pytest.fixture()
def exec_server(tmp_path: Path) -> Iterator[warm.WarmServer]:
    """A real server (no preload: the child imports kfp itself) with the executor step registered."""
    server = warm.WarmServer(tmp_path / "run", log_path=tmp_path / "server.log", preload=False, steps=warm_exec.STEPS)
    assert server.start(), (tmp_path / "server.log").read_text()
    yield server
    server.stop()


def run_task(server: warm.WarmServer, tmp_path: Path, name: str) -> tuple[subprocess.CompletedProcess[str], Path]:
    """kfp.local's task command for the ``hello`` component, through warm_exec, like a task process."""
    module = tmp_path / "ephemeral_component.py"
    module.write_text(COMPONENT)
    out = tmp_path / "out"
    executor_input = {"inputs": {"parameterValues": {"name": name}},
                      "outputs": {"parameters": {"Output": {"outputFile": str(out / "Output")}},
                                  "outputFile": str(out / "executor_output.json")}}
    cwd = tmp_path / "cwd"
    cwd.mkdir(exist_ok=True)
    env = env_without_server() | {warm.SOCKET_ENV: server.socket_path, "TASK_ONLY": "mine"}
    res = subprocess.run([*SHIM, "-m", "kfp.dsl.executor_main", "--component_module_path", str(module),
                          "--executor_input", json.dumps(executor_input), "--function_to_execute", "hello"],
                         env=env, cwd=cwd, capture_output=True, text=True, timeout=120)
    return res, out


def test_the_executor_runs_in_the_servers_child_as_the_task(exec_server: warm.WarmServer, tmp_path: Path) -> None:
    res, out = run_task(exec_server, tmp_path, "x")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "this task's executor ran in the warm task server" in res.stdout
    assert "Wrote executor output file" in res.stdout  # kfp's executor logged into the task's own output
    value = json.loads((out / "executor_output.json").read_text())["parameterValues"]["Output"]
    name, parent, task_only, cwd, sdk_loaded = value.split(" ")
    # a child of the server; kfp imported in its runtime mode (no SDK client, no kubernetes)
    assert (name, int(parent), task_only, cwd, sdk_loaded) == ("x", exec_server.proc.pid, "mine", str(tmp_path / "cwd"), "False")


def test_a_failing_component_fails_the_task_with_its_traceback(exec_server: warm.WarmServer, tmp_path: Path) -> None:
    res, out = run_task(exec_server, tmp_path, "boom")
    assert res.returncode == 1
    assert "ValueError: the component broke" in res.stderr and "ephemeral_component.py" in res.stderr, res.stderr
    assert "warm_executor.py" in res.stderr  # the traceback came from the server's child, not a fallback run here
    assert not (out / "executor_output.json").exists()


def test_a_server_without_the_executor_step_lets_the_task_run_it(tmp_path: Path) -> None:
    """A server that was not given the executor step answers that it cannot run it, and the task
    runs kfp's executor itself (a failure of the optimisation never fails a task)."""
    server = warm.WarmServer(tmp_path / "run", log_path=tmp_path / "server.log", preload=False)
    assert server.start(), (tmp_path / "server.log").read_text()
    try:
        res, out = run_task(server, tmp_path, "x")
    finally:
        server.stop()
    assert res.returncode == 0, res.stdout + res.stderr
    assert "cannot run kfp_executor" in res.stderr and "ran in the warm task server" not in res.stdout
    value = json.loads((out / "executor_output.json").read_text())["parameterValues"]["Output"]
    assert value.split(" ")[1] != str(server.proc.pid if server.proc else -1)
