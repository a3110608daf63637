#!/usr/bin/env bash
# Builds every UDF crate under udfs/ into a wasm32-wasip2 component, and every Python UDF
# (a directory under udfs/ with an app.py) into a component with componentize-py.
#
#   scripts/build-udfs.sh                    # prints the directory holding the .wasm files
#   scripts/build-udfs.sh --except NAME ...  # all but these udfs/NAME (the demo's first run
#                                            # skips fraud_model_tract: 8 CPU-minutes of tract)
#
# Output goes to $RIFFLE_GUEST_TARGET_DIR (default: <cargo target dir>/wasm-guests), kept apart
# from the host's target directory so this can run from a build script while the outer cargo
# holds its lock. Uses rustup's wasm32-wasip2 target when installed, otherwise Debian's
# rustc-web 1.96 with the standard library built from source (-Zbuild-std). Run
# scripts/install-guest-toolchain.sh first on a new machine.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
usage() {
    echo "usage: scripts/build-udfs.sh [--except NAME]... (NAME: a directory under udfs/)" >&2
    exit 2
}
declare -A except=() # udfs/NAME -> 1: not built
while [ $# -gt 0 ]; do
    case "$1" in
    --except)
        [ $# -ge 2 ] || usage
        name=${2%/} # a tab-completed directory
        [[ $name =~ ^[A-Za-z0-9_-]+$ ]] && [ -d "$root/udfs/$name" ] || usage
        except[$name]=1
        shift 2
        ;;
    *)
        usage
        ;;
    esac
done
target_dir=${RIFFLE_GUEST_TARGET_DIR:-${CARGO_TARGET_DIR:-$root/target}/wasm-guests}

# When run from a cargo build script, the outer build's settings must not leak in: they would
# point the inner build at the host's compiler, flags and target.
unset CARGO_ENCODED_RUSTFLAGS RUSTFLAGS RUSTC RUSTDOC RUSTC_WRAPPER RUSTC_WORKSPACE_WRAPPER \
    CARGO_BUILD_TARGET CARGO_TARGET_DIR CARGO_BUILD_RUSTFLAGS TARGET HOST OUT_DIR PROFILE \
    OPT_LEVEL DEBUG NUM_JOBS RUSTC_LINKER CARGO_MANIFEST_DIR CARGO_PRIMARY_PACKAGE

