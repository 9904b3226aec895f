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
# Lints. With the dependencies built without debug info (Cargo.toml),
# `cargo clippy` shares the build above's run of RocksDB's build script, so
# it compiles no C++. (Setting ROCKSDB_LIB_DIR for it, as this script once
# did, would make the next build compile RocksDB again.)
cargo clippy --workspace --all-targets -- -D warnings
cargo test --workspace "$@"
# A short fuzz run of the protocol decoders and the shipping rule
# (docs/fuzzing.md, no RocksDB): 30 s per target after a 1-minute build;
# cargo-fuzz is installed on first use (about a CPU minute more).
# TERN_FUZZ_SECS=0 skips it.
if [ "${TERN_FUZZ_SECS:-30}" != 0 ]; then
  bash fuzz/run.sh --ci "${TERN_FUZZ_SECS:-30}"
fi
