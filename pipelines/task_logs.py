"""kfp.local's output, one log file per task, instead of the console.

kfp.local prints every task's streamed output, its executor input and its outputs to the driver's
``sys.stdout``, from one thread per running task. ``TaskLogs`` stands in for ``sys.stdout`` while a
pipeline runs: it gives each thread the file of the task that thread is running (a task starts with
kfp.local's "Executing task 'NAME'" line), so the console stays quiet, each task's log is whole even
when two tasks run at once, and a failed task's tail can be shown with its name. ``-v`` echoes
everything as before.
"""

from __future__ import annotations

import builtins
import contextlib
import io
import logging
import re
import sys
import threading
import warnings
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TextIO

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_STARTS = re.compile(r"Executing task '([^']+)'")
_ENDS = re.compile(r"Task '([^']+)' finished with status (\w+)")

OnTask = Callable[[str, str], None]  # (task name, "started" | "SUCCESS" | "FAILURE")


class TaskLogs(io.TextIOBase):
    """A file-like object routing lines to ``<log_dir>/<NN>-<task>.log`` by the writing thread."""

    def __init__(self, log_dir: str | Path, echo: TextIO | None = None, on_task: OnTask | None = None) -> None:
        self.dir = Path(log_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.echo, self.on_task = echo, on_task
        self._lock = threading.Lock()
        self._partial: dict[int, str] = {}
        self._current: dict[int, tuple[str, TextIO]] = {}
        self._paths: dict[str, Path] = {}  # task name (latest run of it) -> its log file
        self.failed: list[str] = []
        self._seq = 0
        self._driver = open(self.dir / "driver.log", "a", encoding="utf-8")  # lines of no task

    def writable(self) -> bool:
        return True

    def write(self, s: str) -> int:
        tid = threading.get_ident()
        if self.closed:  # a straggler after the run: nowhere to route it, and never an error
            return len(s)
        with self._lock:
            text = self._partial.pop(tid, "") + s
            *lines, rest = text.split("\n")
            if rest:
                self._partial[tid] = rest
            for line in lines:
                self._line(tid, line)
            if self.echo is not None:
                self.echo.write(s)
        return len(s)

    def _line(self, tid: int, line: str) -> None:
        plain = _ANSI.sub("", line)
        if m := _STARTS.search(plain):
            self._seq += 1
            name = m.group(1)
            path = self.dir / f"{self._seq:03d}-{re.sub(r'[^A-Za-z0-9_.-]+', '-', name)}.log"
            self._current[tid] = (name, open(path, "w", encoding="utf-8"))
            self._paths[name] = path
            if self.on_task:
                self.on_task(name, "started")
        name_file = self._current.get(tid)
        out = name_file[1] if name_file else self._driver
        out.write(plain + "\n")
        out.flush()
        if (m := _ENDS.search(plain)) and name_file:
            status = m.group(2).upper()
            if status != "SUCCESS":
                self.failed.append(m.group(1))
            if self.on_task:
                self.on_task(m.group(1), status)

    def path_of(self, task: str) -> Path | None:
        return self._paths.get(task)

    def tail(self, task: str, lines: int = 30) -> str:
        path = self._paths.get(task)
        if path is None or not path.is_file():
            return ""
        with open(path, encoding="utf-8", errors="replace") as f:
            return "".join(deque(f, maxlen=lines))

    def close(self) -> None:
        with self._lock:
            for tid, rest in list(self._partial.items()):
                self._line(tid, rest)
            self._partial.clear()
            for _, f in self._current.values():
                f.close()
            self._current.clear()
            self._driver.close()
        super().close()


@contextlib.contextmanager
def captured(logs: TaskLogs) -> Iterator[TaskLogs]:
    """While a pipeline runs: ``sys.stdout`` is the router, Python warnings of the driver (kfp.local's
    "resource settings are ignored") go to the driver log instead of the console."""
    def to_log(message: Warning | str, category: type[Warning], filename: str, lineno: int,
               file: TextIO | None = None, line: str | None = None) -> None:
        logs.write(warnings.formatwarning(message, category, filename, lineno, line))

    # kfp.local swaps the root logger's handlers per task from several threads at once, and its
    # save/restore is not thread-safe: a handler bound to this router can outlive the run. Restore
    # exactly the handlers there were before, so nothing logs into a closed router later.
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    # kfp.local indents a task's streamed lines by swapping ``builtins.print`` for a wrapper and back
    # (logging_utils.indented_print), from every task's thread. Two tasks at once restore each other's
    # wrapper, so wrappers pile up for the life of the process, and each wrapper prints its indent
    # through the one below it: a print costs 2^depth calls. In a long run (a bench of several rounds)
    # tasks stalled ~100 s after their work and the logs filled with MBs of spaces. Each task has its
    # own log file here, so the indent is dropped, and print is restored whatever happened.
    from kfp.local import logging_utils

    printer = builtins.print
    with warnings.catch_warnings(), contextlib.redirect_stdout(logs), \
            _replaced(logging_utils, "indented_print", _no_indent):
        warnings.showwarning = to_log
        try:
            yield logs
        finally:
            sys.stdout.flush()
            builtins.print = printer
            root.handlers[:] = handlers
            root.setLevel(level)


@contextlib.contextmanager
def _no_indent(num_spaces: int = 4) -> Iterator[None]:
    """kfp.local's ``indented_print`` without the indent (and without touching ``builtins.print``)."""
    yield


@contextlib.contextmanager
def _replaced(obj: object, name: str, value: object) -> Iterator[None]:
    saved = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, saved)
