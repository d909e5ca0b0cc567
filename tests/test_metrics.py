"""hetlora_core.metrics against a real Pushgateway scraped by a real Prometheus.

Each test pushes under its own run id, so the session-scoped servers are shared safely.
"""

from __future__ import annotations

import logging
import re
import socket
import time
import uuid

import pytest
from prometheus_client.parser import text_string_to_metric_families

# The fixtures `pushgateway` and `prometheus` come from tests/conftest_prometheus.py (via conftest.py).
from prometheus_server import HOST, Prometheus, Pushgateway, free_port

from hetlora_core import metrics
from hetlora_core.config import MetricsConfig

pytestmark = pytest.mark.prometheus

# The Pushgateway adds these two per group; they are not ours.
PUSHGATEWAY_OWN = {"push_time_seconds", "push_failure_time_seconds"}

CLIENTS = {  # client -> (tier, values pushed)
    "hamlet-hamlet": ("large", dict(duration_s=12.5, train_loss=3.25, rank_before=16, rank_after=14,
                                    bytes_up=1_234_567, bytes_down=2_345_678, weight=0.625, heldout_ppl=27.5)),
    "macbeth-witch": ("small", dict(duration_s=7.75, train_loss=3.5, rank_before=2, rank_after=2,
                                    bytes_up=154_321, bytes_down=2_345_678, weight=0.375, heldout_ppl=31.0)),
}
CLIENT_VALUE_OF = {  # metric name -> function of the pushed kwargs
    "hetlora_client_task_duration_seconds": lambda v: v["duration_s"],
    "hetlora_client_train_loss": lambda v: v["train_loss"],
    "hetlora_client_start_rank": lambda v: v["rank_before"],
    "hetlora_client_rank": lambda v: v["rank_after"],
    "hetlora_client_ranks_pruned": lambda v: v["rank_before"] - v["rank_after"],
    "hetlora_client_upload_bytes": lambda v: v["bytes_up"],
    "hetlora_client_download_bytes": lambda v: v["bytes_down"],
    "hetlora_client_aggregation_weight": lambda v: v["weight"],
    "hetlora_client_heldout_perplexity": lambda v: v["heldout_ppl"],
}
ROUND = dict(duration_s=95.5, global_ppl=28.75, mean_train_loss=3.375, clients=2, bytes_up=1_388_888,
             bytes_down=4_691_356, ranks_pruned=2, rouge_l=0.3125)
ROUND_VALUE_OF = {
    "hetlora_round_duration_seconds": ROUND["duration_s"],
    "hetlora_global_heldout_perplexity": ROUND["global_ppl"],
    "hetlora_round_mean_train_loss": ROUND["mean_train_loss"],
    "hetlora_round_clients": ROUND["clients"],
    "hetlora_round_upload_bytes": ROUND["bytes_up"],
    "hetlora_round_download_bytes": ROUND["bytes_down"],
    "hetlora_round_ranks_pruned": ROUND["ranks_pruned"],
    "hetlora_round_rouge_l": ROUND["rouge_l"],
}


@pytest.fixture(autouse=True)
def _no_env_url(monkeypatch: pytest.MonkeyPatch) -> None:
    """The environment override must not leak in from the developer's shell."""
    monkeypatch.delenv(metrics.ENV_URL, raising=False)
    monkeypatch.delenv(metrics.ENV_TIMEOUT, raising=False)


def new_run() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"


