#!/usr/bin/env bash
# Issue 13's benchmark, side by side in one session: what end-to-end
# encryption and three devices per user cost, and how fast the key service
# hands out keys.
#
#   bash benches/e2e/run.sh [--rounds 3] [--rates 1000,2000] [--users 100]
#        [--secs 10] [--keys-rounds 2] [--keys-secs 10] [--claimers 16]
#        [--out DIR] [--no-build] [--no-keys] [--no-chat]
#        [--broker PATH] [--loadgen PATH]
#
# chat: for each rate, ROUNDS rounds of three runs, the order rotated each
# round: `plain-1` (no e2e, 1 device per user: the baseline of issue 12),
# `plain-3` (no e2e, 3 devices: 5 deliveries per message) and `e2e-3`
# (--e2e --devices 3: 5 Olm ciphertexts per message). Each run has a fresh
# tern-broker (synced durability, the default) on 127.0.0.1 with a fresh
# data directory; the loadgen reads the broker's CPU from /proc
# (--broker-pid). keys: KEYS_ROUNDS rounds of `tern-loadgen keys` against
# one broker and against a 3-broker mesh (cluster CA and node certificates
# from `tern-broker cluster-ca`/`cluster-cert`, node 2 and 3 joining node 1;
# users and claimers spread over the three), alternated.
#
# Release binaries are built with scripts/release.sh (never a plain `cargo
# build --release`); --broker and --loadgen run other binaries (copies
# taken after the build, so a rebuild in the shared target directory
# cannot change them halfway). Every JSON report goes to OUT (default
# docs/bench/data/e2e), with runs.txt (the command lines, appended), tables.md (the
# medians) and headline.md (the short table RESULTS.md includes).
set -euo pipefail

usage() { sed -n '2,26p' "$0" | sed 's/^# \{0,1\}//'; }
ROUNDS=3 RATES=1000 USERS=100 SECS=10 KEYS_ROUNDS=2 KEYS_SECS=10 CLAIMERS=16 BUILD=1 KEYS=1 CHAT=1
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
OUT="$ROOT/docs/bench/data/e2e"
while [ $# -gt 0 ]; do
  case "$1" in
    --rounds) ROUNDS=${2:?}; shift ;;
    --rates) RATES=${2:?}; shift ;;
    --users) USERS=${2:?}; shift ;;
    --secs) SECS=${2:?}; shift ;;
    --keys-rounds) KEYS_ROUNDS=${2:?}; shift ;;
    --keys-secs) KEYS_SECS=${2:?}; shift ;;
    --claimers) CLAIMERS=${2:?}; shift ;;
    --out) OUT=${2:?}; shift ;;
    --no-build) BUILD=0 ;;
    --no-keys) KEYS=0 ;;
    --no-chat) CHAT=0 ;;
    --broker) BROKER_BIN=${2:?}; shift ;;
    --loadgen) LOADGEN_BIN=${2:?}; shift ;;
    -h | --help) usage; exit 0 ;;
    *) echo "e2e: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
for tool in python3 timeout; do
  command -v "$tool" >/dev/null || { echo "e2e: $tool not found" >&2; exit 1; }
done
if [ "$BUILD" = 1 ]; then
  "$ROOT/scripts/release.sh" build -p tern-broker -p tern-loadgen
fi
BROKER="${BROKER_BIN:-$ROOT/target/release/tern-broker}" LOADGEN="${LOADGEN_BIN:-$ROOT/target/release/tern-loadgen}"
for b in "$BROKER" "$LOADGEN"; do
  [ -x "$b" ] || { echo "e2e: $b is not built (drop --no-build)" >&2; exit 2; }
done
mkdir -p "$OUT"
echo "# $(date -u +%FT%TZ) $0 $*" >>"$OUT/runs.txt"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/tern-e2e.XXXXXX")
PIDS=()
stop_brokers() {
  local pid
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  PIDS=()
}
cleanup() { stop_brokers; rm -rf "$WORK"; }
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# wait_for WHAT SECS CMD...: polls CMD every 0.1 s, at most SECS seconds.
wait_for() {
  local what=$1 secs=$2 i
  shift 2
  for i in $(seq $((secs * 10))); do
    "$@" 2>/dev/null && return 0
    sleep 0.1
  done
  echo "e2e: timed out waiting for $what" >&2
  return 1
}
http_ok() { python3 -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=1)' "$1"; }
mesh_formed() {
  "$BROKER" mesh status --admin "127.0.0.1:$1" --json | python3 -c '
import json, sys
s = json.load(sys.stdin)
up = [m for m in s.get("members", []) if m.get("alive") and m.get("link") is not None]
sys.exit(0 if len(up) >= int(sys.argv[1]) else 1)' "$2"
}

