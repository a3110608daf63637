//! The fraud demo's training path at small scale, as `scripts/demo.sh` runs it: the feature
//! pipeline (`scripts/demo/fraud_training.toml`) in batch mode writes the training table, the
//! same pipeline in stream mode must give the same features row for row (`riffle verify`), and
//! a model trained on the table with scikit-learn (`scripts/demo/train_fraud.py`) must find the
//! planted fraud far better than the rule-based score. Then the serving path: the exported
//! ONNX model scores a backfill and live payments from Kafka inside the Wasm module
//! (`fraud_scores.toml`, one Delta table) and sends alerts to a Kafka topic
//! (`fraud_alerts.toml`); `riffle verify` finds the live scores and alerts equal to batch mode,
//! and onnxruntime, reading the table's features, gives the served scores.

mod common;

use std::path::Path;

use arrow::array::AsArray;
use arrow::datatypes::TimestampMicrosecondType;
use common::broker::Broker;
use common::{demo_file, riffle, riffle_in, text};

/// `python3 ARGS...`, its output captured.
fn python(args: &[&std::ffi::OsStr]) -> std::process::Output {
    std::process::Command::new("python3")
        .args(args)
        .output()
        .unwrap()
}

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
        demo_file("card_features.sql"),
        dir.join("card_features.sql"),
    )
    .unwrap();
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
    let rows = 150_000u64;
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
    // Against DataFusion's own window operators: batch mode runs the OVER windows with the
    // stream's operator, so plain batch mode would be the code checking itself.
    let out = riffle_in(
        &["verify", pipeline.to_str().unwrap(), "--reference"],
        dir.path(),
    );
    let report = text(&out.stdout);
    assert!(out.status.success(), "{report}{}", text(&out.stderr));
    assert!(
        report.contains(&format!(
            "matched {rows} · mismatched 0 · missing 0 · extra 0"
        )),
        "{report}"
    );

    let out = python(&[
        demo_file("train_fraud.py").as_os_str(),
        dir.path().join("training.parquet").as_os_str(),
        dir.path().join("model").as_os_str(),
    ]);
    assert!(
        out.status.success(),
        "train_fraud.py (needs scikit-learn, matplotlib, skl2onnx, onnxruntime and pyarrow from \
         PyPI): {}{}",
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
    // The exported model is the trained one (onnxruntime against scikit-learn).
    assert!(
        report["onnx"]["max_abs_diff_vs_sklearn"].as_f64().unwrap() < 1e-3,
        "{report:#}"
    );

    serve(dir.path(), rows);
}

