//! The LiveInventory demo at small scale, as `scripts/demo.sh inventory` runs it: a shop's
//! sales and restocks on a real Kafka-protocol broker, streamed by
//! `scripts/demo/live_inventory.toml` (joined with the product catalogue, each product's stock
//! and last-hour pace merged into a Delta table in update mode) over two runs, the second
//! resuming from the checkpoint after more events arrived. `riffle verify` must find the table
//! equal to batch mode over the events the stream released (it cuts at the watermark by
//! itself for an update-mode aggregation after an OVER window), pandas over
//! the same events (reading the table with the `deltalake` package) must agree, and the
//! pricing query must flag only products with a planted surge in the last hour.

mod common;

use common::broker::Broker;
use common::{demo_file, riffle_with_broker as riffle, riffle_with_broker_ok as riffle_ok, text};

#[test]
fn live_inventory_equals_batch_and_pandas_and_flags_the_planted_surges() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let broker = Broker::start();
    // A day of history at one event a second, then three live hours.
    let (history, live) = ("86400", "10800");
    riffle_ok(
        &[
            "generate",
            "sales",
            "--rows",
            history,
            "--out",
            "sales/history.parquet",
            "--products-out",
            "products.parquet",
        ],
        dir,
        &broker,
    );
    riffle_ok(
        &[
            "generate",
            "sales",
            "--skip",
            history,
            "--rows",
            live,
            "--out",
            "sales/live.parquet",
        ],
        dir,
        &broker,
    );
    for name in ["live_inventory.toml", "live_inventory.sql"] {
        std::fs::copy(demo_file(name), dir.join(name)).unwrap();
    }

    // The history, streamed; then the live hours, streamed by a second run that resumes from
    // the checkpoint and merges into the same table. Four partitions, read unevenly: the
    // watermark follows the slowest, so no event is late.
    for file in ["sales/history.parquet", "sales/live.parquet"] {
        riffle_ok(
            &[
                "produce",
                "--topic",
                "sales",
                "--partitions",
                "4",
                "--file",
                file,
                "--key",
                "product_id",
            ],
            dir,
            &broker,
        );
        riffle_ok(
            &["run", "live_inventory.toml", "--mode", "stream"],
            dir,
            &broker,
        );
    }
    let progress = common::progress_lines(&dir.join("inventory-checkpoint/progress.jsonl"));
    let late: u64 = progress
        .iter()
        .map(|p| p["late_rows"].as_u64().unwrap())
        .sum();
    assert_eq!(late, 0, "events dropped as late");

    // The last minute of events is still in the OVER window's hands, so the table differs
    // from batch mode over every event ...
    let out = riffle(
        &["verify", "live_inventory.toml", "--all-events"],
        dir,
        &broker,
    );
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stdout));
    // ... and equals it over the events before the stream's watermark, which verify picks by
    // itself for an update-mode aggregation after an OVER window (or when told to).
    for extra in [None, Some("--until-watermark")] {
        let mut args = vec!["verify", "live_inventory.toml"];
        args.extend(extra);
        let report = text(&riffle_ok(&args, dir, &broker).stdout);
        assert!(
            report.contains("matched 100 · mismatched 0 · missing 0 · extra 0"),
            "{report}"
        );
        assert!(report.contains("sales.ts < "), "{report}");
    }

    riffle_ok(
        &[
            "sql",
            "--table",
            "sales=sales/history.parquet",
            "--file",
            demo_file("daily_velocity.sql").to_str().unwrap(),
            "--output",
            "velocity.parquet",
        ],
        dir,
        &broker,
    );
    riffle_ok(
        &[
            "sql",
            "--table",
            "inventory=LiveInventory",
            "--table",
            "velocity=velocity.parquet",
            "--file",
            demo_file("pricing.sql").to_str().unwrap(),
            "--output",
            "pricing.parquet",
        ],
        dir,
        &broker,
    );
    let status = riffle_ok(&["status", "live_inventory.toml", "--json"], dir, &broker);
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    let watermark = status["last_commit"]["sources"]["sales"]["watermark"]
        .as_i64()
        .unwrap();
    let watermark = riffle::common::time::Watermark(watermark)
        .rfc3339()
        .unwrap();

    let out = std::process::Command::new("python3")
        .arg(demo_file("report_inventory.py"))
        .args([
            "LiveInventory",
            "sales",
            "products.parquet",
            "velocity.parquet",
            "pricing.parquet",
            &watermark,
            "report",
        ])
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "report_inventory.py: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("report/inventory_report.json")).unwrap())
            .unwrap();
    for (column, differing) in report["differing_products_per_column"].as_object().unwrap() {
        assert_eq!(differing, 0, "{column}: {report}");
    }
    let flagged = report["flagged"].as_array().unwrap();
    let planted = report["planted_surges_last_hour"].as_array().unwrap();
    assert!(!flagged.is_empty(), "{report}");
    assert!(flagged.iter().all(|p| planted.contains(p)), "{report}");
    // Products wait 12 hours for a surge's replenishment: about a dozen are low at any time.
    let low = report["low_stock_products"].as_u64().unwrap();
    assert!((5..=20).contains(&low), "{report}");
    assert!(dir.join("report/pricing.png").is_file());
}
