#!/usr/bin/env bash
# Starts one broker on embedded defaults: QUIC on 127.0.0.1:4433, data in
# ./tern-data, admin HTTP on 127.0.0.1:9433. Extra arguments go to tern-broker.
# Built in release mode against the RocksDB that scripts/test.sh also uses
# (scripts/release.sh), so the two compile RocksDB's C++ once.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-deps.sh
exec scripts/release.sh run --quiet -p tern-broker --bin tern-broker -- --admin 127.0.0.1:9433 "$@"
