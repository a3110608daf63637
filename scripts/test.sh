#!/usr/bin/env bash
# Runs Riffle's tests: installs what they need if missing (the Wasm guest toolchain, the
# noida-db Kafka-protocol broker the Kafka tests start, and the `deltalake` Python package that
# reads our Delta tables back as an independent reader), then runs every test in the workspace
# (the tests crate's build script compiles the UDF guests from source first).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
scripts/install-build-deps.sh
scripts/install-guest-toolchain.sh
scripts/kafka-broker.sh install
if ! python3 -c "import deltalake, pyarrow" 2>/dev/null; then
    echo "test deps: pip install deltalake pyarrow" >&2
    python3 -m pip install --quiet deltalake pyarrow >&2
fi
cargo test --workspace "$@"
