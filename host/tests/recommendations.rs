//! The recommendation demo at small scale, as `scripts/demo.sh recs` runs it: clicks on a real
//! Kafka-protocol broker; `scripts/demo/coviews.toml` counts item co-views within sessions (a
//! join of the click stream with itself) into a Delta table in update mode, over two runs
//! (the history, then the live hours); `recommend.toml` joins each view with the items most
//! co-viewed with it and sends them to a Kafka topic exactly once. `riffle verify` must find
//! both equal to batch mode, pandas must give the same co-views, the topic must hold one
//! recommendation per view, and on the live hours' purchases the recommendations must beat
//! recommending the best sellers.

mod common;

use std::path::Path;

use common::broker::Broker;
use common::{demo_file, riffle_with_broker as riffle, riffle_with_broker_ok as riffle_ok, text};

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
    // The demo's shop and rate: six hours of history, then three live hours in two halves.
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
    generate(&["--rows", "43200", "--out", "clicks/history.parquet"]);
    generate(&[
        "--skip",
        "43200",
        "--rows",
        "10800",
        "--out",
        "live/1.parquet",
    ]);
    generate(&[
        "--skip",
        "54000",
        "--rows",
        "10800",
        "--out",
        "live/2.parquet",
    ]);
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
                "4",
                "--file",
                file,
                "--key",
                "user_id",
            ],
            dir,
            &broker,
        );
    };
    // Each item's top 10, renamed over the file the recommendation stream joins with.
    let similar = || {
        riffle_ok(
            &[
                "sql",
                "--table",
                "coviews=coviews",
                "--file",
                demo_file("similar_items.sql").to_str().unwrap(),
                "--output",
                "similar_items.next.parquet",
            ],
            dir,
            &broker,
        );
        std::fs::rename(
            dir.join("similar_items.next.parquet"),
            dir.join("similar_items.parquet"),
        )
        .unwrap();
    };

    produce("clicks/history.parquet");
    riffle_ok(&["run", "coviews.toml", "--mode", "stream"], dir, &broker);
    verify(&["coviews.toml"], dir, &broker);
    similar();
    std::fs::copy(
        dir.join("similar_items.parquet"),
        dir.join("similar_items_history.parquet"),
    )
    .unwrap();

    for half in ["1", "2"] {
        let file = format!("live/{half}.parquet");
        produce(&file);
        std::fs::copy(
            dir.join(&file),
            dir.join(format!("clicks/live-{half}.parquet")),
        )
        .unwrap();
        riffle_ok(&["run", "recommend.toml", "--mode", "stream"], dir, &broker);
        if half == "1" {
            verify(&["recommend.toml", "--key", "event_id"], dir, &broker);
        } else {
            // The second half was served the similarity the first half updated: from its start
            // (7:30, 2 clicks a second) it equals batch mode with today's similar items, and
            // over all rows it does not, as the earlier ones were served the older table.
            verify(
                &[
                    "recommend.toml",
                    "--key",
                    "event_id",
                    "--from",
                    "2026-01-01 07:30:00",
                ],
                dir,
                &broker,
            );
            let all = riffle(
                &["verify", "recommend.toml", "--key", "event_id"],
                dir,
                &broker,
            );
            assert_eq!(all.status.code(), Some(3), "{}", text(&all.stdout));
        }
        riffle_ok(&["run", "coviews.toml", "--mode", "stream"], dir, &broker);
        verify(&["coviews.toml"], dir, &broker);
        similar();
    }

    let out = std::process::Command::new("python3")
        .arg(demo_file("report_recs.py"))
        .args([
            "clicks",
            "live",
            "coviews",
            "similar_items_history.parquet",
            "similar_items.parquet",
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
    // The planted tastes are learnt: on the held-out purchases the co-view recommendations
    // beat recommending the best sellers, by a margin noise cannot explain (the report exits
    // 1 below 5 standard errors; checked here too, against a report that forgot to).
    assert!(
        report["purchases_after_a_view"].as_u64().unwrap() >= 200,
        "{report}"
    );
    let hit_rate = report["hit_rate_at_10"].as_f64().unwrap();
    let popular = report["popularity_hit_rate_at_10"].as_f64().unwrap();
    assert!(hit_rate > 2.0 * popular, "{report}");
    assert!(
        report["z_coviews_over_popularity"].as_f64().unwrap() >= 5.0,
        "{report}"
    );
    assert!(dir.join("report/recs.png").is_file());
}
