#!/usr/bin/env bash
# Runs every check of the workspace: formatting (`cargo fmt --check`), lints
# (`cargo clippy --all-targets -D warnings`), then every test (unit, property,
# integration, crash and CLI end-to-end tests). Installs build dependencies
# first if missing.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-deps.sh
cargo fmt --all -- --check
cargo build --workspace --bins
# Lints. `cargo clippy` (like `cargo check`) runs build scripts separately
# from `cargo build`, so it would compile RocksDB's C++ sources a second time:
# point it at the library the build above made instead. (By hand, run clippy
# or check with the same ROCKSDB_LIB_DIR and ROCKSDB_STATIC=1, or the next one
# without them compiles RocksDB for check mode.)
rocksdb_out=$(cargo build --workspace --bins --message-format=json 2>/dev/null |
  grep -o '"out_dir":"[^"]*librocksdb-sys-[^"]*"' | head -n 1 | sed 's/^"out_dir":"//; s/"$//')
if [ -n "$rocksdb_out" ] && [ -f "$rocksdb_out/librocksdb.a" ]; then
  ROCKSDB_LIB_DIR="$rocksdb_out" ROCKSDB_STATIC=1 cargo clippy --workspace --all-targets -- -D warnings
else
  cargo clippy --workspace --all-targets -- -D warnings
fi
cargo test --workspace "$@"
# A short fuzz run of the protocol decoders and the shipping rule
# (docs/fuzzing.md, no RocksDB): 30 s per target after a 1-minute build;
# cargo-fuzz is installed on first use (about a CPU minute more).
# TERN_FUZZ_SECS=0 skips it.
if [ "${TERN_FUZZ_SECS:-30}" != 0 ]; then
  bash fuzz/run.sh --ci "${TERN_FUZZ_SECS:-30}"
fi
