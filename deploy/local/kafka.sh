#!/usr/bin/env bash
# A real single-node Apache Kafka broker (KRaft, combined broker+controller) for tests and the
# demo, run from the jars on Maven Central: no tarball, no Docker.
#
#   kafka.sh fetch [VERSION]
#       Resolve kafka_2.13:VERSION and a log4j2 binding into
#       ${KAFKA_CACHE:-<repo>/.cache/kafka}/VERSION/libs (idempotent; marker file on success).
#   kafka.sh start --dir DIR [--port P] [--controller-port C] [--version V] [--timeout S]
#                  [--watch-pid PID] [--prop KEY=VALUE]...
#                  [--listener NAME:PROTOCOL]... [--no-plaintext] [--inter-broker NAME]
#                  [--controller-protocol PROTOCOL] [--scram SPEC]... [--ready-tls CA[,CERT,KEY]]
#       Write DIR/server.properties, format DIR/data, start the broker in the background
#       (pid in DIR/kafka.pid, logs in DIR/logs/), wait until it serves requests, then print
#       `BOOTSTRAP=127.0.0.1:P` on stdout. Free ports are chosen when not given; on a restart of
#       the same DIR the previous ports, cluster id and version are reused (DIR/broker.env).
#       --watch-pid PID: stop the broker when process PID ends (a test runner that dies).
#       --prop KEY=VALUE: extra server.properties lines (repeatable; last one wins).
#       Secured brokers (TLS, mutual TLS, SASL; the TLS and SASL properties come with --prop):
#       --listener NAME:PROTOCOL  one more listener (PROTOCOL: PLAINTEXT, SSL, SASL_PLAINTEXT,
#           SASL_SSL) on a free port, advertised on 127.0.0.1; printed as LISTENER_NAME=host:port.
#       --no-plaintext  no PLAINTEXT listener: the first --listener is the bootstrap (P).
#       --inter-broker NAME  the listener the broker uses to reach itself (default: the first).
#       --controller-protocol PROTOCOL  of the CONTROLLER listener (default PLAINTEXT).
#       --scram SPEC  a SCRAM credential created at format time, e.g.
#           'SCRAM-SHA-512=[name=alice,password=alice-secret]' (repeatable; first start only).
#       --ready-tls CA[,CERT,KEY]  PEM files the readiness probe uses when the bootstrap listener
#           speaks TLS (CA to verify the broker; CERT/KEY when it requires a client certificate).
#   kafka.sh wait-ready --dir DIR [--timeout S]
#       Wait until the broker in DIR serves requests (exit 1 with the log tail if not).
#   kafka.sh stop --dir DIR [--timeout S]     SIGTERM, wait (30 s), then SIGKILL. Idempotent.
#   kafka.sh kill --dir DIR                   SIGKILL at once (fault tests). Idempotent.
#   kafka.sh status --dir DIR                 exit 0 and print BOOTSTRAP=... (and LISTENER_...)
#                                             when running.
#
# Environment: KAFKA_VERSION (default version), KAFKA_CACHE (jar cache), KAFKA_HEAP_OPTS
# (default -Xms256m -Xmx512m), KAFKA_JVM_OPTS (extra JVM flags), MAVEN_OPTS / MVN (maven).
# Kafka 4.x needs Java 17+. Kafka 3.9.x works too (same KRaft properties and StorageTool flags).
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$SCRIPT_DIR/../.." && pwd)"
CONF_DIR="$SCRIPT_DIR/kafka"
POM="$CONF_DIR/pom.xml"
LOG4J_CONF="$CONF_DIR/log4j2.properties"
CACHE="${KAFKA_CACHE:-$REPO/.cache/kafka}"
MVN="${MVN:-mvn}"
HEAP_OPTS="${KAFKA_HEAP_OPTS:--Xms256m -Xmx512m}"
READY_TIMEOUT=90
STOP_TIMEOUT=30

die() { echo "kafka.sh: $*" >&2; exit 1; }
info() { echo "kafka.sh: $*" >&2; }

