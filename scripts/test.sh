#!/usr/bin/env bash
# Runs Riffle's tests: installs what they need if missing (the Wasm guest toolchain, the
# noida-db Kafka-protocol broker the Kafka tests start, the `deltalake` Python package that
# reads our Delta tables back as an independent reader, `prometheus-client` whose parser reads
# our /metrics, scikit-learn, matplotlib, skl2onnx and onnxruntime for the fraud model the demo
# trains, exports and checks, and Debian's
# Chromium with ChromeDriver plus Selenium, which drive the dashboard), then runs the Python
# SDK's own tests and every test in the workspace (the tests crate's build script compiles the
# UDF guests, Rust and Python, from source first).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
scripts/install-build-deps.sh
scripts/install-guest-toolchain.sh
scripts/kafka-broker.sh install
if ! python3 -c "import deltalake, pyarrow, pandas, prometheus_client, selenium, sklearn, matplotlib, skl2onnx, onnxruntime, confluent_kafka" 2>/dev/null; then
    echo "test deps: pip install deltalake pyarrow pandas prometheus-client selenium scikit-learn matplotlib skl2onnx onnxruntime confluent-kafka" >&2
    python3 -m pip install --quiet deltalake pyarrow pandas prometheus-client selenium scikit-learn \
        matplotlib skl2onnx onnxruntime confluent-kafka >&2
fi
if ! [ -x /usr/bin/chromium ] || ! [ -x /usr/bin/chromedriver ]; then
    echo "test deps: apt-get install chromium chromium-driver" >&2
    sudo_cmd=""
    [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
    $sudo_cmd apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq chromium chromium-driver >&2
fi
# The Python SDK's batch path, natively (the component's exports driven through the bindings
# componentize-py generates).
PYTHONDONTWRITEBYTECODE=1 python3 -m unittest discover -s guest-sdk-py/tests
cargo test --workspace "$@"
