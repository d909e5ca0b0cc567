"""The warm task server for local runs (hetlora_core/warm.py, warm_server.py): a delegated step keeps
the task's semantics (environment, working directory, output, exceptions, hard exits), a task whose
server is gone runs in-process, and a delegated train uploads the same bytes as an in-process one.

Protocol tests use a server without preload and probe steps registered by a small launcher script
(the shipped step table has only the real steps); the train tests use one real, preloaded server."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from tiny_round import tiny_round

from hetlora_core import store as st
from hetlora_core import warm
from hetlora_core.config import ConfigError, config_from_dict
from hetlora_core.datasource import client_ids

ROOT = Path(__file__).resolve().parents[1]

PROBES = textwrap.dedent('''
    import json, os, sys, time
    from pathlib import Path
    from hetlora_core import warm

    def probe(names_json):
        print("probe on stdout", flush=True)
        print("probe on stderr", file=sys.stderr, flush=True)
        names = json.loads(names_json)
        return json.dumps({"env": {n: os.environ.get(n) for n in names}, "cwd": os.getcwd(), "pid": os.getpid()})

    def boom(msg):
        raise ValueError(msg)

    def hard_exit(code):
        code = int(code)
        if code < 0:
            os.kill(os.getpid(), -code)
        os._exit(code)

    def linger(pid_file):
        Path(pid_file).write_text(str(os.getpid()))
        time.sleep(120)
        return "too late"

    def model_state(cfg_json):
        import torch
        from hetlora_core import runtime
        from hetlora_core.config import config_from_dict
        before = runtime._model.cache_info().currsize
        runtime.model(config_from_dict(json.loads(cfg_json)))
        return json.dumps({"threads": torch.get_num_threads(), "cached_before": before, "loads": runtime._model.cache_info().misses})

    STEPS = {n: "__main__:" + n for n in ("probe", "boom", "hard_exit", "linger", "model_state")}
    warm.STEPS.update(STEPS)
''')

SERVER = PROBES + "\nfrom hetlora_core.warm_server import main\nmain()\n"
TASK = PROBES + "\nimport sys\nprint(warm.delegate(sys.argv[1], *sys.argv[2:]))\n"


@pytest.fixture()
def probe_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[warm.WarmServer]:
    """A server without preload that knows the probe steps, started from an environment holding a
    server key and store credentials; this process is pointed at it like a kfp.local task."""
    script = tmp_path / "probe_server.py"
    script.write_text(SERVER)
    monkeypatch.setenv("HETLORA_SERVER_KEY", "s3cret-server-key")
    monkeypatch.setenv("HETLORA_S3_SECRET_KEY", "s3cret-store-key")
    monkeypatch.setenv("MY_KEY", "s3cret-custom")
    server = warm.WarmServer(tmp_path / "run", withhold=("MY_KEY",), log_path=tmp_path / "server.log", preload=False,
                             argv=[sys.executable, str(script)])
    assert server.start(), (tmp_path / "server.log").read_text()
    for name in ("probe", "boom", "hard_exit", "linger"):
        monkeypatch.setitem(warm.STEPS, name, f"__main__:{name}")
    monkeypatch.setenv(warm.SOCKET_ENV, server.socket_path)
    yield server
    server.stop()


def test_socket_is_private_and_server_env_holds_no_secret(probe_server: warm.WarmServer) -> None:
    assert probe_server.dir is not None and (probe_server.dir.stat().st_mode & 0o777) == 0o700
    assert (os.stat(probe_server.socket_path).st_mode & 0o777) == 0o600
    assert probe_server.proc is not None
    env = dict(kv.split(b"=", 1) for kv in Path(f"/proc/{probe_server.proc.pid}/environ").read_bytes().split(b"\0") if b"=" in kv)
    assert b"PATH" in env  # the check can see variables at all
    for name in (b"HETLORA_SERVER_KEY", b"HETLORA_S3_SECRET_KEY", b"MY_KEY", warm.SOCKET_ENV.encode()):
        assert name not in env, name
    assert not any(b"s3cret" in v for v in env.values())


def test_child_takes_the_tasks_env_cwd_and_output(probe_server: warm.WarmServer, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]) -> None:
    # A client task: the server key's variable set empty (pipelines/platform.py), a variable of its own.
    monkeypatch.setenv("HETLORA_SERVER_KEY", "")
    monkeypatch.setenv("TASK_ONLY", "from-the-task")
    (tmp_path / "taskdir").mkdir()
    monkeypatch.chdir(tmp_path / "taskdir")
    out = warm.delegate("probe", json.dumps(["HETLORA_SERVER_KEY", "TASK_ONLY", "HETLORA_S3_SECRET_KEY", "MY_KEY"]))
    assert out is not None
    got = json.loads(out)
    assert got["env"] == {"HETLORA_SERVER_KEY": "", "TASK_ONLY": "from-the-task", "HETLORA_S3_SECRET_KEY": "s3cret-store-key",
                          "MY_KEY": "s3cret-custom"}  # the task's own environment, credentials included
    assert got["cwd"] == str(tmp_path / "taskdir") and got["pid"] != os.getpid()
    cap = capfd.readouterr()
    assert "probe on stdout" in cap.out and "probe on stderr" in cap.err  # written to this task's fds 1 and 2


@pytest.mark.parametrize("served", [True, False])
def test_run_step_delegates_a_model_free_step_before_importing_it(probe_server: warm.WarmServer, served: bool) -> None:
    """A prune/aggregate task (warm.run_step) hands the step to the server without importing the
    step's module (the point: ~0.35 s of numpy, config and store imports per task); with no server it
    imports and runs it here. Either way the step's own error comes back as the same class."""
    code = textwrap.dedent("""
        import sys
        from hetlora_core import warm
        try:
            warm.run_step("prune", '{"training": {"lr": "fast"}}', 0, "c")
        except Exception as e:
            print(type(e).__name__, "lr" in str(e), "hetlora_core.steps.prune" in sys.modules)
    """)
    env = {**os.environ, warm.SOCKET_ENV: probe_server.socket_path if served else ""}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.stdout.split() == ["ConfigError", "True", str(not served)], out.stderr