pom_default_version() {
  sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$POM" | head -n 1
}

default_version() {
  if [[ -n "${KAFKA_VERSION:-}" ]]; then echo "$KAFKA_VERSION"; else pom_default_version; fi
}

libs_dir() { echo "$CACHE/$1/libs"; }

# ---------------------------------------------------------------------------------------- fetch
fetch() {
  local version="$1"
  [[ "$version" =~ ^[0-9]+\.[0-9]+\.[0-9]+([.-][A-Za-z0-9.-]+)?$ ]] || die "bad version '$version'"
  local vdir="$CACHE/$version"
  local marker="$vdir/.complete"
  [[ -f "$marker" ]] && return 0
  command -v "$MVN" >/dev/null || die "maven ('$MVN') is needed to fetch Kafka jars"
  mkdir -p "$vdir"
  # Serialise concurrent first fetches of the same version (two test runs at once).
  exec 9>"$vdir/.lock"
  flock 9
  if [[ -f "$marker" ]]; then exec 9>&-; return 0; fi
  local tmp="$vdir/libs.partial.$$"
  local mvnlog="$vdir/mvn.log"
  rm -rf "$tmp" "$vdir/libs"
  info "resolving Apache Kafka $version from Maven Central (first run only, ~60 MB)..."
  local start=$SECONDS rc=0
  # mvn prints one "Downloaded from" line per file; show a dot for each so a human sees it move.
  # The full output goes to $mvnlog.
  "$MVN" -B -Dstyle.color=never -f "$POM" dependency:copy-dependencies \
      -Dkafka.version="$version" -DincludeScope=runtime -DoutputDirectory="$tmp" \
      -Dmdep.overWriteIfNewer=true 2>&1 \
    | tee "$mvnlog" \
    | awk '/Downloaded from/ { printf "." > "/dev/stderr"; fflush("/dev/stderr") }
           END { printf "\n" > "/dev/stderr" }' \
    || rc=$?
  if (( rc != 0 )) || ! compgen -G "$tmp/kafka_2.13-$version.jar" >/dev/null \
      || ! compgen -G "$tmp/log4j-core-*.jar" >/dev/null; then
    rm -rf "$tmp"
    tail -n 40 "$mvnlog" >&2 || true
    exec 9>&-
    die "could not resolve Apache Kafka $version (maven log: $mvnlog)"
  fi
  mv "$tmp" "$vdir/libs"
  date -u +%Y-%m-%dT%H:%M:%SZ >"$marker"
  exec 9>&-
  info "Apache Kafka $version ready in $vdir/libs ($((SECONDS - start)) s)"
}

# ------------------------------------------------------------------------------------- helpers
# Two distinct free loopback ports (bound at the same time, so they differ).
free_ports() {
  python3 - "$1" <<'PY'
import socket, sys
n = int(sys.argv[1])
socks = []
for _ in range(n):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
for s in socks:
    s.close()
PY
}

# 22 characters of URL-safe base64 of a random UUID; like Kafka's Uuid.randomUuid() never starting
# with "-", which the StorageTool's argument parser would take for an option.
new_cluster_id() {
  python3 - <<'PY'
import base64, uuid
while True:
    cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
    if not cid.startswith("-"):
        print(cid)
        break
PY
}

read_pid() {
  local pidfile="$1/kafka.pid"
  [[ -f "$pidfile" ]] || return 1
  local pid
  pid="$(cat "$pidfile" 2>/dev/null || true)"
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  echo "$pid"
}

# True when PID is a live (non-zombie) broker process started for DIR.
is_our_broker() {
  local pid="$1" dir="$2"
  [[ -r "/proc/$pid/cmdline" ]] || return 1
  local state
  state="$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null || echo X)"
  [[ "$state" != "Z" && "$state" != "X" ]] || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF -- "$dir/server.properties"
}

running_pid() {
  local dir="$1" pid
  pid="$(read_pid "$dir")" || return 1
  is_our_broker "$pid" "$dir" || return 1
  echo "$pid"
}

