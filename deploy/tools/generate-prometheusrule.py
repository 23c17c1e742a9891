#!/usr/bin/env python3
"""Writes deploy/kubernetes/monitoring/prometheusrule.yaml from deploy/prometheus/alerts.yml.

    generate-prometheusrule.py           write the file
    generate-prometheusrule.py --check   exit 1 if the committed file differs from what it would write

The rule groups are embedded verbatim (comments included: each threshold's reason travels with
it), so the PrometheusRule's spec is exactly alerts.yml, which promtool tests.
"""

import argparse
import sys
from pathlib import Path

import yaml

DEPLOY = Path(__file__).resolve().parent.parent
SOURCE = DEPLOY / "prometheus" / "alerts.yml"
TARGET = DEPLOY / "kubernetes" / "monitoring" / "prometheusrule.yaml"

HEADER = """\
# GENERATED from deploy/prometheus/alerts.yml by deploy/tools/generate-prometheusrule.py:
# do not edit. Edit alerts.yml (and its tests, alerts_test.yml), then run the generator;
# scripts/check-deploy.sh fails while the two differ.
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: causal-commit
  namespace: causal-commit
  labels:
    app.kubernetes.io/name: causal-commit
    app.kubernetes.io/part-of: causal-commit
spec:
"""


def render() -> str:
    lines = SOURCE.read_text().splitlines()
    # alerts.yml's own header comment (before "groups:") describes that file; drop it.
    start = next(i for i, line in enumerate(lines) if line.startswith("groups:"))
    body = "".join(("  " + line if line.strip() else "") + "\n" for line in lines[start:])
    text = HEADER + body
    # The embedding must be exact: same rules, same expressions, same labels and annotations.
    assert yaml.safe_load(text)["spec"] == yaml.safe_load(SOURCE.read_text()), "embedding changed the rules"
    return text


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args()
    text = render()
    if args.check:
        if not TARGET.exists() or TARGET.read_text() != text:
            print(f"{TARGET.relative_to(DEPLOY.parent)} is out of date with {SOURCE.relative_to(DEPLOY.parent)}: "
                  "run deploy/tools/generate-prometheusrule.py", file=sys.stderr)
            return 1
        print(f"{TARGET.relative_to(DEPLOY.parent)} matches {SOURCE.relative_to(DEPLOY.parent)}")
        return 0
    TARGET.write_text(text)
    print(f"wrote {TARGET.relative_to(DEPLOY.parent)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