def test_exception_comes_back_with_message_and_traceback(probe_server: warm.WarmServer) -> None:
    with pytest.raises(ValueError, match="the step broke") as e:
        warm.delegate("boom", "the step broke")
    assert isinstance(e.value.__cause__, warm.RemoteTraceback) and "in boom" in str(e.value.__cause__)


@pytest.mark.parametrize("code, want", [(3, 3), (137, 137), (-signal.SIGKILL, -signal.SIGKILL)])
def test_hard_exit_of_the_child_is_the_tasks_exit(probe_server: warm.WarmServer, tmp_path: Path, code: int, want: int) -> None:
    task = tmp_path / "task.py"
    task.write_text(TASK)
    p = subprocess.run([sys.executable, str(task), "hard_exit", str(code)], capture_output=True, text=True, timeout=60)
    assert p.returncode == want, p.stderr
    assert "None" not in p.stdout  # it did not fall back to running the step itself


def test_task_dying_kills_its_child(probe_server: warm.WarmServer, tmp_path: Path) -> None:
    task = tmp_path / "task.py"
    task.write_text(TASK)
    pid_file = tmp_path / "child.pid"
    p = subprocess.Popen([sys.executable, str(task), "linger", str(pid_file)])
    try:
        deadline = time.monotonic() + 30
        while not pid_file.exists() or not pid_file.read_text():
            assert time.monotonic() < deadline and p.poll() is None
            time.sleep(0.02)
        child = int(pid_file.read_text())
        p.kill()
        p.wait()
        deadline = time.monotonic() + 10
        while Path(f"/proc/{child}").exists():  # killed by its watcher, then reaped by the server
            assert time.monotonic() < deadline, "the child outlived its task"
            time.sleep(0.02)
    finally:
        p.kill()


def test_unreachable_server_means_in_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    dead = tmp_path / "dead.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(dead))  # a socket file nobody listens on: what a crashed server leaves
    s.close()
    for path in (str(dead), str(tmp_path / "missing.sock")):
        monkeypatch.setenv(warm.SOCKET_ENV, path)
        caplog.clear()
        assert warm.delegate("train", "{}", 0, "c") is None
        assert len([r for r in caplog.records if "running train in this process" in r.getMessage()]) == 1
    # a server that never takes the task (listening, never accepting): not waited for beyond the timeout
    stuck = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stuck.bind(str(tmp_path / "stuck.sock"))
    stuck.listen(4)
    monkeypatch.setattr(warm, "START_TIMEOUT_S", 0.3)
    monkeypatch.setenv(warm.SOCKET_ENV, str(tmp_path / "stuck.sock"))
    caplog.clear()
    assert warm.delegate("train", "{}", 0, "c") is None
    assert any("timed out" in r.getMessage() and "running train in this process" in r.getMessage() for r in caplog.records)
    stuck.close()
    monkeypatch.delenv(warm.SOCKET_ENV)
    assert warm.delegate("train", "{}", 0, "c") is None  # Kubeflow: never set, nothing said


def test_stopped_server_is_gone_and_its_dir_removed(probe_server: warm.WarmServer) -> None:
    assert probe_server.proc is not None and probe_server.dir is not None
    probe_server.stop()
    assert probe_server.proc.poll() is not None and not probe_server.dir.exists()
    assert warm.delegate("probe", "[]") is None


