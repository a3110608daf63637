//! `riffle udf new` and `riffle udf build`: write, build and try a UDF without this repository.
//!
//! `new` writes a project with one example scalar, one example aggregate, native unit tests
//! and a README, and beside it a copy of the guest SDK (with the WIT contract) taken from this
//! binary, so the project builds with nothing but crates.io (or PyPI) and matches the contract
//! this host speaks. A Rust project is a crate; a Python project is an `app.py` that
//! componentize-py turns into a component embedding CPython.
//!
//! `build` compiles a Rust crate into a `wasm32-wasip2` component with the toolchains the
//! project supports (rustup's target, else Debian's `rustc-web` with the standard library built
//! from source, as `scripts/build-udfs.sh` does for the repository's own UDFs), or a Python
//! project with componentize-py, checks that the result is a module this host loads, and
//! prints its path and sha256.

use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use super::engine_options;
use crate::error::{Result, RiffleError};
use crate::udf::UdfEngine;

/// The guest SDK's sources, as this binary was built with them.
const SDK_FILES: &[(&str, &str)] = &[
    ("src/lib.rs", include_str!("../../../guest-sdk/src/lib.rs")),
    (
        "src/column.rs",
        include_str!("../../../guest-sdk/src/column.rs"),
    ),
    (
        "src/aggregate.rs",
        include_str!("../../../guest-sdk/src/aggregate.rs"),
    ),
    ("README.md", include_str!("../../../guest-sdk/README.md")),
    (
        "macros/src/lib.rs",
        include_str!("../../../guest-sdk/macros/src/lib.rs"),
    ),
    (
        "macros/src/aggregate.rs",
        include_str!("../../../guest-sdk/macros/src/aggregate.rs"),
    ),
    ("wit/udf.wit", WIT),
];

/// The WIT contract this host speaks.
const WIT: &str = include_str!("../../../wit/udf.wit");

/// The SDK's manifests, standalone (the repository's inherit from its workspace). Versions
/// are the workspace's.
const SDK_MANIFEST: &str = r#"[package]
name = "riffle-udf"
version = "0.1.0"
edition = "2024"
license = "Apache-2.0"
description = "Write Riffle user-defined functions as plain Rust functions (copied by `riffle udf new`)"

[dependencies]
riffle-udf-macros = { path = "macros" }
wit-bindgen = { version = "0.63", default-features = false, features = ["macros", "realloc"] }
libm = "0.2"
"#;

const MACROS_MANIFEST: &str = r#"[package]
name = "riffle-udf-macros"
version = "0.1.0"
edition = "2024"
license = "Apache-2.0"
description = "Procedural macros for riffle-udf (copied by `riffle udf new`)"

[lib]
proc-macro = true

[dependencies]
syn = { version = "2", features = ["full"] }
quote = "1"
proc-macro2 = "1"
"#;

fn project_manifest(name: &str) -> String {
    format!(
        r#"[package]
name = "{name}"
version = "0.1.0"
edition = "2024"
publish = false

[lib]
# cdylib: the Wasm component; rlib: native unit tests.
crate-type = ["cdylib", "rlib"]

[dependencies]
riffle-udf = {{ path = "riffle-udf" }}

[profile.release]
# UDFs are small: optimise them fully.
opt-level = 3
lto = "fat"
codegen-units = 1
strip = "debuginfo"

# A project of its own, even inside another workspace's directory.
[workspace]
"#
    )
}

const PROJECT_LIB: &str = r#"//! UDFs for Riffle. Each `#[scalar]` function and `#[aggregate]` type listed in
//! `export_udfs!` becomes a SQL function of the module this crate builds into.

use riffle_udf::{AggregateState, aggregate, export_udfs, scalar};

/// `amount` less `percent` per cent. A percentage outside 0..=100 is a row error: the host
/// fails the query, or sets the value to NULL, as the user chose.
#[scalar]
pub fn discounted(amount: f64, percent: f64) -> Result<f64, String> {
    if !(0.0..=100.0).contains(&percent) {
        return Err(format!("percent {percent} is not between 0 and 100"));
    }
    Ok(amount * (1.0 - percent / 100.0))
}

/// State of `range_width`: the smallest and largest value seen.
#[derive(Clone, Debug, Default, PartialEq, AggregateState)]
pub struct RangeWidth {
    low: Option<f64>,
    high: Option<f64>,
}

