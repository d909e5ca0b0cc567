"""The Grafana dashboard against the real Prometheus and the metrics the code emits.

* every query (panel targets and template variables) parses: it is POSTed to Prometheus's
  ``/api/v1/query`` after substituting the template variables (a parse error answers 400);
* every metric name a query uses is in ``hetlora_core.metrics.METRIC_NAMES``, and every emitted
  metric has a panel;
* with a sample run pushed through the Pushgateway, every panel query returns data (so label
  names such as ``tier`` and ``round`` are right, not only the metric names);
* the dashboard is shipped in a ConfigMap the kube-prometheus-stack Grafana sidecar picks up.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import yaml

# The fixtures `pushgateway` and `prometheus` come from tests/conftest_prometheus.py (via conftest.py).
from prometheus_server import Prometheus, Pushgateway, skip_or_fail

from hetlora_core import metrics
from hetlora_core.config import MetricsConfig

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "manifests" / "base" / "grafana" / "hetlora-dashboard.json"
TIERS = ("small", "medium", "large")


def load_dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def all_panels(panels: list[dict]) -> Iterator[dict]:
    for p in panels:
        yield p
        yield from all_panels(p.get("panels", []))  # collapsed rows nest their panels


def panel_targets() -> list[tuple[str, str]]:
    """(panel title / refId, expr) of every panel target."""
    out = []
    for p in all_panels(load_dashboard()["panels"]):
        for t in p.get("targets", []):
            out.append((f'{p["title"]} / {t.get("refId")}', t["expr"]))
    return out


def variable_queries() -> list[tuple[str, str]]:
    """(variable name, PromQL selector inside label_values(...)) of every query variable."""
    out = []
    for v in load_dashboard()["templating"]["list"]:
        if v["type"] != "query":
            continue
        q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
        m = re.fullmatch(r"\s*label_values\((.+),\s*([a-zA-Z_][a-zA-Z0-9_]*)\)\s*", q)
        assert m, f"variable {v['name']}: expected label_values(<selector>, <label>), got {q!r}"
        out.append((v["name"], m.group(1)))
    return out


def substitute(expr: str, run: str = "t-run", tier: str = "small|medium|large", rnd: str = "0") -> str:
    """Replace Grafana's template variables by values Prometheus accepts."""
    values = {"run": run, "tier": tier, "round": rnd, "__range": "1h", "__rate_interval": "1m",
              "__interval": "1m", "__range_s": "3600"}
    out = re.sub(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)",
                 lambda m: values[m.group(1) or m.group(2)] if (m.group(1) or m.group(2)) in values
                 else m.group(0), expr)
    assert "$" not in out, f"unknown template variable left in {out!r}"
    return out


# A small PromQL lexer: once Prometheus has accepted an expression, the identifiers left after
# removing strings, label matchers, ranges, grouping clauses, numbers, keywords and function calls
# are metric names.
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset", "and", "or",
             "unless", "inf", "nan", "atan2", "start", "end"}


def metric_names(expr: str) -> set[str]:
    s = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', " ", expr)
    s = re.sub(r"\{[^{}]*\}", " ", s)
    s = re.sub(r"\[[^\[\]]*\]", " ", s)
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", " ", s)
    s = re.sub(r"\boffset\s+-?\w+", " ", s)
    s = re.sub(r"(?<![\w:])(0x[0-9a-fA-F]+|\d+(\.\d*)?([eE][+-]?\d+)?|\.\d+([eE][+-]?\d+)?)", " ", s)
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", s):
        if m.group(0).lower() in _KEYWORDS or s[m.end():].lstrip().startswith("("):
            continue  # keyword, function or aggregation
        names.add(m.group(0))
    return names


def grouping_labels(expr: str) -> set[str]:
    """Labels an expression's result is grouped by: ``by (...)`` clauses and count_values' label."""
    labels = {lbl.strip() for group in re.findall(r"\bby\s*\(([^)]*)\)", expr) for lbl in group.split(",")}
    labels |= set(re.findall(r'count_values(?:\s*(?:by|without)\s*\([^)]*\))?\s*\(\s*"(\w+)"', expr))
    return labels


