//! Builds every UDF crate under `udfs/` into a Wasm component before the tests compile, so tests
//! always run against guests built from the current source (never prebuilt binaries).
//! The directory of `.wasm` files reaches the tests as `RIFFLE_UDF_DIR`.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let root = manifest.parent().unwrap().to_path_buf();
    // Relative paths (cargo resolves them against this package): one target directory shared
    // by several clones (CI reuses one) must watch the sources of the clone being built, not
    // those of whichever clone ran this script last. Cargo scans directories recursively, so
    // a new UDF crate is noticed too.
    for path in [
        "../udfs",
        "../guest-sdk",
        "../guest-sdk-py",
        "../wit",
        "../scripts/build-udfs.sh",
        "../Cargo.lock",
    ] {
        println!("cargo:rerun-if-changed={path}");
    }

    // OUT_DIR is <target>/<profile>/build/<pkg>-<hash>/out: keep guests beside the host's
    // artifacts, in <target>/wasm-guests, shared by all profiles and by scripts/build-udfs.sh.
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    let target = out
        .ancestors()
        .nth(4)
        .expect("OUT_DIR inside a target directory");
    let output = Command::new("bash")
        .arg(root.join("scripts/build-udfs.sh"))
        .env("RIFFLE_GUEST_TARGET_DIR", target.join("wasm-guests"))
        .output()
        .expect("running scripts/build-udfs.sh");
    if !output.status.success() {
        panic!(
            "building the UDF guests failed (run scripts/install-guest-toolchain.sh on a new \
             machine):\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let dir = String::from_utf8(output.stdout).unwrap();
    let dir = dir
        .lines()
        .last()
        .expect("build-udfs.sh prints the output directory");
    println!("cargo:rustc-env=RIFFLE_UDF_DIR={dir}");
}
