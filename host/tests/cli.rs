//! The `riffle` binary, run as a user would.

mod common;

use common::{riffle_in as riffle, text};

use std::path::Path;
use std::process::Command;

use riffle_tests::udf;

#[test]
fn inspect_shows_signatures_hash_and_sandbox_mode() {
    let dir = tempfile::tempdir().unwrap();
    let path = udf("fraud");
    let out = riffle(&["udf", "inspect", path.to_str().unwrap()], dir.path());
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let hash = sha256_hex(&std::fs::read(&path).unwrap());
    assert!(stdout.contains(&hash), "{stdout}");
    assert!(
        stdout.contains("risk_score(amount DOUBLE, country VARCHAR) -> DOUBLE"),
        "{stdout}"
    );
    assert!(
        stdout.contains("amount_bucket(amount DOUBLE) -> VARCHAR or row error"),
        "{stdout}"
    );
    assert!(
        stdout.contains("is_night(ts TIMESTAMP) -> BOOLEAN"),
        "{stdout}"
    );
    assert!(stdout.contains("deterministic: frozen clock"), "{stdout}");
    assert!(
        stdout.contains("Great-circle distance"),
        "docs are shown: {stdout}"
    );
    // Aggregates, with the columns of their state.
    assert!(
        stdout.contains("aggregates (1):")
            && stdout
                .contains("decayed_avg(amount DOUBLE, ts TIMESTAMP) -> DOUBLE NULL  [retractable]")
            && stdout.contains("state: at TIMESTAMP NULL, weighted DOUBLE, weight DOUBLE"),
        "{stdout}"
    );

    // A module whose init hook requires configuration is still described.
    let out = riffle(
        &["udf", "inspect", udf("configured").to_str().unwrap()],
        dir.path(),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("scaled(x DOUBLE) -> DOUBLE"));

    let out = riffle(
        &["udf", "inspect", "--json", udf("clock").to_str().unwrap()],
        dir.path(),
    );
    assert!(out.status.success());
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["deterministic"], false);
    assert_eq!(json["abi_version"], 2);
    assert_eq!(json["functions"][0]["name"], "now");
    assert_eq!(json["functions"][0]["returns"], "timestamp");

    let out = riffle(
        &["udf", "inspect", "--json", udf("sketch").to_str().unwrap()],
        dir.path(),
    );
    assert!(out.status.success());
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let sketch = &json["aggregates"][0];
    assert_eq!(sketch["name"], "dd_quantile");
    assert_eq!(sketch["retractable"], true);
    assert_eq!(sketch["state"][2]["name"], "positive");
    assert_eq!(sketch["state"][2]["data_type"], "binary");
}

fn sha256_hex(bytes: &[u8]) -> String {
    // Independent of the host's implementation: ask coreutils.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("f");
    std::fs::write(&file, bytes).unwrap();
    let out = Command::new("sha256sum").arg(&file).output().unwrap();
    text(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

#[test]
fn generate_then_query_with_udfs_into_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let out = riffle(
        &[
            "generate",
            "fraud",
            "--rows",
            "20000",
            "--out",
            "data/tx.parquet",
        ],
        dir.path(),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("wrote 20000 fraud transactions"));

    let fraud = udf("fraud");
    let out = riffle(
        &[
            "sql",
            "--table",
            "tx=data/tx.parquet",
            "--udf",
            fraud.to_str().unwrap(),
            "--on-row-error",
            "null",
            "--output",
            "out/risky.csv",
            "SELECT country, count(*) AS n, round(avg(risk_score(amount, country)), 4) AS risk, \
             count(amount_bucket(amount)) AS bucketed \
             FROM tx WHERE country IS NOT NULL GROUP BY country ORDER BY risk DESC",
        ],
        dir.path(),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let csv = std::fs::read_to_string(dir.path().join("out/risky.csv")).unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines[0], "country,n,risk,bucketed");
    assert!(lines.len() > 5, "{csv}");
    // The riskiest country by the model's weights comes first.
    assert!(lines[1].starts_with("NG,"), "{csv}");
}

#[test]
fn scripts_register_udfs_with_create_functions() {
    let dir = tempfile::tempdir().unwrap();
    let script = format!(
        "CREATE FUNCTION normalize_email FROM '{}';\n\
         SELECT normalize_email(e) AS e FROM (VALUES ('J.Doe+x@GMail.com'), ('a@b.org')) AS t(e);",
        udf("text").display()
    );
    std::fs::write(dir.path().join("q.sql"), script).unwrap();
    let out = riffle(&["sql", "--file", "q.sql"], dir.path());
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("jdoe@gmail.com") && stdout.contains("a@b.org"),
        "{stdout}"
    );
}

