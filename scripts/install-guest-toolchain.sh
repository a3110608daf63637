#!/usr/bin/env bash
# Makes sure a Rust toolchain that builds wasm32-wasip2 components is available.
#
# Prefers rustup's wasm32-wasip2 target. Where rustup cannot download it (machines without
# internet access to rustup's servers), installs Debian's rustc-web toolchain, whose standard
# library builds for wasm32-wasip2 from source (see scripts/build-udfs.sh). Also installs
# componentize-py, which builds Python UDFs. Idempotent.
set -euo pipefail

have_rustup_target() {
    command -v rustup >/dev/null 2>&1 &&
        timeout 20 rustup target list --installed 2>/dev/null | grep -qx wasm32-wasip2
}

have_debian_route() {
    [ -x /usr/bin/rustc ] && [ -x /usr/bin/cargo ] && [ -d /usr/lib/wasm32-wasi ] &&
        [ -x /usr/lib/llvm-22/bin/lld ] && ls /usr/src/rustc-*/library/std/Cargo.toml >/dev/null 2>&1 &&
        /usr/bin/rustc --version | grep -q '^rustc 1\.96'
}

# Python UDFs build with componentize-py (PyPI), pinned: its output embeds a CPython build.
componentize_py_version=0.25.1
if ! componentize-py --version 2>/dev/null | grep -qx "componentize-py $componentize_py_version"; then
    echo "guest toolchain: pip install componentize-py==$componentize_py_version" >&2
    python3 -m pip install --quiet "componentize-py==$componentize_py_version" >&2
    command -v componentize-py >/dev/null 2>&1 || { echo "guest toolchain: componentize-py is not on PATH after pip install" >&2; exit 1; }
fi

if have_rustup_target || have_debian_route; then
    exit 0
fi

if command -v rustup >/dev/null 2>&1; then
    echo "guest toolchain: trying 'rustup target add wasm32-wasip2' (60 s limit)" >&2
    if timeout 60 rustup target add wasm32-wasip2 >&2 && have_rustup_target; then
        exit 0
    fi
    echo "guest toolchain: rustup could not add the target; using Debian's rustc-web" >&2
fi

sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq rustc-web cargo-web rust-web-src lld-22 wasi-libc >&2
have_debian_route || { echo "guest toolchain: Debian packages installed but unusable" >&2; exit 1; }