/// Largest minus smallest value (NULL for no rows).
#[aggregate]
impl RangeWidth {
    pub fn update(&mut self, value: f64) {
        self.low = Some(self.low.map_or(value, |l| l.min(value)));
        self.high = Some(self.high.map_or(value, |h| h.max(value)));
    }

    pub fn merge(&mut self, other: Self) {
        if let (Some(low), Some(high)) = (other.low, other.high) {
            self.update(low);
            self.update(high);
        }
    }

    pub fn finish(&self) -> Option<f64> {
        Some(self.high? - self.low?)
    }
}

export_udfs!(discounted, range_width);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn discounted_takes_off_the_percentage() {
        assert_eq!(discounted(200.0, 25.0), Ok(150.0));
        assert!(discounted(200.0, 120.0).is_err());
    }

    #[test]
    fn range_width_merges_partial_states() {
        let (mut a, mut b) = (RangeWidth::default(), RangeWidth::default());
        a.update(3.0);
        b.update(10.0);
        b.update(-2.0);
        a.merge(b);
        assert_eq!(a.finish(), Some(12.0));
        assert_eq!(RangeWidth::default().finish(), None);
    }
}
"#;

fn project_readme(name: &str) -> String {
    let file = name.replace('-', "_");
    format!(
        r#"# {name}

Riffle UDFs, written with the `riffle-udf` SDK (a copy is in `riffle-udf/`, with the WIT
contract in `riffle-udf/wit/`; its README documents the types and rules).

```sh
cargo test                                   # the functions are plain Rust: test them natively
riffle udf build .                           # -> target/wasm32-wasip2/release/{file}.wasm
riffle udf inspect target/wasm32-wasip2/release/{file}.wasm
riffle udf test target/wasm32-wasip2/release/{file}.wasm --input sample.csv "discounted(amount, 10)"
riffle sql --udf target/wasm32-wasip2/release/{file}.wasm --table t=sample.csv \
    "SELECT shop, sum(discounted(amount, 10)), range_width(amount) FROM t GROUP BY shop"
```

`riffle udf build` uses rustup's `wasm32-wasip2` target when it is installed
(`rustup target add wasm32-wasip2`), otherwise Debian's `rustc-web` toolchain.
"#
    )
}

/// The languages `riffle udf new` writes projects in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Lang {
    /// A Rust crate using the `riffle-udf` SDK.
    Rust,
    /// A Python package using the `riffle_udf` SDK, built with componentize-py.
    Python,
}

/// The componentize-py release the Python SDK is built and tested with (as pinned by
/// `scripts/install-guest-toolchain.sh`).
const COMPONENTIZE_PY_VERSION: &str = "0.25.1";

/// The Python SDK's files, as this binary was built with them.
const PYTHON_SDK: &[(&str, &str)] = &[
    (
        "riffle_udf/__init__.py",
        include_str!("../../../guest-sdk-py/riffle_udf/__init__.py"),
    ),
    (
        "riffle_udf/math.py",
        include_str!("../../../guest-sdk-py/riffle_udf/math.py"),
    ),
];

const PYTHON_APP: &str = r#""""UDFs for Riffle. Each @scalar function and @aggregate class listed in `export_udfs`
becomes a SQL function of the module this file builds into (`riffle udf build`)."""

from __future__ import annotations

from typing import Optional

from riffle_udf import Result, RowError, aggregate, export_udfs, scalar


@scalar
def discounted(amount: float, percent: float) -> Result[float]:
    """`amount` less `percent` per cent. A percentage outside 0..=100 is a row error: the host
    fails the query, or sets the value to NULL, as the user chose."""
    if not 0.0 <= percent <= 100.0:
        raise RowError(f"percent {percent} is not between 0 and 100")
    return amount * (1.0 - percent / 100.0)


@aggregate
class RangeWidth:
    """Largest minus smallest value (NULL for no rows)."""

    low: Optional[float] = None
    high: Optional[float] = None

    def update(self, value: float) -> None:
        self.low = value if self.low is None else min(self.low, value)
        self.high = value if self.high is None else max(self.high, value)

    def merge(self, other: RangeWidth) -> None:
        if other.low is not None and other.high is not None:
            self.update(other.low)
            self.update(other.high)

    def finish(self) -> Optional[float]:
        if self.low is None or self.high is None:
            return None
        return self.high - self.low


# The component's exports: componentize-py looks for `WitWorld` in this module.
WitWorld = export_udfs(discounted, RangeWidth)
"#;

const PYTHON_TEST: &str = r#""""The functions stay plain Python: test them natively with `python3 -m unittest`."""