/// The serving half of the demo: backfill and live scores into one Delta table, alerts to
/// Kafka, both checked against batch mode, the served scores against onnxruntime.
fn serve(dir: &Path, history: u64) {
    for name in ["fraud_scored.sql", "fraud_scores.toml", "fraud_alerts.toml"] {
        std::fs::copy(demo_file(name), dir.join(name)).unwrap();
    }
    std::fs::copy(
        riffle_tests::udf("fraud_model"),
        dir.join("riffle_udfs_fraud_model.wasm"),
    )
    .unwrap();
    let broker = Broker::start();
    let live = 10_000u64;
    let continuation = |what: &[&str]| {
        let mut args = what.to_vec();
        let (skip, rows) = (history.to_string(), live.to_string());
        args.extend([
            "--skip",
            &skip,
            "--rows",
            &rows,
            "--cards",
            "2000",
            "--events-per-second",
            "0.5",
        ]);
        let out = riffle_in(&args, dir);
        assert!(out.status.success(), "{what:?}: {}", text(&out.stderr));
    };
    continuation(&["generate", "fraud", "--out", "live.parquet"]);
    continuation(&[
        "produce",
        "--topic",
        "payments",
        "--partitions",
        "1",
        "--bootstrap",
        &broker.bootstrap,
    ]);
    for (pipeline, mode) in [
        ("fraud_scores.toml", "batch"),
        ("fraud_scores.toml", "stream"),
        ("fraud_alerts.toml", "stream"),
    ] {
        let out = riffle(&dir.join(pipeline), mode)
            .env("RIFFLE_KAFKA_BOOTSTRAP", &broker.bootstrap)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{pipeline} {mode}: {}",
            text(&out.stderr)
        );
    }

    // The live payments' time range, less the last minute: the stream holds the last 30 s of
    // event time until its watermark passes them, as a live query must.
    let (first, last) = time_range(&dir.join("live.parquet"));
    let (from, to) = (micros_text(first), micros_text(last - 60_000_000));
    let verify = |args: &[&str]| {
        let mut all = vec!["verify"];
        all.extend(args);
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_riffle"));
        let out = c
            .args(all)
            .env("RIFFLE_KAFKA_BOOTSTRAP", &broker.bootstrap)
            .current_dir(dir)
            .output()
            .unwrap();
        let report = text(&out.stdout);
        assert!(out.status.success(), "{report}{}", text(&out.stderr));
        assert!(
            report.contains("mismatched 0 · missing 0 · extra 0"),
            "{report}"
        );
        report
    };
    let scores = verify(&[
        "fraud_scores.toml",
        "--input",
        "transactions=live.parquet",
        "--from",
        &from,
        "--to",
        &to,
        "--key",
        "tx_id",
    ]);
    // All but the last minute's 30 or so payments, scored live exactly as in batch mode.
    let matched = |report: &str| -> u64 {
        let after = report.split("matched ").nth(1).unwrap();
        after.split(' ').next().unwrap().parse().unwrap()
    };
    assert!(matched(&scores) > live - 60, "{scores}");
    let alerts = verify(&["fraud_alerts.toml", "--to", &to, "--key", "tx_id"]);
    assert!(matched(&alerts) > 10, "{alerts}");

    let out = python(&[
        demo_file("report_scores.py").as_os_str(),
        dir.join("scores").as_os_str(),
        dir.join("model/fraud_model.onnx").as_os_str(),
        dir.join("live.parquet").as_os_str(),
        dir.join("model").as_os_str(),
    ]);
    assert!(
        out.status.success(),
        "report_scores.py (needs deltalake and onnxruntime): {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("model/scores_report.json")).unwrap())
            .unwrap();
    // Each payment once: the backfill's and the stream's, no more.
    assert_eq!(report["backfill_rows"], history, "{report:#}");
    assert!(
        report["live_rows"].as_u64().unwrap() > live - 60,
        "{report:#}"
    );
    // The module's tree evaluator and onnxruntime evaluate the same float32 trees.
    assert!(
        report["served_vs_onnxruntime"]["max_abs_diff"]
            .as_f64()
            .unwrap()
            < 1e-5,
        "{report:#}"
    );
    let live_quality = &report["live"];
    let auc = |who: &str| live_quality[format!("{who}_roc_auc")].as_f64().unwrap();
    assert!(auc("model") > auc("rule") + 0.1, "{report:#}");
    // The table's live scores of 0.5 or more include every alert verified (up to a minute
    // before the end) and perhaps some of the last minute.
    assert!(
        live_quality["alerts"].as_u64().unwrap() >= matched(&alerts),
        "{report:#}"
    );
    assert!(
        dir.join("model/score_distributions.png")
            .metadata()
            .unwrap()
            .len()
            > 10_000
    );

    any_model_is_served_by_tract(dir);

    // What the module cannot serve fails the run with its reason: a file that is no ONNX
    // model, and the trained model relabelled as trained on the features in another order.
    let relabel = r#"
import sys, onnx
m = onnx.load(sys.argv[1])
entry = next(e for e in m.metadata_props if e.key == "riffle.features")
names = entry.value.split(",")
entry.value = ",".join([names[1], names[0]] + names[2:])
onnx.save(m, sys.argv[2])
"#;
    let out = python(&[
        "-c".as_ref(),
        relabel.as_ref(),
        dir.join("model/fraud_model.onnx").as_os_str(),
        dir.join("reordered.onnx").as_os_str(),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    for (config, reason) in [
        ("live.parquet", "the ONNX model cannot be served"),
        (
            "reordered.onnx",
            "it was trained on the features rule_score, amount, km_from_previous",
        ),
    ] {
        let file = std::fs::read_to_string(dir.join("fraud_alerts.toml")).unwrap();
        let bad = file.replace("model/fraud_model.onnx", config);
        std::fs::write(dir.join("bad_model.toml"), bad).unwrap();
        let out = riffle(&dir.join("bad_model.toml"), "batch")
            .output()
            .unwrap();
        let stderr = text(&out.stderr);
        assert!(!out.status.success());
        assert!(
            stderr.contains("rejected its configuration") && stderr.contains(reason),
            "{stderr}"
        );
    }
}

/// A model that is not a tree ensemble (a logistic regression written as MatMul, Add and
/// Sigmoid) is refused by the tree-only module with the reason and the module that serves it,
/// and goes through tract in that one (`fraud_model_tract`): its scores of the table's
/// features equal the same formula computed by SQL, to float32 precision.
fn any_model_is_served_by_tract(dir: &Path) {
    std::fs::copy(
        riffle_tests::udf("fraud_model_tract"),
        dir.join("riffle_udfs_fraud_model_tract.wasm"),
    )
    .unwrap();
    let model = dir.join("logistic.onnx");
    let script = r#"
import sys, numpy as np, onnx
from onnx import TensorProto, helper, numpy_helper
w = numpy_helper.from_array(np.full((14, 1), 1e-5, dtype=np.float32), "w")
b = numpy_helper.from_array(np.array([-1.0], dtype=np.float32), "b")
graph = helper.make_graph(
    [helper.make_node("MatMul", ["features", "w"], ["z"]),
     helper.make_node("Add", ["z", "b"], ["logit"]),
     helper.make_node("Sigmoid", ["logit"], ["score"])],
    "logistic",
    [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["rows", 14])],
    [helper.make_tensor_value_info("score", TensorProto.FLOAT, ["rows", 1])],
    [w, b])
onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), sys.argv[1])
"#;
    let out = python(&["-c".as_ref(), script.as_ref(), model.as_os_str()]);
    assert!(
        out.status.success(),
        "writing an ONNX model: {}",
        text(&out.stderr)
    );
    let features = "amount, rule_score, km_from_previous, km_per_hour, seconds_since_previous, \
                    tx_10m, tx_1h, tx_24h, amount_10m, amount_1h, amount_24h, amount_vs_30d, \
                    risky_category, night";
    let sum = features.replace(", ", " + ");
    let sql = |module: &str| {
        format!(
            "CREATE FUNCTIONS FROM '{module}' WITH CONFIG 'logistic.onnx';\n\
         SELECT count(*) AS n, max(abs(fraud_model_score({features}) \
                - 1.0 / (1.0 + exp(-(1e-5 * ({sum}) - 1.0))))) AS diff, \
                min(fraud_model_score({features})) AS low, \
                max(fraud_model_score({features})) AS high \
         FROM (SELECT * FROM scores WHERE amount IS NOT NULL AND rule_score IS NOT NULL \
               AND amount_vs_30d IS NOT NULL AND km_per_hour IS NOT NULL \
               LIMIT 5000) s;\n"
        )
    };
    let run = |module: &str| {
        std::fs::write(dir.join("logistic.sql"), sql(module)).unwrap();
        riffle_in(
            &[
                "sql",
                "--file",
                "logistic.sql",
                "--table",
                "scores=scores",
                "--output",
                "logistic.csv",
            ],
            dir,
        )
    };
    let out = run("riffle_udfs_fraud_model.wasm");
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("it is not a binary tree-ensemble classifier")
            && stderr.contains("riffle_udfs_fraud_model_tract.wasm"),
        "{stderr}"
    );
    let out = run("riffle_udfs_fraud_model_tract.wasm");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let csv = std::fs::read_to_string(dir.join("logistic.csv")).unwrap();
    let values: Vec<&str> = csv.lines().nth(1).unwrap().split(',').collect();
    let number = |i: usize| -> f64 { values[i].parse().unwrap() };
    assert_eq!(number(0), 5000.0, "{csv}");
    assert!(
        number(1) < 1e-5,
        "tract's logistic regression against SQL's: {csv}"
    );
    // The scores spread (a model that gave every row the same value would not be checked).
    assert!(number(3) - number(2) > 0.2, "{csv}");
}

/// The smallest and largest `ts` of a Parquet file, in microseconds.
fn time_range(file: &Path) -> (i64, i64) {
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(
        std::fs::File::open(file).unwrap(),
    )
    .unwrap()
    .build()
    .unwrap();
    let (mut first, mut last) = (i64::MAX, i64::MIN);
    for batch in reader {
        let batch = batch.unwrap();
        let ts = batch
            .column_by_name("ts")
            .unwrap()
            .as_primitive::<TimestampMicrosecondType>();
        for t in ts.values() {
            first = first.min(*t);
            last = last.max(*t);
        }
    }
    (first, last)
}

/// Microseconds since the epoch as RFC 3339.
fn micros_text(micros: i64) -> String {
    chrono::DateTime::from_timestamp_micros(micros)
        .unwrap()
        .to_rfc3339()
}
