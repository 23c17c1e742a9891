#!/usr/bin/env python3
"""Offline checks of deploy/docker-compose.yml and deploy/kubernetes/ beyond their schemas.

The schemas (compose-spec, Kubernetes) say a file is well formed; this says the pieces fit:

Kubernetes
  - ServiceMonitor and PrometheusRule validate against the prometheus-operator CRD schemas
    vendored in deploy/kubernetes/schemas/ (strict: unknown fields are errors, as with kubectl's
    strict field validation);
  - each kustomization lists every manifest of its folder (except the ones it documents as
    applied separately) and only files that exist;
  - selectors (Services, PodDisruptionBudget, ServiceMonitor) select the StatefulSet's pods,
    the StatefulSet's serviceName is a headless Service, named ports exist;
  - every ConfigMap and Secret a pod uses is defined (configmap.yaml, secrets.example.yaml), every
    ..._FILE variable points into a mounted Secret at a key that Secret has, the runtime pods
    never mount the owner-role Secret, every container has resource requests and runs as
    non-root, probes use /livez and /readyz;
  - the ConfigMap's config.toml uses only keys of config/default.toml, no reserved librdkafka
    key and no credential or instance_id.
Compose
  - every file it mounts or takes a secret from exists, secrets have no trailing newline;
  - depends_on names services; ports publish on 127.0.0.1 only; images carry a version tag;
  - the processors have distinct instance ids, the migration uses the owner-role URL and the
    processors the runtime one.
Both
  - every CAUSAL_COMMIT__* variable names a key of config/default.toml (or its ..._FILE form).
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

import jsonschema
import yaml

# --selftest runs the checks on mutated copies: CHECK_MANIFESTS_ROOT points at such a copy.
REPO = Path(os.environ.get("CHECK_MANIFESTS_ROOT") or Path(__file__).resolve().parent.parent.parent)
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "kubernetes"
COMPOSE = DEPLOY / "docker-compose.yml"
DEFAULT_CONFIG = REPO / "config" / "default.toml"

# Keys the lead has fixed that config/default.toml may not list yet.
UPCOMING_KEYS = {"redis.ca_file"}
# librdkafka settings causal-commit sets itself and refuses under [kafka.client] (src/config.rs).
RESERVED_CLIENT_KEYS = {"bootstrap.servers", "group.id", "transactional.id", "enable.auto.commit",
                        "enable.auto.offset.store", "isolation.level",
                        "partition.assignment.strategy", "group.protocol"}
SECRET_KEYS = {"postgres.url", "redis.url", "admin.token", "kafka.client.sasl.password"}
# Applied on their own, documented in kustomization.yaml.
NOT_IN_KUSTOMIZATION = {"secrets.example.yaml", "migrate-job.yaml"}

errors: list[str] = []


def error(where: str, message: str) -> None:
    errors.append(f"{where}: {message}")


def rel(path: Path) -> str:
    return str(path.relative_to(REPO))


# ------------------------------------------------------------------------ configuration keys


def config_keys() -> set[str]:
    def walk(table: dict, prefix: str) -> set[str]:
        keys = set()
        for key, value in table.items():
            if isinstance(value, dict):
                keys |= walk(value, f"{prefix}{key}.")
            else:
                keys.add(prefix + key)
        return keys

    keys = walk(tomllib.loads(DEFAULT_CONFIG.read_text()), "") | UPCOMING_KEYS
    return keys | {"kafka.client"}


KEYS = config_keys()


def env_key(name: str) -> str | None:
    """The configuration key a CAUSAL_COMMIT__ variable sets, or None if it sets none."""
    parts = name.removeprefix("CAUSAL_COMMIT__").lower().split("__")
    if parts[:2] == ["kafka", "client"] and len(parts) == 3 and parts[2]:
        return "kafka.client." + parts[2].removesuffix("_file").replace("_", ".")
    key = ".".join(parts)
    if key in KEYS:
        return key
    if key.endswith("_file") and key.removesuffix("_file") in KEYS:
        return key.removesuffix("_file")
    return None


def check_env(where: str, env: dict[str, str]) -> None:
    for name in env:
        if name.startswith("CAUSAL_COMMIT__") and env_key(name) is None:
            error(where, f"{name} names no key of {rel(DEFAULT_CONFIG)}")
        if name.startswith("CAUSAL_COMMIT__") and not name.endswith("_FILE"):
            key = env_key(name)
            if key in SECRET_KEYS:
                error(where, f"{name} passes a credential as a value: use {name}_FILE")


def check_config_toml(where: str, text: str) -> None:
    try:
        config = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        error(where, f"config.toml does not parse: {e}")
        return

    def walk(table: dict, prefix: str) -> None:
        for key, value in table.items():
            full = prefix + key
            if full == "kafka.client":
                for client_key in value:
                    if client_key in RESERVED_CLIENT_KEYS:
                        error(where, f"[kafka.client] sets {client_key!r}, which causal-commit sets itself")
                    if "kafka.client." + client_key in SECRET_KEYS:
                        error(where, f"[kafka.client] holds the credential {client_key!r}")
            elif isinstance(value, dict):
                walk(value, full + ".")
            elif full not in KEYS:
                error(where, f"config.toml key {full!r} is not in {rel(DEFAULT_CONFIG)}")
            elif full in SECRET_KEYS or full == "instance_id":
                error(where, f"config.toml sets {full!r}: it must come from the pod (Secret, pod name)")

    walk(config, "")


# ------------------------------------------------------------------------ Kubernetes


def load_k8s() -> dict[Path, list[dict]]:
    docs = {}
    for path in sorted(K8S.rglob("*.yaml")):
        docs[path] = [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def strict(schema):
    """Unknown fields become errors, except where Kubernetes keeps unknown fields."""
    if isinstance(schema, dict):
        schema = {k: strict(v) for k, v in schema.items()}
        if schema.get("type") == "object" and "properties" in schema \
                and not schema.get("x-kubernetes-preserve-unknown-fields") \
                and "additionalProperties" not in schema:
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    return schema


def crd_validators() -> dict[tuple[str, str], jsonschema.protocols.Validator]:
    validators = {}
    for path in sorted((K8S / "schemas").glob("*.json")):
        schema = json.loads(path.read_text())
        gvk = schema["x-kubernetes-group-version-kind"]
        # metadata is the generic ObjectMeta, validated by the API server; the CRD leaves it open.
        schema = strict(copy.deepcopy(schema))
        schema["properties"]["metadata"] = {"type": "object"}
        validators[(f"{gvk['group']}/{gvk['version']}", gvk["kind"])] = \
            jsonschema.Draft7Validator(schema)
    return validators


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def check_kubernetes() -> None:
    docs = load_k8s()
    objects = [(path, d) for path, ds in docs.items() for d in ds]
    by_kind: dict[str, list[tuple[Path, dict]]] = {}
    for path, d in objects:
        by_kind.setdefault(d.get("kind", "?"), []).append((path, d))

    # CRDs against the vendored schemas.
    validators = crd_validators()
    for path, d in objects:
        validator = validators.get((d.get("apiVersion"), d.get("kind")))
        if validator is None:
            if d.get("apiVersion", "").startswith("monitoring.coreos.com"):
                error(rel(path), f"no vendored schema for {d.get('apiVersion')} {d.get('kind')}")
            continue
        for e in sorted(validator.iter_errors(d), key=lambda e: list(e.path)):
            error(rel(path), f"{d['kind']} {'.'.join(map(str, e.path))}: {e.message}")

    # Kustomizations list exactly their folder's manifests.
    for path, d in objects:
        if d.get("kind") != "Kustomization":
            continue
        listed = set(d.get("resources", []))
        present = {p.name for p in path.parent.glob("*.yaml")} - {"kustomization.yaml"}
        for name in sorted(listed - present):
            error(rel(path), f"lists {name}, which does not exist")
        for name in sorted(present - listed - NOT_IN_KUSTOMIZATION):
            error(rel(path), f"does not list {name}")

    configmaps = {d["metadata"]["name"]: d for _, d in by_kind.get("ConfigMap", [])}
    secrets = {d["metadata"]["name"]: d for _, d in by_kind.get("Secret", [])}
    services = {d["metadata"]["name"]: d for _, d in by_kind.get("Service", [])}
    for name, cm in configmaps.items():
        if "config.toml" in cm.get("data", {}):
            check_config_toml(f"ConfigMap {name}", cm["data"]["config.toml"])

    statefulsets = by_kind.get("StatefulSet", [])
    if len(statefulsets) != 1:
        error("deploy/kubernetes", f"expected one StatefulSet, found {len(statefulsets)}")
        return
    sts_path, sts = statefulsets[0]
    pod_labels = sts["spec"]["template"]["metadata"]["labels"]
    if not matches(sts["spec"]["selector"]["matchLabels"], pod_labels):
        error(rel(sts_path), "the selector does not match the pod template's labels")
    governing = services.get(sts["spec"]["serviceName"])
    if governing is None or governing["spec"].get("clusterIP") != "None":
        error(rel(sts_path), f"serviceName {sts['spec']['serviceName']!r} is not a headless Service")

    for path, d in by_kind.get("Service", []):
        if not matches(d["spec"]["selector"], pod_labels):
            error(rel(path), f"Service {d['metadata']['name']} selects no causal-commit pod")
    for path, d in by_kind.get("PodDisruptionBudget", []):
        if not matches(d["spec"]["selector"]["matchLabels"], pod_labels):
            error(rel(path), "the PodDisruptionBudget selects no causal-commit pod")
    for path, d in by_kind.get("ServiceMonitor", []):
        selected = [s for s in services.values()
                    if matches(d["spec"]["selector"]["matchLabels"], s["metadata"].get("labels", {}))]
        if not selected:
            error(rel(path), "the ServiceMonitor selects no Service")
        for s in selected:
            ports = {p["name"] for p in s["spec"]["ports"]}
            for endpoint in d["spec"]["endpoints"]:
                if endpoint["port"] not in ports:
                    error(rel(path), f"Service {s['metadata']['name']} has no port {endpoint['port']!r}")
            job = s["metadata"].get("labels", {}).get(d["spec"].get("jobLabel", ""), s["metadata"]["name"])
            if job != "causal-commit":
                error(rel(path), f"scraped series get job={job!r}; the alert rules expect job=\"causal-commit\"")

    pods = [(sts_path, "StatefulSet", sts["spec"]["template"]["spec"])]
    pods += [(p, "Job", d["spec"]["template"]["spec"]) for p, d in by_kind.get("Job", [])]
    for path, kind, pod in pods:
        check_pod(f"{rel(path)} ({kind})", kind, pod, configmaps, secrets)

    env = {e["name"]: e.get("value", "") for e in sts["spec"]["template"]["spec"]["containers"][0]["env"]}
    instance = next((e for e in sts["spec"]["template"]["spec"]["containers"][0]["env"]
                     if e["name"] == "CAUSAL_COMMIT__INSTANCE_ID"), None)
    if not instance or instance.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") != "metadata.name":
        error(rel(sts_path), "CAUSAL_COMMIT__INSTANCE_ID must come from the pod name (metadata.name)")
    del env


def check_pod(where: str, kind: str, pod: dict, configmaps: dict, secrets: dict) -> None:
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    security = pod.get("securityContext", {})
    if not security.get("runAsNonRoot"):
        error(where, "the pod does not require runAsNonRoot")
    for v in volumes.values():
        if "configMap" in v and v["configMap"]["name"] not in configmaps:
            error(where, f"volume {v['name']}: ConfigMap {v['configMap']['name']!r} is not defined")
        if "secret" in v:
            name = v["secret"]["secretName"]
            if name not in secrets:
                error(where, f"volume {v['name']}: Secret {name!r} is not defined (secrets.example.yaml)")
            if kind == "StatefulSet" and name == "causal-commit-migrate":
                error(where, "the processors mount the owner-role Secret: only the migrate Job may")
    for c in pod["containers"]:
        cw = f"{where} container {c['name']}"
        image = c.get("image", "")
        if not re.fullmatch(r"causal-commit:[\w.-]+", image):
            error(cw, f"image {image!r} is not causal-commit:<tag> (kustomization.yaml rewrites it)")
        if not c.get("resources", {}).get("requests"):
            error(cw, "no resource requests")
        if c.get("securityContext", {}).get("allowPrivilegeEscalation") is not False:
            error(cw, "allowPrivilegeEscalation is not false")
        ports = {p["name"] for p in c.get("ports", [])}
        for probe_name, path in (("livenessProbe", "/livez"), ("startupProbe", "/livez"),
                                 ("readinessProbe", "/readyz")):
            probe = c.get(probe_name)
            if kind == "StatefulSet" and probe is None:
                error(cw, f"no {probe_name}")
            if probe:
                if probe["httpGet"]["path"] != path:
                    error(cw, f"{probe_name} should probe {path}, not {probe['httpGet']['path']}")
                if probe["httpGet"]["port"] not in ports:
                    error(cw, f"{probe_name} probes port {probe['httpGet']['port']!r}, not a named port")
        mounts = {m["mountPath"].rstrip("/"): volumes.get(m["name"]) for m in c.get("volumeMounts", [])}
        for m in c.get("volumeMounts", []):
            if m["name"] not in volumes:
                error(cw, f"mounts undefined volume {m['name']!r}")
        env = {e["name"]: e.get("value", "") for e in c.get("env", [])}
        check_env(cw, env)
        for name, value in env.items():
            if name.endswith("_FILE"):
                directory, _, key = value.rpartition("/")
                volume = mounts.get(directory)
                if volume is None or "secret" not in volume:
                    error(cw, f"{name}={value} is not in a mounted Secret")
                    continue
                secret = secrets.get(volume["secret"]["secretName"])
                if secret and key not in (secret.get("stringData", {}) | secret.get("data", {})):
                    error(cw, f"{name}: Secret {secret['metadata']['name']} has no key {key!r}")
            if name == "CAUSAL_COMMIT_CONFIG":
                directory, _, key = value.rpartition("/")
                volume = mounts.get(directory)
                if volume is None or "configMap" not in volume or \
                        key not in configmaps.get(volume["configMap"]["name"], {}).get("data", {}):
                    error(cw, f"CAUSAL_COMMIT_CONFIG={value} is not a mounted ConfigMap key")


# ------------------------------------------------------------------------ compose


def check_compose() -> None:
    where = rel(COMPOSE)
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    declared_secrets = compose.get("secrets", {})
    for name, secret in declared_secrets.items():
        path = DEPLOY / secret["file"]
        if not path.is_file():
            error(where, f"secret {name}: {secret['file']} does not exist")
        elif path.read_bytes().endswith(b"\n"):
            error(where, f"secret {name}: {secret['file']} ends with a newline")
    for name, service in services.items():
        sw = f"{where} service {name}"
        image = service.get("image", "")
        if not re.fullmatch(r"[a-z0-9][a-z0-9._/-]*:[\w][\w.-]*", image) or image.endswith(":latest"):
            error(sw, f"image {image!r} has no version tag")
        if image.split("/")[0].count(".") and "/" in image:
            error(sw, f"image {image!r} names a registry host")
        for dep in service.get("depends_on", {}):
            if dep not in services:
                error(sw, f"depends on unknown service {dep!r}")
        for port in service.get("ports", []):
            if not str(port).startswith("127.0.0.1:"):
                error(sw, f"port {port!r} is published on every interface, not 127.0.0.1")
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith((".", "/")) and not (DEPLOY / source).exists():
                error(sw, f"mounts {source}, which does not exist")
        for secret in service.get("secrets", []):
            if secret not in declared_secrets:
                error(sw, f"uses undeclared secret {secret!r}")
        env = service.get("environment", {}) or {}
        check_env(sw, env)
        for key, value in env.items():
            if str(value).startswith("/run/secrets/"):
                secret = str(value).removeprefix("/run/secrets/")
                if secret not in service.get("secrets", []):
                    error(sw, f"{key} reads /run/secrets/{secret}, which the service does not mount")
        build = service.get("build")
        if build:
            dockerfile = (DEPLOY / build["context"] / build["dockerfile"]).resolve()
            if not dockerfile.is_file():
                error(sw, f"builds from {build['dockerfile']}, which does not exist")

    processors = {n: s for n, s in services.items() if s.get("command") == ["run"]}
    ids = [s["environment"].get("CAUSAL_COMMIT__INSTANCE_ID") for s in processors.values()]
    if len(processors) < 2 or None in ids or len(set(ids)) != len(ids):
        error(where, f"expected at least two processors with distinct instance ids, got {ids}")
    for name, s in processors.items():
        url = s["environment"].get("CAUSAL_COMMIT__POSTGRES__URL_FILE", "")
        if not url.endswith("postgres-app-url"):
            error(f"{where} service {name}", "the processors must use the runtime role (postgres-app-url)")
    migrate = [s for s in services.values() if s.get("command") == ["migrate"]]
    if len(migrate) != 1 or not migrate[0]["environment"].get(
            "CAUSAL_COMMIT__POSTGRES__URL_FILE", "").endswith("postgres-owner-url"):
        error(where, "expected one migrate service using the owner role (postgres-owner-url)")


# (file under the repository, text to replace, replacement, what the report must contain)
MUTATIONS = [
    ("deploy/kubernetes/monitoring/servicemonitor.yaml", "scrapeTimeout: 10s", "scrapeTimout: 10s",
     "scrapeTimout"),
    ("deploy/kubernetes/monitoring/prometheusrule.yaml", "  groups:", "  groupz:", "groupz"),
    ("deploy/kubernetes/kustomization.yaml", "  - pdb.yaml\n", "", "does not list pdb.yaml"),
    ("deploy/kubernetes/services.yaml", "  clusterIP: None\n", "", "not a headless Service"),
    ("deploy/kubernetes/pdb.yaml", "component: processor", "component: procesor", "selects no"),
    ("deploy/kubernetes/statefulset.yaml", "secretName: causal-commit-runtime",
     "secretName: causal-commit-migrate", "owner-role Secret"),
    ("deploy/kubernetes/statefulset.yaml", "/run/secrets/causal-commit/redis-url",
     "/run/secrets/causal-commit/redis-uri", "no key 'redis-uri'"),
    ("deploy/kubernetes/statefulset.yaml", "CAUSAL_COMMIT__ADMIN__TOKEN_FILE",
     "CAUSAL_COMMIT__ADMIN__TOKEN", "passes a credential as a value"),
    ("deploy/kubernetes/statefulset.yaml", "path: /readyz", "path: /livez", "should probe /readyz"),
    ("deploy/kubernetes/statefulset.yaml", "fieldPath: metadata.name", "fieldPath: metadata.uid",
     "pod name"),
    ("deploy/kubernetes/configmap.yaml", "    max_linger = ", "    max_lingr = ", "max_lingr"),
    ("deploy/kubernetes/configmap.yaml", '"sasl.username"', '"group.id"', "'group.id'"),
    ("deploy/kubernetes/configmap.yaml", "config.toml: |\n", 'config.toml: |\n    instance_id = "x"\n',
     "sets 'instance_id'"),
    ("deploy/kubernetes/configmap.yaml", "[redis]\n", '[redis]\n    url = "redis://x"\n',
     "sets 'redis.url'"),
    ("deploy/docker-compose.yml", "CAUSAL_COMMIT__INSTANCE_ID: processor-2",
     "CAUSAL_COMMIT__INSTANCE_ID: processor-1", "distinct instance ids"),
    ("deploy/docker-compose.yml", "CAUSAL_COMMIT__KAFKA__BROKERS: kafka:9092\n  CAUSAL",
     "CAUSAL_COMMIT__KAFKA__BROKER: kafka:9092\n  CAUSAL", "CAUSAL_COMMIT__KAFKA__BROKER names no key"),
    ("deploy/docker-compose.yml", '"127.0.0.1:9090:9090"', '"9090:9090"', "every interface"),
    ("deploy/docker-compose.yml", "image: redis:7.4-bookworm", "image: redis", "no version tag"),
    ("deploy/docker-compose.yml", "./prometheus/alerts.yml:", "./prometheus/alert.yml:", "does not exist"),
    ("deploy/docker-compose.yml", "CAUSAL_COMMIT__POSTGRES__URL_FILE: /run/secrets/postgres-owner-url",
     "CAUSAL_COMMIT__POSTGRES__URL_FILE: /run/secrets/postgres-app-url", "owner role"),
]


def selftest() -> int:
    failures = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for mutation in MUTATIONS:
            shutil.rmtree(root, ignore_errors=True)
            shutil.copytree(REPO / "deploy", root / "deploy")
            shutil.copytree(REPO / "config", root / "config")
            file, old, new, expected = mutation
            text = (root / file).read_text()
            if old not in text:
                failures.append(f"mutation does not apply to {file}: {old!r}")
                continue
            (root / file).write_text(text.replace(old, new, 1))
            run = subprocess.run([sys.executable, __file__], capture_output=True, text=True,
                                 env=dict(os.environ, CHECK_MANIFESTS_ROOT=str(root)))
            if run.returncode == 0 or expected not in run.stderr:
                failures.append(f"{file}: {old!r} -> {new!r} not reported as {expected!r}: {run.stderr.strip()}")
    for failure in failures:
        print(f"check_manifests.py selftest: {failure}", file=sys.stderr)
    if not failures:
        print(f"check_manifests.py selftest: {len(MUTATIONS)} broken copies reported")
    return 1 if failures else 0


def main() -> int:
    if sys.argv[1:] == ["--selftest"]:
        return selftest()
    check_kubernetes()
    check_compose()
    for e in errors:
        print(f"check_manifests.py: {e}", file=sys.stderr)
    if errors:
        return 1
    print("check_manifests.py: Kubernetes manifests (CRDs against the vendored schemas), kustomizations, "
          "compose file and configuration keys fit together")
    return 0


if __name__ == "__main__":
    sys.exit(main())