import unittest

from riffle_udf import RowError

from app import RangeWidth, discounted


class AppTest(unittest.TestCase):
    def test_discounted_takes_off_the_percentage(self):
        self.assertEqual(discounted(200.0, 25.0), 150.0)
        with self.assertRaises(RowError):
            discounted(200.0, 120.0)

    def test_range_width_merges_partial_states(self):
        a, b = RangeWidth(), RangeWidth()
        a.update(3.0)
        b.update(10.0)
        b.update(-2.0)
        a.merge(b)
        self.assertEqual(a.finish(), 12.0)
        self.assertIsNone(RangeWidth().finish())


if __name__ == "__main__":
    unittest.main()
"#;

fn python_readme(name: &str) -> String {
    let file = name.replace('-', "_");
    format!(
        r#"# {name}

Riffle UDFs in Python, written with the `riffle_udf` SDK (a copy is in `riffle_udf/`, with the
WIT contract in `wit/`; its docstring documents the types and rules). `riffle udf build` turns
`app.py` into a WebAssembly component with componentize-py
(`pip install componentize-py=={COMPONENTIZE_PY_VERSION}`); the component embeds CPython and
runs in the same sandbox as a Rust module.

```sh
python3 -m unittest                          # the functions are plain Python: test them natively
riffle udf build .                           # -> build/{file}.wasm
riffle udf inspect build/{file}.wasm
riffle udf test build/{file}.wasm --input sample.csv "discounted(amount, 10)"
riffle sql --udf build/{file}.wasm --table t=sample.csv \
    "SELECT shop, sum(discounted(amount, 10)), range_width(amount) FROM t GROUP BY shop"
```
"#
    )
}

/// `riffle udf new NAME`: writes the project into `parent/NAME`.
pub(super) fn new(name: &str, parent: &Path, lang: Lang) -> Result<PathBuf> {
    let valid = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        && name.starts_with(|c: char| c.is_ascii_alphabetic());
    if !valid {
        return Err(RiffleError::Config(format!(
            "{name:?} is not a crate name: letters, digits, `-` and `_`, starting with a letter"
        )));
    }
    if name.replace('-', "_").starts_with("riffle_udf") {
        return Err(RiffleError::Config(format!(
            "{name:?} would clash with the SDK crates the project carries (riffle-udf, \
             riffle-udf-macros); choose another name"
        )));
    }
    let root = parent.join(name);
    if root.exists() {
        return Err(RiffleError::Config(format!(
            "{} already exists; choose another name or directory",
            root.display()
        )));
    }
    let files = match lang {
        Lang::Rust => rust_project(name, &root),
        Lang::Python => python_project(name, &root),
    };
    for (path, text) in files {
        let dir = path.parent().expect("files are inside the project");
        std::fs::create_dir_all(dir).map_err(|e| RiffleError::io("creating", dir, e))?;
        std::fs::write(&path, text).map_err(|e| RiffleError::io("writing", &path, e))?;
    }
    Ok(root)
}

fn python_project(name: &str, root: &Path) -> Vec<(PathBuf, String)> {
    let sdk = PYTHON_SDK
        .iter()
        .map(|(path, text)| (root.join(path), text.to_string()));
    vec![
        (root.join("app.py"), PYTHON_APP.to_string()),
        (root.join("test_app.py"), PYTHON_TEST.to_string()),
        (root.join("README.md"), python_readme(name)),
        (
            root.join(".gitignore"),
            "/build\n__pycache__/\n".to_string(),
        ),
        (root.join("wit/udf.wit"), WIT.to_string()),
    ]
    .into_iter()
    .chain(sdk)
    .collect()
}

