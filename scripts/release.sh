#!/usr/bin/env bash
# Cargo with the release profile, linking the RocksDB that the dev build
# (scripts/test.sh) compiles, so RocksDB's C++ is compiled once for both
# (about 15 minutes on 2 cores) instead of once per profile.
#
#   scripts/release.sh build -p tern-broker        # cargo build --release -p tern-broker
#   scripts/release.sh run -p tern-broker -- ARGS  # cargo run --release ...
#
# The first call builds the workspace in the dev profile if that has not
# been done (it is what scripts/test.sh builds first). Every release build in
# this repository's scripts goes through here: a plain `cargo build
# --release` would compile RocksDB for release on its own (once, about 20
# minutes), and alternating the two recompiles it each time.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-deps.sh
[ $# -ge 1 ] || { echo "usage: scripts/release.sh CARGO_COMMAND [ARGS...]" >&2; exit 2; }
lib=$(env -u ROCKSDB_LIB_DIR -u ROCKSDB_STATIC cargo build --workspace --bins --message-format=json |
  grep -o '"out_dir":"[^"]*librocksdb-sys-[^"]*"' | head -n 1 | sed 's/^"out_dir":"//; s/"$//' || true)
if [ -z "$lib" ] || [ ! -f "$lib/librocksdb.a" ]; then
  echo "release.sh: the dev build made no librocksdb.a (see the build output above)" >&2
  exit 1
fi
command=$1
shift
ROCKSDB_LIB_DIR="$lib" ROCKSDB_STATIC=1 exec cargo "$command" --release "$@"
