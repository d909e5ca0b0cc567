"""A small in-process stand-in for the Kubeflow Pipelines API server (REST, v2beta1), for tests.

It serves just what the real ``kfp.Client`` (kfp 2.x SDK, generated ``kfp_server_api`` under it)
needs to be constructed, to create a run from a pipeline package and to wait for / get a run:

    GET  /apis/v2beta1/healthz              Client() when no namespace is set (namespace "kubeflow"
                                            counts as unset); {"multi_user": bool}
    GET  /apis/v2beta1/experiments          ?filter=<JSON Filter>&namespace=&page_size=&page_token=
                                            (get_experiment(experiment_name=...) lists with a
                                            display_name EQUALS filter)
    POST /apis/v2beta1/experiments          body: V2beta1Experiment {display_name, namespace, ...}
    GET  /apis/v2beta1/experiments/{id}
    POST /apis/v2beta1/runs                 body: V2beta1Run {experiment_id, display_name,
                                            pipeline_spec, runtime_config{parameters,...}}
    GET  /apis/v2beta1/runs/{run_id}        get_run / wait_for_run_completion

Anything else answers 404 with a google.rpc.Status body, as grpc-gateway does. Every request is
recorded (``.requests``: method, path, query, parsed JSON body, raw body) for assertions.

A run is "executed" when it is created: ``on_run(pipeline_spec, platform_spec_or_None,
parameters)`` is called in the request's thread and its answer (True: SUCCEEDED, False: FAILED,
or a V2beta1RuntimeState name such as "CANCELED") becomes the run's state. The POST answers the
run as PENDING, as the real server does; GETs then answer the final state (after
``running_polls`` GETs answering RUNNING, default none), so ``wait_for_run_completion`` returns on
its first poll without sleeping. An exception from ``on_run`` makes the run FAILED and is kept in
``.errors``.

    with KFPAPIServer(on_run) as server:
        client = kfp.Client(host=server.url, namespace="team-a")
"""

from __future__ import annotations

import json
import threading
import traceback
import urllib.parse
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

HOST = "127.0.0.1"
PREFIX = "/apis/v2beta1"
# google.rpc.Code values grpc-gateway puts in error bodies
NOT_FOUND, INVALID_ARGUMENT, INTERNAL = 5, 3, 13
RUNTIME_STATES = {"RUNTIME_STATE_UNSPECIFIED", "PENDING", "RUNNING", "SUCCEEDED", "SKIPPED", "FAILED",
                  "CANCELING", "CANCELED", "PAUSED"}
# v2beta1 Predicate.Operation (the SDK sends the enum's number; grpc-gateway accepts names too)
EQUALS = {1, "EQUALS"}

OnRun = Callable[[dict[str, Any], "dict[str, Any] | None", dict[str, Any]], "bool | str"]


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    body: Any  # parsed JSON, or None
    raw: bytes
    headers: dict[str, str] = field(default_factory=dict)


