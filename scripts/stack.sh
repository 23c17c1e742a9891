#!/usr/bin/env bash
# Local infrastructure for causal-commit: a single-node Kafka 4.x (KRaft), Redis
# and PostgreSQL, all on 127.0.0.1, with every file we own under <repo>/.stack/.
#
# Usage: scripts/stack.sh COMMAND
#   install          install missing Debian packages and the Kafka runtime jars
#   up               install, then start every service that is not answering
#   down             stop the services that this script started (data kept)
#   status           one line per service: running / stopped / external
#   start SERVICE    start one service and wait until it answers
#   stop SERVICE     stop one service (tests use it to simulate outages)
#   reset            down, wipe Kafka and Redis data, recreate the database
#   env              print the environment the project reads (eval-able)
# SERVICE is kafka, redis or postgres.
#
# "external" means something we did not start answers on the port: we use it
# but never stop it. Marker files (.stack/<service>/started-by-stack) record
# what we started, so `down` leaves everything else alone.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(cd "$SCRIPT_DIR/.." && pwd)
STACK_DIR=$REPO_DIR/.stack
DEPLOY_KAFKA=$REPO_DIR/deploy/kafka

HOST=127.0.0.1
KAFKA_PORT=9092
KAFKA_CONTROLLER_PORT=9093
REDIS_PORT=6379
PG_PORT=5432
DB_NAME=causal_commit
DB_USER=causal_commit
DB_PASSWORD=causal_commit

# name:partitions, all with replication factor 1 (one broker).
KAFKA_TOPICS=(intents:12 side-effects:12 intents.manual-review:3)

KAFKA_DIR=$STACK_DIR/kafka
KAFKA_LIBS=$KAFKA_DIR/libs
KAFKA_DATA=$KAFKA_DIR/data
KAFKA_PROPS=$KAFKA_DIR/server.properties
KAFKA_LOG=$KAFKA_DIR/kafka.log
KAFKA_PID=$KAFKA_DIR/kafka.pid
KAFKA_CLUSTER_ID=$KAFKA_DIR/cluster-id
KAFKA_START_TIMEOUT=90
KAFKA_STOP_GRACE=60

REDIS_DIR=$STACK_DIR/redis
REDIS_PID=$REDIS_DIR/redis.pid

PG_START_TIMEOUT=60

APT_PACKAGES=(redis-server postgresql protobuf-compiler kcat libcurl4-openssl-dev
  libssl-dev libsasl2-dev zlib1g-dev libzstd-dev pkg-config cmake build-essential)

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

# True when the pid in file $1 is running AND its command line contains $2, so
# a stale pid file (reboot, pid reuse) is never mistaken for our process.
pid_alive() {
  local pid
  [[ -s $1 ]] || return 1
  pid=$(<"$1")
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  proc_running "$pid" || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q -- "$2"
}

# Wait up to $2 seconds for process $1 to exit. Returns 1 on timeout.
wait_pid_gone() {
  local deadline=$((SECONDS + $2))
  while proc_running "$1"; do
    ((SECONDS < deadline)) || return 1
    sleep 0.2
  done
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

need_cmd() { command -v "$1" >/dev/null 2>&1 || die "'$1' not found; run: scripts/stack.sh install"; }

# Kafka 4.x needs Java 17+. JAVA_HOME wins (CI can point it at a newer JDK).
java_bin() {
  if [[ -n ${JAVA_HOME:-} && -x $JAVA_HOME/bin/java ]]; then
    printf '%s\n' "$JAVA_HOME/bin/java"
  else
    command -v java || die "java not found (Kafka needs Java 17+)"
  fi
}

# ---------------------------------------------------------------------------
# install

apt_installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }

