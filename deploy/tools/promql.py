#!/usr/bin/env python3
"""Every PromQL expression deploy/ relies on: extract them, and check them offline.

    promql.py extract [--job JOB] [--instance REGEX] [--rate-interval 1m]
        One JSON object per line: {"source", "where", "expr", "query"}. "expr" is the text as
        written; "query" has Grafana's variables replaced, ready for a live Prometheus
        (GET /api/v1/query?query=...): a live test runs each one against a running instance.

    promql.py live --url http://PROMETHEUS:9090 [--job JOB] [--strict]
        Runs every expression against a Prometheus that scrapes a running causal-commit: an
        expression Prometheus rejects fails; metrics of metrics.txt that no scraped series has,
        and dashboard queries that return nothing, are listed (--strict: they fail too). Rule
        expressions may well return nothing: an alert that does not fire.

    promql.py selftest --promtool PATH
        Proves the checks below can fail: known-bad expressions must each be reported.

    promql.py check --promtool PATH [--strict-source]
        1. promtool parses every expression (each wrapped in a temporary recording-rule file,
           since promtool checks rule files).
        2. Every metric an expression selects is in deploy/prometheus/metrics.txt (histograms
           with their _bucket, _sum and _count series), every label it matches, groups or joins
           on is a label of one of its metrics (or a target label), and every value it matches
           with = or != is in the metric's closed set of values, where metrics.txt gives one.
        3. The dashboard is well formed: unique panel ids, panels inside the 24-column grid and
           not overlapping, every query on the dashboard's data source variable, unique refIds
           per panel.
        Metrics of metrics.txt that src/telemetry/metrics.rs does not name yet are listed;
        --strict-source makes that an error.

Sources: deploy/prometheus/alerts.yml (every rule), deploy/grafana/dashboards/*.json (every
panel target and every query variable's label_values() selector).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import promql_parser
import yaml

DEPLOY = Path(__file__).resolve().parent.parent
REPO = DEPLOY.parent
RULES = DEPLOY / "prometheus" / "alerts.yml"
METRICS = DEPLOY / "prometheus" / "metrics.txt"
DASHBOARDS = sorted((DEPLOY / "grafana" / "dashboards").glob("*.json"))
SOURCE_METRICS = REPO / "src" / "telemetry" / "metrics.rs"

# Labels Prometheus attaches to every series of a target (static configs, Kubernetes discovery
# through a ServiceMonitor), so expressions may match, group and join on them.
TARGET_LABELS = {"job", "instance", "namespace", "pod", "service", "container", "endpoint"}
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def rel(path: Path) -> str:
    return str(path.relative_to(REPO))


# ------------------------------------------------------------------------- the metric list


class Metric:
    def __init__(self, name: str, kind: str, labels: dict[str, set[str] | None]):
        self.name, self.kind, self.labels = name, kind, labels


def load_metrics() -> dict[str, Metric]:
    """Series name -> its metric (a histogram contributes its three series)."""
    series: dict[str, Metric] = {}
    for line in METRICS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, kind, *labels = line.split()
        parsed: dict[str, set[str] | None] = {}
        for label in labels:
            key, _, values = label.partition("=")
            parsed[key] = set(values.split("|")) if values else None
        metric = Metric(name, kind, parsed)
        if kind == "histogram":
            for suffix in HISTOGRAM_SUFFIXES:
                series[name + suffix] = metric
        else:
            series[name] = metric
    return series


def source_metric_names() -> set[str] | None:
    if not SOURCE_METRICS.exists():
        return None
    return set(re.findall(r'pub const \w+: &str = "([a-z_:][a-z0-9_:]*)";', SOURCE_METRICS.read_text()))


# ------------------------------------------------------------------------- extraction


def grafana_substitute(expr: str, job: str, instance: str, rate_interval: str) -> str:
    values = {
        "job": job,
        "instance": instance,
        "__rate_interval": rate_interval,
        "__interval": "30s",
        "__range": "1h",
    }

    def repl(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        if name not in values:
            raise SystemExit(f"promql.py: unknown Grafana variable ${name} in {expr!r}")
        return values[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", repl, expr)


def extract(job: str, instance: str, rate_interval: str) -> list[dict[str, str]]:
    found: list[dict[str, str]] = []
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in group["rules"]:
            name = rule.get("alert") or rule.get("record")
            expr = rule["expr"].strip()
            found.append({"source": rel(RULES), "where": f"{group['name']} / {name}",
                          "expr": expr, "query": expr})
    for path in DASHBOARDS:
        dashboard = json.loads(path.read_text())
        for var in dashboard.get("templating", {}).get("list", []):
            if var.get("type") != "query":
                continue
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            m = re.fullmatch(r"\s*label_values\((.+),\s*(\w+)\)\s*", query)
            if not m:
                raise SystemExit(f"promql.py: {rel(path)}: variable {var['name']}: "
                                 f"only label_values(selector, label) is supported: {query!r}")
            found.append({"source": rel(path), "where": f"variable {var['name']}", "expr": m.group(1),
                          "query": grafana_substitute(m.group(1), job, instance, rate_interval)})
        for panel in all_panels(dashboard):
            for target in panel.get("targets", []):
                expr = target.get("expr", "").strip()
                if expr:
                    found.append({"source": rel(path),
                                  "where": f"panel {panel['id']} '{panel['title']}' target {target['refId']}",
                                  "expr": expr,
                                  "query": grafana_substitute(expr, job, instance, rate_interval)})
    return found


def all_panels(dashboard: dict) -> list[dict]:
    panels = []
    for panel in dashboard.get("panels", []):
        panels.append(panel)
        panels.extend(panel.get("panels", []))  # collapsed rows hold their panels
    return panels


# ------------------------------------------------------------------------- checks


def check_with_promtool(exprs: list[dict[str, str]], promtool: str) -> list[str]:
    rules = {"groups": [{"name": "extracted", "rules": [
        {"record": f"check:expr_{i}", "expr": e["query"]} for i, e in enumerate(exprs)]}]}
    with tempfile.NamedTemporaryFile("w", suffix=".yml", delete=False) as f:
        yaml.safe_dump(rules, f, sort_keys=False)
        path = f.name
    try:
        run = subprocess.run([promtool, "check", "rules", path], capture_output=True, text=True)
    finally:
        Path(path).unlink()
    if run.returncode == 0:
        return []
    # Name the failing expression(s): promtool reports the rule index in its message.
    errors = [f"promtool: {line}" for line in (run.stdout + run.stderr).splitlines() if line.strip()]
    for i in sorted({int(n) for n in re.findall(r"check:expr_(\d+)", run.stdout + run.stderr)}):
        errors.append(f"  {exprs[i]['source']}: {exprs[i]['where']}: {exprs[i]['query']}")
    return errors


def check_names(expr: dict[str, str], metrics: dict[str, Metric]) -> tuple[list[str], set[str]]:
    """Metric, label and value errors of one expression, and the metrics it uses."""
    where = f"{expr['source']}: {expr['where']}"
    try:
        ast = promql_parser.parse(expr["query"])
    except Exception as e:  # the parser raises a plain ValueError/RuntimeError
        return [f"{where}: does not parse: {e}"], set()
    errors: list[str] = []
    used: list[Metric] = []
    grouping: set[str] = set()

    def visit(node, *_):
        if isinstance(node, promql_parser.VectorSelector):
            metric = metrics.get(node.name or "")
            if metric is None:
                errors.append(f"{where}: unknown metric {node.name!r} (not in {rel(METRICS)})")
                return
            used.append(metric)
            allowed = set(metric.labels) | TARGET_LABELS | {"__name__"}
            if node.name.endswith("_bucket") and metric.kind == "histogram":
                allowed.add("le")
            for m in node.matchers.matchers:
                if m.name not in allowed:
                    errors.append(f"{where}: {node.name} has no label {m.name!r}")
                    continue
                values = metric.labels.get(m.name)
                if values and m.op in (promql_parser.MatchOp.Equal, promql_parser.MatchOp.NotEqual) \
                        and m.value not in values:
                    errors.append(f"{where}: {node.name}{{{m.name}=...}}: {m.value!r} is not one of "
                                  f"{'|'.join(sorted(values))}")
        elif isinstance(node, promql_parser.AggregateExpr) and node.modifier is not None:
            grouping.update(node.modifier.labels)
        elif isinstance(node, promql_parser.BinaryExpr) and node.modifier is not None:
            if node.modifier.matching is not None:
                grouping.update(node.modifier.matching.labels)
            grouping.update(node.modifier.group_labels or [])
        return True

    promql_parser.walk(ast, visit, None)
    known = set(TARGET_LABELS)
    for metric in used:
        known.update(metric.labels)
        if metric.kind == "histogram":
            known.add("le")
    for label in sorted(grouping - known):
        errors.append(f"{where}: groups or joins on {label!r}, a label none of its metrics has")
    return errors, {m.name for m in used}


def check_dashboard(path: Path) -> list[str]:
    errors = []
    dashboard = json.loads(path.read_text())
    names = {v["name"] for v in dashboard.get("templating", {}).get("list", [])}
    if "datasource" not in names:
        errors.append(f"{rel(path)}: no 'datasource' variable: queries would be bound to one data source")
    seen: set[int] = set()
    boxes = []
    for panel in dashboard.get("panels", []):
        g = panel.get("gridPos", {})
        box = (g.get("x", 0), g.get("y", 0), g.get("w", 0), g.get("h", 0))
        for other_id, (x, y, w, h) in boxes:
            if box[0] < x + w and x < box[0] + box[2] and box[1] < y + h and y < box[1] + box[3]:
                errors.append(f"{rel(path)}: panel {panel.get('id')} overlaps panel {other_id}")
        boxes.append((panel.get("id"), box))
    for panel in all_panels(dashboard):
        pid = panel.get("id")
        if pid in seen:
            errors.append(f"{rel(path)}: duplicate panel id {pid}")
        seen.add(pid)
        grid = panel.get("gridPos", {})
        if grid.get("x", 0) + grid.get("w", 0) > 24:
            errors.append(f"{rel(path)}: panel {pid} '{panel.get('title')}' overflows the 24-column grid")
        if panel.get("type") == "row":
            continue
        refs = [t.get("refId") for t in panel.get("targets", [])]
        if not refs:
            errors.append(f"{rel(path)}: panel {pid} '{panel.get('title')}' has no query")
        if len(refs) != len(set(refs)):
            errors.append(f"{rel(path)}: panel {pid} has duplicate refIds {refs}")
        for ds in [panel.get("datasource")] + [t.get("datasource") for t in panel.get("targets", [])]:
            if ds is not None and ds.get("uid") != "${datasource}":
                errors.append(f"{rel(path)}: panel {pid} is bound to data source {ds!r}, "
                              "not to ${datasource}")
    return errors


# Each must be reported by the check named beside it.
BAD_EXPRESSIONS = [
    ("promtool", "sum by (partition) (rate(causal_commit_outcomes_total[5m])"),
    ("unknown metric", "causal_commit_backlog_waitng > 1"),
    ("no label", 'causal_commit_consumer_lag{partiton="1"}'),
    ("not one of", 'rate(causal_commit_transactions_total{result="aborted"}[5m])'),
    ("not one of", 'causal_commit_outcomes_total{state!="committed"}'),
    ("groups or joins", "sum by (reason) (causal_commit_backlog_waiting)"),
    ("groups or joins", "a_metric_nobody_has / on (shard) causal_commit_ready"),
    ("no label", 'causal_commit_ready{le="1"}'),
]


def selftest(promtool: str) -> int:
    metrics = load_metrics()
    failures = []
    for kind, query in BAD_EXPRESSIONS:
        expr = {"source": "selftest", "where": kind, "expr": query, "query": query}
        if kind == "promtool":
            errors = check_with_promtool([expr], promtool)
        else:
            errors, _ = check_names(expr, metrics)
        if not any(kind in e or kind == "promtool" for e in errors):
            failures.append(f"not reported ({kind}): {query} -> {errors}")
    good = {"source": "selftest", "where": "good", "expr": "", "query":
            'histogram_quantile(0.9, sum by (le) (rate(causal_commit_commit_latency_seconds_bucket{job="x"}[5m])))'}
    errors = check_with_promtool([good], promtool) + check_names(good, metrics)[0]
    if errors:
        failures.append(f"a good expression was rejected: {errors}")
    for failure in failures:
        print(f"promql.py selftest: {failure}", file=sys.stderr)
    if not failures:
        print(f"promql.py selftest: {len(BAD_EXPRESSIONS)} bad expressions reported, a good one accepted")
    return 1 if failures else 0


def prometheus_query(url: str, query: str) -> list:
    """The result vector of an instant query; raises ValueError with Prometheus's error."""
    request = f"{url.rstrip('/')}/api/v1/query?{urllib.parse.urlencode({'query': query})}"
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            body = json.load(response)
    except urllib.error.HTTPError as e:
        body = json.load(e)
    if body.get("status") != "success":
        raise ValueError(f"{body.get('errorType')}: {body.get('error')}")
    return body["data"]["result"]


