#!/usr/bin/env bash
# Offline checks of everything under deploy/: alert rules and their unit tests, Alertmanager
# routing, the Grafana dashboard's and the rules' PromQL, the Dockerfile, the compose file and
# the Kubernetes manifests. Nothing is fetched at run time except, on the first run, the tools:
#   - promtool and amtool, extracted from Debian's prometheus and prometheus-alertmanager
#     packages into .stack/tools (no daemon installed, nothing started);
#   - the pinned Python tools of deploy/tools/requirements.txt in the venv .stack/venv/deploy.
# Idempotent; a warm run takes seconds. Exit status: non-zero when any check fails.
#
# Usage: scripts/check-deploy.sh            (make check-deploy)
set -euo pipefail

REPO_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
STACK_DIR=$REPO_DIR/.stack
VENV=$STACK_DIR/venv/deploy
TOOLS=$STACK_DIR/tools
REQUIREMENTS=$REPO_DIR/deploy/tools/requirements.txt
# Kubernetes versions the manifests must validate against: the oldest we support, the newest
# the schemas know.
KUBERNETES_VERSIONS=(1.30 1.37)

log() { printf 'check-deploy: %s\n' "$*"; }
die() {
  printf 'check-deploy: ERROR: %s\n' "$*" >&2
  exit 1
}

# ---------------------------------------------------------------------------------- tools

install_python_tools() {
  local stamp=$VENV/.requirements.sha256 want
  want=$(sha256sum "$REQUIREMENTS" | cut -d' ' -f1)
  if [[ -x $VENV/bin/python && -f $stamp && $(cat "$stamp") == "$want" ]]; then
    return
  fi
  log "installing the Python tools into ${VENV#"$REPO_DIR"/}"
  python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
    die "python3 3.11 or newer is needed (tomllib)"
  if ! python3 -m venv --help >/dev/null 2>&1 || ! python3 -c 'import ensurepip' 2>/dev/null; then
    apt-get update -qq && apt-get install -y -qq --no-install-recommends python3-venv >/dev/null
  fi
  mkdir -p "$(dirname "$VENV")"
  [[ -x $VENV/bin/python ]] || python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check -r "$REQUIREMENTS"
  printf '%s\n' "$want" >"$stamp"
}

# promtool and amtool come with Debian's server packages; installing those would start the
# daemons, so the two binaries are taken out of the .deb files instead.
install_prometheus_tools() {
  if [[ -x $TOOLS/bin/promtool && -x $TOOLS/bin/amtool ]]; then
    return
  fi
  command -v apt-get >/dev/null || die "promtool and amtool come from Debian packages: apt-get is needed"
  log "extracting promtool and amtool from Debian's packages into ${TOOLS#"$REPO_DIR"/}"
  local tmp
  tmp=$(mktemp -d)
  # shellcheck disable=SC2064 # expand now: tmp is local
  trap "rm -rf '$tmp'" RETURN
  if ! (cd "$tmp" && apt-get download prometheus prometheus-alertmanager >/dev/null 2>&1); then
    apt-get update -qq
    (cd "$tmp" && apt-get download prometheus prometheus-alertmanager >/dev/null 2>&1) ||
      die "apt-get download prometheus prometheus-alertmanager failed"
  fi
  for deb in "$tmp"/*.deb; do dpkg-deb -x "$deb" "$tmp/root"; done
  mkdir -p "$TOOLS/bin"
  install -m 0755 "$tmp/root/usr/bin/promtool" "$tmp/root/usr/bin/amtool" "$TOOLS/bin/"
}

# ---------------------------------------------------------------------------------- checks

PASSED=0
FAILED=()
OUT=$(mktemp)
trap 'rm -f "$OUT"' EXIT

# check NAME COMMAND...: runs one check, shows its output only when it fails.
check() {
  local name=$1
  shift
  if "$@" >"$OUT" 2>&1; then
    PASSED=$((PASSED + 1))
    printf 'check-deploy: ok    %s\n' "$name"
  else
    FAILED+=("$name")
    printf 'check-deploy: FAIL  %s\n' "$name"
    sed 's/^/    /' "$OUT"
  fi
}

# Files that must not name this machine's paths or a registry host (deploy/kafka/ is the local
# broker's, not ours).
no_machine_paths_or_registries() {
  local files hits
  mapfile -t files < <(cd "$REPO_DIR" && git ls-files -co --exclude-standard -- \
    deploy .dockerignore scripts/check-deploy.sh | grep -v '^deploy/kafka/')
  ((${#files[@]})) || return 1
  if hits=$(cd "$REPO_DIR" && grep -nIE \
    "((^|[[:space:]\"'=:(])/(work|root|home|var/tmp)/|(docker\\.io|quay\\.io|gcr\\.io|ghcr\\.io|registry\\.k8s\\.io|k8s\\.gcr\\.io|public\\.ecr\\.aws|mcr\\.microsoft\\.com)/)" \
    "${files[@]}"); then
    printf '%s\n' "$hits"
    return 1
  fi
}

kubernetes_schemas() {
  local version files
  mapfile -t files < <(cd "$REPO_DIR" && find deploy/kubernetes -maxdepth 1 -name '*.yaml' ! -name kustomization.yaml | sort)
  for version in "${KUBERNETES_VERSIONS[@]}"; do
    (cd "$REPO_DIR" && "$VENV/bin/kubernetes-validate" --strict --quiet -k "$version" "${files[@]}") || return 1
  done
}

# The ConfigMap's config.toml through the real configuration loader, when a binary is built
# (make build / make release); skipped otherwise.
configmap_with_binary() {
  local bin="" candidate toml
  for candidate in target/release/causal-commit target/debug/causal-commit; do
    [[ -x $candidate ]] && bin=$candidate && break
  done
  if [[ -z $bin ]]; then
    echo "no target/*/causal-commit: skipped"
    return 0
  fi
  toml=$(mktemp --suffix=.toml)
  "$VENV/bin/python" -c 'import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))["data"]["config.toml"])' \
    deploy/kubernetes/configmap.yaml >"$toml"
  env -u CAUSAL_COMMIT_CONFIG CAUSAL_COMMIT__INSTANCE_ID=causal-commit-0 \
    "$bin" show-config --config "$toml" >/dev/null || {
    rm -f "$toml"
    return 1
  }
  rm -f "$toml"
}

