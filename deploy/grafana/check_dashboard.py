#!/usr/bin/env python3
"""Check deploy/grafana/sluice-dashboard.json (python3 standard library only).

    python3 deploy/grafana/check_dashboard.py [DASHBOARD] [--metrics SCRAPE | --source METRICS_RS]

The dashboard must be a well-formed Grafana dashboard (panels with unique ids, a
datasource, targets with unique refIds and balanced PromQL) and every `sluice_*` metric
it queries must be one the worker exports. The exported names come from a live scrape
of the worker's /metrics saved to a file (--metrics), or else from the metric names
registered in worker/src/metrics.rs (--source, the default). Histograms count with their
_bucket, _sum and _count series. RabbitMQ metrics (`rabbitmq_*`) must come from the
families the dashboard is documented to use.

Exit status: 0 when every check passed, 1 when one failed (each problem on a line of
its own), 2 on a usage error.
"""

import argparse
import json
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_DASHBOARD = HERE / "sluice-dashboard.json"
DEFAULT_SOURCE = HERE.parent.parent / "worker" / "src" / "metrics.rs"

# RabbitMQ's own metrics the dashboard may query (rabbitmq_prometheus plugin).
RABBITMQ_METRICS = {
    "rabbitmq_queue_messages",
    "rabbitmq_queue_messages_ready",
    "rabbitmq_queue_messages_unacked",
    "rabbitmq_detailed_queue_messages",
    "rabbitmq_detailed_queue_messages_ready",
    "rabbitmq_detailed_queue_messages_unacked",
}

HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
METRIC_NAME = re.compile(r"\b((?:sluice|rabbitmq)_[A-Za-z0-9_]+)")


def exported_from_scrape(text):
    """Metric names in a Prometheus text exposition, histogram series included."""
    names = set()
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        if line.startswith("#"):
            parts = line.split()
            if len(parts) >= 4 and parts[1] == "TYPE":
                name, kind = parts[2], parts[3]
                names.add(name)
                if kind in ("histogram", "summary"):
                    names.update(name + s for s in HISTOGRAM_SUFFIXES)
            continue
        match = re.match(r"[A-Za-z_:][A-Za-z0-9_:]*", line)
        if match:
            names.add(match.group(0))
    return names


def exported_from_source(text):
    """Metric names registered in worker/src/metrics.rs (string literals `"sluice_..."`)."""
    names = set()
    for name in re.findall(r'"(sluice_[a-z0-9_]+)"', text):
        names.add(name)
    for name in re.findall(r'HistogramOpts::new\(\s*"(sluice_[a-z0-9_]+)"', text):
        names.update(name + s for s in HISTOGRAM_SUFFIXES)
    return names


def balanced(expr):
    pairs = {")": "(", "]": "[", "}": "{"}
    stack = []
    in_string = False
    escaped = False
    for ch in expr:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
            continue
        if ch == '"':
            in_string = True
        elif ch in "([{":
            stack.append(ch)
        elif ch in ")]}":
            if not stack or stack.pop() != pairs[ch]:
                return False
    return not stack and not in_string


def walk_panels(panels):
    for panel in panels:
        yield panel
        yield from walk_panels(panel.get("panels", []))


def check(dashboard, exported):
    """Problems found, as lines of text; and the sluice metrics queried."""
    problems = []
    queried = set()
    for key in ("title", "uid", "panels", "schemaVersion"):
        if key not in dashboard:
            problems.append(f"dashboard: missing {key!r}")
    if not isinstance(dashboard.get("panels", []), list):
        problems.append("dashboard: 'panels' is not a list")
        return problems, queried

    expressions = []  # (where, expr)
    seen_ids = set()
    for panel in walk_panels(dashboard.get("panels", [])):
        where = f"panel {panel.get('id')!r} ({panel.get('title', '?')})"
        for key in ("id", "type", "title", "gridPos"):
            if key not in panel:
                problems.append(f"{where}: missing {key!r}")
        if panel.get("id") in seen_ids:
            problems.append(f"{where}: duplicate panel id")
        seen_ids.add(panel.get("id"))
        grid = panel.get("gridPos", {})
        if not all(isinstance(grid.get(k), int) for k in ("h", "w", "x", "y")):
            problems.append(f"{where}: gridPos needs integer h, w, x, y")
        elif grid["x"] + grid["w"] > 24:
            problems.append(f"{where}: wider than the 24-column grid")
        if panel.get("type") == "row":
            continue
        targets = panel.get("targets", [])
        if not targets:
            problems.append(f"{where}: no targets")
        if "datasource" not in panel:
            problems.append(f"{where}: no datasource")
        ref_ids = [t.get("refId") for t in targets]
        if len(set(ref_ids)) != len(ref_ids) or None in ref_ids:
            problems.append(f"{where}: refIds missing or not unique: {ref_ids}")
        for target in targets:
            expr = target.get("expr")
            if not isinstance(expr, str) or not expr.strip():
                problems.append(f"{where}: target {target.get('refId')} has no expr")
                continue
            expressions.append((f"{where} target {target.get('refId')}", expr))

    for variable in dashboard.get("templating", {}).get("list", []):
        query = variable.get("query")
        if isinstance(query, dict):
            query = query.get("query")
        if variable.get("type") == "query" and isinstance(query, str):
            expressions.append((f"variable ${variable.get('name')}", query))

    for where, expr in expressions:
        if not balanced(expr):
            problems.append(f"{where}: unbalanced brackets or quotes in {expr!r}")
        for name in METRIC_NAME.findall(expr):
            if name.startswith("sluice_"):
                queried.add(name)
                if name not in exported:
                    problems.append(f"{where}: unknown metric {name} (the worker does not export it)")
            elif name not in RABBITMQ_METRICS:
                problems.append(f"{where}: unexpected RabbitMQ metric {name}")
    return problems, queried


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dashboard", nargs="?", type=Path, default=DEFAULT_DASHBOARD)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--metrics", type=Path, help="a scrape of the worker's /metrics")
    source.add_argument("--source", type=Path, help="worker/src/metrics.rs")
    args = parser.parse_args(argv)

    try:
        dashboard = json.loads(args.dashboard.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        print(f"FAIL {args.dashboard}: not a readable JSON file: {e}")
        return 1
    if args.metrics:
        exported = exported_from_scrape(args.metrics.read_text(encoding="utf-8"))
        origin = str(args.metrics)
    else:
        path = args.source or DEFAULT_SOURCE
        exported = exported_from_source(path.read_text(encoding="utf-8"))
        origin = str(path)
    exported = {n for n in exported if n.startswith("sluice_")}
    if not exported:
        print(f"FAIL {origin}: no sluice_* metric found there")
        return 1

    problems, queried = check(dashboard, exported)
    for problem in problems:
        print(f"FAIL {problem}")
    if problems:
        return 1
    bases = {re.sub(r"_(bucket|sum|count)$", "", n) for n in exported}
    shown = {re.sub(r"_(bucket|sum|count)$", "", n) for n in queried}
    missing = sorted(bases - shown)
    note = f"; not shown: {', '.join(missing)}" if missing else ""
    print(f"PASS {args.dashboard.name}: {len(queried)} sluice metrics, all exported by the worker ({origin}){note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
