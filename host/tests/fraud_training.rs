//! The fraud demo's training path at small scale, as `scripts/demo.sh` runs it: the feature
//! pipeline (`scripts/demo/fraud_training.toml`) in batch mode writes the training table, the
//! same pipeline in stream mode must give the same features row for row (`riffle verify`), and
//! a model trained on the table with scikit-learn (`scripts/demo/train_fraud.py`) must find the
//! planted fraud far better than the rule-based score.

mod common;

use std::path::Path;

use common::{riffle, riffle_in, text};

/// The demo's pipeline file, at `rows` transactions, with the fraud UDF module beside it.
fn demo_pipeline(dir: &Path, rows: u64) -> std::path::PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let file = std::fs::read_to_string(root.join("scripts/demo/fraud_training.toml")).unwrap();
    let edited = file.replace("rows = 300000", &format!("rows = {rows}"));
    assert_ne!(
        edited, file,
        "the demo pipeline's generator sets rows = 300000"
    );
    let path = dir.join("fraud_training.toml");
    std::fs::write(&path, edited).unwrap();
    std::fs::copy(
        riffle_tests::udf("fraud"),
        dir.join("riffle_udfs_fraud.wasm"),
    )
    .unwrap();
    path
}

#[test]
fn features_agree_in_both_modes_and_a_trained_model_beats_the_rules() {
    let dir = tempfile::tempdir().unwrap();
    let rows = 150_000;
    let out = riffle_in(
        &[
            "generate",
            "fraud",
            "--rows",
            &rows.to_string(),
            "--cards",
            "2000",
            "--events-per-second",
            "0.5",
            "--out",
            "history.parquet",
        ],
        dir.path(),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let pipeline = demo_pipeline(dir.path(), rows);

    for mode in ["batch", "stream"] {
        let out = riffle(&pipeline, mode).output().unwrap();
        assert!(out.status.success(), "{mode}: {}", text(&out.stderr));
    }
    let out = riffle_in(&["verify", pipeline.to_str().unwrap()], dir.path());
    let report = text(&out.stdout);
    assert!(out.status.success(), "{report}{}", text(&out.stderr));
    assert!(
        report.contains(&format!(
            "matched {rows} · mismatched 0 · missing 0 · extra 0"
        )),
        "{report}"
    );

    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/demo/train_fraud.py");
    let out = std::process::Command::new("python3")
        .arg(script)
        .arg(dir.path().join("training.parquet"))
        .arg(dir.path().join("model"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "train_fraud.py (needs scikit-learn, matplotlib and pyarrow from PyPI): {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(
        &std::fs::read(dir.path().join("model/fraud_model_report.json")).unwrap(),
    )
    .unwrap();
    let auc = |who: &str| report[who]["roc_auc"].as_f64().unwrap();
    let precision = |who: &str| report[who]["precision_at_alert_rate"].as_f64().unwrap();
    assert!(auc("model") > 0.9, "{report:#}");
    assert!(auc("model") > auc("rule") + 0.1, "{report:#}");
    assert!(precision("model") > 2.0 * precision("rule"), "{report:#}");
    // Every planted pattern is in the held-out rows, and the model catches most of each.
    let recall = report["model"]["recall_by_pattern"].as_object().unwrap();
    assert_eq!(recall.len(), 4, "{report:#}");
    assert!(dir.path().join("model/roc.png").metadata().unwrap().len() > 10_000);
}