main() {
  cd "$REPO_DIR"
  install_python_tools
  install_prometheus_tools
  local py=$VENV/bin/python promtool=$TOOLS/bin/promtool amtool=$TOOLS/bin/amtool
  log "$("$promtool" --version 2>&1 | head -1); $("$amtool" --version 2>&1 | head -1)"

  check "alert rules parse (promtool check rules)" "$promtool" check rules deploy/prometheus/alerts.yml
  check "alert rule unit tests (promtool test rules)" "$promtool" test rules deploy/prometheus/alerts_test.yml
  check "alert labels, test coverage both ways, routing (amtool)" "$py" deploy/tools/check_alerts.py --amtool "$amtool"
  check "example Prometheus config (promtool check config)" "$promtool" check config deploy/prometheus/prometheus.yml
  check "Alertmanager config (amtool check-config)" "$amtool" check-config deploy/alertmanager/alertmanager.yml
  check "PromQL checker catches bad expressions (selftest)" "$py" deploy/tools/promql.py selftest --promtool "$promtool"
  check "dashboard and rule PromQL: parse, metrics, labels" "$py" deploy/tools/promql.py check --promtool "$promtool" --strict-source
  check "PrometheusRule is generated from alerts.yml" "$py" deploy/tools/generate-prometheusrule.py --check
  check "Kubernetes schemas (kubernetes-validate ${KUBERNETES_VERSIONS[*]})" kubernetes_schemas
  check "manifests and compose fit together, CRD schemas" "$py" deploy/tools/check_manifests.py
  check "manifest checker catches broken copies (selftest)" "$py" deploy/tools/check_manifests.py --selftest
  check "compose file (compose-spec schema)" "$VENV/bin/check-jsonschema" --builtin-schema vendor.compose-spec deploy/docker-compose.yml
  check "Dockerfile lint (hadolint)" "$VENV/bin/hadolint" deploy/Dockerfile
  check "ConfigMap config.toml loads in causal-commit (if built)" configmap_with_binary
  check "no machine paths or registry hosts in deploy files" no_machine_paths_or_registries

  local name
  for name in "${FAILED[@]}"; do
    log "failed: $name"
  done
  log "${PASSED} passed, ${#FAILED[@]} failed"
  ((${#FAILED[@]} == 0))
}

main "$@"
