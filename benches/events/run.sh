#!/usr/bin/env bash
# What one chat message costs the broker in events: system calls by kind,
# context switches (thread wake-ups), UDP datagrams, store write batches and
# syncs, and CPU time, each divided by the messages delivered in the window.
# One fresh broker per rate (synced durability unless --durability says
# otherwise), `tern-loadgen chat` over USERS connections on 127.0.0.1, and
# `perf stat` attached to the broker for the middle of the run: CPU time,
# context switches, and system calls from the kernel's syscall tracepoints
# (which, unlike strace, do not slow the broker and so do not change how
# much it batches).
#
#   bash benches/events/run.sh [--rates 1000,2000,10000] [--users 100]
#        [--secs 10] [--durability synced|written|none] [--out DIR] [--no-build]
#        [--broker PATH] [--no-receipts]
#
# Writes OUT/events.json and OUT/events.md (a table per rate), OUT defaulting
# to target/events. --broker measures another tern-broker binary (for an
# A/B: run old and new alternately, each with its own --out).
# --no-receipts has the loadgen send every message asking for no delivered
# receipt (`Send.no_receipt`). Needs perf with tracepoint access (Debian:
# linux-perf; root, or kernel.perf_event_paranoid <= -1).
set -euo pipefail

usage() { sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'; }
RATES=1000,2000,10000 USERS=100 SECS=10 DURABILITY=synced BUILD=1
LOADGEN_ARGS=()
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
OUT="$ROOT/target/events"
while [ $# -gt 0 ]; do
  case "$1" in
    --rates) RATES=${2:?}; shift ;;
    --users) USERS=${2:?}; shift ;;
    --secs) SECS=${2:?}; shift ;;
    --durability) DURABILITY=${2:?}; shift ;;
    --out) OUT=${2:?}; shift ;;
    --no-build) BUILD=0 ;;
    --broker) BROKER_BIN=${2:?}; shift ;;
    --no-receipts) LOADGEN_ARGS+=(--no-receipts) ;;
    -h|--help) usage; exit 0 ;;
    *) echo "events: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
for tool in perf curl python3; do
  command -v "$tool" >/dev/null || { echo "events: $tool not found; install it (Debian: apt-get install linux-perf curl)" >&2; exit 1; }
done
# The system calls counted one by one (all of them are counted in total).
CALLS="sendmsg sendmmsg recvmsg recvmmsg futex epoll_wait write writev pwrite64 fdatasync fsync read"
EVENTS="task-clock,context-switches,cpu-migrations,page-faults,raw_syscalls:sys_enter"
for c in $CALLS; do EVENTS="$EVENTS,syscalls:sys_enter_$c"; done
perf stat -e "$EVENTS" -- true 2>/dev/null >/dev/null ||
  { echo "events: perf cannot count syscall tracepoints here (run as root, or lower kernel.perf_event_paranoid)" >&2; exit 1; }
if [ "$BUILD" = 1 ]; then
  "$ROOT/scripts/release.sh" build -p tern-broker -p tern-loadgen
fi
BROKER="${BROKER_BIN:-$ROOT/target/release/tern-broker}" LOADGEN="$ROOT/target/release/tern-loadgen"
mkdir -p "$OUT"

# WORK (removed on exit), free_port, stop_broker (BROKER_PID).
source "$ROOT/benches/ab/lib.sh"
udp() { awk '/^Udp: [0-9]/ {print $2, $5}' /proc/net/snmp; }

# one RATE: a fresh broker, the loadgen at RATE, perf attached to the broker
# for the measured window. Leaves $WORK/$RATE.{json,txt,udp*,metrics*}.
one() {
  local rate=$1 data="$WORK/data-$1" admin port
  port=$(free_port) admin=$(free_port)
  "$BROKER" --listen "127.0.0.1:$port" --admin "127.0.0.1:$admin" --data-dir "$data" \
    --durability "$DURABILITY" >"$WORK/broker-$rate.log" 2>&1 &
  BROKER_PID=$!
  for _ in $(seq 100); do [ -f "$data/tls/cert.pem" ] && break; sleep 0.1; done
  sleep 0.5
  # The loadgen registers and connects, warms up 2 s, then measures SECS.
  "$LOADGEN" chat --target "tern://127.0.0.1:$port" --ca "$data/tls/cert.pem" --users "$USERS" \
    --rate "$rate" --duration "$SECS" --warmup 2 --broker-pid "$BROKER_PID" --json "$WORK/$rate.json" --quiet "${LOADGEN_ARGS[@]}" &
  local lg=$!
  # Attach once the users are connected and warm: the window is the middle
  # SECS-2 seconds of the measured run.
  local settle=$(( 3 + USERS / 200 ))
  sleep "$settle"
  curl -s "http://127.0.0.1:$admin/metrics" >"$WORK/$rate.metrics0" || true
  udp >"$WORK/$rate.udp0"
  local window=$(( SECS - 2 ))
  perf stat -x, -e "$EVENTS" -p "$BROKER_PID" -- sleep "$window" 2>"$WORK/$rate.txt"
  udp >"$WORK/$rate.udp1"
  curl -s "http://127.0.0.1:$admin/metrics" >"$WORK/$rate.metrics1" || true
  echo "$window" >"$WORK/$rate.window"
  wait "$lg"
  stop_broker
}

IFS=, read -r -a rates <<<"$RATES"
for rate in "${rates[@]}"; do
  echo "events: $rate msg/s, $USERS users" >&2
  one "$rate"
done

python3 "$ROOT/benches/events/report.py" "$WORK" "$OUT" "$USERS" "$DURABILITY" "${rates[@]}"
