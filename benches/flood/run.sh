#!/usr/bin/env bash
# Established clients' latency under a QUIC handshake flood, beside the same
# workload without it, on one broker on loopback.
#
# Usage: benches/flood/run.sh [--rate MSGS_PER_S] [--secs SECS]
#                             [--concurrency N] [--no-build]
#
# Builds tern-broker, tern-loadgen and the handshake_flood example (release,
# scripts/release.sh), starts one broker, and runs `tern-loadgen chat` three
# times with the same users and rate: alone (baseline); while another process
# (`handshake_flood`) completes as many full QUIC handshakes as it can with
# CONCURRENCY tasks from 127.0.0.1, which the broker exempts from its rate
# limits (flood: what a broker without per-address limits gets); and the
# same flood from 127.0.0.2, under `rate.handshakes_per_ip` (flood-limited).
# Each flood starts after the loadgen's users are connected. Prints, for
# each run, send->ack and send->deliver p50/p99/max and the flood's
# handshake rate, and writes them to target/bench-flood/result.json (the
# loadgen reports beside it).
#
# Traffic goes to 127.0.0.1 and 127.0.0.2 only; every process is bounded in
# time and stopped at the end.
set -euo pipefail

RATE=2000          # messages per second over all users
SECS=15            # measured seconds of each chat run
USERS=100
CONCURRENCY=256    # flood tasks, each one handshake at a time
BUILD=1
while [ $# -gt 0 ]; do
  case "$1" in
    --rate) RATE=${2:?}; shift ;;
    --secs) SECS=${2:?}; shift ;;
    --concurrency) CONCURRENCY=${2:?}; shift ;;
    --no-build) BUILD=0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
  shift
done

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
OUT="$ROOT/target/bench-flood"
BIN="$ROOT/target/release"
rm -rf "$OUT"
mkdir -p "$OUT"

if [ "$BUILD" = 1 ]; then
  (cd "$ROOT" && scripts/release.sh build -p tern-broker -p tern-loadgen --bins --example handshake_flood)
fi
for b in "$BIN/tern-broker" "$BIN/tern-loadgen" "$BIN/examples/handshake_flood"; do
  [ -x "$b" ] || { echo "missing $b (build first or drop --no-build)" >&2; exit 1; }
done

free_port() { python3 -c 'import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

PORT=$(free_port)
ADMIN=$(free_port)
# Only 127.0.0.1 is exempt from rate limits, so the loadgen's users (from
# there) are not throttled. The flood runs twice: from 127.0.0.1 (exempt:
# bounded by the connection cap and CPU only, as a broker without
# per-address limits), and from 127.0.0.2 (under rate.handshakes_per_ip).
"$BIN/tern-broker" --listen "127.0.0.1:$PORT" --admin "127.0.0.1:$ADMIN" --data-dir "$OUT/broker" \
  --rate-exempt 127.0.0.1/32 \
  >"$OUT/broker.log" 2>&1 &
PIDS+=($!)
BROKER_PID=$!
for _ in $(seq 1 300); do
  [ -s "$OUT/broker/tls/cert.pem" ] && curl -fs "http://127.0.0.1:$ADMIN/healthz" >/dev/null 2>&1 && break
  sleep 0.1
done
CA="$OUT/broker/tls/cert.pem"

chat() {
  local name=$1
  timeout --kill-after=10 $((SECS + 60)) "$BIN/tern-loadgen" chat --target "tern://127.0.0.1:$PORT" --ca "$CA" \
    --users "$USERS" --rate "$RATE" --duration "$SECS" --warmup 2 --broker-pid "$BROKER_PID" \
    --json "$OUT/$name.json" --quiet >"$OUT/$name.log" 2>&1
}

echo "baseline: chat at $RATE msg/s, $USERS users, ${SECS} s"
chat baseline

flood() {
  local name=$1 source=$2
  echo "$name: the same, while handshake_flood runs $CONCURRENCY handshakes at a time from $source"
  chat "$name" &
  local chat_pid=$!
  # Start once the users are connected (the loadgen's warm-up), so the
  # flood measures what it does to established clients.
  sleep 4
  timeout --kill-after=5 $((SECS + 10)) "$BIN/examples/handshake_flood" "127.0.0.1:$PORT" "$CA" "$SECS" \
    "$CONCURRENCY" 8 "$source" >"$OUT/$name-generator.json" 2>"$OUT/$name-generator.log" || true
  wait "$chat_pid"
}
flood flood 127.0.0.1
flood flood-limited 127.0.0.2

python3 - "$OUT" <<'EOF'
import json, sys, os
out = sys.argv[1]
names = ("baseline", "flood", "flood-limited")
runs = {n: json.load(open(os.path.join(out, n + ".json"))) for n in names}
gen = {n: json.loads(open(os.path.join(out, n + "-generator.json")).read().strip() or "{}") for n in names[1:]}
rows = []
for name, r in runs.items():
    a, d = r["ack_latency_us"], r["deliver_latency_us"]
    rows.append({"run": name, "acked_per_s": round(r["acked_per_s"]), "ack_p50_us": a["p50"], "ack_p99_us": a["p99"],
                 "ack_max_us": a["max"], "deliver_p50_us": d["p50"], "deliver_p99_us": d["p99"], "deliver_max_us": d["max"]})
result = {"runs": rows, "flood": gen}
json.dump(result, open(os.path.join(out, "result.json"), "w"), indent=2)
print(f"{'run':<13} {'acked/s':>8} {'ack p50':>9} {'ack p99':>9} {'ack max':>9} {'dlv p50':>9} {'dlv p99':>9} {'dlv max':>9}  (µs)")
for r in rows:
    print(f"{r['run']:<13} {r['acked_per_s']:>8} {r['ack_p50_us']:>9} {r['ack_p99_us']:>9} {r['ack_max_us']:>9} "
          f"{r['deliver_p50_us']:>9} {r['deliver_p99_us']:>9} {r['deliver_max_us']:>9}")
for name, g in gen.items():
    print(f"{name}:", json.dumps(g))
EOF