def live(url: str, job: str, strict: bool) -> int:
    exprs = extract(job, ".*", "1m")
    errors, notes = [], []
    for e in exprs:
        try:
            result = prometheus_query(url, e["query"])
        except ValueError as err:
            errors.append(f"{e['source']}: {e['where']}: rejected: {err}")
            continue
        if not result and not e["source"].endswith("alerts.yml"):
            notes.append(f"{e['source']}: {e['where']}: no data")
    series = {r["metric"]["__name__"] for r in prometheus_query(
        url, f'count by (__name__) ({{job="{job}", __name__=~"causal_commit_.+"}})')}
    for name in sorted(load_metrics()):
        if name.startswith("causal_commit_") and name not in series:
            notes.append(f"{rel(METRICS)}: {name}: no series scraped")
    for error in errors:
        print(f"promql.py live: {error}", file=sys.stderr)
    for note in notes:
        print(f"promql.py live: {'' if strict else 'note: '}{note}", file=sys.stderr if strict else sys.stdout)
    print(f"promql.py live: {len(exprs)} expressions run against {url}: "
          f"{len(errors)} rejected, {len(notes)} without data")
    return 1 if errors or (strict and notes) else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("extract")
    ex.add_argument("--job", default="causal-commit")
    ex.add_argument("--instance", default=".*")
    ex.add_argument("--rate-interval", default="1m")
    lv = sub.add_parser("live")
    lv.add_argument("--url", required=True)
    lv.add_argument("--job", default="causal-commit")
    lv.add_argument("--strict", action="store_true")
    st = sub.add_parser("selftest")
    st.add_argument("--promtool", required=True)
    ck = sub.add_parser("check")
    ck.add_argument("--promtool", required=True)
    ck.add_argument("--strict-source", action="store_true")
    args = ap.parse_args()

    if args.command == "extract":
        try:
            for e in extract(args.job, args.instance, args.rate_interval):
                print(json.dumps(e))
        except BrokenPipeError:  # piped into head
            pass
        return 0

    if args.command == "selftest":
        return selftest(args.promtool)
    if args.command == "live":
        return live(args.url, args.job, args.strict)

    exprs = extract("causal-commit", ".*", "1m")
    metrics = load_metrics()
    errors = check_with_promtool(exprs, args.promtool)
    used: set[str] = set()
    for e in exprs:
        errs, names = check_names(e, metrics)
        errors += errs
        used |= names
    for path in DASHBOARDS:
        errors += check_dashboard(path)

    listed = {m.name for m in metrics.values()} - {"up"}
    for name in sorted(listed - used):
        print(f"promql.py: note: {name} is listed but no dashboard panel or rule uses it")
    notes = []
    source = source_metric_names()
    if source is not None:
        missing = sorted(listed - source)
        if missing:
            notes = [f"{rel(SOURCE_METRICS)} does not name {', '.join(missing)} yet"]
    for note in notes:
        if args.strict_source:
            errors.append(note)
        else:
            print(f"promql.py: note: {note}")

    for error in errors:
        print(f"promql.py: {error}", file=sys.stderr)
    if errors:
        return 1
    print(f"promql.py: {len(exprs)} expressions parse with promtool and name only listed metrics "
          f"and labels ({len(used)} metrics used)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