class APIError(Exception):
    def __init__(self, status: int, code: int, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def split_spec(spec: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The Run's ``pipeline_spec``: the PipelineSpec itself, or {pipeline_spec, platform_spec}
    when the package has a platform spec (what kfp.client._PipelineDoc.to_dict sends)."""
    if "pipeline_spec" in spec and "pipelineInfo" not in spec:
        return spec["pipeline_spec"], spec.get("platform_spec")
    return spec, None


class KFPAPIServer:
    def __init__(self, on_run: OnRun | None = None, *, multi_user: bool = False, running_polls: int = 0) -> None:
        self.on_run = on_run or (lambda spec, platform, params: True)
        self.multi_user = multi_user
        self.running_polls = running_polls
        self.requests: list[Request] = []
        self.experiments: dict[str, dict[str, Any]] = {}
        self.runs: dict[str, dict[str, Any]] = {}
        self.errors: list[str] = []
        self._polls: dict[str, int] = {}
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # lifecycle -------------------------------------------------------------------------------

    @property
    def port(self) -> int:
        assert self._httpd is not None, "server not started"
        return self._httpd.server_address[1]

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self) -> KFPAPIServer:
        server = self

        class Handler(_Handler):
            api = server

        self._httpd = ThreadingHTTPServer((HOST, 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="kfp-api-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> KFPAPIServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # assertions helpers ------------------------------------------------------------------------

    def calls(self, method: str, path: str) -> list[Request]:
        """Recorded requests with this method and exact path (without the query)."""
        with self._lock:
            return [r for r in self.requests if r.method == method and r.path == path]

    @property
    def posted_runs(self) -> list[dict[str, Any]]:
        return [r.body for r in self.calls("POST", f"{PREFIX}/runs")]

    # API -------------------------------------------------------------------------------------

    def handle(self, method: str, path: str, query: dict[str, list[str]], body: Any) -> dict[str, Any]:
        if not path.startswith(PREFIX + "/"):
            raise APIError(404, NOT_FOUND, f"no such path {path}")
        parts = path[len(PREFIX) + 1:].split("/")
        if parts == ["healthz"] and method == "GET":
            return {"multi_user": self.multi_user}
        if parts[0] == "experiments":
            if len(parts) == 1 and method == "GET":
                return self._list_experiments(query)
            if len(parts) == 1 and method == "POST":
                return self._create_experiment(body)
            if len(parts) == 2 and method == "GET":
                return self._get("experiment", self.experiments, parts[1])
        if parts[0] == "runs":
            if len(parts) == 1 and method == "POST":
                return self._create_run(body)
            if len(parts) == 2 and method == "GET":
                return self._get_run(parts[1])
        raise APIError(404, NOT_FOUND, f"{method} {path} is not served by this stand-in")

    def _get(self, kind: str, table: dict[str, dict[str, Any]], key: str) -> dict[str, Any]:
        with self._lock:
            if key not in table:
                raise APIError(404, NOT_FOUND, f"{kind} {key} not found")
            return dict(table[key])

    def _list_experiments(self, query: dict[str, list[str]]) -> dict[str, Any]:
        namespace = query.get("namespace", [None])[0]
        predicates = []
        if "filter" in query:
            try:
                predicates = json.loads(query["filter"][0]).get("predicates", [])
            except (ValueError, AttributeError) as e:
                raise APIError(400, INVALID_ARGUMENT, f"bad filter {query['filter'][0]!r}: {e}") from None
        with self._lock:
            found = [dict(e) for e in self.experiments.values()
                     if (not namespace or e.get("namespace", "") == namespace)]
        for p in predicates:
            if p.get("operation") not in EQUALS or "stringValue" not in p and "string_value" not in p:
                raise APIError(400, INVALID_ARGUMENT, f"predicate not served by this stand-in: {p}")
            want = p.get("stringValue", p.get("string_value"))
            found = [e for e in found if str(e.get(p["key"], "")) == want]
        return {"experiments": found, "total_size": len(found)} if found else {}

    def _create_experiment(self, body: Any) -> dict[str, Any]:
        if not isinstance(body, dict) or not body.get("display_name"):
            raise APIError(400, INVALID_ARGUMENT, "experiment display_name is required")
        exp = {**body, "experiment_id": str(uuid.uuid4()), "created_at": _now(), "storage_state": "AVAILABLE"}
        with self._lock:
            if any(e["display_name"] == exp["display_name"] and e.get("namespace", "") == exp.get("namespace", "")
                   for e in self.experiments.values()):
                raise APIError(409, 6, f"experiment {exp['display_name']!r} already exists")  # ALREADY_EXISTS
            self.experiments[exp["experiment_id"]] = exp
        return dict(exp)

    def _create_run(self, body: Any) -> dict[str, Any]:
        if not isinstance(body, dict) or not body.get("display_name"):
            raise APIError(400, INVALID_ARGUMENT, "run display_name is required")
        exp_id = body.get("experiment_id")
        with self._lock:
            if exp_id and exp_id not in self.experiments:
                raise APIError(404, NOT_FOUND, f"experiment {exp_id} not found")
        if not isinstance(body.get("pipeline_spec"), dict):
            raise APIError(400, INVALID_ARGUMENT, "this stand-in only runs inline pipeline_spec runs")
        spec, platform = split_spec(body["pipeline_spec"])
        params = (body.get("runtime_config") or {}).get("parameters") or {}
        run_id = str(uuid.uuid4())
        run = {**body, "run_id": run_id, "created_at": _now(), "scheduled_at": _now(), "storage_state": "AVAILABLE"}
        try:
            outcome = self.on_run(spec, platform, params)
            state = outcome if isinstance(outcome, str) else ("SUCCEEDED" if outcome else "FAILED")
            if state not in RUNTIME_STATES:
                raise ValueError(f"on_run returned {outcome!r}: not a bool or a V2beta1RuntimeState")
        except Exception as e:  # noqa: BLE001 - the run fails, the test sees .errors
            self.errors.append(traceback.format_exc())
            state, run["error"] = "FAILED", {"code": 2, "message": f"{type(e).__name__}: {e}"}
        final = {**run, "state": state, "finished_at": _now(),
                 "state_history": [{"update_time": run["created_at"], "state": "PENDING"},
                                   {"update_time": _now(), "state": state}]}
        with self._lock:
            self.runs[run_id] = final
            self._polls[run_id] = 0
        return {**run, "state": "PENDING"}

    def _get_run(self, run_id: str) -> dict[str, Any]:
        run = self._get("run", self.runs, run_id)
        with self._lock:
            self._polls[run_id] += 1
            if self._polls[run_id] <= self.running_polls:
                return {**run, "state": "RUNNING", "finished_at": None}
        return run


class _Handler(BaseHTTPRequestHandler):
    api: KFPAPIServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet
        pass

    def _serve(self, method: str) -> None:
        url = urllib.parse.urlsplit(self.path)
        query = urllib.parse.parse_qs(url.query, keep_blank_values=True)
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        req = Request(method, urllib.parse.unquote(url.path), query, body, raw, dict(self.headers.items()))
        with self.api._lock:
            self.api.requests.append(req)
        try:
            if raw and body is None:
                raise APIError(400, INVALID_ARGUMENT, "body is not JSON")
            status, payload = 200, self.api.handle(method, req.path, query, body)
        except APIError as e:
            status, payload = e.status, {"code": e.code, "message": e.message, "details": []}
        except Exception as e:  # noqa: BLE001 - a bug here must reach the test, not hang the client
            self.api.errors.append(traceback.format_exc())
            status, payload = 500, {"code": INTERNAL, "message": f"{type(e).__name__}: {e}", "details": []}
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802
        self._serve("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._serve("POST")

    def do_DELETE(self) -> None:  # noqa: N802
        self._serve("DELETE")