abs_dir() {
  mkdir -p "$1"
  (cd "$1" && pwd)
}

# Kafka ApiVersions v0 over a plain socket (or TLS: PROTOCOL SSL/SASL_SSL, with the CA[,CERT,KEY]
# PEM files of --ready-tls): proves the broker answers requests. stdlib only.
api_versions_ok() {
  python3 - "$1" "${2:-PLAINTEXT}" "${3:-}" <<'PY' 2>/dev/null
import socket, ssl, struct, sys
port, protocol, tls = int(sys.argv[1]), sys.argv[2], sys.argv[3]
client = b"kafka.sh"
body = struct.pack(">hhih", 18, 0, 1, len(client)) + client


def connect():
    raw = socket.create_connection(("127.0.0.1", port), timeout=2)
    if protocol not in ("SSL", "SASL_SSL"):
        return raw
    ca, _, rest = tls.partition(",")
    cert, _, key = rest.partition(",")
    ctx = ssl.create_default_context(cafile=ca or None)
    ctx.check_hostname = False  # a readiness probe on loopback, not a security check
    if not ca:
        ctx.verify_mode = ssl.CERT_NONE
    if cert:
        ctx.load_cert_chain(cert, key or None)
    return ctx.wrap_socket(raw, server_hostname="127.0.0.1")


try:
    with connect() as s:
        s.sendall(struct.pack(">i", len(body)) + body)
        head = b""
        while len(head) < 10:
            chunk = s.recv(10 - len(head))
            if not chunk:
                sys.exit(1)
            head += chunk
    _size, corr, err = struct.unpack(">iih", head)
    sys.exit(0 if corr == 1 and err == 0 else 1)
except (OSError, ValueError):
    sys.exit(1)
PY
}

log_tail() {
  local dir="$1"
  for f in "$dir/logs/kafka.out" "$dir/logs/format.log"; do
    if [[ -s "$f" ]]; then
      echo "---- tail of $f ----" >&2
      tail -n 60 "$f" >&2
    fi
  done
}

load_env() {
  # DIR/broker.env: PORT, CONTROLLER_PORT, VERSION, CLUSTER_ID of the last start in DIR.
  local envfile="$1/broker.env"
  PREV_PORT="" PREV_CONTROLLER_PORT="" PREV_VERSION="" PREV_CLUSTER_ID="" PREV_LOG_OFFSET=0
  PREV_LISTENERS="" PREV_READY_PROTOCOL="PLAINTEXT" PREV_READY_TLS=""
  [[ -f "$envfile" ]] || return 0
  local key value
  while IFS='=' read -r key value; do
    case "$key" in
      PORT) PREV_PORT="$value" ;;
      CONTROLLER_PORT) PREV_CONTROLLER_PORT="$value" ;;
      VERSION) PREV_VERSION="$value" ;;
      CLUSTER_ID) PREV_CLUSTER_ID="$value" ;;
      LOG_OFFSET) PREV_LOG_OFFSET="$value" ;;
      LISTENERS) PREV_LISTENERS="$value" ;;
      READY_PROTOCOL) PREV_READY_PROTOCOL="$value" ;;
      READY_TLS) PREV_READY_TLS="$value" ;;
    esac
  done <"$envfile"
}

# Wait until the broker in DIR logged "Kafka Server started" (after LOG_OFFSET, i.e. in this
# run) and answers ApiVersions. Returns 0 ready, 1 timeout, 2 process died, 3 port in use.
wait_ready_dir() {
  local dir="$1" timeout="$2"
  load_env "$dir"
  local port="$PREV_PORT" offset="$PREV_LOG_OFFSET"
  [[ -n "$port" ]] || return 2
  local out="$dir/logs/kafka.out"
  local deadline=$((SECONDS + timeout))
  while :; do
    local pid
    if ! pid="$(running_pid "$dir")"; then
      if tail -c "+$((offset + 1))" "$out" 2>/dev/null | grep -q "Address already in use"; then
        return 3
      fi
      return 2
    fi
    if tail -c "+$((offset + 1))" "$out" 2>/dev/null | grep -q "Kafka Server started" \
        && api_versions_ok "$port" "$PREV_READY_PROTOCOL" "$PREV_READY_TLS"; then
      return 0
    fi
    (( SECONDS < deadline )) || return 1
    sleep 0.2
  done
}