def by_name(result: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for sample in result:
        out.setdefault(sample["metric"]["__name__"], []).append(sample)
    return out


def pushed_samples(pg: Pushgateway, run: str) -> dict[str, dict[tuple, float]]:
    """What the Pushgateway exposes for ``run``: name -> {sorted label items: value}."""
    out: dict[str, dict[tuple, float]] = {}
    for fam in text_string_to_metric_families(pg.metrics_text()):
        for s in fam.samples:
            if s.labels.get("run") == run:
                out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


# ---------------------------------------------------------------- names


def test_metric_names_follow_prometheus_conventions() -> None:
    assert len(metrics.METRIC_NAMES) >= 17
    for name in metrics.METRIC_NAMES:
        assert re.fullmatch(r"hetlora_[a-z][a-z0-9_]*[a-z0-9]", name), name
        assert not name.endswith("_total"), f"{name}: every metric is a gauge; _total is for counters"
        for unit in ("seconds", "bytes"):  # a unit appears only as the suffix (base units)
            assert unit not in name or name.endswith(f"_{unit}"), name
        assert not re.search(r"_(ms|milliseconds|minutes|hours|kb|mb|kib|mib)(_|$)", name), name
    for m in metrics.CLIENT_METRICS + metrics.ROUND_METRICS + metrics.RUN_METRICS:
        assert m.help.strip(), m.name
    # the names the issue asks for
    for required in ("hetlora_round_duration_seconds", "hetlora_client_task_duration_seconds",
                     "hetlora_client_train_loss", "hetlora_global_heldout_perplexity",
                     "hetlora_client_heldout_perplexity", "hetlora_client_rank", "hetlora_client_ranks_pruned",
                     "hetlora_client_upload_bytes", "hetlora_client_download_bytes",
                     "hetlora_client_aggregation_weight", "hetlora_last_successful_round_timestamp_seconds"):
        assert required in metrics.METRIC_NAMES


# ---------------------------------------------------------------- round trip through Prometheus


def test_client_and_round_metrics_reach_prometheus(pushgateway: Pushgateway, prometheus: Prometheus) -> None:
    run, rnd, cfg = new_run(), 3, MetricsConfig(pushgateway_url=pushgateway.url, job="hetlora-test")
    for client, (tier, values) in CLIENTS.items():
        assert metrics.push_client_metrics(cfg, run, rnd, client, tier, **values) is True
    committed_at = 1_790_000_000.5
    assert metrics.push_round_metrics(cfg, run, rnd, **ROUND, committed_at=committed_at) is True

    # Everything with this run id, once Prometheus has scraped every name we push.
    expected_names = metrics.METRIC_NAMES
    result = prometheus.wait_for(
        f'{{run="{run}"}}', lambda r: expected_names <= {s["metric"]["__name__"] for s in r})
    got = by_name(result)
    # Nothing but our names (and the Pushgateway's own bookkeeping) carries the run label.
    assert set(got) - PUSHGATEWAY_OWN == expected_names

    for name, value_of in CLIENT_VALUE_OF.items():
        samples = got[name]
        assert len(samples) == len(CLIENTS), (name, samples)
        for s in samples:
            client = s["metric"]["client"]
            tier, values = CLIENTS[client]
            # exact label set: job and grouping key from the push, tier from us, no instance label
            assert s["metric"] == {"__name__": name, "job": "hetlora-test", "run": run, "round": str(rnd),
                                   "client": client, "tier": tier}, s
            assert float(s["value"][1]) == float(value_of(values)), (name, client, s)

    for name, value in ROUND_VALUE_OF.items():
        (s,) = got[name]
        assert s["metric"] == {"__name__": name, "job": "hetlora-test", "run": run, "round": str(rnd)}, s
        assert float(s["value"][1]) == float(value), (name, s)

    (ts,) = got["hetlora_last_successful_round_timestamp_seconds"]
    assert ts["metric"] == {"__name__": "hetlora_last_successful_round_timestamp_seconds", "job": "hetlora-test",
                            "run": run}
    assert float(ts["value"][1]) == committed_at
    (last,) = got["hetlora_last_successful_round"]
    assert last["metric"] == {"__name__": "hetlora_last_successful_round", "job": "hetlora-test", "run": run}
    assert float(last["value"][1]) == rnd

    # The groups are exactly {run, round, client} x clients, {run, round} and {run}.
    groups = sorted(tuple(sorted(g.items())) for g in pushgateway.group_labels(run=run))
    want = sorted(
        [tuple(sorted({"job": "hetlora-test", "run": run, "round": str(rnd), "client": c}.items())) for c in CLIENTS]
        + [tuple(sorted({"job": "hetlora-test", "run": run, "round": str(rnd)}.items())),
           tuple(sorted({"job": "hetlora-test", "run": run}.items()))])
    assert groups == want


def test_last_successful_round_moves_forward(pushgateway: Pushgateway, prometheus: Prometheus) -> None:
    run, cfg = new_run(), MetricsConfig(pushgateway_url=pushgateway.url)
    for rnd in (0, 1):
        assert metrics.push_round_metrics(cfg, run, rnd, duration_s=1.0, global_ppl=30.0 - rnd, mean_train_loss=3.0,
                                          clients=2, bytes_up=10, bytes_down=20)
    result = prometheus.wait_for(f'hetlora_last_successful_round{{run="{run}"}}',
                                 lambda r: len(r) == 1 and r[0]["value"][1] == "1")
    assert result[0]["metric"]["job"] == "hetlora"  # MetricsConfig's default job
    ts = prometheus.wait_for(f'hetlora_last_successful_round_timestamp_seconds{{run="{run}"}}')
    assert abs(float(ts[0]["value"][1]) - time.time()) < 60  # committed_at defaults to now
    # both rounds' groups remain; only the {run} group was overwritten
    ppl = prometheus.wait_for(f'hetlora_global_heldout_perplexity{{run="{run}"}}', lambda r: len(r) == 2)
    assert {s["metric"]["round"]: float(s["value"][1]) for s in ppl} == {"0": 30.0, "1": 29.0}


def test_optional_values_are_left_out_and_a_retry_replaces_the_group(pushgateway: Pushgateway) -> None:
    run, cfg = new_run(), MetricsConfig(pushgateway_url=pushgateway.url)
    values = dict(CLIENTS["hamlet-hamlet"][1])
    assert metrics.push_client_metrics(cfg, run, 0, "c1", "large", **values)
    assert "hetlora_client_aggregation_weight" in pushed_samples(pushgateway, run)
    # A retried task pushes again without weight/perplexity: PUT replaces the whole group.
    values.update(weight=None, heldout_ppl=None, train_loss=2.5)
    assert metrics.push_client_metrics(cfg, run, 0, "c1", "large", **values)
    samples = pushed_samples(pushgateway, run)
    assert "hetlora_client_aggregation_weight" not in samples
    assert "hetlora_client_heldout_perplexity" not in samples
    assert list(samples["hetlora_client_train_loss"].values()) == [2.5]
    # round given as 0.0 (KFP hands numbers back as floats) lands in the same group
    assert metrics.push_client_metrics(cfg, run, 0.0, "c1", "large", **values)  # type: ignore[arg-type]
    assert len(pushgateway.group_labels(run=run)) == 1


def test_weight_added_after_aggregation_keeps_the_client_values(pushgateway: Pushgateway,
                                                                prometheus: Prometheus) -> None:
    run, cfg = new_run(), MetricsConfig(pushgateway_url=pushgateway.url)
    values = dict(CLIENTS["macbeth-witch"][1], weight=None, heldout_ppl=None)
    assert metrics.push_client_metrics(cfg, run, 2, "c1", "small", **values)
    assert metrics.add_client_metrics(cfg, run, 2, "c1", "small") is False  # nothing to add
    assert metrics.add_client_metrics(cfg, run, 2, "c1", "small", weight=0.25)
    assert metrics.add_client_metrics(cfg, run, 2, "c1", "small", heldout_ppl=41.5)
    samples = pushed_samples(pushgateway, run)
    # POST: the client task's values are all still there, next to the added ones
    assert {n for n in samples if n.startswith("hetlora_")} == {m.name for m in metrics.CLIENT_METRICS}
    assert list(samples["hetlora_client_aggregation_weight"].values()) == [0.25]
    assert list(samples["hetlora_client_train_loss"].values()) == [values["train_loss"]]
    got = prometheus.wait_for(f'hetlora_client_aggregation_weight{{run="{run}"}}')
    assert got[0]["metric"] == {"__name__": "hetlora_client_aggregation_weight", "job": "hetlora", "run": run,
                                "round": "2", "client": "c1", "tier": "small"}
    assert float(got[0]["value"][1]) == 0.25
    assert len(pushgateway.group_labels(run=run)) == 1  # same group, not a new one


def test_label_values_that_need_escaping(pushgateway: Pushgateway) -> None:
    run, cfg = new_run(), MetricsConfig(pushgateway_url=pushgateway.url)
    client = "king-lear/the fool"  # '/' and ' ' go base64-encoded in the URL
    assert metrics.push_client_metrics(cfg, run, 1, client, "medium", duration_s=1, train_loss=1, rank_before=8,
                                       rank_after=8, bytes_up=1, bytes_down=1)
    assert pushgateway.group_labels(run=run) == [{"job": "hetlora", "run": run, "round": "1", "client": client}]


# ---------------------------------------------------------------- off / failing gateway


def test_empty_url_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple] = []
    monkeypatch.setattr(metrics, "push_to_gateway", lambda *a, **k: calls.append(a))
    monkeypatch.setattr(metrics, "delete_from_gateway", lambda *a, **k: calls.append(a))
    cfg = MetricsConfig()  # pushgateway_url="" is the default
    assert metrics.push_client_metrics(cfg, "r", 0, "c", "small", duration_s=1, train_loss=1, rank_before=2,
                                       rank_after=2, bytes_up=1, bytes_down=1) is False
    assert metrics.push_round_metrics(cfg, "r", 0, duration_s=1, global_ppl=1, mean_train_loss=1, clients=1,
                                      bytes_up=1, bytes_down=1) is False
    assert metrics.delete_run_groups(cfg, "r", 3, {0: ["c"]}) == 0
    assert calls == []