install_apt_packages() {
  local missing=() p
  for p in "${APT_PACKAGES[@]}"; do
    apt_installed "$p" || missing+=("$p")
  done
  if ((${#missing[@]} == 0)); then
    log "debian packages: all present"
    return
  fi
  ((EUID == 0)) || die "missing debian packages (need root to install): ${missing[*]}"
  log "debian packages: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
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

cmd_install() {
  install_apt_packages
  install_kafka_libs
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

# The generated properties are rewritten on every start so edits to the
# template take effect; absolute paths are fine there (.stack is git-ignored).
kafka_render_config() {
  local text
  text=$(<"$DEPLOY_KAFKA/server.properties.in")
  printf '%s\n' "${text//@KAFKA_DATA_DIR@/$KAFKA_DATA}" >"$KAFKA_PROPS"
}

# KRaft needs its log directory formatted once with a cluster id. The id is
# generated here (16 random bytes, URL-safe base64, as Kafka's Uuid prints it)
# instead of via `StorageTool random-uuid`, which would cost a JVM start.
kafka_format_storage() {
  if [[ -f $KAFKA_DATA/meta.properties ]]; then
    return
  fi
  if [[ ! -s $KAFKA_CLUSTER_ID ]]; then
    head -c 16 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=\n' >"$KAFKA_CLUSTER_ID"
  fi
  log "kafka: formatting storage (cluster id $(<"$KAFKA_CLUSTER_ID"))"
  mkdir -p "$KAFKA_DATA"
  kafka_tool kafka.tools.StorageTool format --standalone \
    -t "$(<"$KAFKA_CLUSTER_ID")" -c "$KAFKA_PROPS" >/dev/null ||
    die "kafka: formatting storage failed (output above; config .stack/kafka/server.properties)"
}

kafka_launch() {
  local port
  # A clear message beats a BindException buried in the broker log.
  for port in "$KAFKA_PORT" "$KAFKA_CONTROLLER_PORT"; do
    ! port_open "$port" || die "kafka: port $HOST:$port is taken by another process"
  done
  rm -f "$KAFKA_PID"
  printf '==== stack.sh: starting kafka at %s ====\n' "$(date '+%F %T')" >>"$KAFKA_LOG"
  # setsid: own session, so the broker outlives this shell and its process
  # group; the inner shell writes its pid and execs java, so the pid file
  # holds the JVM's pid whatever setsid does about forking.
  # shellcheck disable=SC2016 # $$ and $1 belong to the inner shell
  setsid bash -c 'echo $$ >"$1"; shift; exec "$@"' _ "$KAFKA_PID" \
    "$(java_bin)" -Xms512m -Xmx1g -XX:+UseG1GC -XX:MaxGCPauseMillis=20 \
    -XX:+ExitOnOutOfMemoryError -Djava.awt.headless=true \
    -cp "$KAFKA_LIBS/*" -Dlog4j2.configurationFile="$DEPLOY_KAFKA/log4j2.properties" \
    kafka.Kafka "$KAFKA_PROPS" >>"$KAFKA_LOG" 2>&1 </dev/null 9>&- &
  wait_for 10 test -s "$KAFKA_PID" || die "kafka: launcher did not write its pid file"
}

# On a failed start the cause is usually an exception well above the last
# lines, so show the errors logged since our start marker, then the tail.
kafka_show_start_log() {
  {
    echo "---- errors logged by this start of kafka ----"
    sed -n '/^==== stack.sh: starting kafka/,$p' "$KAFKA_LOG" |
      grep -E ' (ERROR|FATAL) |Exception: |^Caused by:' | tail -n 15
    echo "---- last lines of .stack/kafka/kafka.log ----"
    tail -n 15 "$KAFKA_LOG"
  } >&2 2>/dev/null || true
}

kafka_wait_ready() {
  local deadline=$((SECONDS + KAFKA_START_TIMEOUT))
  until kafka_answers; do
    if ! kafka_ours; then
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
    if kafka_answers; then
      log "kafka: already running (pid $(<"$KAFKA_PID"))"
    else
      log "kafka: already starting (pid $(<"$KAFKA_PID")), waiting until it answers"
      kafka_wait_ready
    fi
    return
  fi
  if kafka_answers; then
    log "kafka: external broker answers on $HOST:$KAFKA_PORT, using it"
    return
  fi
  [[ -f $KAFKA_LIBS/kafka_2.13-$(kafka_version).jar ]] || install_kafka_libs
  need_cmd kcat
  mkdir -p "$KAFKA_DIR"
  kafka_render_config
  kafka_format_storage
  log "kafka: starting on $HOST:$KAFKA_PORT (controller $KAFKA_CONTROLLER_PORT)"
  kafka_launch
  mark_started kafka
  kafka_wait_ready
  log "kafka: ready (pid $(<"$KAFKA_PID"))"
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
  local pid
  pid=$(<"$KAFKA_PID")
  log "kafka: stopping (pid $pid)"
  # SIGTERM runs Kafka's controlled shutdown (flushes logs, clean restart).
  kill -TERM "$pid" 2>/dev/null || true
  if ! wait_pid_gone "$pid" "$KAFKA_STOP_GRACE"; then
    warn "kafka: still running after ${KAFKA_STOP_GRACE}s, sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    wait_pid_gone "$pid" 10 || die "kafka: pid $pid survived SIGKILL"
  fi
  rm -f "$KAFKA_PID"
  unmark_started kafka
  log "kafka: stopped"
}

kafka_status() {
  if kafka_ours; then
    if kafka_answers; then
      status_line kafka running "$KAFKA_PORT" "pid $(<"$KAFKA_PID")"
    else
      status_line kafka starting "$KAFKA_PORT" "pid $(<"$KAFKA_PID"), not answering yet"
    fi
  elif kafka_answers; then
    status_line kafka external "$KAFKA_PORT" "not started by stack.sh"
  else
    status_line kafka stopped "$KAFKA_PORT"
  fi
}

# ---------------------------------------------------------------------------
# Redis: Debian's redis-server binary with our own config and files.

redis_answers() { redis-cli -h "$HOST" -p "$REDIS_PORT" ping 2>/dev/null | grep -q PONG; }
redis_ours() { pid_alive "$REDIS_PID" redis-server; }

redis_write_config() {
  mkdir -p "$REDIS_DIR"
  cat >"$REDIS_DIR/redis.conf" <<EOF
# Generated by scripts/stack.sh; rewritten on every start.
port $REDIS_PORT
bind $HOST
protected-mode yes
daemonize yes
dir $REDIS_DIR
pidfile $REDIS_PID
logfile $REDIS_DIR/redis.log
# Throwaway local data: no snapshots, no AOF.
save ""
appendonly no
EOF
}

redis_start() {
  if redis_answers; then
    if redis_ours; then
      log "redis: already running (pid $(<"$REDIS_PID"))"
    else
      log "redis: external server answers on $HOST:$REDIS_PORT, using it"
    fi
    return
  fi
  need_cmd redis-server
  redis_write_config
  log "redis: starting on $HOST:$REDIS_PORT"
  redis-server "$REDIS_DIR/redis.conf" >/dev/null 9>&-
  mark_started redis
  if ! wait_for 20 redis_answers; then
    tail -n 20 "$REDIS_DIR/redis.log" >&2 || true
    die "redis did not answer within 20s (log: .stack/redis/redis.log)"
  fi
  log "redis: ready (pid $(<"$REDIS_PID"))"
}

# `redis_stop explicit` (the `stop redis` command, used by outage tests) also shuts down a
# server that stack.sh did not start; `down` never does.
redis_stop() {
  if ! redis_ours; then
    unmark_started redis
    if redis_answers; then
      if [[ ${1:-} == explicit ]]; then
        warn "redis: shutting down the server on $HOST:$REDIS_PORT that stack.sh did not start"
        redis-cli -h "$HOST" -p "$REDIS_PORT" shutdown nosave >/dev/null 2>&1 || true
        wait_for 15 bash -c "! redis-cli -h $HOST -p $REDIS_PORT ping 2>/dev/null | grep -q PONG" \
          || die "redis: still answering 15s after SHUTDOWN"
        log "redis: stopped"
        return 0
      fi
      warn "redis: the server on $HOST:$REDIS_PORT was not started by stack.sh; not stopping it"
      return 1
    fi
    log "redis: not running"
    return 0
  fi
  local pid
  pid=$(<"$REDIS_PID")
  log "redis: stopping (pid $pid)"
  redis-cli -h "$HOST" -p "$REDIS_PORT" shutdown nosave >/dev/null 2>&1 || kill -TERM "$pid" 2>/dev/null || true
  if ! wait_pid_gone "$pid" 15; then
    warn "redis: still running after 15s, sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    wait_pid_gone "$pid" 5 || die "redis: pid $pid survived SIGKILL"
  fi
  rm -f "$REDIS_PID"
  unmark_started redis
  log "redis: stopped"
}

redis_status() {
  if redis_ours && redis_answers; then
    status_line redis running "$REDIS_PORT" "pid $(<"$REDIS_PID")"
  elif redis_answers; then
    status_line redis external "$REDIS_PORT" "not started by stack.sh"
  else
    status_line redis stopped "$REDIS_PORT"
  fi
}

# ---------------------------------------------------------------------------
# PostgreSQL: Debian's cluster "<version> main", driven by pg_ctlcluster
# (initdb and postgres refuse to run as root; pg_ctlcluster switches user).

pg_version() {
  local v
  v=$(find /etc/postgresql -mindepth 1 -maxdepth 1 -type d -printf '%f\n' 2>/dev/null | sort -V | tail -n1)
  [[ -n $v ]] || v=$(find /usr/lib/postgresql -mindepth 1 -maxdepth 1 -type d -printf '%f\n' 2>/dev/null | sort -V | tail -n1)
  [[ -n $v ]] || die "postgresql: no server installed; run: scripts/stack.sh install"
  printf '%s\n' "$v"
}

pg_cluster_exists() { [[ -f /etc/postgresql/$1/main/postgresql.conf ]]; }
pg_cluster_running() { pg_ctlcluster "$1" main status >/dev/null 2>&1; }
pg_answers() { pg_isready -q -h "$HOST" -p "$PG_PORT" 2>/dev/null; }

# psql as the postgres superuser; cd / avoids "could not change directory".
pg_admin() { (cd / && runuser -u postgres -- psql -X -q -v ON_ERROR_STOP=1 -d postgres "$@"); }

pg_ensure_cluster() {
  local v=$1 port
  if ! pg_cluster_exists "$v"; then
    log "postgres: creating cluster $v/main on port $PG_PORT"
    pg_createcluster "$v" main --port "$PG_PORT" >/dev/null
  fi
  port=$(pg_conftool -s "$v" main show port 2>/dev/null || echo "$PG_PORT")
  [[ $port == "$PG_PORT" ]] ||
    die "postgres: cluster $v/main is configured for port $port, the project expects $PG_PORT (fix /etc/postgresql/$v/main/postgresql.conf)"
}

pg_start() {
  local v
  v=$(pg_version)
  if pg_cluster_exists "$v" && pg_cluster_running "$v"; then
    if started_by_us postgres; then
      log "postgres: already running (cluster $v/main)"
    else
      log "postgres: cluster $v/main already running (external), using it"
    fi
  elif pg_answers; then
    log "postgres: external server answers on $HOST:$PG_PORT, using it"
    return
  else
    pg_ensure_cluster "$v"
    log "postgres: starting cluster $v/main on $HOST:$PG_PORT"
    pg_ctlcluster "$v" main start 9>&-
    mark_started postgres
  fi
  wait_for "$PG_START_TIMEOUT" pg_answers ||
    die "postgres did not answer on $HOST:$PG_PORT within ${PG_START_TIMEOUT}s (see /var/log/postgresql/)"
}

# Idempotent: role (password re-set every time, cheap) and database.
pg_provision() {
  pg_admin <<SQL
DO \$\$
BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '$DB_USER') THEN
    CREATE ROLE $DB_USER LOGIN CREATEDB PASSWORD '$DB_PASSWORD';
  ELSE
    ALTER ROLE $DB_USER LOGIN CREATEDB PASSWORD '$DB_PASSWORD';
  END IF;
END
\$\$;
SELECT 'CREATE DATABASE $DB_NAME OWNER $DB_USER'
  WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = '$DB_NAME')\gexec
SQL
  # What the project actually does: password auth over TCP on loopback.
  PGPASSWORD=$DB_PASSWORD PGCONNECT_TIMEOUT=5 psql -X -q -w -h "$HOST" -p "$PG_PORT" \
    -U "$DB_USER" -d "$DB_NAME" -tAc 'select 1' >/dev/null ||
    die "postgres: password login as $DB_USER over TCP failed (check pg_hba.conf: host ... $HOST/32 scram-sha-256)"
  log "postgres: database $DB_NAME ready for user $DB_USER"
}

# `down` only stops what we started; an explicit `stop postgres` (outage tests)
# stops Debian's cluster whoever started it, because it is the same cluster.
pg_stop() {
  local v explicit=${1:-}
  v=$(pg_version)
  if ! pg_cluster_exists "$v" || ! pg_cluster_running "$v"; then
    unmark_started postgres
    if pg_answers; then
      warn "postgres: the server on $HOST:$PG_PORT is not Debian's cluster $v/main; not stopping it"
      return 1
    fi
    log "postgres: not running"
    return 0
  fi
  if ! started_by_us postgres && [[ $explicit != explicit ]]; then
    log "postgres: cluster $v/main was not started by stack.sh; leaving it running"
    return 0
  fi
  log "postgres: stopping cluster $v/main"
  pg_ctlcluster "$v" main stop -m fast
  unmark_started postgres
  log "postgres: stopped"
}

pg_reset_db() {
  local v was_running=yes
  v=$(pg_version)
  pg_cluster_exists "$v" || return 0
  pg_cluster_running "$v" || was_running=no
  [[ $was_running == yes ]] || pg_start
  log "postgres: dropping and recreating database $DB_NAME"
  pg_admin -c "DROP DATABASE IF EXISTS $DB_NAME WITH (FORCE)"
  pg_provision
  [[ $was_running == yes ]] || pg_stop
}

pg_status() {
  local v
  v=$(pg_version)
  if pg_cluster_exists "$v" && pg_cluster_running "$v" && pg_answers; then
    if started_by_us postgres; then
      status_line postgres running "$PG_PORT" "cluster $v/main"
    else
      status_line postgres external "$PG_PORT" "cluster $v/main, not started by stack.sh"
    fi
  elif pg_answers; then
    status_line postgres external "$PG_PORT" "not Debian's cluster $v/main"
  else
    status_line postgres stopped "$PG_PORT"
  fi
}

# ---------------------------------------------------------------------------
# commands

status_line() { printf '%-9s %-9s %s:%s%s\n' "$1" "$2" "$HOST" "$3" "${4:+  ($4)}"; }

# Serialise commands that change state, so two test suites calling `up` at
# once do not both format Kafka or start two brokers. Every daemon we launch
# gets "9>&-" so it does not inherit (and hold forever) this lock.
take_lock() {
  mkdir -p "$STACK_DIR"
  exec 9>"$STACK_DIR/.lock"
  flock -w 300 9 || die "another stack.sh has held .stack/.lock for 300s"
}

check_service() {
  case ${1:-} in
    kafka | redis | postgres) ;;
    *) die "unknown service '${1:-}' (expected kafka, redis or postgres)" ;;
  esac
}

cmd_up() {
  local t0=$SECONDS
  cmd_install
  pg_start
  pg_provision
  redis_start
  kafka_start
  kafka_create_topics
  log "up: done in $((SECONDS - t0))s"
}

# Kafka first: its controlled shutdown is the slowest and nothing depends on it.
cmd_down() {
  local rc=0
  if started_by_us kafka || kafka_ours; then kafka_stop || rc=1; else log "kafka: not started by stack.sh"; fi
  if started_by_us redis || redis_ours; then redis_stop || rc=1; else log "redis: not started by stack.sh"; fi
  if started_by_us postgres; then pg_stop || rc=1; else log "postgres: not started by stack.sh"; fi
  return "$rc"
}

cmd_status() {
  kafka_status
  redis_status
  pg_status
}

cmd_start() {
  check_service "$1"
  case $1 in
    kafka)
      kafka_start
      kafka_create_topics
      ;;
    redis) redis_start ;;
    postgres) pg_start ;;
  esac
}