def test_lexer_finds_metric_names() -> None:
    assert metric_names('sum by (tier) (rate(foo_total{a="b{c}"}[5m] offset 1h)) / on(x) group_left bar') == \
        {"foo_total", "bar"}
    assert metric_names('count_values by (tier) ("rank", last_over_time(hetlora_client_rank{run="x"}[1h]))') == \
        {"hetlora_client_rank"}
    assert metric_names("time() - max(x:y_seconds) > 1e3 and bool 2") == {"x:y_seconds"}


# ---------------------------------------------------------------- structure (no server needed)


def test_dashboard_structure() -> None:
    d = load_dashboard()
    assert d["uid"] and d["title"]
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert {"datasource", "run", "tier", "round"} <= set(variables)
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert variables["tier"]["multi"] and variables["tier"]["includeAll"]
    ids = [p["id"] for p in all_panels(d["panels"])]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    titles = " | ".join(p["title"] for p in all_panels(d["panels"]))
    for topic in ("perplexity", "loss", "Rank distribution", "pruned", "bytes", "duration", "Tier $tier"):
        assert topic.lower() in titles.lower(), f"no panel about {topic!r}"
    assert any(p.get("repeat") == "tier" for p in d["panels"]), "a row repeated per tier"
    for p in all_panels(d["panels"]):
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p.get("targets"), f"panel {p['title']!r} has no query"
        for t in p["targets"]:
            assert "__name__" not in t["expr"], "select metrics by name so the name check sees them"
            if "tier" in t["expr"]:
                assert 'tier=~"$tier"' in t["expr"], f"{p['title']}: filter tiers with =~ (multi-value variable)"
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]


def test_transformations_use_the_labels_the_queries_return() -> None:
    """Table panels pivot on labels (groupingToMatrix) and plot a label on the x axis: those labels
    must be ones the panel's queries group by, or Grafana shows an empty panel."""
    checked = 0
    for p in all_panels(load_dashboard()["panels"]):
        exprs = [t["expr"] for t in p.get("targets", [])]
        labels = set().union(*map(grouping_labels, exprs)) if exprs else set()
        fields = set(labels)
        for tr in p.get("transformations", []):
            if tr["id"] == "groupingToMatrix":
                row, col = tr["options"]["rowField"], tr["options"]["columnField"]
                assert {row, col} <= labels, f"{p['title']}: pivots on {row}/{col}, queries give {labels}"
                fields.add(f"{row}\\{col}")  # Grafana names the pivot's first column row\column
                checked += 1
        x = p.get("options", {}).get("xField")
        if x:
            assert x in fields, f"{p['title']}: x axis {x!r} not among {fields}"
            checked += 1
    assert checked >= 10


def test_every_metric_name_is_emitted_and_every_metric_is_shown() -> None:
    used: set[str] = set()
    for where, expr in panel_targets() + variable_queries():
        names = metric_names(expr)
        assert names, f"{where}: no metric in {expr!r}"
        unknown = names - metrics.METRIC_NAMES
        assert not unknown, f"{where}: {sorted(unknown)} are not emitted by hetlora_core.metrics"
        used |= names
    assert metrics.METRIC_NAMES - used == set(), "emitted metrics without a panel"


# ---------------------------------------------------------------- against the real Prometheus


def test_every_query_parses(prometheus: Prometheus) -> None:
    # The check can fail: a syntax error answers 400 bad_data.
    status, doc = prometheus.api("query", query='sum by (tier) (hetlora_client_rank{run="x"}')
    assert status == 400 and doc["errorType"] == "bad_data", doc
    for where, expr in panel_targets():
        status, doc = prometheus.api("query", query=substitute(expr))
        assert status == 200, f"{where}: {expr!r} -> {status} {doc.get('error')}"
    for name, selector in variable_queries():
        # Grafana runs label_values(<selector>, label) as a series query: the selector must parse.
        status, doc = prometheus.api("series", **{"match[]": substitute(selector)})
        assert status == 200, f"variable {name}: {selector!r} -> {status} {doc.get('error')}"