fn rust_project(name: &str, root: &Path) -> Vec<(PathBuf, String)> {
    let mut files: Vec<(PathBuf, String)> = vec![
        (root.join("Cargo.toml"), project_manifest(name)),
        (root.join("src/lib.rs"), PROJECT_LIB.to_string()),
        (root.join("README.md"), project_readme(name)),
        (root.join(".gitignore"), "/target\n".to_string()),
        (root.join("riffle-udf/Cargo.toml"), SDK_MANIFEST.to_string()),
        (
            root.join("riffle-udf/macros/Cargo.toml"),
            MACROS_MANIFEST.to_string(),
        ),
    ];
    for (path, text) in SDK_FILES {
        // In the repository the contract sits beside the SDK; in a project, inside it.
        let text = text.replace(r#"path: "../wit""#, r#"path: "wit""#);
        files.push((root.join("riffle-udf").join(path), text));
    }
    files
}

/// How this machine builds `wasm32-wasip2` components.
enum Toolchain {
    /// rustup's target.
    Rustup,
    /// Debian's rustc-web 1.96, the standard library built from source.
    Debian,
}

fn toolchain(project: &Path) -> Option<Toolchain> {
    // From the project, so that its rust-toolchain.toml, if any, picks the toolchain.
    let rustup = Command::new("rustup")
        .current_dir(project)
        .args(["target", "list", "--installed"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .is_some_and(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .any(|l| l.trim() == "wasm32-wasip2")
        });
    if rustup {
        return Some(Toolchain::Rustup);
    }
    let debian = Path::new("/usr/lib/wasm32-wasi").is_dir()
        && Path::new("/usr/lib/llvm-22/bin/lld").exists()
        && Command::new("/usr/bin/rustc")
            .arg("--version")
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).starts_with("rustc 1.96"));
    debian.then_some(Toolchain::Debian)
}

/// `riffle udf build [PATH]`: builds the project at `path` and returns the component's path.
pub(super) fn build(path: &Path) -> Result<PathBuf> {
    // Absolute, so the path printed for the module works from anywhere.
    let path = &std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    if !path.join("Cargo.toml").exists() && path.join("app.py").exists() {
        return build_python(path);
    }
    build_rust(path)
}

/// Builds a Python project (`app.py`, the SDK package beside it, the contract in `wit/`) with
/// componentize-py into `build/NAME.wasm`.
fn build_python(path: &Path) -> Result<PathBuf> {
    let wit = path.join("wit");
    if !wit.join("udf.wit").exists() {
        return Err(RiffleError::Config(format!(
            "{}: no wit/udf.wit; `riffle udf new NAME --lang python` writes a project with the \
             contract this host speaks",
            path.display()
        )));
    }
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("udfs")
        .replace('-', "_");
    let out_dir = path.join("build");
    std::fs::create_dir_all(&out_dir).map_err(|e| RiffleError::io("creating", &out_dir, e))?;
    let wasm = out_dir.join(format!("{name}.wasm"));
    let status = Command::new("componentize-py")
        .current_dir(path)
        .arg("-d")
        .arg(&wit)
        .args(["-w", "udf", "componentize", "-p"])
        .arg(path)
        .args(["app", "-o"])
        .arg(&wasm)
        // Its chatter goes to stderr: stdout is the module's path, sha256 and functions.
        .stdout(std::io::stderr())
        .status()
        .map_err(|e| {
            RiffleError::Config(format!(
                "cannot run componentize-py ({e}); install it with \
                 `python3 -m pip install componentize-py=={COMPONENTIZE_PY_VERSION}`"
            ))
        })?;
    if !status.success() {
        return Err(RiffleError::Config(format!(
            "componentize-py could not build {} ({status}); its errors are above",
            path.join("app.py").display()
        )));
    }
    Ok(wasm)
}