cmd_stop() {
  check_service "$1"
  case $1 in
    kafka) kafka_stop ;;
    redis) redis_stop explicit ;;
    postgres) pg_stop explicit ;;
  esac
}

cmd_reset() {
  cmd_down || true
  if kafka_ours || redis_ours; then
    die "reset: a service is still running; not deleting its data"
  fi
  log "reset: deleting Kafka data (libs kept) and Redis data"
  rm -rf "$KAFKA_DATA" "$KAFKA_CLUSTER_ID" "$KAFKA_PROPS" "$KAFKA_LOG" "$KAFKA_PID"
  rm -rf "$REDIS_DIR"
  pg_reset_db
  log "reset: done; next 'up' formats Kafka afresh"
}

cmd_env() {
  cat <<EOF
export CC_KAFKA_BROKERS=$HOST:$KAFKA_PORT
export CC_REDIS_URL=redis://$HOST:$REDIS_PORT
export CC_DATABASE_URL=postgres://$DB_USER:$DB_PASSWORD@$HOST:$PG_PORT/$DB_NAME
EOF
}

usage() {
  sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"
}

main() {
  local cmd=${1:-}
  case $cmd in
    install | up | down | reset)
      take_lock
      "cmd_$cmd"
      ;;
    start | stop)
      [[ $# -eq 2 ]] || die "usage: stack.sh $cmd kafka|redis|postgres"
      take_lock
      "cmd_$cmd" "$2"
      ;;
    status) cmd_status ;;
    env) cmd_env ;;
    -h | --help | help) usage ;;
    *)
      usage >&2
      exit 2
      ;;
  esac
}

main "$@"