# Crates of the main workspace go in one build; a crate with its own `[workspace]` (one whose
# dependencies the host must not compile natively, like the ONNX runtime of
# udfs/fraud_model_tract) is built on its own, into the same directory.
packages=()
own_workspaces=()
for manifest in "$root"/udfs/*/Cargo.toml; do
    [ -f "$manifest" ] || continue
    [ -z "${except[$(basename "$(dirname "$manifest")")]:-}" ] || continue
    if grep -q '^\[workspace\]' "$manifest"; then
        own_workspaces+=("$manifest")
        continue
    fi
    name=$(sed -n 's/^name *= *"\(.*\)"/\1/p' "$manifest" | head -n1)
    packages+=(-p "$name")
done

# Guests are small: optimise them fully (the workspace release profile is tuned for host build time).
export CARGO_PROFILE_RELEASE_OPT_LEVEL=3 CARGO_PROFILE_RELEASE_STRIP=debuginfo CARGO_PROFILE_RELEASE_DEBUG=false
# ...in one codegen unit with whole-program LTO, except a crate with a workspace of its own: the
# ONNX runtime of udfs/fraud_model_tract is ~150 crates, and tract-core alone in one unit took
# 230 s of one core on a fresh machine. Thin LTO over 16 units built it in 4.2 min wall and 8.2
# CPU-min against 5.4 and 9.2 (the module: 20.8 MB against 21.3). Its per-row path for tree
# ensembles is the crate's own evaluator (udfs/fraud_model/src/trees.rs), optimised the same
# either way.
guest_profile() { # MANIFEST: the LTO and codegen-unit settings for it, as environment
    if [ "$1" = "$root/Cargo.toml" ]; then
        echo CARGO_PROFILE_RELEASE_LTO=fat CARGO_PROFILE_RELEASE_CODEGEN_UNITS=1
    else
        echo CARGO_PROFILE_RELEASE_LTO=thin CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16
    fi
}

# simd128 lets LLVM vectorise batch loops; every engine Riffle supports has it. Interleaving 8
# vectors per loop iteration amortises the per-iteration epoch (CPU deadline) check Cranelift
# inserts: it halved the cost of a trivial f64 UDF on 8192 rows (see host/src/udf/abi.rs).
# Every call inside the sandbox pays that check too (plus a stack check) on entry, so inline
# more than LLVM's default (225): the fraud model's log1p/exp calls cost an eighth of its Wasm time.
simd="-C target-feature=+simd128 -C llvm-args=-force-vector-interleave=8 -C llvm-args=-inline-threshold=1000"

if command -v rustup >/dev/null 2>&1 &&
    timeout 20 rustup target list --installed 2>/dev/null | grep -qx wasm32-wasip2; then
    for manifest in "$root/Cargo.toml" "${own_workspaces[@]}"; do
        selection=()
        [ "$manifest" = "$root/Cargo.toml" ] && selection=("${packages[@]}")
        # shellcheck disable=SC2046 # two NAME=VALUE words
        env $(guest_profile "$manifest") RUSTFLAGS="$simd" \
            cargo build --manifest-path "$manifest" --release \
            --target wasm32-wasip2 --target-dir "$target_dir" "${selection[@]}" >&2
    done
elif [ -x /usr/bin/rustc ] && /usr/bin/rustc --version | grep -q '^rustc 1\.96' &&
    [ -d /usr/lib/wasm32-wasi ] && [ -x /usr/lib/llvm-22/bin/lld ]; then
    # Debian's toolchain finds the linker as `rust-lld`; give it LLVM 22's lld under that name.
    shim="$target_dir/bin"
    mkdir -p "$shim"
    ln -sf /usr/lib/llvm-22/bin/lld "$shim/rust-lld"
    for manifest in "$root/Cargo.toml" "${own_workspaces[@]}"; do
        selection=()
        [ "$manifest" = "$root/Cargo.toml" ] && selection=("${packages[@]}")
        # shellcheck disable=SC2046 # two NAME=VALUE words
        env $(guest_profile "$manifest") \
            PATH="$shim:/usr/lib/llvm-22/bin:$PATH" RUSTC=/usr/bin/rustc RUSTDOC=/usr/bin/rustdoc \
            RUSTC_BOOTSTRAP=1 \
            RUSTFLAGS="-L /usr/lib/wasm32-wasi -C link-self-contained=no $simd" \
            /usr/bin/cargo build --manifest-path "$manifest" --release \
            --target wasm32-wasip2 --target-dir "$target_dir" \
            -Zbuild-std=std,panic_abort "${selection[@]}" >&2
    done
else
    echo "error: no Rust toolchain for wasm32-wasip2; run scripts/install-guest-toolchain.sh" >&2
    exit 1
fi

out="$target_dir/wasm32-wasip2/release"

# Python UDFs: componentize-py bundles CPython with the app and the SDK (guest-sdk-py) into one
# component. It takes ~10 s per module, so a module is rebuilt only when a source is newer.
for app in "$root"/udfs/*/app.py; do
    [ -f "$app" ] || continue
    dir=$(dirname "$app")
    [ -z "${except[$(basename "$dir")]:-}" ] || continue
    wasm="$out/riffle_udfs_$(basename "$dir").wasm"
    if [ -f "$wasm" ] && [ -z "$(find "$dir" "$root/guest-sdk-py" "$root/wit" -newer "$wasm" \
        -name '*.py' -o -newer "$wasm" -name '*.wit' | head -n1)" ]; then
        continue
    fi
    if ! command -v componentize-py >/dev/null 2>&1; then
        echo "error: componentize-py is missing; run scripts/install-guest-toolchain.sh" >&2
        exit 1
    fi
    # Build from a copy: componentize-py writes __pycache__ beside the sources it imports,
    # which would make cargo (watching udfs/) rerun the build script every time.
    stage="$target_dir/python-stage/$(basename "$dir")"
    rm -rf "$stage"
    mkdir -p "$stage" "$out"
    cp -r "$dir" "$stage/app"
    cp -r "$root/guest-sdk-py" "$stage/sdk"
    (cd "$stage" && componentize-py -d "$root/wit" -w udf componentize \
        -p "$stage/sdk" -p "$stage/app" app -o "$wasm.tmp" >&2)
    mv "$wasm.tmp" "$wasm"
done

echo "$out"
