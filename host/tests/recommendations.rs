//! The recommendation demo at small scale, as `scripts/demo.sh recs` runs it: clicks on a real
//! Kafka-protocol broker; `scripts/demo/coviews.toml` counts item co-views within sessions (a
//! join of the click stream with itself) into a Delta table in update mode, over two runs
//! (the history, then the live hours); `recommend.toml` joins each view with the items most
//! co-viewed with it and sends them to a Kafka topic exactly once. `riffle verify` must find
//! both equal to batch mode, pandas must give the same co-views, and the topic must hold one
//! recommendation per view.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;

use common::broker::Broker;
use common::text;

fn demo_file(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../scripts/demo")
        .join(name)
}

/// `riffle ARGS...` in `dir`, talking to `broker`; it must succeed.
fn riffle_ok(args: &[&str], dir: &Path, broker: &Broker) -> Output {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_riffle"))
        .args(args)
        .env("RIFFLE_KAFKA_BOOTSTRAP", &broker.bootstrap)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "riffle {args:?}: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    out
}

/// `riffle verify ARGS...`, which must find the two sides equal.
fn verify(args: &[&str], dir: &Path, broker: &Broker) {
    let mut all = vec!["verify"];
    all.extend(args);
    let report = text(&riffle_ok(&all, dir, broker).stdout);
    assert!(
        report.contains("mismatched 0 · missing 0 · extra 0"),
        "{report}"
    );
}

#[test]
fn coviews_and_recommendations_agree_with_batch_mode_and_pandas() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let broker = Broker::start();
    // The demo's shop and rate: six hours of history, three live hours.
    let (history, live) = ("43200", "21600");
    let clicks = [
        "--users",
        "20000",
        "--items",
        "700",
        "--events-per-second",
        "2",
    ];
    let generate = |extra: &[&str]| {
        let mut args = vec!["generate", "clickstream"];
        args.extend(clicks);
        args.extend(extra);
        riffle_ok(&args, dir, &broker);
    };
    generate(&["--rows", history, "--out", "clicks/history.parquet"]);
    generate(&["--skip", history, "--rows", live, "--out", "live.parquet"]);
    for name in ["coviews.toml", "coviews.sql", "recommend.toml"] {
        std::fs::copy(demo_file(name), dir.join(name)).unwrap();
    }
    let produce = |file: &str| {
        riffle_ok(
            &[
                "produce",
                "--topic",
                "clicks",
                "--partitions",
                "1",
                "--file",
                file,
                "--key",
                "user_id",
            ],
            dir,
            &broker,
        );
    };
    let similar = |out: &str| {
        riffle_ok(
            &[
                "sql",
                "--table",
                "coviews=coviews",
                "--file",
                demo_file("similar_items.sql").to_str().unwrap(),
                "--output",
                out,
            ],
            dir,
            &broker,
        );
    };

    produce("clicks/history.parquet");
    riffle_ok(&["run", "coviews.toml", "--mode", "stream"], dir, &broker);
    verify(&["coviews.toml"], dir, &broker);
    similar("similar_items.parquet");

    produce("live.parquet");
    std::fs::copy(dir.join("live.parquet"), dir.join("clicks/live.parquet")).unwrap();
    riffle_ok(&["run", "recommend.toml", "--mode", "stream"], dir, &broker);
    riffle_ok(&["run", "coviews.toml", "--mode", "stream"], dir, &broker);
    verify(&["coviews.toml"], dir, &broker);
    verify(&["recommend.toml", "--key", "event_id"], dir, &broker);
    similar("similar_items_live.parquet");

    let out = std::process::Command::new("python3")
        .arg(demo_file("report_recs.py"))
        .args([
            "clicks",
            "live.parquet",
            "coviews",
            "similar_items.parquet",
            "similar_items_live.parquet",
            &broker.bootstrap,
            "recommendations",
            "report",
        ])
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "report_recs.py: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("report/recs_report.json")).unwrap())
            .unwrap();
    assert_eq!(report["coviews_differing_from_pandas"], 0, "{report}");
    // Hit rates are reported; at this scale they are too noisy to compare (see the report).
    assert!(report["hit_rate_at_10"].as_f64().is_some(), "{report}");
    assert!(
        report["purchases_after_a_view"].as_u64().unwrap() >= 50,
        "{report}"
    );
    assert!(dir.join("report/recs.png").is_file());
}
