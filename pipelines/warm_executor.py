"""The warm server's side of ``warm_exec``: kfp's executor, run in the server's child for a task.

The server imports this module (and so kfp's executor) once, before it forks: a child then loads the
task's component and runs its body with no kfp import of its own.

Security: the child runs the component file the task's arguments name, as the task process itself
would have. Only a process of this user reaches the server (its socket is 0600 in a 0700 directory,
and peers are checked by SO_PEERCRED), and such a process can run any code as this user already; the
server's memory holds no key and no credentials (hetlora_core.warm.server_env), and the child takes
the task's own environment.
"""

from __future__ import annotations

import os
import sys

# kfp's runtime mode, as the task's own command sets it (_KFP_RUNTIME=true python3 -m ...): kfp then
# imports its executor without the SDK's client and compiler (kfp_server_api, kubernetes), here in
# the server that every task's child is a copy of.
os.environ.setdefault("_KFP_RUNTIME", "true")

from kfp.dsl import executor_main  # noqa: E402


def run_executor(*argv: str) -> str:
    """``python -m kfp.dsl.executor_main ARGV...`` in this process (the server's child for the task)."""
    sys.argv = [executor_main.__file__, *argv]
    executor_main.executor_main()
    return ""