fn build_rust(path: &Path) -> Result<PathBuf> {
    let manifest_path = path.join("Cargo.toml");
    let text = std::fs::read_to_string(&manifest_path).map_err(|e| {
        RiffleError::Config(format!(
            "{}: not a UDF project: no Rust crate ({e}) and no Python app.py; `riffle udf new \
             NAME [--lang python]` creates one",
            manifest_path.display()
        ))
    })?;
    let manifest: toml::Value = toml::from_str(&text)
        .map_err(|e| RiffleError::Config(format!("{}: {e}", manifest_path.display())))?;
    let name = manifest
        .get("package")
        .and_then(|p| p.get("name"))
        .and_then(|n| n.as_str())
        .ok_or_else(|| {
            RiffleError::Config(format!("{}: no [package] name", manifest_path.display()))
        })?;
    let cdylib = manifest
        .get("lib")
        .and_then(|l| l.get("crate-type"))
        .and_then(|t| t.as_array())
        .is_some_and(|types| types.iter().any(|t| t.as_str() == Some("cdylib")));
    if !cdylib {
        return Err(RiffleError::Config(format!(
            "{}: the crate is not a cdylib, so it builds no Wasm module; add\n  [lib]\n  \
             crate-type = [\"cdylib\", \"rlib\"]",
            manifest_path.display()
        )));
    }
    // The module is named after the library target (`[lib] name`, else the package).
    let lib_name = manifest
        .get("lib")
        .and_then(|l| l.get("name"))
        .and_then(|n| n.as_str())
        .unwrap_or(name)
        .replace('-', "_");
    let Some(toolchain) = toolchain(path) else {
        return Err(RiffleError::Config(
            "no Rust toolchain for wasm32-wasip2: run `rustup target add wasm32-wasip2`, or \
             on Debian install rustc-web, cargo-web, rust-web-src, lld-22 and wasi-libc"
                .into(),
        ));
    };
    let target_dir = path.join("target");
    let mut cargo = match toolchain {
        Toolchain::Rustup => Command::new("cargo"),
        Toolchain::Debian => Command::new("/usr/bin/cargo"),
    };
    // Settings of an outer build (this may run from a build script or a test) must not leak
    // into the guest's.
    for var in [
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_BUILD_RUSTFLAGS",
        "RUSTFLAGS",
        "RUSTC",
        "RUSTDOC",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
    ] {
        cargo.env_remove(var);
    }
    cargo
        .current_dir(path)
        .args(["build", "--release", "--target", "wasm32-wasip2"])
        .arg("--manifest-path")
        .arg(&manifest_path)
        .arg("--target-dir")
        .arg(&target_dir);
    // As scripts/build-udfs.sh: simd128 lets LLVM vectorise batch loops, interleaving and
    // inlining cut the CPU-deadline checks the sandbox adds to every loop iteration and call.
    let simd = "-C target-feature=+simd128 -C llvm-args=-force-vector-interleave=8 \
                -C llvm-args=-inline-threshold=1000";
    match toolchain {
        Toolchain::Rustup => {
            cargo.env("RUSTFLAGS", simd);
        }
        Toolchain::Debian => {
            let shim = target_dir.join("bin");
            std::fs::create_dir_all(&shim).map_err(|e| RiffleError::io("creating", &shim, e))?;
            let lld = shim.join("rust-lld");
            let _ = std::fs::remove_file(&lld);
            std::os::unix::fs::symlink("/usr/lib/llvm-22/bin/lld", &lld)
                .map_err(|e| RiffleError::io("linking", &lld, e))?;
            let path_var = format!(
                "{}:/usr/lib/llvm-22/bin:{}",
                shim.display(),
                std::env::var("PATH").unwrap_or_default()
            );
            cargo
                .env("PATH", path_var)
                .env("RUSTC", "/usr/bin/rustc")
                .env("RUSTDOC", "/usr/bin/rustdoc")
                .env("RUSTC_BOOTSTRAP", "1")
                .env(
                    "RUSTFLAGS",
                    format!("-L /usr/lib/wasm32-wasi -C link-self-contained=no {simd}"),
                )
                .arg("-Zbuild-std=std,panic_abort");
        }
    }
    let status = cargo
        .status()
        .map_err(|e| RiffleError::Config(format!("running cargo: {e}")))?;
    if !status.success() {
        return Err(RiffleError::Config(format!(
            "cargo could not build {} for wasm32-wasip2 ({status}); its errors are above",
            path.display()
        )));
    }
    Ok(target_dir
        .join("wasm32-wasip2/release")
        .join(format!("{lib_name}.wasm")))
}

/// Builds, then checks the module loads here and prints what it exports.
pub(super) fn build_and_report(path: &Path) -> Result<()> {
    let wasm = build(path)?;
    let engine = UdfEngine::new(engine_options(&Default::default(), &Default::default()))?;
    let (_, spec) = engine.describe(&wasm)?;
    if spec.functions.is_empty() && spec.aggregates.is_empty() {
        return Err(RiffleError::InvalidModule {
            path: wasm,
            reason: "the module exports no functions: list them in `export_udfs`".into(),
        });
    }
    let bytes = std::fs::read(&wasm).map_err(|e| RiffleError::io("reading", &wasm, e))?;
    println!("{}", wasm.display());
    println!("sha256 {}", hex::encode(Sha256::digest(&bytes)));
    for f in &spec.functions {
        println!("  {}", f.signature());
    }
    for a in &spec.aggregates {
        println!(
            "  {}  (aggregate; state: {})",
            a.signature(),
            a.state_schema()
        );
    }
    Ok(())
}