# start DIR N: N fresh brokers on 127.0.0.1 (N > 1: a mesh). Sets TARGETS,
# CA (one PEM with every broker's certificate) and PIDS.
start() {
  local dir=$1 n=$2 i first="" ports=() admins=()
  mkdir -p "$dir"
  if [ "$n" -gt 1 ]; then
    "$BROKER" cluster-ca --out "$dir/ca" >/dev/null
    for i in $(seq "$n"); do
      "$BROKER" cluster-cert --ca "$dir/ca" --node "node-$i" --out "$dir/node-$i" >/dev/null
    done
  fi
  for i in $(seq "$n"); do
    ports+=("$(free_port)") admins+=("$(free_port)")
  done
  for i in $(seq "$n"); do
    local args=(--listen "127.0.0.1:${ports[$((i - 1))]}" --admin "127.0.0.1:${admins[$((i - 1))]}"
      --data-dir "$dir/data-$i" --durability synced)
    if [ "$n" -gt 1 ]; then
      args+=(--node "node-$i" --cluster "$dir/node-$i")
      [ -n "$first" ] && args+=(--join "$first")
    fi
    "$BROKER" "${args[@]}" >"$dir/broker-$i.log" 2>&1 &
    PIDS+=($!)
    [ -n "$first" ] || first="127.0.0.1:${ports[0]}"
  done
  TARGETS="" CA="$dir/ca.pem"
  : >"$CA"
  for i in $(seq "$n"); do
    wait_for "broker $i" 60 http_ok "http://127.0.0.1:${admins[$((i - 1))]}/healthz"
    cat "$dir/data-$i/tls/cert.pem" >>"$CA"
    TARGETS="${TARGETS:+$TARGETS,}tern://127.0.0.1:${ports[$((i - 1))]}"
  done
  if [ "$n" -gt 1 ]; then
    for i in $(seq "$n"); do
      wait_for "the mesh seen from node-$i" 60 mesh_formed "${admins[$((i - 1))]}" "$((n - 1))"
    done
  fi
}

# loadgen NAME ARGS...: one loadgen run against the brokers started, its
# JSON in OUT/NAME.json, its command line in runs.txt.
loadgen() {
  local name=$1
  shift
  local pids
  pids=$(IFS=,; echo "${PIDS[*]}")
  local cmd=("$LOADGEN" "$@" --target "$TARGETS" --ca "$CA" --broker-pid "$pids" --quiet --json "$OUT/$name.json")
  echo "$name: tern-loadgen ${cmd[*]:1}" | sed "s#$WORK#\$WORK#g" >>"$OUT/runs.txt"
  echo "e2e: $name" >&2
  # The whole machine's busy CPU over the run (other processes included),
  # so a run disturbed by something else on the machine shows.
  local busy0 t0=$SECONDS
  busy0=$(busy_jiffies)
  timeout 600 "${cmd[@]}" || echo "e2e: $name exited $?" >&2
  echo "$(( $(busy_jiffies) - busy0 )) $(getconf CLK_TCK) $((SECONDS - t0))" >"$OUT/$name.machine"
}
busy_jiffies() { awk '/^cpu / {print $2 + $3 + $4 + $7 + $8}' /proc/stat; }

config_args() {
  case "$1" in
    plain-1) echo "--devices 1" ;;
    plain-3) echo "--devices 3" ;;
    e2e-3) echo "--devices 3 --e2e" ;;
  esac
}

CONFIGS=(plain-1 plain-3 e2e-3)
if [ "$CHAT" = 1 ]; then
  IFS=, read -r -a rates <<<"$RATES"
  for rate in "${rates[@]}"; do
    for round in $(seq "$ROUNDS"); do
      for k in 0 1 2; do
        config=${CONFIGS[$(((round - 1 + k) % 3))]}
        start "$WORK/chat-$rate-$config-$round" 1
        # shellcheck disable=SC2046 # the config's flags split on purpose
        loadgen "chat-$rate-$config-$round" chat --users "$USERS" --rate "$rate" --duration "$SECS" --warmup 2 \
          $(config_args "$config")
        stop_brokers
      done
    done
  done
fi
if [ "$KEYS" = 1 ]; then
  for round in $(seq "$KEYS_ROUNDS"); do
    for n in 1 3; do
      start "$WORK/keys-$n-$round" "$n"
      loadgen "keys-$n-$round" keys --users "$USERS" --claimers "$CLAIMERS" --duration "$KEYS_SECS"
      stop_brokers
    done
  done
fi

# Every run in OUT counts (an earlier session's too, e.g. a rate added later).
python3 "$ROOT/benches/e2e/report.py" "$OUT" "$USERS"
