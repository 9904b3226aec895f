#!/usr/bin/env bash
# Starts one broker on embedded defaults: QUIC on 127.0.0.1:4433, data in
# ./tern-data, admin HTTP on 127.0.0.1:9433. Extra arguments go to tern-broker.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-deps.sh
exec cargo run --release --quiet -p tern-broker --bin tern-broker -- --admin 127.0.0.1:9433 "$@"
