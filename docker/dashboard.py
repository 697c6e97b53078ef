"""The provisioned "cadre" Grafana dashboard, read outside Grafana.

What Grafana would do with docker/grafana/dashboards/cadre.json, minus Grafana: list every
panel's PromQL, interpolate Grafana's variables ($__rate_interval, $__range, $layer) the
way Grafana would, evaluate the queries against a Prometheus server (check_panels: each
must return a finite value, and the panels traffic drives a positive one), and draw the
panels with matplotlib at their dashboard positions. tests/test_dashboard_e2e.py and
scripts/compose_checks.py (the compose smoke test) check the panels; the picture of the
dashboard in docs/observability.md comes from drawing them:

    python docker/dashboard.py --prometheus http://127.0.0.1:9090 --out dashboard.png
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

DASHBOARD = Path(__file__).resolve().parent / "grafana" / "dashboards" / "cadre.json"


@dataclass(frozen=True)
class PanelQuery:
    panel: str  # panel title
    ref_id: str
    expr: str  # PromQL with Grafana variables still in it
    instant: bool


def load(path: Path = DASHBOARD) -> dict:
    return json.loads(Path(path).read_text())


def panels(dashboard: dict) -> list[dict]:
    """Every panel that shows data (rows flattened, row headers dropped), in file order."""
    found = []
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            found.extend(panel.get("panels", []))  # a collapsed row keeps its panels inside
        else:
            found.append(panel)
    return found


def panel_queries(dashboard: dict) -> list[PanelQuery]:
    return [PanelQuery(p["title"], t["refId"], t["expr"], bool(t.get("instant")))
            for p in panels(dashboard) for t in p.get("targets", [])]


def label_variables(dashboard: dict) -> dict[str, tuple[str, str]]:
    """Template variables of the form label_values(METRIC, LABEL): {name: (metric, label)}."""
    found = {}
    for var in dashboard.get("templating", {}).get("list", []):
        match = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", var["definition"])
        if not match:
            raise ValueError(f"variable {var['name']}: unsupported definition {var['definition']!r}")
        found[var["name"]] = (match[1], match[2])
    return found


def interpolate(expr: str, variables: dict[str, str], rate_interval: str, range_: str) -> str:
    """Replace Grafana's variables as Grafana does before sending a query to Prometheus."""
    builtins = {"__rate_interval": rate_interval, "__range": range_, "__interval": rate_interval}
    values = {**builtins, **variables}

    def substitute(match: re.Match) -> str:
        name = match[1] or match[2]
        if name not in values:
            raise KeyError(f"no value for ${name} in {expr!r}")
        return values[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", substitute, expr)


class Prometheus:
    """The three calls of Prometheus' HTTP API that a dashboard needs."""

    def __init__(self, url: str, timeout: float = 10.0):
        self.client = httpx.Client(base_url=url.rstrip("/"), timeout=timeout)

    def _get(self, path: str, **params) -> list | dict:
        reply = self.client.get(path, params=params)
        body = reply.json()
        if reply.status_code != 200 or body.get("status") != "success":
            raise RuntimeError(f"{path} {params}: HTTP {reply.status_code}: {body.get('error', body)}")
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict]:
        params = {"query": expr} if at is None else {"query": expr, "time": at}
        data = self._get("/api/v1/query", **params)
        return data["result"] if data["resultType"] == "vector" else [{"metric": {}, "value": data["result"]}]

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[dict]:
        return self._get("/api/v1/query_range", query=expr, start=start, end=end, step=step)["result"]

    def label_values(self, label: str, metric: str) -> list[str]:
        return self._get(f"/api/v1/label/{label}/values", **{"match[]": metric})


def numeric_sorted(values: list[str]) -> list[str]:
    return sorted(values, key=lambda v: (0, int(v)) if v.isdigit() else (1, v))


def legend(fmt: str, labels: dict) -> str:
    if fmt in ("", "__auto"):
        return ",".join(f"{k}={v}" for k, v in labels.items()) or "value"
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m[1], ""), fmt)


# ---- checking ---------------------------------------------------------------------------

# Panels whose value any served traffic moves above zero; the others may stay 0 (exact
# routing has no regret, prefetch is off by default). The rejections target needs a burst
# past the queue (a 503).
TRAFFIC_MOVES = ("Generated tokens/s", "Expert activations in the time range", "Top 10 experts",
                 "Tokens/s", "Time to first token", "Inter-token latency", "End-to-end request latency",
                 "Cache bytes vs capacity", "Expert cache fill", "activations/s by expert")
