#!/usr/bin/env bash
# Builds and runs Tern's fuzz targets (docs/fuzzing.md).
#
#   fuzz/run.sh TARGET [SECONDS] [libFuzzer flags...]   one target, one worker
#   fuzz/run.sh --ci SECONDS                            every protocol target
#
# Targets: client_frame, peer_frame, ship_admit (tern-protocol only), session
# and store_item (link tern-broker, so RocksDB: built against the main
# workspace's librocksdb.a, never a second C++ build). FUZZ_SANITIZER picks
# the sanitizer: `none` by default (the targets check allocations
# themselves; Tern's code has no `unsafe`), `address` for AddressSanitizer, which
# here ran the client decoder 7 times slower.
# Runs under `nice -n 19`, one worker, and stops after SECONDS (default 60).
set -euo pipefail
cd "$(dirname "$0")"
sanitizer=${FUZZ_SANITIZER:-none}

# cargo-fuzz needs nightly flags; the toolchain is stable. Set for the fuzz
# workspace's commands only: the build scripts of proc-macro2, anyhow and
# thiserror watch RUSTC_BOOTSTRAP, so a main-workspace build that sees it
# change rebuilds every proc macro and, through bindgen, RocksDB's C++.
fuzz() { RUSTC_BOOTSTRAP=1 nice -n 19 cargo fuzz "$@"; }
protocol_targets=(client_frame server_frame peer_frame ship_admit)

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz: installing cargo-fuzz" >&2
  cargo install cargo-fuzz --locked --version '^0.13'
fi

# The main workspace's RocksDB build (as scripts/test.sh makes it), for the
# targets that link tern-broker.
rocksdb_env() {
  local out
  out=$(cd .. && env -u RUSTC_BOOTSTRAP -u ROCKSDB_LIB_DIR -u ROCKSDB_STATIC \
    cargo build --workspace --bins --message-format=json 2>/dev/null |
    grep -o '"out_dir":"[^"]*librocksdb-sys-[^"]*"' | head -n 1 | sed 's/^"out_dir":"//; s/"$//' || true)
  if [ -z "$out" ] || [ ! -f "$out/librocksdb.a" ]; then
    echo "fuzz: no librocksdb.a from the main workspace's build; run scripts/test.sh (or cargo build) first" >&2
    exit 1
  fi
  export ROCKSDB_LIB_DIR="$out" ROCKSDB_STATIC=1
}

run() {
  local target=$1 secs=$2
  shift 2
  local features=()
  case $target in
    session | store_item)
      rocksdb_env
      features=(--features broker)
      ;;
  esac
  mkdir -p "corpus/$target"
  # New inputs go to corpus/ (not committed); seeds/ holds a few committed
  # starting points (the session's reach past login).
  local dirs=("corpus/$target")
  [ -d "seeds/$target" ] && dirs+=("seeds/$target")
  fuzz run -s "$sanitizer" "${features[@]}" "$target" "${dirs[@]}" -- \
    -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -malloc_limit_mb=1024 -print_final_stats=1 "$@"
}

case ${1:-} in
  --ci)
    secs=${2:-20}
    fuzz build -s "$sanitizer"
    for t in "${protocol_targets[@]}"; do
      echo "fuzz: $t for ${secs}s" >&2
      run "$t" "$secs"
    done
    ;;
  "" | -h | --help)
    sed -n '2,13p' "$0"
    ;;
  *)
    target=$1
    secs=${2:-60}
    shift $(($# < 2 ? $# : 2))
    run "$target" "$secs" "$@"
    ;;
esac
