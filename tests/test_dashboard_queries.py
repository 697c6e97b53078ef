"""The provisioned "cadre" dashboard: every panel the issue lists is there, every query
names only contract metrics (shared/DESIGN.md), and the JSON is what Grafana's file
provisioning expects (one data source uid, unique ids, panels inside the 24-column grid).
tests/test_dashboard_e2e.py then runs each query against a real Prometheus."""

from __future__ import annotations

import re

import pytest
from compose_helpers import CONTRACT_METRICS, GRAFANA, dashboard_module, load_yaml

KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset"}
dash = dashboard_module()


@pytest.fixture(scope="module")
def dashboard():
    return dash.load()


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (label matchers, ranges, grouping labels,
    strings, function names and keywords removed)."""
    text = re.sub(r'"[^"]*"', "", expr)
    text = re.sub(r"\{[^}]*\}|\[[^\]]*\]", "", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    return {name for name in re.findall(r"\b([A-Za-z_:][\w:]*)\b(?!\s*\()", text) if name not in KEYWORDS}


def test_metric_names_parser_sees_every_selector():
    expr = 'sum by (layer) (rate(cadre_a_total{layer=~"$layer"}[5m])) / on (x) sum(cadre_b_bytes) or vector(0)'
    assert metric_names(expr) == {"cadre_a_total", "cadre_b_bytes"}


def test_every_query_uses_only_contract_metrics(dashboard):
    for query in dash.panel_queries(dashboard):
        for name in metric_names(query.expr):
            base = re.sub(r"_(bucket|sum|count)$", "", name)
            if base != name:
                assert CONTRACT_METRICS.get(base) == "histogram", f"{query.panel}: {name}"
            else:
                assert name in CONTRACT_METRICS, f"{query.panel}: {name} is not a contract metric"
                assert CONTRACT_METRICS[name] != "histogram", f"{query.panel}: use {name}_bucket"
            if CONTRACT_METRICS[base] == "counter":  # a raw counter only grows: show its rate or increase
                assert re.search(rf"(rate|increase)\({name}\b", query.expr), f"{query.panel}: {query.expr}"


def test_every_contract_metric_is_on_the_dashboard(dashboard):
    used = {re.sub(r"_bucket$", "", name) for q in dash.panel_queries(dashboard) for name in metric_names(q.expr)}
    assert used == set(CONTRACT_METRICS)


def queries_of(dashboard, title_pattern: str) -> list[str]:
    matching = [p for p in dash.panels(dashboard) if re.search(title_pattern, p["title"], re.IGNORECASE)]
    assert matching, f"no panel titled like {title_pattern!r}"
    return [t["expr"] for p in matching for t in p["targets"]]


def test_the_panels_the_issue_asks_for(dashboard):
    by_type = {}
    for panel in dash.panels(dashboard):
        by_type.setdefault(panel["type"], []).append(panel)
    # layer × expert: a colour-scaled matrix of activations, and per-layer heatmaps over time
    (matrix,) = [p for p in by_type["table"] if "layer" in p["title"] and "expert" in p["title"]]
    assert "groupingToMatrix" in [t["id"] for t in matrix["transformations"]]
    assert matrix["fieldConfig"]["defaults"]["custom"]["cellOptions"]["type"] == "color-background"
    (heatmap,) = by_type["heatmap"]
    assert heatmap["repeat"] == "layer"
    assert any("topk(" in e for e in queries_of(dashboard, r"top .*experts"))
    (hit_rate,) = queries_of(dashboard, r"hit rate per layer")
    assert re.fullmatch(r"sum by \(layer\) \(rate\(cadre_expert_cache_hits_total\[.*\]\)\) / "
                        r"sum by \(layer\) \(rate\(cadre_expert_cache_queries_total\[.*\]\)\)", hit_rate)
    assert any("by (tier)" in e for e in queries_of(dashboard, r"loads/s by tier"))
    for title, metric in [("load latency", "cadre_expert_load_seconds"),
                          ("time to first token", "cadre_time_to_first_token_seconds"),
                          ("inter-token latency", "cadre_inter_token_latency_seconds")]:
        quantiles = sorted(re.match(r"histogram_quantile\(([\d.]+), ", e)[1] for e in queries_of(dashboard, title))
        assert quantiles == ["0.5", "0.95", "0.99"], title
        assert all(f"{metric}_bucket" in e for e in queries_of(dashboard, title))
    bytes_panel = " ".join(queries_of(dashboard, r"cache bytes vs capacity"))
    assert "cadre_expert_cache_bytes" in bytes_panel and "cadre_expert_cache_capacity_bytes" in bytes_panel
    assert any("by (outcome)" in e for e in queries_of(dashboard, r"prefetch outcomes"))
    assert queries_of(dashboard, r"router regret")
    assert any("cadre_generation_tokens_total" in e for e in queries_of(dashboard, r"^tokens/s"))
    queue = " ".join(queries_of(dashboard, r"running / waiting / rejected"))
    assert all(m in queue for m in ("cadre_requests_running", "cadre_requests_waiting", "cadre_request_rejections"))


def test_panels_use_the_provisioned_datasource(dashboard):
    (datasource,) = load_yaml(GRAFANA / "provisioning" / "datasources" / "prometheus.yml")["datasources"]
    for panel in dash.panels(dashboard):
        assert panel["datasource"] == {"type": "prometheus", "uid": datasource["uid"]}, panel["title"]
        assert all(t["datasource"]["uid"] == datasource["uid"] for t in panel["targets"]), panel["title"]
    for variable in dashboard["templating"]["list"]:
        assert variable["datasource"]["uid"] == datasource["uid"]


def test_layout_ids_and_grid(dashboard):
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    assert dashboard["uid"] == "cadre"
    cells = set()
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, panel["title"]
        area = {(grid["x"] + dx, grid["y"] + dy) for dx in range(grid["w"]) for dy in range(grid["h"])}
        assert not area & cells, f"{panel['title']} overlaps another panel"
        cells |= area


def test_interpolation_leaves_no_grafana_variable(dashboard):
    assert set(dash.label_variables(dashboard)) == {"layer"}
    for query in dash.panel_queries(dashboard):
        expr = dash.interpolate(query.expr, {"layer": "3"}, rate_interval="20s", range_="900s")
        assert "$" not in expr, expr
    with pytest.raises(KeyError):
        dash.interpolate("rate(x[$__rate_interval]) + $unknown", {}, rate_interval="1m", range_="1h")
