#!/usr/bin/env bash
# Runs every test of the workspace (unit, property, integration, crash and
# CLI end-to-end tests). Installs build dependencies first if missing.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-deps.sh
cargo build --workspace --bins
cargo test --workspace "$@"