BURST_MOVES = {("Requests running / waiting / rejected", "C")}


def check_panels(prom: Prometheus, at: float, rate_interval: str, range_: str,
                 dashboard: dict | None = None) -> tuple[int, list[str]]:
    """Evaluate every panel query (repeats expanded, variables from Prometheus) at time
    `at`: (queries evaluated, failures). A failure is a query with no data, no finite value,
    or, for a panel traffic drives, no value above zero."""
    dashboard = dashboard or load()
    variables = {}
    for name, (metric, label) in label_variables(dashboard).items():
        variables[name] = numeric_sorted(prom.label_values(label, metric))
        if not variables[name]:
            return 0, [f"template variable ${name} has no values (label {label} of {metric})"]
    failures, evaluated = [], 0
    for panel, _, values in expand_repeats(dashboard, variables):
        for target in panel.get("targets", []):
            expr = interpolate(target["expr"], values, rate_interval=rate_interval, range_=range_)
            numbers = [float(sample["value"][1]) for sample in prom.query(expr, at)]
            finite = [v for v in numbers if math.isfinite(v)]
            evaluated += 1
            label = f"{panel['title']} [{target['refId']}] {expr}"
            must_move = (any(key in panel["title"] for key in TRAFFIC_MOVES)
                         or (panel["title"], target["refId"]) in BURST_MOVES)
            if not numbers:
                failures.append(f"no data: {label}")
            elif not finite:
                failures.append(f"no finite value ({numbers}): {label}")
            elif must_move and max(finite) <= 0:
                failures.append(f"traffic did not move it ({numbers}): {label}")
    return evaluated, failures


# ---- drawing ----------------------------------------------------------------------------

