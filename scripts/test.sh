#!/usr/bin/env bash
# Runs Riffle's tests: installs the Wasm guest toolchain if missing, then runs every test in the
# workspace (the tests crate's build script compiles the UDF guests from source first).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
scripts/install-guest-toolchain.sh
cargo test --workspace "$@"