# ----------------------------------------------------------------------------------- commands
# Uses LNAMES/LPROTOS/LPORTS (the listeners), CONTROLLER_PROTOCOL and INTER_BROKER.
write_properties() {
  local dir="$1" cport="$2" i listeners="" advertised="" map="CONTROLLER:$CONTROLLER_PROTOCOL"
  for i in "${!LNAMES[@]}"; do
    listeners+="${LNAMES[$i]}://127.0.0.1:${LPORTS[$i]},"
    advertised+="${advertised:+,}${LNAMES[$i]}://127.0.0.1:${LPORTS[$i]}"
    map+=",${LNAMES[$i]}:${LPROTOS[$i]}"
  done
  cat >"$dir/server.properties" <<EOF
# Written by deploy/local/kafka.sh: one-node combined broker+controller on loopback.
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$cport
listeners=${listeners}CONTROLLER://127.0.0.1:$cport
advertised.listeners=$advertised
controller.listener.names=CONTROLLER
inter.broker.listener.name=$INTER_BROKER
listener.security.protocol.map=$map
log.dirs=$dir/data
num.partitions=1
offsets.topic.replication.factor=1
offsets.topic.num.partitions=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
EOF
  if ((${#EXTRA_PROPS[@]})); then
    echo "# extra (--prop)" >>"$dir/server.properties"
    printf '%s\n' "${EXTRA_PROPS[@]}" >>"$dir/server.properties"
  fi
}

# The port LISTENERS (NAME:PROTOCOL:PORT,...) of broker.env gave listener NAME, or "".
previous_port() {
  local name="$1" entry
  local -a entries
  IFS=',' read -r -a entries <<<"$PREV_LISTENERS"
  for entry in "${entries[@]}"; do
    if [[ "${entry%%:*}" == "$name" ]]; then
      echo "${entry##*:}"
      return 0
    fi
  done
}

cmd_start() {
  local dir="" port="" cport="" version="" timeout="$READY_TIMEOUT" watch_pid=""
  local plaintext=1 ready_tls="" spec
  local -a extra_listeners=() scram=()
  EXTRA_PROPS=() CONTROLLER_PROTOCOL=PLAINTEXT INTER_BROKER=""
  while (($#)); do
    case "$1" in
      --dir) dir="${2:?--dir needs a value}"; shift 2 ;;
      --port) port="${2:?--port needs a value}"; shift 2 ;;
      --controller-port) cport="${2:?--controller-port needs a value}"; shift 2 ;;
      --version) version="${2:?--version needs a value}"; shift 2 ;;
      --timeout) timeout="${2:?--timeout needs a value}"; shift 2 ;;
      --watch-pid) watch_pid="${2:?--watch-pid needs a value}"; shift 2 ;;
      --prop)
        [[ "${2:-}" == *=* ]] || die "start: --prop needs KEY=VALUE"
        EXTRA_PROPS+=("$2"); shift 2 ;;
      --listener)
        [[ "${2:-}" =~ ^[A-Z][A-Z0-9_]*:(PLAINTEXT|SSL|SASL_PLAINTEXT|SASL_SSL)$ ]] \
          || die "start: --listener needs NAME:PROTOCOL (NAME in capitals, PROTOCOL one of PLAINTEXT, SSL, SASL_PLAINTEXT, SASL_SSL)"
        [[ "${2%%:*}" != CONTROLLER ]] || die "start: the listener name CONTROLLER is taken"
        extra_listeners+=("$2"); shift 2 ;;
      --no-plaintext) plaintext=0; shift ;;
      --inter-broker) INTER_BROKER="${2:?--inter-broker needs a value}"; shift 2 ;;
      --controller-protocol)
        [[ "${2:-}" =~ ^(PLAINTEXT|SSL|SASL_PLAINTEXT|SASL_SSL)$ ]] \
          || die "start: --controller-protocol needs PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL"
        CONTROLLER_PROTOCOL="$2"; shift 2 ;;
      --scram) scram+=("${2:?--scram needs a value}"); shift 2 ;;
      --ready-tls) ready_tls="${2:?--ready-tls needs CA[,CERT,KEY]}"; shift 2 ;;
      *) die "start: unknown argument '$1'" ;;
    esac
  done
  [[ -n "$dir" ]] || die "start: --dir DIR is required"
  dir="$(abs_dir "$dir")"
  if running_pid "$dir" >/dev/null; then
    die "start: a broker is already running for $dir (pid $(read_pid "$dir")); stop it first"
  fi
  load_env "$dir"
  [[ -n "$version" ]] || version="${PREV_VERSION:-$(default_version)}"
  [[ -n "$cport" ]] || cport="$PREV_CONTROLLER_PORT"
  local cluster_id="${PREV_CLUSTER_ID:-$(new_cluster_id)}"

  # The listeners: PLAINTEXT first unless --no-plaintext, then each --listener, in order.
  LNAMES=() LPROTOS=() LPORTS=()
  ((plaintext)) && { LNAMES+=(PLAINTEXT); LPROTOS+=(PLAINTEXT); }
  for spec in "${extra_listeners[@]}"; do
    [[ " ${LNAMES[*]} " != *" ${spec%%:*} "* ]] || die "start: listener ${spec%%:*} given twice"
    LNAMES+=("${spec%%:*}"); LPROTOS+=("${spec#*:}")
  done
  ((${#LNAMES[@]})) || die "start: --no-plaintext needs at least one --listener"
  [[ -n "$INTER_BROKER" ]] || INTER_BROKER="${LNAMES[0]}"
  [[ " ${LNAMES[*]} " == *" $INTER_BROKER "* ]] \
    || die "start: --inter-broker $INTER_BROKER names no listener"
  local i
  for i in "${!LNAMES[@]}"; do LPORTS[i]="$(previous_port "${LNAMES[$i]}")"; done
  [[ -n "$port" ]] || port="${PREV_PORT:-${LPORTS[0]}}"
  LPORTS[0]="$port"
  local -a fixed=("${LPORTS[@]}")
  local fixed_cport="$cport"

  fetch "$version"
  local libs
  libs="$(libs_dir "$version")"
  mkdir -p "$dir/logs" "$dir/data"
  java -version >/dev/null 2>&1 || die "java (17+) is needed"
  local -a format_args=()
  for spec in "${scram[@]}"; do format_args+=(--add-scram "$spec"); done

  local attempt rc auto_ports
  for attempt in 1 2 3; do
    # Free ports for every listener (and the controller) without one; all bound at once.
    auto_ports=0
    local -a missing=()
    for i in "${!LPORTS[@]}"; do [[ -n "${LPORTS[$i]}" ]] || missing+=("$i"); done
    [[ -n "$cport" ]] || missing+=(controller)
    if ((${#missing[@]})); then
      auto_ports=1
      local -a ports
      read -r -a ports <<<"$(free_ports "${#missing[@]}")"
      for i in "${!missing[@]}"; do
        if [[ "${missing[$i]}" == controller ]]; then
          cport="${ports[$i]}"
        else
          LPORTS[missing[i]]="${ports[$i]}"
        fi
      done
    fi
    port="${LPORTS[0]}"
    write_properties "$dir" "$cport"
    # shellcheck disable=SC2086  # HEAP_OPTS / KAFKA_JVM_OPTS are word lists on purpose
    if ! java $HEAP_OPTS -cp "$libs/*" -Dlog4j2.configurationFile="$LOG4J_CONF" \
        -Dkafka.logs.dir="$dir/logs" kafka.tools.StorageTool format -t "$cluster_id" \
        -c "$dir/server.properties" --ignore-formatted "${format_args[@]}" \
        >"$dir/logs/format.log" 2>&1; then
      log_tail "$dir"
      die "start: formatting $dir/data failed"
    fi
    local offset=0 listeners_env=""
    [[ -f "$dir/logs/kafka.out" ]] && offset="$(stat -c %s "$dir/logs/kafka.out")"
    for i in "${!LNAMES[@]}"; do
      listeners_env+="${listeners_env:+,}${LNAMES[$i]}:${LPROTOS[$i]}:${LPORTS[$i]}"
    done
    {
      echo "PORT=$port"
      echo "CONTROLLER_PORT=$cport"
      echo "VERSION=$version"
      echo "CLUSTER_ID=$cluster_id"
      echo "LOG_OFFSET=$offset"
      echo "LISTENERS=$listeners_env"
      echo "READY_PROTOCOL=${LPROTOS[0]}"
      echo "READY_TLS=$ready_tls"
    } >"$dir/broker.env"
    info "starting Apache Kafka $version on 127.0.0.1:$port (controller $cport) in $dir"
    # stdin/stdout/stderr detached so a caller capturing our output is not held open by java.
    # shellcheck disable=SC2086
    nohup java $HEAP_OPTS ${KAFKA_JVM_OPTS:-} -Djava.awt.headless=true \
      -cp "$libs/*" -Dlog4j2.configurationFile="$LOG4J_CONF" -Dkafka.logs.dir="$dir/logs" \
      kafka.Kafka "$dir/server.properties" </dev/null >>"$dir/logs/kafka.out" 2>&1 &
    local bpid=$!
    echo "$bpid" >"$dir/kafka.pid"
    [[ -z "$watch_pid" ]] || start_watchdog "$watch_pid" "$bpid" "$dir"
    rc=0
    wait_ready_dir "$dir" "$timeout" || rc=$?
    case "$rc" in
      0)
        echo "BOOTSTRAP=127.0.0.1:$port"
        print_listeners "$dir"
        return 0 ;;
      3)
        if ((auto_ports)) && ((attempt < 3)); then
          info "port taken meanwhile; retrying with other ports"
          LPORTS=("${fixed[@]}") cport="$fixed_cport"
          continue
        fi ;;
    esac
    log_tail "$dir"
    stop_dir "$dir" 5 >/dev/null 2>&1 || true
    case "$rc" in
      1) die "start: broker not ready within ${timeout} s" ;;
      3) die "start: a port of $dir/server.properties is already in use" ;;
      *) die "start: broker process exited" ;;
    esac
  done
}

# LISTENER_<NAME>=127.0.0.1:<port> for each listener of the last start (from broker.env).
print_listeners() {
  load_env "$1"
  local entry name rest
  local -a entries
  IFS=',' read -r -a entries <<<"$PREV_LISTENERS"
  for entry in "${entries[@]}"; do
    name="${entry%%:*}" rest="${entry#*:}"
    echo "LISTENER_${name}=127.0.0.1:${rest#*:}"
  done
}

# Background watcher: when WATCHED ends while the broker BPID still runs, stop the broker.
# It ends by itself when the broker ends first (stop, kill, restart).
start_watchdog() {
  local watched="$1" bpid="$2" dir="$3"
  # shellcheck disable=SC2016  # the script expands its own positional arguments
  nohup bash -c '
    watched="$1" bpid="$2" props="$3/server.properties"
    ours() { tr "\0" " " <"/proc/$bpid/cmdline" 2>/dev/null | grep -qF -- "$props"; }
    # Until the background job runs java, its command line is not yet the broker one: wait
    # for that first (else the loop below ends at once and stops the broker as it starts).
    for _ in $(seq 1 100); do ours && break; kill -0 "$bpid" 2>/dev/null || exit 0; sleep 0.1; done
    while kill -0 "$watched" 2>/dev/null && ours; do sleep 1; done
    if ours; then
      kill -TERM "$bpid" 2>/dev/null
      for _ in $(seq 1 150); do ours || exit 0; sleep 0.2; done
      kill -KILL "$bpid" 2>/dev/null
    fi' kafka-watchdog "$watched" "$bpid" "$dir" </dev/null >/dev/null 2>&1 &
}

stop_dir() {
  local dir="$1" timeout="$2" pid
  if ! pid="$(running_pid "$dir")"; then
    rm -f "$dir/kafka.pid"
    return 0
  fi
  kill -TERM "$pid" 2>/dev/null || true
  local deadline=$((SECONDS + timeout))
  while is_our_broker "$pid" "$dir"; do
    if ((SECONDS >= deadline)); then
      info "broker $pid did not stop within ${timeout} s; SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
      local kdeadline=$((SECONDS + 10))
      while is_our_broker "$pid" "$dir" && ((SECONDS < kdeadline)); do sleep 0.1; done
      break
    fi
    sleep 0.1
  done
  rm -f "$dir/kafka.pid"
}

parse_dir_timeout() {
  # sets DIR and TIMEOUT from --dir/--timeout
  DIR="" TIMEOUT="$2"
  shift 2
  while (($#)); do
    case "$1" in
      --dir) DIR="${2:?--dir needs a value}"; shift 2 ;;
      --timeout) TIMEOUT="${2:?--timeout needs a value}"; shift 2 ;;
      *) die "$CMD: unknown argument '$1'" ;;
    esac
  done
  [[ -n "$DIR" ]] || die "$CMD: --dir DIR is required"
  [[ -d "$DIR" ]] || { DIR="$(pwd)/$DIR"; return 0; }
  DIR="$(cd "$DIR" && pwd)"
}