def expand_repeats(dashboard: dict, variable_values: dict[str, list[str]]) -> list[tuple[dict, dict, dict]]:
    """(panel, gridPos, variables) for every panel Grafana would show, row headers included,
    repeats laid out like Grafana's horizontal repeat (maxPerRow per line, later panels
    pushed down)."""
    flat = [p for top in dashboard["panels"] for p in ([top] + (top.get("panels", []) if top["type"] == "row" else []))]
    laid_out, shift = [], 0
    for panel in flat:
        grid = dict(panel["gridPos"], y=panel["gridPos"]["y"] + shift)
        name = panel.get("repeat")
        if not name:
            laid_out.append((panel, grid, {}))
            continue
        values = variable_values[name]
        per_row = min(len(values), panel.get("maxPerRow", 4))
        width = 24 // per_row
        for i, value in enumerate(values):
            cell = dict(grid, x=(i % per_row) * width, y=grid["y"] + (i // per_row) * grid["h"], w=width)
            laid_out.append((panel, cell, {name: value}))
        shift += (math.ceil(len(values) / per_row) - 1) * grid["h"]
    return laid_out


def draw(dashboard: dict, prom: Prometheus, out: Path, minutes: float, rate_interval: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    end = time.time()
    start = end - minutes * 60
    step = max(1.0, (end - start) / 240)
    range_ = f"{int(end - start)}s"
    variable_values = {name: numeric_sorted(prom.label_values(label, metric))
                       for name, (metric, label) in label_variables(dashboard).items()}
    layout = expand_repeats(dashboard, variable_values)
    height = max(g["y"] + g["h"] for _, g, _ in layout)

    fig = plt.figure(figsize=(24, height * 0.6))
    for panel, grid, variables in layout:
        top = 1 - grid["y"] / height
        if panel["type"] == "row":
            fig.text(0.005, top - 0.5 / height, panel["title"], fontsize=15, weight="bold", va="center")
            continue
        # leave room inside the grid cell for the title above and tick labels below
        rect = [grid["x"] / 24 + 0.03, top - (grid["h"] - 0.9) / height,
                grid["w"] / 24 - 0.04, (grid["h"] - 1.9) / height]
        ax = fig.add_axes(rect)
        title = interpolate(panel["title"], variables, rate_interval, range_)
        ax.set_title(title, fontsize=11, loc="left")
        targets = [(t, interpolate(t["expr"], variables, rate_interval, range_)) for t in panel["targets"]]
        DRAWERS[panel["type"]](ax, panel, targets, prom, start, end, step)
    fig.savefig(out, dpi=72)
    plt.close(fig)


def _draw_timeseries(ax, panel, targets, prom, start, end, step):
    unit = panel["fieldConfig"]["defaults"].get("unit", "short")
    for target, expr in targets:
        for series in prom.query_range(expr, start, end, step):
            xs = [float(t) - end for t, _ in series["values"]]
            ys = [float(v) for _, v in series["values"]]
            ax.plot(xs, ys, linewidth=1, label=legend(target["legendFormat"], series["metric"]))
    ax.set_xlabel("seconds before now", fontsize=7)
    ax.set_ylabel(unit, fontsize=7)
    ax.tick_params(labelsize=7)
    if ax.lines:
        ax.legend(fontsize=8, loc="upper left", ncol=2)


def _draw_stat(ax, panel, targets, prom, start, end, step):
    (_, expr), = targets
    result = prom.query(expr, end)
    value = float(result[0]["value"][1]) if result else float("nan")
    unit = panel["fieldConfig"]["defaults"].get("unit", "short")
    text = f"{100 * value:.1f} %" if unit == "percentunit" else f"{value:.3g}"
    ax.text(0.5, 0.45, text, ha="center", va="center", fontsize=22, color="tab:blue")
    ax.set_axis_off()


def _draw_matrix(ax, panel, targets, prom, start, end, step):
    (_, expr), = targets
    cells = {(s["metric"]["layer"], s["metric"]["expert"]): float(s["value"][1]) for s in prom.query(expr, end)}
    layers = numeric_sorted(list({layer for layer, _ in cells}))
    experts = numeric_sorted(list({expert for _, expert in cells}))
    grid = [[cells.get((layer, expert), 0.0) for expert in experts] for layer in layers]
    image = ax.imshow(grid, aspect="auto", cmap="YlOrRd", interpolation="nearest")
    ax.set_xlabel("expert", fontsize=7)
    ax.set_ylabel("layer", fontsize=7)
    ax.set_yticks(range(len(layers)), layers, fontsize=7)
    ax.set_xticks(range(0, len(experts), 2), experts[::2], fontsize=6)
    ax.figure.colorbar(image, ax=ax, fraction=0.03, pad=0.01)


def _draw_bars(ax, panel, targets, prom, start, end, step):
    (target, expr), = targets
    result = prom.query(expr, end)
    names = [legend(target["legendFormat"], s["metric"]) for s in result][::-1]
    values = [float(s["value"][1]) for s in result][::-1]
    ax.barh(names, values, color="tab:orange")
    ax.tick_params(labelsize=7)


def _draw_heatmap(ax, panel, targets, prom, start, end, step):
    (target, expr), = targets
    rows = {legend(target["legendFormat"], s["metric"]): s["values"] for s in prom.query_range(expr, start, end, step)}
    names = numeric_sorted(list(rows))
    times = sorted({float(t) for values in rows.values() for t, _ in values})
    index = {t: i for i, t in enumerate(times)}
    grid = [[0.0] * len(times) for _ in names]
    for r, name in enumerate(names):
        for t, v in rows[name]:
            grid[r][index[float(t)]] = float(v)
    extent = [times[0] - end, times[-1] - end, -0.5, len(names) - 0.5] if times else None
    ax.imshow(grid, aspect="auto", cmap="YlOrRd", origin="lower", interpolation="nearest", extent=extent)
    ax.set_ylabel("expert", fontsize=7)
    ax.set_xlabel("seconds before now", fontsize=7)
    ax.tick_params(labelsize=6)


DRAWERS = {"timeseries": _draw_timeseries, "stat": _draw_stat, "gauge": _draw_stat, "table": _draw_matrix,
           "bargauge": _draw_bars, "heatmap": _draw_heatmap}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="example: python docker/dashboard.py --prometheus "
                                            "http://127.0.0.1:9090 --out dashboard.png --minutes 5")
    parser.add_argument("--prometheus", required=True, help="Prometheus base URL")
    parser.add_argument("--out", required=True, type=Path, help="PNG to write")
    parser.add_argument("--minutes", type=float, default=5.0, help="time range drawn, ending now")
    parser.add_argument("--rate-interval", default="20s",
                        help="what $__rate_interval becomes (Grafana: 4 x the scrape interval)")
    parser.add_argument("--dashboard", type=Path, default=DASHBOARD)
    args = parser.parse_args(argv)
    try:
        draw(load(args.dashboard), Prometheus(args.prometheus), args.out, args.minutes, args.rate_interval)
    except (OSError, httpx.HTTPError, RuntimeError) as exc:
        print(f"dashboard.py: {args.prometheus}: {exc}", file=sys.stderr)
        return 2
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
