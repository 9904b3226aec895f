#!/usr/bin/env bash
# Two tern-broker binaries side by side on the 1:1 workload, alternated in
# one session so machine noise hits both alike: `tern-loadgen chat` at a
# fixed rate and `tern-loadgen max`, ROUNDS times each, old then new then
# old ..., each run on a fresh broker with a fresh data directory (synced
# durability, the default). Prints the median of each metric per binary and
# the new/old ratio, and writes every report to OUT.
#
#   bash benches/ab/run.sh OLD_BROKER NEW_BROKER [--rounds N] [--rate R]
#                          [--secs S] [--out DIR] [--loadgen PATH]
#
# Both brokers are driven by the same loadgen (default target/release/
# tern-loadgen), so only the broker differs. Traffic stays on 127.0.0.1.
set -euo pipefail

usage() { sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; }
[ $# -ge 2 ] || { usage; exit 2; }
OLD=$1 NEW=$2
shift 2
ROUNDS=3 RATE=10000 SECS=15
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
OUT="$ROOT/target/ab"
LOADGEN="$ROOT/target/release/tern-loadgen"
while [ $# -gt 0 ]; do
  case "$1" in
    --rounds) ROUNDS=${2:?}; shift ;;
    --rate) RATE=${2:?}; shift ;;
    --secs) SECS=${2:?}; shift ;;
    --out) OUT=${2:?}; shift ;;
    --loadgen) LOADGEN=${2:?}; shift ;;
    -h | --help) usage; exit 0 ;;
    *) echo "run.sh: unknown argument $1 (try --help)" >&2; exit 2 ;;
  esac
  shift
done
for b in "$OLD" "$NEW" "$LOADGEN"; do
  [ -x "$b" ] || { echo "run.sh: $b is not an executable" >&2; exit 2; }
done
mkdir -p "$OUT"
. "$ROOT/benches/ab/lib.sh"

# run LABEL BROKER ROUND: one broker, one chat run, one max run.
run() {
  local label=$1 bin=$2 round=$3 data
  data="$WORK/$label-$round"
  start_broker "$bin" "$data" "$OUT/$label-$round.broker.log"
  local common=(--target "tern://127.0.0.1:$PORT" --ca "$data/tls/cert.pem" --quiet)
  timeout 300 "$LOADGEN" chat "${common[@]}" --rate "$RATE" --duration "$SECS" --json "$OUT/$label-$round.chat.json"
  timeout 300 "$LOADGEN" max "${common[@]}" --json "$OUT/$label-$round.max.json"
  stop_broker
  echo "round $round $label done" >&2
}

for round in $(seq "$ROUNDS"); do
  run old "$OLD" "$round"
  run new "$NEW" "$round"
done

python3 - "$OUT" "$ROUNDS" "$RATE" <<'EOF'
import json, statistics, sys
out, rounds, rate = sys.argv[1], int(sys.argv[2]), sys.argv[3]
def load(label, kind):
    return [json.load(open(f"{out}/{label}-{r}.{kind}.json")) for r in range(1, rounds + 1)]
rows = [
    ("chat", f"acked/s at {rate} msg/s", lambda r: r["acked_per_s"]),
    ("chat", "send->ack p50 (us)", lambda r: r["ack_latency_us"]["p50"]),
    ("chat", "send->ack p99 (us)", lambda r: r["ack_latency_us"]["p99"]),
    ("chat", "send->deliver p50 (us)", lambda r: r["deliver_latency_us"]["p50"]),
    ("chat", "send->deliver p99 (us)", lambda r: r["deliver_latency_us"]["p99"]),
    ("max", "max: highest rate sustained (msg/s)", lambda r: r["max"]["max_sustained_per_s"]),
    ("max", "max: send->deliver p99 (us)", lambda r: r["deliver_latency_us"]["p99"]),
]
print(f"| metric (median of {rounds}, runs alternated) | old | new | new/old |")
print("|---|---:|---:|---:|")
for kind, name, get in rows:
    old = statistics.median(get(r) for r in load("old", kind))
    new = statistics.median(get(r) for r in load("new", kind))
    print(f"| {name} | {old:,.0f} | {new:,.0f} | {new / old:.2f} |")
EOF