# ---------------------------------------------------------------- the real steps, one preloaded server

CFG = tiny_round("warm")


@pytest.fixture(scope="module")
def real_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[warm.WarmServer]:
    d = tmp_path_factory.mktemp("warm-real")
    server = warm.WarmServer(d, log_path=d / "server.log", config_json=config_from_dict(CFG).to_json())
    assert server.start(), (d / "server.log").read_text()
    yield server
    server.stop()


def test_server_preloads_the_base_model_for_its_children(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the run's config the server loads the base model before forking: a child finds it in
    its process cache (loaded once, by the server) and starts with a fresh process's torch threads,
    not the one thread the server loaded with."""
    script = tmp_path / "server.py"
    script.write_text(SERVER)
    cfg = config_from_dict(CFG)
    server = warm.WarmServer(tmp_path / "run", log_path=tmp_path / "server.log", argv=[sys.executable, str(script)],
                             config_json=cfg.to_json())
    assert server.start(), (tmp_path / "server.log").read_text()
    monkeypatch.setitem(warm.STEPS, "model_state", "__main__:model_state")
    monkeypatch.setenv(warm.SOCKET_ENV, server.socket_path)
    try:
        got = json.loads(warm.delegate("model_state", cfg.to_json()) or "{}")
        monkeypatch.setenv("HETLORA_CACHE", str(tmp_path / "other-cache"))
        other_cache = json.loads(warm.delegate("model_state", cfg.to_json()) or "{}")
    finally:
        server.stop()
    fresh = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"], capture_output=True, text=True,
                           check=True).stdout.strip()
    assert "base model tiny preloaded" in (tmp_path / "server.log").read_text()
    assert got == {"threads": int(fresh), "cached_before": 1, "loads": 1}, got
    assert not other_cache["cached_before"], other_cache  # a task naming another model cache loads its own
    assert not list((tmp_path / "run").glob("warm-*"))  # the config file went with the socket directory


@pytest.mark.parametrize("section, why", [({"device": "cuda"}, "needs CUDA"), ({"quantize": "4bit"}, "needs CUDA"),
                                          ({"vocab": "corpus"}, "tokenised corpus"), ({"device": "cpu"}, None)])
def test_model_preload_only_where_fork_safe(section: dict[str, str], why: str | None) -> None:
    from hetlora_core.warm_server import model_preload_refusal

    model = {"name": "smollm2-135m"} if section.get("quantize") else CFG["model"]  # 4bit needs a saved model
    cfg = config_from_dict({**CFG, "model": {**model, **section}})
    refusal = model_preload_refusal(cfg)
    assert (refusal is None) if why is None else (why in (refusal or "")), refusal


def test_delegated_train_uploads_the_same_bytes(real_server: warm.WarmServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                caplog: pytest.LogCaptureFixture) -> None:
    from hetlora_core.steps.plan import plan_round
    from hetlora_core.steps.train import train_task

    caplog.set_level(logging.INFO, logger="hetlora")
    trained = {}
    for mode in ("in-process", "warm"):
        cfg = config_from_dict({**CFG, "store": {"root": str(tmp_path / mode)}})
        store = st.open_store(cfg.store)
        cid = plan_round(cfg, store, client_ids(cfg), 0).clients[0].client_id
        # in-process: a server that is gone (the fallback path); warm: the real, preloaded server
        monkeypatch.setenv(warm.SOCKET_ENV, str(tmp_path / "gone.sock") if mode == "in-process" else real_server.socket_path)
        caplog.clear()
        report = json.loads(train_task(cfg.to_json(), 0, cid))
        said = [r.getMessage() for r in caplog.records]
        assert any("ran in the warm task server" in m for m in said) == (mode == "warm"), said
        assert any("running train in this process" in m for m in said) == (mode == "in-process"), said
        assert report["status"] == "trained", report
        trained[mode] = (report, st.get_artifact(store, st.trained_prefix("warm", 0, cid))[0])
    assert trained["warm"] == trained["in-process"]
    assert "warmed up in" in Path(real_server.log_path or "").read_text()  # the child was a warmed server's


def test_delegated_step_raises_the_same_config_error(real_server: warm.WarmServer, monkeypatch: pytest.MonkeyPatch) -> None:
    from hetlora_core.steps.train import train_task

    monkeypatch.setenv(warm.SOCKET_ENV, real_server.socket_path)
    with pytest.raises(ConfigError, match="training.lr") as e:
        train_task(json.dumps({"training": {"lr": "fast"}}), 0, "c")
    assert isinstance(e.value.__cause__, warm.RemoteTraceback) and "config_of" in str(e.value.__cause__)
    assert "base model tiny preloaded" in Path(real_server.log_path or "").read_text()


@pytest.mark.slow
def test_kfp_local_round_with_the_server_equals_without(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One kfp.local round (3 clients, tiny model) with the warm server and without: the same global
    bytes; every task's executor did run in the server; signing works (the server tasks' children got the
    key from their task's environment although the server itself was started without it)."""
    from hetlora_kfp.pipelines.runners import run_local

    monkeypatch.setenv("HETLORA_SERVER_KEY", "ab" * 32)  # the driver's environment holds the key
    cfg = config_from_dict(CFG)
    glob = {}
    for on in (True, False):
        out = tmp_path / ("warm" if on else "cold")
        res = run_local(cfg, out, progress=False, warm=on)
        assert res["rounds_committed"] == 1
        store = st.LocalStore(out / "store")
        man = st.signing.get_global_manifest(store, cfg.store, "warm", 0)  # verified with the key
        assert man is not None and sorted(man["participants"]) == sorted(client_ids(cfg)), man
        glob[on] = st.get_artifact(store, st.global_prefix("warm", 0))[0]
        logs = {p.name: p.read_text(errors="replace") for p in (out / "logs").rglob("*") if p.is_file()}
        # each task's whole kfp executor ran in a child of the server (pipelines/warm_exec.py)
        in_server = sorted(n for n, text in logs.items() if "this task's executor ran in the warm task server" in text)
        assert len(in_server) == (8 if on else 0), (in_server, sorted(logs))  # 3 trains, 3 prunes, aggregate, evaluate
        assert ("base model tiny preloaded" in logs.get("warm-server.log", "")) == on
        assert not list(out.glob("warm-*"))  # the socket directory is gone with the server
    assert glob[True] == glob[False]


def test_a_failed_fork_fails_only_that_request(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fork that fails (EAGAIN under a pids limit) makes that one task run in-process; a task whose
    child is already running is untouched and the server goes on serving (the review's reproducer)."""
    script = tmp_path / "flaky_server.py"
    script.write_text(PROBES + textwrap.dedent('''
        _fork, n = os.fork, [0]
        def fork():
            n[0] += 1
            if n[0] == 2:
                raise BlockingIOError(11, "Resource temporarily unavailable")
            return _fork()
        os.fork = fork
        from hetlora_core.warm_server import main
        main()
    '''))
    server = warm.WarmServer(tmp_path / "run", log_path=tmp_path / "server.log", preload=False, argv=[sys.executable, str(script)])
    assert server.start()
    try:
        task = tmp_path / "task.py"
        task.write_text(TASK)
        env = {**os.environ, warm.SOCKET_ENV: server.socket_path}
        lingering = subprocess.Popen([sys.executable, str(task), "linger", str(tmp_path / "pid")], env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(100):  # fork 1: its child runs linger
            if (tmp_path / "pid").exists():
                break
            time.sleep(0.1)
        child = int((tmp_path / "pid").read_text())
        assert child != lingering.pid
        # fork 2 fails: no answer, so delegate() returns None and the step runs in the task's process
        second = subprocess.run([sys.executable, str(task), "probe", "[]"], env=env, capture_output=True, text=True, timeout=60)
        assert second.returncode == 0 and second.stdout.strip().splitlines()[-1] == "None", second.stderr[-500:]
        assert lingering.poll() is None
        os.kill(child, 0)  # the running task's child is untouched
        lingering.kill()
        lingering.wait()
        third = subprocess.run([sys.executable, str(task), "probe", "[]"], env=env, capture_output=True, text=True, timeout=60)
        assert third.returncode == 0 and json.loads(third.stdout.strip().splitlines()[-1])["pid"] != os.getpid()
        assert server.proc is not None and server.proc.poll() is None, (tmp_path / "server.log").read_text()
        assert "could not serve a task" in (tmp_path / "server.log").read_text()
    finally:
        server.stop()


def test_server_ignores_a_module_named_like_its_own_in_the_working_directory(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The server runs with -P: a folder in the driver's working directory named like a package
    (here a hetlora_core that fails on import) is not what the server, and so every task's child, imports."""
    cwd = tmp_path / "work"
    (cwd / "hetlora_core").mkdir(parents=True)
    (cwd / "hetlora_core" / "__init__.py").write_text("raise ImportError('the shadow package was imported')\n")
    monkeypatch.chdir(cwd)
    server = warm.WarmServer(tmp_path / "run", log_path=tmp_path / "server.log", preload=False)
    try:
        assert server.start(), (tmp_path / "server.log").read_text()
    finally:
        server.stop()
    assert "shadow package" not in (tmp_path / "server.log").read_text()
