//! The UDF author's toolbox, used as an author outside this repository would: `riffle udf
//! new` in a temporary directory, the project's own native tests with `cargo test`, `riffle
//! udf build` into a component (its sha256 checked with coreutils), `riffle udf test` over a
//! sample, and the module in `riffle sql` and in a `riffle run` pipeline. Bad projects fail
//! with errors that say what to fix.
//!
//! The new project resolves its dependencies (wit-bindgen, syn, quote, libm) from crates.io
//! like any crate; the Cargo cache this workspace's build filled already holds them.

mod common;

use common::{riffle_in as riffle, text};

use std::path::Path;
use std::process::{Command, Output};

fn ok(out: &Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what}: {}\n{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

#[test]
fn new_test_build_try_and_use_a_udf_project_outside_the_repository() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    ok(&riffle(&["udf", "new", "shop-udfs"], root), "udf new");
    let project = root.join("shop-udfs");
    for file in [
        "Cargo.toml",
        "src/lib.rs",
        "README.md",
        "riffle-udf/wit/udf.wit",
    ] {
        assert!(project.join(file).is_file(), "{file}");
    }
    let again = riffle(&["udf", "new", "shop-udfs"], root);
    assert!(!again.status.success());
    assert!(text(&again.stderr).contains("already exists"));

    // The example's native unit tests pass with plain `cargo test`.
    let test = Command::new("cargo")
        .arg("test")
        .current_dir(&project)
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("RUSTFLAGS")
        .output()
        .unwrap();
    let said = format!("{}{}", text(&test.stdout), text(&test.stderr));
    assert!(test.status.success(), "cargo test: {said}");
    assert!(said.contains("test result: ok. 2 passed"), "{said}");

    let built = ok(&riffle(&["udf", "build", "shop-udfs"], root), "udf build");
    let wasm = std::fs::canonicalize(&project)
        .unwrap()
        .join("target/wasm32-wasip2/release/shop_udfs.wasm");
    build_report_try_and_use(root, &built, &wasm, "percent 200 is not between");
}

/// What both languages' projects must do once built: `udf build` printed the module's path,
/// its sha256 (checked with coreutils) and the example's signatures; `udf test` runs the
/// example scalar over a sample (`row_error` is its message for the bad row); the module
/// works in `riffle sql` and in a `riffle run` pipeline.
fn build_report_try_and_use(root: &Path, built: &str, wasm: &Path, row_error: &str) {
    assert!(
        built.starts_with(&format!("{}\n", wasm.display())),
        "{built}"
    );
    let sha = Command::new("sha256sum").arg(wasm).output().unwrap();
    assert!(
        built.contains(&format!("sha256 {}", &text(&sha.stdout)[..64])),
        "{built}"
    );
    assert!(
        built.contains("discounted(amount DOUBLE, percent DOUBLE) -> DOUBLE or row error")
            && built.contains("range_width(value DOUBLE) -> DOUBLE NULL  (aggregate; state: low DOUBLE NULL, high DOUBLE NULL)"),
        "{built}"
    );

    // Try it on a sample, then use it in SQL and in a pipeline.
    std::fs::write(
        root.join("sample.csv"),
        "shop,amount,percent\na,100,10\na,50,200\nb,80,50\n",
    )
    .unwrap();
    let wasm = wasm.to_str().unwrap();
    let tried = ok(
        &riffle(
            &[
                "udf",
                "test",
                wasm,
                "--input",
                "sample.csv",
                "discounted(amount, percent)",
            ],
            root,
        ),
        "udf test",
    );
    assert!(
        tried.contains("row errors: 1") && tried.contains(&format!("row 1: {row_error}")),
        "{tried}"
    );
    let sql = ok(
        &riffle(
            &[
                "sql",
                "--udf",
                wasm,
                "--table",
                "t=sample.csv",
                "--on-row-error",
                "null",
                "SELECT shop, sum(discounted(amount, percent)) AS paid, \
                 range_width(amount) AS spread FROM t GROUP BY shop ORDER BY shop",
            ],
            root,
        ),
        "sql",
    );
    assert!(
        sql.contains("| a    | 90.0 | 50.0   |") && sql.contains("| b    | 40.0 | 0.0    |"),
        "{sql}"
    );
    std::fs::write(
        root.join("pipeline.toml"),
        format!(
            r#"
query = "SELECT shop, range_width(amount) AS spread FROM t GROUP BY shop"
[source]
name = "t"
batch = "sample.csv"
[[udfs]]
path = "{wasm}"
[sink]
batch = "spread.csv"
"#
        ),
    )
    .unwrap();
    ok(
        &riffle(
            &["run", "pipeline.toml", "--mode", "batch", "--quiet"],
            root,
        ),
        "run",
    );
    let mut lines: Vec<String> = std::fs::read_to_string(root.join("spread.csv"))
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    lines.sort();
    assert_eq!(lines, ["a,50.0", "b,0.0", "shop,spread"]);
}

