#!/usr/bin/env bash
# Debian packages the host build needs beyond a Rust toolchain: librdkafka (built from source
# by rdkafka-sys) needs a C/C++ compiler, make, perl, pkg-config and zlib headers. Idempotent:
# installs only what is missing.
set -euo pipefail
packages=(gcc g++ make perl pkg-config zlib1g-dev)
missing=()
for p in "${packages[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "build deps: installing ${missing[*]}" >&2
    sudo_cmd=""
    [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
    $sudo_cmd apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq "${missing[@]}" >&2
fi
