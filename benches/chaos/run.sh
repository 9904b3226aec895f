#!/usr/bin/env bash
# The chaos suite: three brokers on loopback under the chat workload while
# brokers are SIGKILLed and restarted, peer links cut and brokers paused
# longer than the failure detector's timeout; fails unless every
# acknowledged message was delivered, none twice, none out of order.
#
#   bash benches/chaos/run.sh [--duration SECS] [--json OUT] [--seed N]
#                             [--rate MSGS_PER_S] [--debug] [--no-build]
#                             [--keep] [-- EXTRA LOADGEN FLAGS]
#
# --duration   seconds of chaos (default 600: the long variant; CI runs 60)
# --json       write the report there (default: target/chaos/report.json)
# --seed       seed of the fault schedule (default: random; printed, and in
#              the report, so a failing run can be repeated)
# --rate       messages per second over all users (default 500)
# --debug      use the dev-profile binaries (target/debug) instead of release
# --no-build   use the binaries as they are (no cargo build first)
# --keep       keep the temporary directory even when the run passes
# After --, flags go to `tern-loadgen chaos` as they are (--users, --faults
# kill,pause, --broker-log debug, ...; see `tern-loadgen chaos --help`).
#
# Builds tern-broker and tern-loadgen (release unless --debug), copies them
# into a fresh temporary directory (a rebuild during the run does not change
# the brokers it restarts), and runs `tern-loadgen chaos`, which makes the
# cluster CA and certificates, starts the mesh, runs the load and the faults,
# drains and prints the table. Exit status: 0 pass, 1 loss, duplicate,
# reorder or broker crash, other values set-up errors. A failed run keeps
# its directory (broker logs, events.log) and says where.
# docs/bench/chaos.md explains the schedule and records the last long run.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"

usage() {
  sed -n '2,27p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

DURATION=600
JSON=""
SEED=""
RATE=500
PROFILE=release
BUILD=1
KEEP=0
EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --duration) DURATION=${2:?--duration needs seconds}; shift ;;
    --json) JSON=${2:?--json needs a file}; shift ;;
    --seed) SEED=${2:?--seed needs a number}; shift ;;
    --rate) RATE=${2:?--rate needs messages per second}; shift ;;
    --debug) PROFILE=debug ;;
    --no-build) BUILD=0 ;;
    --keep) KEEP=1 ;;
    -h | --help) usage; exit 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) echo "run.sh: unknown argument $1 (try --help)" >&2; exit 2 ;;
  esac
  shift
done

if [ "$BUILD" = 1 ]; then
  scripts/ensure-deps.sh
  if [ "$PROFILE" = release ]; then
    scripts/release.sh build -p tern-broker -p tern-loadgen
  else
    # The same build as scripts/test.sh's, so nothing is compiled again.
    cargo build --workspace --bins
  fi
fi
for bin in tern-broker tern-loadgen; do
  if [ ! -x "target/$PROFILE/$bin" ]; then
    echo "run.sh: target/$PROFILE/$bin is missing (run without --no-build)" >&2
    exit 2
  fi
done

WORK=$(mktemp -d "${TMPDIR:-/tmp}/tern-chaos.XXXXXX")
MESH="$WORK/mesh"
if [ -z "$JSON" ]; then
  mkdir -p target/chaos
  JSON=target/chaos/report.json
fi
LOADGEN_PID=""

# Never leave a broker behind: the loadgen kills them when it ends, and
# this trap catches the rest (the loadgen itself killed, ^C) from the pid
# files it keeps, checking each pid still runs a broker of this directory.
cleanup() {
  if [ -n "$LOADGEN_PID" ]; then
    kill "$LOADGEN_PID" 2>/dev/null || true
    wait "$LOADGEN_PID" 2>/dev/null || true
  fi
  for f in "$MESH"/pids/*.pid; do
    [ -f "$f" ] || continue
    pid=$(cat "$f")
    if tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$MESH/"; then
      kill -KILL "$pid" 2>/dev/null || true
    fi
  done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Hard links where possible (a rebuild replaces target/'s files, not these).
mkdir -p "$WORK/bin"
for bin in tern-broker tern-loadgen; do
  ln "target/$PROFILE/$bin" "$WORK/bin/$bin" 2>/dev/null || cp "target/$PROFILE/$bin" "$WORK/bin/$bin"
done

COMMIT=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
if [ -n "$(git status --porcelain 2>/dev/null | head -1)" ]; then COMMIT="$COMMIT+uncommitted changes"; fi
echo "chaos suite: ${DURATION}s at ${RATE} msg/s, $PROFILE binaries of $COMMIT, in $WORK" >&2

ARGS=(chaos --broker-bin "$WORK/bin/tern-broker" --dir "$MESH" --duration "$DURATION" --rate "$RATE" --json "$JSON")
if [ -n "$SEED" ]; then ARGS+=(--seed "$SEED"); fi
ARGS+=("${EXTRA[@]}")

# Set-up, the drain (at most 120 s) and slack on top of the chaos itself.
LIMIT=$(awk -v d="$DURATION" 'BEGIN { printf "%d", d + 300 }')
set +e
timeout --signal=INT --kill-after=20 "$LIMIT" "$WORK/bin/tern-loadgen" "${ARGS[@]}" &
LOADGEN_PID=$!
wait "$LOADGEN_PID"
STATUS=$?
LOADGEN_PID=""
set -e

if [ "$STATUS" = 124 ]; then
  echo "run.sh: the run did not finish within ${LIMIT}s; logs in $WORK" >&2
fi
if [ "$STATUS" = 0 ] && [ "$KEEP" = 0 ]; then
  rm -rf "$WORK"
  echo "report: $JSON" >&2
else
  echo "kept: $WORK (broker logs in mesh/logs, faults in mesh/events.log); report: $JSON" >&2
fi
exit "$STATUS"