#[test]
fn building_what_is_not_a_udf_crate_says_what_to_fix() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let out = riffle(&["udf", "build", "nowhere"], root);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("not a UDF project") && text(&out.stderr).contains("udf new"),
        "{}",
        text(&out.stderr)
    );

    std::fs::create_dir_all(root.join("plain/src")).unwrap();
    std::fs::write(
        root.join("plain/Cargo.toml"),
        "[package]\nname = \"plain\"\nversion = \"0.1.0\"\nedition = \"2024\"\n[workspace]\n",
    )
    .unwrap();
    std::fs::write(root.join("plain/src/lib.rs"), "").unwrap();
    let out = riffle(&["udf", "build", "plain"], root);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("not a cdylib")
            && text(&out.stderr).contains("crate-type = [\"cdylib\", \"rlib\"]"),
        "{}",
        text(&out.stderr)
    );

    // A cdylib that exports no functions builds, and is refused as a module.
    std::fs::write(
        root.join("plain/Cargo.toml"),
        "[package]\nname = \"plain\"\nversion = \"0.1.0\"\nedition = \"2024\"\n\
         [lib]\ncrate-type = [\"cdylib\"]\n[workspace]\n",
    )
    .unwrap();
    let out = riffle(&["udf", "build", "plain"], root);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("not a Riffle UDF module"),
        "{}",
        text(&out.stderr)
    );
}

/// The same journey for a Python project: `new --lang python`, the project's own tests with
/// `python3 -m unittest`, `build` with componentize-py, `test`, SQL and a pipeline. An exception
/// in a function fails the query with the function, the exception and the module named.
#[test]
fn a_python_udf_project_from_new_to_sql_and_a_pipeline() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    ok(
        &riffle(&["udf", "new", "shop-py", "--lang", "python"], root),
        "udf new",
    );
    let project = std::fs::canonicalize(root.join("shop-py")).unwrap();
    for file in [
        "app.py",
        "test_app.py",
        "README.md",
        "riffle_udf/__init__.py",
        "wit/udf.wit",
    ] {
        assert!(project.join(file).is_file(), "{file}");
    }

    // The example's native tests pass with plain CPython, no component involved.
    let test = Command::new("python3")
        .args(["-m", "unittest", "-v"])
        .current_dir(&project)
        .output()
        .unwrap();
    let said = format!("{}{}", text(&test.stdout), text(&test.stderr));
    assert!(test.status.success(), "unittest: {said}");
    assert!(
        said.contains("Ran 2 tests") && said.contains("OK"),
        "{said}"
    );

    let built = ok(&riffle(&["udf", "build", "shop-py"], root), "udf build");
    let wasm = project.join("build/shop_py.wasm");
    build_report_try_and_use(root, &built, &wasm, "percent 200.0 is not between");
    let module = wasm.to_str().unwrap();

    // A bug in a function: the query fails and says where.
    let app = std::fs::read_to_string(project.join("app.py")).unwrap();
    let app = app.replace(
        "WitWorld = export_udfs(discounted, RangeWidth)",
        "@scalar\ndef ratio(a: float, b: float) -> float:\n    return a / b\n\n\n\
         WitWorld = export_udfs(discounted, RangeWidth, ratio)",
    );
    std::fs::write(project.join("app.py"), app).unwrap();
    ok(&riffle(&["udf", "build", "shop-py"], root), "rebuild");
    let out = riffle(
        &[
            "sql",
            "--udf",
            module,
            "--table",
            "t=sample.csv",
            "SELECT ratio(amount, amount - 100) FROM t",
        ],
        root,
    );
    let said = text(&out.stderr);
    assert!(!out.status.success(), "{said}");
    assert!(
        said.contains("shop_py.wasm")
            && said.contains("ratio raised ZeroDivisionError: division by zero")
            && said.contains("app.py\", line 45, in ratio"),
        "{said}"
    );
}

#[test]
fn a_python_project_without_its_contract_says_what_to_fix() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::create_dir_all(root.join("loose")).unwrap();
    std::fs::write(root.join("loose/app.py"), "x = 1\n").unwrap();
    let out = riffle(&["udf", "build", "loose"], root);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("no wit/udf.wit") && text(&out.stderr).contains("--lang python"),
        "{}",
        text(&out.stderr)
    );
}