cmd_stop() {
  parse_dir_timeout "$CMD" "$STOP_TIMEOUT" "$@"
  [[ -d "$DIR" ]] || return 0
  stop_dir "$DIR" "$TIMEOUT"
}

cmd_kill() {
  parse_dir_timeout "$CMD" 10 "$@"
  [[ -d "$DIR" ]] || return 0
  local pid
  if pid="$(running_pid "$DIR")"; then
    kill -KILL "$pid" 2>/dev/null || true
    local deadline=$((SECONDS + TIMEOUT))
    while is_our_broker "$pid" "$DIR" && ((SECONDS < deadline)); do sleep 0.05; done
  fi
  rm -f "$DIR/kafka.pid"
}

cmd_wait_ready() {
  parse_dir_timeout "$CMD" "$READY_TIMEOUT" "$@"
  local rc=0
  wait_ready_dir "$DIR" "$TIMEOUT" || rc=$?
  if ((rc == 0)); then
    load_env "$DIR"
    echo "BOOTSTRAP=127.0.0.1:$PREV_PORT"
    return 0
  fi
  log_tail "$DIR"
  case "$rc" in
    1) die "wait-ready: broker not ready within ${TIMEOUT} s" ;;
    *) die "wait-ready: broker is not running" ;;
  esac
}

cmd_status() {
  parse_dir_timeout "$CMD" 0 "$@"
  running_pid "$DIR" >/dev/null || { info "not running"; return 1; }
  load_env "$DIR"
  echo "BOOTSTRAP=127.0.0.1:$PREV_PORT"
  print_listeners "$DIR"
}

CMD="${1:-}"
(($#)) && shift
case "$CMD" in
  fetch)
    (($# <= 1)) || die "usage: kafka.sh fetch [VERSION]"
    v="${1:-$(default_version)}"
    fetch "$v"
    libs_dir "$v" ;;
  start) cmd_start "$@" ;;
  stop) cmd_stop "$@" ;;
  kill) cmd_kill "$@" ;;
  wait-ready) cmd_wait_ready "$@" ;;
  status) cmd_status "$@" ;;
  *)
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}" >&2
    exit 2 ;;
esac