def test_environment_overrides_the_config(pushgateway: Pushgateway, monkeypatch: pytest.MonkeyPatch) -> None:
    dead = f"http://{HOST}:{free_port()}"
    run = new_run()
    monkeypatch.setenv(metrics.ENV_URL, pushgateway.url)
    assert metrics.pushgateway_url(MetricsConfig(pushgateway_url=dead)) == pushgateway.url
    assert metrics.push_round_metrics(MetricsConfig(pushgateway_url=dead), run, 0, duration_s=1, global_ppl=2,
                                      mean_train_loss=3, clients=1, bytes_up=4, bytes_down=5) is True
    assert pushgateway.group_labels(run=run)
    # set but empty: pushing is off even though the config names a live gateway
    monkeypatch.setenv(metrics.ENV_URL, "")
    run2 = new_run()
    assert metrics.push_round_metrics(MetricsConfig(pushgateway_url=pushgateway.url), run2, 0, duration_s=1,
                                      global_ppl=2, mean_train_loss=3, clients=1, bytes_up=4, bytes_down=5) is False
    assert pushgateway.group_labels(run=run2) == []


def test_unreachable_gateway_warns_and_never_raises(caplog: pytest.LogCaptureFixture) -> None:
    cfg = MetricsConfig(pushgateway_url=f"http://{HOST}:{free_port()}")  # nothing listens there
    with caplog.at_level(logging.WARNING, logger=metrics.__name__):
        ok = metrics.push_client_metrics(cfg, "r", 0, "c", "small", duration_s=1, train_loss=1, rank_before=2,
                                         rank_after=2, bytes_up=1, bytes_down=1)
        ok_round = metrics.push_round_metrics(cfg, "r", 0, duration_s=1, global_ppl=1, mean_train_loss=1, clients=1,
                                              bytes_up=1, bytes_down=1)
        deleted = metrics.delete_run_groups(cfg, "r", 2, {0: ["c"], 1: ["c"]})
    assert (ok, ok_round, deleted) == (False, False, 0)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert any("could not push client metrics" in r.getMessage() for r in warnings)
    assert any("could not push round metrics" in r.getMessage() for r in warnings)
    assert any("could not push last successful round" in r.getMessage() for r in warnings)
    # deletion stops at the first failure instead of trying every group
    assert sum("could not delete" in r.getMessage() for r in warnings) == 1


