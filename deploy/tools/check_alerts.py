#!/usr/bin/env python3
"""Checks of deploy/prometheus/alerts.yml that promtool does not make.

    check_alerts.py --amtool PATH

  - every alert carries the story's chain as labels (severity, priority, channel, owner,
    ack_sla) with one of the agreed combinations, and summary, description and a runbook_url
    of the form docs/runbook.md#<anchor>;
  - every alert has, in alerts_test.yml, a case where it fires and a case where it stays silent;
  - Alertmanager (deploy/alertmanager/alertmanager.yml) routes every alert's labels to the
    receivers its severity and owner call for (amtool config routes test --verify.receivers),
    and an alert with an unknown owner still reaches the catch-all receiver.
Prints the runbook anchors used, one per line, for whoever writes docs/runbook.md.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

import yaml

DEPLOY = Path(__file__).resolve().parent.parent
RULES = DEPLOY / "prometheus" / "alerts.yml"
TESTS = DEPLOY / "prometheus" / "alerts_test.yml"
ALERTMANAGER = DEPLOY / "alertmanager" / "alertmanager.yml"

# severity -> (priority, channel, ack_sla): the only combinations in use.
CHAINS = {"critical": ("P1", "page", "5m"), "warning": ("P2", "chat", "30m")}
OWNERS = {"backend-oncall", "platform-oncall"}
RECEIVERS = {
    "critical": "incident-p1,{team}-pager",
    "warning": "{team}-chat",
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--amtool", required=True)
    args = ap.parse_args()
    errors: list[str] = []

    rules = [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"] if "alert" in r]
    names = [r["alert"] for r in rules]
    if len(names) != len(set(names)):
        errors.append(f"duplicate alert names in {RULES.name}")

    anchors = []
    for rule in rules:
        name, labels, notes = rule["alert"], rule.get("labels", {}), rule.get("annotations", {})
        severity = labels.get("severity")
        if severity not in CHAINS:
            errors.append(f"{name}: severity {severity!r} is not one of {sorted(CHAINS)}")
            continue
        expected = dict(zip(("priority", "channel", "ack_sla"), CHAINS[severity]))
        for key, value in expected.items():
            if labels.get(key) != value:
                errors.append(f"{name}: {key}={labels.get(key)!r}, but severity {severity} means {value!r}")
        if labels.get("owner") not in OWNERS:
            errors.append(f"{name}: owner {labels.get('owner')!r} is not one of {sorted(OWNERS)}")
        for key in ("summary", "description", "runbook_url"):
            if not notes.get(key):
                errors.append(f"{name}: no {key} annotation")
        m = re.fullmatch(r"docs/runbook\.md#([a-z0-9]+(?:-[a-z0-9]+)*)", notes.get("runbook_url", ""))
        if not m:
            errors.append(f"{name}: runbook_url {notes.get('runbook_url')!r} is not docs/runbook.md#<anchor>")
        else:
            anchors.append(m.group(1))

    # Test coverage: a firing case and a silent case per alert.
    fires, silent = set(), set()
    for test in yaml.safe_load(TESTS.read_text())["tests"]:
        for case in test.get("alert_rule_test", []):
            (fires if case.get("exp_alerts") else silent).add(case["alertname"])
    for name in names:
        if name not in fires:
            errors.append(f"{name}: no test in {TESTS.name} where it fires")
        if name not in silent:
            errors.append(f"{name}: no test in {TESTS.name} where it stays silent")
    for name in sorted((fires | silent) - set(names)):
        errors.append(f"{TESTS.name} tests {name!r}, which {RULES.name} does not define")

    # Routing: each alert's labels reach the receivers its severity and owner call for.
    def route(labels: dict[str, str], receivers: str) -> None:
        cmd = [args.amtool, "config", "routes", "test", f"--config.file={ALERTMANAGER}",
               f"--verify.receivers={receivers}"] + [f"{k}={v}" for k, v in sorted(labels.items())]
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode != 0:
            errors.append(f"routing {labels}: expected {receivers}, amtool says: {run.stdout.strip()} "
                          f"{run.stderr.strip()}".strip())

    for rule in rules:
        labels = {"alertname": rule["alert"], "job": "causal-commit", **rule.get("labels", {})}
        team = labels.get("owner", "").removesuffix("-oncall")
        if labels.get("severity") in RECEIVERS:
            route(labels, RECEIVERS[labels["severity"]].format(team=team))
    route({"alertname": "Unknown", "severity": "warning", "owner": "someone-else"}, "causal-commit-catch-all")

    for error in errors:
        print(f"check_alerts.py: {error}", file=sys.stderr)
    if errors:
        return 1
    print(f"check_alerts.py: {len(rules)} alerts labelled, tested both ways and routed; runbook anchors:")
    for anchor in anchors:
        print(f"  docs/runbook.md#{anchor}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
