# What benches/ab/run.sh and benches/ab/sweep.sh share (sourced, not run):
# a fresh broker per run on a free loopback port, and cleaning up after.
#
# Sets WORK, a temporary directory removed on exit (with the broker still
# running, if any, killed first).

WORK=$(mktemp -d "${TMPDIR:-/tmp}/tern-ab.XXXXXX")
BROKER_PID=""
ab_cleanup() {
  stop_broker
  rm -rf "$WORK"
}
trap ab_cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# start_broker BIN DATA LOG: starts broker BIN on 127.0.0.1 with data
# directory DATA, its output in LOG; returns once it has made its
# certificate (DATA/tls/cert.pem) and had half a second more. Sets PORT and
# BROKER_PID.
start_broker() {
  local bin=$1 data=$2 log=$3
  PORT=$(free_port)
  "$bin" --listen "127.0.0.1:$PORT" --data-dir "$data" >"$log" 2>&1 &
  BROKER_PID=$!
  for _ in $(seq 100); do
    [ -f "$data/tls/cert.pem" ] && break
    sleep 0.1
  done
  sleep 0.5
}

# stop_broker: stops the broker start_broker started, if it runs.
stop_broker() {
  if [ -n "$BROKER_PID" ]; then
    kill "$BROKER_PID" 2>/dev/null || true
    wait "$BROKER_PID" 2>/dev/null || true
  fi
  BROKER_PID=""
}