def test_http_error_from_a_non_pushgateway_warns(prometheus: Prometheus, caplog: pytest.LogCaptureFixture) -> None:
    cfg = MetricsConfig(pushgateway_url=prometheus.url)  # a live server that rejects the PUT
    with caplog.at_level(logging.WARNING, logger=metrics.__name__):
        assert metrics.push_client_metrics(cfg, "r", 0, "c", "small", duration_s=1, train_loss=1, rank_before=2,
                                           rank_after=2, bytes_up=1, bytes_down=1) is False
    assert any("could not push client metrics" in r.getMessage() and "HTTP" in r.getMessage()
               for r in caplog.records)


def test_a_hanging_gateway_costs_at_most_the_timeout(monkeypatch: pytest.MonkeyPatch,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as srv:
        srv.bind((HOST, 0))
        srv.listen(8)  # the kernel accepts the connection; nobody ever answers
        monkeypatch.setenv(metrics.ENV_TIMEOUT, "0.5")
        cfg = MetricsConfig(pushgateway_url=f"{HOST}:{srv.getsockname()[1]}")  # no scheme: http is assumed
        t0 = time.monotonic()
        with caplog.at_level(logging.WARNING, logger=metrics.__name__):
            ok = metrics.push_client_metrics(cfg, "r", 0, "c", "small", duration_s=1, train_loss=1, rank_before=2,
                                             rank_after=2, bytes_up=1, bytes_down=1)
        elapsed = time.monotonic() - t0
    assert ok is False
    assert elapsed < 3.0, elapsed
    assert any("could not push" in r.getMessage() for r in caplog.records)


def test_invalid_labels_or_values_warn_and_push_nothing(monkeypatch: pytest.MonkeyPatch,
                                              caplog: pytest.LogCaptureFixture) -> None:
    calls: list[tuple] = []
    monkeypatch.setattr(metrics, "push_to_gateway", lambda *a, **k: calls.append(a))
    monkeypatch.setattr(metrics, "pushadd_to_gateway", lambda *a, **k: calls.append(a))
    monkeypatch.setattr(metrics, "delete_from_gateway", lambda *a, **k: calls.append(a))
    cfg = MetricsConfig(pushgateway_url="http://127.0.0.1:9")
    kw = dict(duration_s=1, train_loss=1, rank_before=2, rank_after=2, bytes_up=1, bytes_down=1)
    with caplog.at_level(logging.WARNING, logger=metrics.__name__):
        for label, args in (("run", ("", 0, "c", "small")), ("client", ("r", 0, "", "small")),
                            ("tier", ("r", 0, "c", ""))):
            caplog.clear()
            assert metrics.push_client_metrics(cfg, *args, **kw) is False  # type: ignore[arg-type]
            assert metrics.add_client_metrics(cfg, *args, weight=0.5) is False  # type: ignore[arg-type]
            assert any(f"label {label!r}" in r.getMessage() for r in caplog.records), label
        for bad in (-1, 1.5, True, "2"):
            caplog.clear()
            assert metrics.push_client_metrics(cfg, "r", bad, "c", "small", **kw) is False  # type: ignore[arg-type]
            assert metrics.push_round_metrics(cfg, "r", bad, duration_s=1, global_ppl=1,  # type: ignore[arg-type]
                                              mean_train_loss=1, clients=1, bytes_up=1, bytes_down=1) is False
            assert any("round must be" in r.getMessage() for r in caplog.records), bad
        caplog.clear()
        assert metrics.push_client_metrics(cfg, "r", 0, "c", "small", **{**kw, "rank_after": None}) is False
        assert metrics.push_round_metrics(cfg, "r", 0, duration_s="slow", global_ppl=1,  # type: ignore[arg-type]
                                          mean_train_loss=1, clients=1, bytes_up=1, bytes_down=1) is False
        assert sum("are not numbers" in r.getMessage() for r in caplog.records) == 2
        assert metrics.delete_run_groups(cfg, "r", 2, {0: ["a", ""]}) == 0
        assert metrics.delete_run_groups(cfg, "r", 2, {-1: ["a"]}) == 0
    assert calls == [], "nothing may be pushed or deleted with an invalid label"


# ---------------------------------------------------------------- cleanup at run end


def test_delete_run_groups_keeps_only_the_run_group(pushgateway: Pushgateway, prometheus: Prometheus) -> None:
    run, other = new_run(), new_run()
    cfg = MetricsConfig(pushgateway_url=pushgateway.url)
    clients_by_round = {0: ["a", "b"], 1: ["b", "c"]}
    for r in (run, other):
        for rnd, clients in clients_by_round.items():
            for c in clients:
                assert metrics.push_client_metrics(cfg, r, rnd, c, "small", duration_s=1, train_loss=1,
                                                   rank_before=4, rank_after=2, bytes_up=1, bytes_down=1)
            assert metrics.push_round_metrics(cfg, r, rnd, duration_s=1, global_ppl=1, mean_train_loss=1,
                                              clients=len(clients), bytes_up=1, bytes_down=1)
    assert len(pushgateway.group_labels(run=run)) == 4 + 2 + 1
    prometheus.wait_for(f'hetlora_client_rank{{run="{run}"}}', lambda res: len(res) == 4)

    # keys as they come back from JSON / KFP: strings and floats
    deleted = metrics.delete_run_groups(cfg, run, 2, {"0": ["a", "b"], 1.0: ["b", "c"]})
    assert deleted == 4 + 2
    assert pushgateway.group_labels(run=run) == [{"job": "hetlora", "run": run}]
    assert len(pushgateway.group_labels(run=other)) == 7  # another run is untouched

    # Prometheus sees the series go stale at the next scrape; the run-level pair stays.
    prometheus.wait_for(f'count({{run="{run}", round!=""}})', lambda res: res == [])
    last = prometheus.query(f'hetlora_last_successful_round{{run="{run}"}}')
    assert [float(s["value"][1]) for s in last] == [1.0]
    assert len(prometheus.query(f'hetlora_client_rank{{run="{other}"}}')) == 4


def test_delete_covers_rounds_without_clients(pushgateway: Pushgateway) -> None:
    run, cfg = new_run(), MetricsConfig(pushgateway_url=pushgateway.url)
    for rnd in range(3):
        metrics.push_round_metrics(cfg, run, rnd, duration_s=1, global_ppl=1, mean_train_loss=1, clients=0,
                                   bytes_up=0, bytes_down=0)
    assert metrics.delete_run_groups(cfg, run, 3, {}) == 3
    assert pushgateway.group_labels(run=run) == [{"job": "hetlora", "run": run}]


def test_deploy_docs_list_every_metric() -> None:
    """docs/deploy.md's metric table is the user's reference: it names exactly what the code emits."""
    from pathlib import Path

    doc = (Path(__file__).resolve().parent.parent / "docs" / "deploy.md").read_text()
    rows = set(re.findall(r"^\| `(hetlora_[a-z0-9_]+)` \|", doc, re.M))
    assert rows == metrics.METRIC_NAMES


def test_pushgateway_password_never_in_warnings(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """A basic-auth Pushgateway URL: a failed push warns with the host, never the password."""
    from hetlora_core.config import MetricsConfig
    from hetlora_core.metrics import push_round_metrics, redact

    assert redact("http://bob:s3cret@gw:9091") == "http://bob:***@gw:9091" and redact("http://gw:9091") == "http://gw:9091"
    assert redact("http://bob:s3cret@gw:9091", "error at http://bob:s3cret@gw:9091/x (s3cret)") == "error at http://bob:***@gw:9091/x (***)"
    assert redact("bob:s3cret@gw:9091") == "bob:***@gw:9091"  # no scheme: prometheus_client adds http:// and pushes
    assert "p@ss" not in redact("http://bob:p%40ss@gw:9091", "auth failed for p@ss")  # percent-decoded too
    # The URL with its password comes from the environment (a config holding one is refused: tests/test_secrets.py).
    monkeypatch.setenv("HETLORA_PUSHGATEWAY_URL", "http://bob:s3cret@127.0.0.1:1")  # nothing listens on port 1
    monkeypatch.setenv("HETLORA_PUSHGATEWAY_TIMEOUT_S", "2")
    cfg = MetricsConfig()
    with caplog.at_level("WARNING", logger="hetlora"):
        assert push_round_metrics(cfg, "run1", 0, duration_s=1.0, global_ppl=10.0, mean_train_loss=2.0, clients=3,
                                  bytes_up=1, bytes_down=1) is False
    text = caplog.text
    assert "could not push" in text and "127.0.0.1:1" in text and "s3cret" not in text
