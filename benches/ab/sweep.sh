#!/usr/bin/env bash
# Several tern-broker binaries on the 1:1 workload, interleaved in one
# session: each round runs `tern-loadgen chat` once against every binary, in
# an order that rotates from round to round (so no binary always runs first
# or last), each run on a fresh broker with a fresh data
# directory (synced durability, the default). Prints, per binary, the median
# of each metric over the rounds, its ratio to the first binary's, and a 90%
# bootstrap interval of that ratio: a ratio whose interval holds 1.00 is
# within this machine's noise. For bisecting a latency change; the two-binary
# A/B with `tern-loadgen max` as well is benches/ab/run.sh.
#
#   bash benches/ab/sweep.sh LABEL=BROKER LABEL=BROKER [...]
#        [--rounds N] [--rate R] [--secs S] [--out DIR] [--loadgen PATH]
#
# Defaults: 8 rounds, 10,000 msg/s, 10 s. Every run's report is kept in OUT
# (default target/ab-sweep) as LABEL-ROUND.chat.json, and the table is
# written to OUT/summary.md. Traffic stays on 127.0.0.1.
set -euo pipefail
usage() { sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; }
ROUNDS=8 RATE=10000 SECS=10
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
OUT="$ROOT/target/ab-sweep"
LOADGEN="$ROOT/target/release/tern-loadgen"
LABELS=() BINS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --rounds) ROUNDS=${2:?}; shift ;;
    --rate) RATE=${2:?}; shift ;;
    --secs) SECS=${2:?}; shift ;;
    --out) OUT=${2:?}; shift ;;
    --loadgen) LOADGEN=${2:?}; shift ;;
    -h | --help) usage; exit 0 ;;
    *=*) LABELS+=("${1%%=*}"); BINS+=("${1#*=}") ;;
    *) echo "sweep.sh: unknown argument $1 (binaries are given as LABEL=PATH; try --help)" >&2; exit 2 ;;
  esac
  shift
done
[ ${#BINS[@]} -ge 2 ] || { usage; exit 2; }
for b in "${BINS[@]}" "$LOADGEN"; do
  [ -x "$b" ] || { echo "sweep.sh: $b is not an executable" >&2; exit 2; }
done
mkdir -p "$OUT"
. "$ROOT/benches/ab/lib.sh"
# run LABEL BROKER ROUND: one broker, one chat run.
run() {
  local label=$1 bin=$2 round=$3 data
  data="$WORK/$label-$round"
  start_broker "$bin" "$data" "$OUT/$label-$round.broker.log"
  timeout 300 "$LOADGEN" chat --target "tern://127.0.0.1:$PORT" --ca "$data/tls/cert.pem" --quiet \
    --rate "$RATE" --duration "$SECS" --json "$OUT/$label-$round.chat.json"
  stop_broker
  rm -rf "$data"
}
n=${#BINS[@]}
for round in $(seq "$ROUNDS"); do
  for k in $(seq 0 $((n - 1))); do
    i=$(((round + k) % n))
    run "${LABELS[$i]}" "${BINS[$i]}" "$round"
  done
  echo "round $round of $ROUNDS done" >&2
done
python3 - "$OUT" "$ROUNDS" "$RATE" "${LABELS[@]}" <<'EOF' | tee "$OUT/summary.md"
import json, random, statistics, sys
out, rounds, rate, labels = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4:]
runs = {l: [json.load(open(f"{out}/{l}-{r}.chat.json")) for r in range(1, rounds + 1)] for l in labels}
metrics = [
    ("acked/s", lambda r: r["acked_per_s"]),
    ("send->ack p50 (us)", lambda r: r["ack_latency_us"]["p50"]),
    ("send->deliver p50 (us)", lambda r: r["deliver_latency_us"]["p50"]),
    ("send->deliver p99 (us)", lambda r: r["deliver_latency_us"]["p99"]),
    ("broker CPU per message (us)", lambda r: r["broker"]["cpu_us_per_msg"]),
]
rng = random.Random(1)
def interval(a, b):
    """90% bootstrap interval of median(b) / median(a)."""
    ratios = sorted(
        statistics.median(rng.choices(b, k=len(b))) / statistics.median(rng.choices(a, k=len(a)))
        for _ in range(2000)
    )
    return ratios[100], ratios[1899]
base = labels[0]
print(f"chat at {rate} msg/s, {rounds} rounds interleaved; medians, ratio to {base} with its 90% bootstrap interval\n")
print("| metric | " + " | ".join(labels) + " |")
print("|---|" + "---:|" * len(labels))
for name, get in metrics:
    cells = []
    a = [get(r) for r in runs[base]]
    for l in labels:
        b = [get(r) for r in runs[l]]
        m = statistics.median(b)
        if l == base:
            cells.append(f"{m:,.0f}" if m >= 100 else f"{m:.1f}")
        else:
            lo, hi = interval(a, b)
            cells.append(f"{m:,.0f} ({m / statistics.median(a):.2f}, {lo:.2f}-{hi:.2f})")
    print(f"| {name} | " + " | ".join(cells) + " |")
lost = {l: sum(r["lost"] for r in runs[l]) for l in labels}
print(f"\nlost in all runs: {lost}")
EOF