def push_sample_run(pg: Pushgateway, run: str) -> None:
    cfg = MetricsConfig(pushgateway_url=pg.url)
    for rnd in (0, 1):
        total_up = total_down = pruned = 0
        for i, tier in enumerate(TIERS):
            for j in range(2):
                rank = (2, 8, 16)[i]
                after = rank - j - rnd if rank > 2 else rank
                up, down = 1000 * after, 16_000
                assert metrics.push_client_metrics(cfg, run, rnd, f"{tier}-{j}", tier, duration_s=10 + i + j,
                                                   train_loss=3.0 - 0.1 * rnd, rank_before=rank, rank_after=after,
                                                   bytes_up=up, bytes_down=down, weight=1 / 6,
                                                   heldout_ppl=30.0 - rnd)
                total_up, total_down, pruned = total_up + up, total_down + down, pruned + rank - after
        assert metrics.push_round_metrics(cfg, run, rnd, duration_s=60.0 + rnd, global_ppl=29.0 - rnd,
                                          mean_train_loss=3.0 - 0.1 * rnd, clients=6, bytes_up=total_up,
                                          bytes_down=total_down, ranks_pruned=pruned, rouge_l=0.2 + 0.05 * rnd)


def test_every_panel_query_returns_data_for_a_pushed_run(pushgateway: Pushgateway, prometheus: Prometheus) -> None:
    run = f"t-{uuid.uuid4().hex[:12]}"
    push_sample_run(pushgateway, run)
    prometheus.wait_for(f'count by (__name__) ({{run="{run}"}})',
                        lambda r: metrics.METRIC_NAMES <= {s["metric"]["__name__"] for s in r})
    for where, expr in panel_targets():
        # labels the panel groups by (and count_values' output label) must exist on the result:
        # a misspelt label would silently collapse the series into one
        grouping = grouping_labels(expr)
        for tier in ("small|medium|large", "medium"):  # "All" and one value of the repeated row
            query = substitute(expr, run=run, tier=tier, rnd="1")
            result = prometheus.query(query)
            assert result, f"{where}: no data for a pushed run: {query}"
            for label in grouping:
                assert all(s["metric"].get(label) for s in result), f"{where}: no label {label!r} in {query}"
    # spot-check two panels' numbers
    (ppl,) = prometheus.query(substitute(
        'min(last_over_time(hetlora_global_heldout_perplexity{run="$run"}[$__range]))', run=run))
    assert float(ppl["value"][1]) == 28.0
    dist = prometheus.query(substitute(next(e for w, e in panel_targets() if w.startswith("Rank distribution")),
                                       run=run, rnd="1"))
    counts = {(s["metric"]["tier"], s["metric"]["rank"]): float(s["value"][1]) for s in dist}
    assert counts == {("small", "2"): 2.0, ("medium", "7"): 1.0, ("medium", "6"): 1.0,
                      ("large", "15"): 1.0, ("large", "14"): 1.0}
    for name, selector in variable_queries():
        status, doc = prometheus.api("series", **{"match[]": substitute(selector, run=run)})
        assert status == 200 and doc["data"], f"variable {name} lists nothing for a pushed run"


# ---------------------------------------------------------------- shipped as a ConfigMap


def kustomize_bin() -> str | None:
    cache = os.environ.get("HETLORA_CACHE") or os.path.expanduser("~/.cache/hetlora")
    path = Path(cache) / "bin" / "kustomize"
    return str(path) if path.is_file() else shutil.which("kustomize")


def test_dashboard_configmap_is_labelled_for_the_grafana_sidecar() -> None:
    kustomize = kustomize_bin()
    if kustomize is None:
        skip_or_fail("kustomize not found: run scripts/setup.sh tools")
    out = subprocess.run([kustomize, "build", str(ROOT / "manifests" / "base")], capture_output=True, text=True,
                         check=False)
    assert out.returncode == 0, out.stderr
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    cms = [d for d in docs if d["kind"] == "ConfigMap" and "hetlora-dashboard.json" in d.get("data", {})]
    assert len(cms) == 1, [d["metadata"]["name"] for d in docs if d["kind"] == "ConfigMap"]
    cm = cms[0]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(cm["data"]["hetlora-dashboard.json"]) == load_dashboard()