#[test]
fn bad_input_gets_a_clear_error_and_a_failing_exit_code() {
    let dir = tempfile::tempdir().unwrap();
    let out = riffle(
        &["sql", "--table", "tx=missing.parquet", "SELECT 1"],
        dir.path(),
    );
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("missing.parquet does not exist") && stderr.contains("check the input"),
        "{stderr}"
    );

    // Rates of zero are refused before anything runs (no broker is needed to see that).
    for args in [
        &[
            "produce",
            "--topic",
            "t",
            "--bootstrap",
            "127.0.0.1:1",
            "--rate",
            "0",
        ][..],
        &[
            "produce",
            "--topic",
            "t",
            "--bootstrap",
            "127.0.0.1:1",
            "--events-per-second=-1",
        ],
        &["generate", "fraud", "--out", "x.parquet", "--days", "0"],
    ] {
        let out = riffle(args, dir.path());
        assert!(!out.status.success(), "{args:?}");
        let stderr = text(&out.stderr);
        assert!(
            stderr.contains("must be a positive number"),
            "{args:?}: {stderr}"
        );
    }

    let out = riffle(
        &["udf", "inspect", "Cargo.toml"],
        Path::new(env!("CARGO_MANIFEST_DIR")),
    );
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("invalid UDF module"),
        "{}",
        text(&out.stderr)
    );

    std::fs::write(
        dir.path().join("riffle.toml"),
        "[tables]\ntx = \"a.parquet\"\n[limitz]\n",
    )
    .unwrap();
    let out = riffle(&["sql", "--config", "riffle.toml", "SELECT 1"], dir.path());
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("riffle.toml") && stderr.contains("line 3"),
        "{stderr}"
    );

    let out = riffle(
        &[
            "sql",
            "--udf",
            udf("hostile").to_str().unwrap(),
            "--udf-timeout-ms",
            "100",
            "SELECT spin(1)",
        ],
        dir.path(),
    );
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("UDF spin")
            && stderr.contains("CPU deadline")
            && stderr.contains("a UDF failed"),
        "{stderr}"
    );
}

#[test]
fn udf_test_runs_a_function_or_an_aggregate_over_a_sample() {
    let dir = tempfile::tempdir().unwrap();
    let out = riffle(
        &[
            "generate",
            "fraud",
            "--rows",
            "20000",
            "--out",
            "tx.parquet",
        ],
        dir.path(),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let fraud = udf("fraud");
    let sketch = udf("sketch");
    let fraud = fraud.to_str().unwrap();
    let sketch = sketch.to_str().unwrap();

    // A scalar with row errors: every one is listed (by its row), counted as SQL counts them.
    let out = riffle(
        &[
            "udf",
            "test",
            fraud,
            "--input",
            "tx.parquet",
            "amount_bucket(amount)",
            "--errors",
            "1000",
        ],
        dir.path(),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let negative = riffle(
        &[
            "sql",
            "--table",
            "tx=tx.parquet",
            "--output",
            "neg.csv",
            "SELECT count(*) AS n FROM tx WHERE amount < 0",
        ],
        dir.path(),
    );
    assert!(negative.status.success(), "{}", text(&negative.stderr));
    let negative: usize = std::fs::read_to_string(dir.path().join("neg.csv"))
        .unwrap()
        .lines()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    assert!(negative > 0, "the generator writes refunds");
    assert!(
        stdout.contains("amount_bucket(amount)")
            && stdout.contains("20000 rows (20 shown)")
            && stdout.contains(&format!("row errors: {negative}\n"))
            && stdout.contains(": invalid amount -")
            && stdout.contains("limits: 5000.000 ms per call"),
        "{stdout}"
    );
    assert_eq!(stdout.matches("\n  row ").count(), negative, "{stdout}");

    // An aggregate over the whole sample: the same value `riffle sql` computes.
    let out = riffle(
        &[
            "udf",
            "test",
            sketch,
            "--input",
            "tx.parquet",
            "dd_quantile(amount, 0.5)",
        ],
        dir.path(),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let sql = riffle(
        &[
            "sql",
            "--udf",
            sketch,
            "--table",
            "tx=tx.parquet",
            "--output",
            "q.csv",
            "SELECT dd_quantile(amount, 0.5) AS q FROM tx",
        ],
        dir.path(),
    );
    assert!(sql.status.success(), "{}", text(&sql.stderr));
    let median = std::fs::read_to_string(dir.path().join("q.csv")).unwrap();
    let median = median.lines().nth(1).unwrap();
    assert!(
        stdout.contains(&format!("| {median} "))
            && stdout
                .contains("state after 20000 rows: q DOUBLE NULL, zeros BIGINT, positive BYTEA"),
        "{median}: {stdout}"
    );

    // CSV input, expressions as arguments, a 0.1.0 module; a name the module lacks.
    std::fs::write(dir.path().join("x.csv"), "x\n1\n2\n").unwrap();
    let legacy = udf("legacy");
    let legacy = legacy.to_str().unwrap();
    let out = riffle(
        &[
            "udf",
            "test",
            legacy,
            "--input",
            "x.csv",
            "legacy_triple(x * 2)",
        ],
        dir.path(),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("| 2     | 6 ") && stdout.contains("| 4     | 12 "),
        "{stdout}"
    );
    let out = riffle(
        &["udf", "test", legacy, "--input", "x.csv", "tripple(x)"],
        dir.path(),
    );
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("exports no function tripple (it has: legacy_triple)"),
        "{}",
        text(&out.stderr)
    );
}
