//! `riffle run --http`: a streaming run serves Prometheus metrics, a JSON API and a dashboard,
//! and what they say agrees with the progress file the run writes.
//!
//! The metrics are parsed by the `prometheus_client` Python package's OpenMetrics parser and
//! the dashboard is driven in headless Chromium (Debian's `chromium` and `chromium-driver`,
//! through Selenium): readers we did not write. `scripts/test.sh` installs all three.

mod common;

use common::http::Run;

use std::collections::BTreeMap;
use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value;

/// A windowed aggregation with a UDF inside it, over a paced generator: state, a UDF and
/// epochs that keep coming until the run is stopped.
fn pipeline(dir: &Path) -> PathBuf {
    let path = dir.join("pipeline.toml");
    std::fs::write(
        &path,
        format!(
            r#"
query = """
SELECT window(ts, '10 seconds') AS window, country, count(*) AS n,
       max(risk_score(amount, country)) AS risk
FROM transactions GROUP BY window(ts, '10 seconds'), country
"""

[source]
name = "transactions"
event_time = "ts"
watermark = "5 seconds"
stream = {{ kind = "generator", rows_per_second = 20000, events_per_second = 200 }}

[[udfs]]
path = "{udf}"

[sink]
stream = "out"

[stream]
checkpoint = "checkpoint"
interval = "200 milliseconds"
max_rows_per_epoch = 1000
"#,
            udf = riffle_tests::udf("fraud").display(),
        ),
    )
    .unwrap();
    path
}

fn tool(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/tools")
        .join(name)
}

/// Samples by name: (labels, value) each.
type Samples = BTreeMap<String, Vec<(BTreeMap<String, String>, f64)>>;

/// Samples of the exposition, parsed by `prometheus_client`.
fn parse_metrics(text: &str) -> Samples {
    let mut child = Command::new("python3")
        .arg(tool("prometheus_samples.py"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "prometheus_client rejected /metrics (install it with `pip install prometheus-client`): {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    let samples: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    let mut by_name: BTreeMap<String, Vec<_>> = BTreeMap::new();
    for s in samples {
        let labels = s["labels"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
            .collect();
        by_name
            .entry(s["name"].as_str().unwrap().to_string())
            .or_default()
            .push((labels, s["value"].as_f64().unwrap()));
    }
    by_name
}

/// The one value of `name` whose labels include `with`.
fn value(metrics: &Samples, name: &str, with: &[(&str, &str)]) -> f64 {
    let found: Vec<f64> = metrics
        .get(name)
        .unwrap_or_else(|| panic!("no metric {name}"))
        .iter()
        .filter(|(labels, _)| {
            with.iter()
                .all(|(k, v)| labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|(_, v)| *v)
        .collect();
    assert_eq!(found.len(), 1, "{name} {with:?}: {found:?}");
    found[0]
}

#[test]
fn metrics_api_and_dashboard_agree_with_the_progress_file() {
    let dir = tempfile::tempdir().unwrap();
    let run = Run::start(&pipeline(dir.path()));
    run.wait_for_epoch(3);

    // /metrics: well-formed for an independent parser, and equal to the progress file up to
    // the epoch it reports (the monitor is updated after the epoch's line is written, under
    // one lock, so a scrape is one committed epoch's picture).
    let (status, content_type, text) = run.get("/metrics");
    assert_eq!(status, 200);
    assert!(content_type.starts_with("application/openmetrics-text"));
    let metrics = parse_metrics(&text);
    let query = metrics["riffle_run_info"][0].0["query"].clone();
    let run_id = metrics["riffle_run_info"][0].0["run"].clone();
    let q = [("query", query.as_str())];
    let epoch = value(&metrics, "riffle_last_epoch", &q) as u64;
    let lines: Vec<Value> = common::progress_lines(&dir.path().join("checkpoint/progress.jsonl"))
        .into_iter()
        .filter(|p| p["run_id"] == run_id.as_str() && p["epoch"].as_u64().unwrap() <= epoch)
        .collect();
    assert_eq!(lines.len() as u64, epoch, "one line per committed epoch");
    assert!(lines.iter().all(|p| p["query_id"] == query.as_str()));
    let sum = |f: &dyn Fn(&Value) -> u64| lines.iter().map(f).sum::<u64>() as f64;
    let field = |name: &'static str| move |p: &Value| p[name].as_u64().unwrap();
    assert_eq!(value(&metrics, "riffle_epochs_total", &q), epoch as f64);
    for (metric, key) in [
        ("riffle_input_rows_total", "input_rows"),
        ("riffle_output_rows_total", "output_rows"),
        ("riffle_late_rows_total", "late_rows"),
        (
            "riffle_checkpoint_written_bytes_total",
            "state_bytes_written",
        ),
    ] {
        assert_eq!(value(&metrics, metric, &q), sum(&field(key)), "{metric}");
    }
    assert!(value(&metrics, "riffle_input_rows_total", &q) > 0.0);
    let last = lines.last().unwrap();
    assert_eq!(
        value(&metrics, "riffle_state_rows", &q),
        last["state"]["rows"].as_f64().unwrap()
    );
    assert_eq!(
        value(
            &metrics,
            "riffle_source_input_rows_total",
            &[("source", "transactions")]
        ),
        sum(&|p| p["sources"][0]["input_rows"].as_u64().unwrap())
    );
    for op in last["operators"].as_array().unwrap() {
        let id = op["id"].as_str().unwrap();
        let labels = [("operator", id)];
        assert_eq!(
            value(&metrics, "riffle_operator_rows_in_total", &labels),
            sum(&|p| {
                p["operators"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|o| o["id"] == id)
                    .unwrap()["rows_in"]
                    .as_u64()
                    .unwrap()
            }),
            "{id}"
        );
        assert_eq!(
            value(&metrics, "riffle_operator_rows_out_total", &labels),
            sum(&|p| {
                p["operators"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|o| o["id"] == id)
                    .unwrap()["rows_out"]
                    .as_u64()
                    .unwrap()
            }),
            "{id}"
        );
        assert_eq!(
            value(&metrics, "riffle_operator_state_rows", &labels),
            op["state"]["rows"].as_f64().unwrap()
        );
        let rate = value(&metrics, "riffle_operator_rows_in_per_second", &labels);
        let expected = op["rows_in"].as_f64().unwrap()
            / (last["durations"]["total_ms"].as_f64().unwrap() / 1e3);
        assert!(
            (rate - expected).abs() <= 1e-9 * expected.max(1.0),
            "{id}: {rate} vs {expected}"
        );
    }
    assert_eq!(
        value(&metrics, "riffle_epoch_duration_seconds_count", &q),
        epoch as f64
    );
    // Time per phase: the sums of the file's durations; rates: the last epoch's.
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1.0);
    let ms = |p: &Value, key: &str| p["durations"][key].as_f64().unwrap();
    for phase in ["plan", "read", "operators", "state", "sink", "commit"] {
        let key = format!("{phase}_ms");
        let from_file: f64 = lines.iter().map(|p| ms(p, &key) / 1e3).sum();
        let metric = value(
            &metrics,
            "riffle_epoch_phase_seconds_total",
            &[("phase", phase)],
        );
        assert!(close(metric, from_file), "{phase}: {metric} vs {from_file}");
    }
    let per_second = |rows: &Value| rows.as_f64().unwrap() / (ms(last, "total_ms") / 1e3);
    for (metric, expected) in [
        (
            "riffle_input_rows_per_second",
            last["input_rows_per_second"].as_f64().unwrap(),
        ),
        (
            "riffle_processed_rows_per_second",
            last["processed_rows_per_second"].as_f64().unwrap(),
        ),
        (
            "riffle_output_rows_per_second",
            per_second(&last["output_rows"]),
        ),
    ] {
        let got = value(&metrics, metric, &q);
        assert!(close(got, expected), "{metric}: {got} vs {expected}");
    }
    // Watermarks (query, source, operator) are the file's last ones; their lags are taken at
    // the scrape, so at least the lag when the line was written.
    let unix = |text: &Value| {
        chrono::DateTime::parse_from_rfc3339(text.as_str().unwrap())
            .unwrap()
            .timestamp_micros() as f64
            / 1e6
    };
    let written_at = unix(&last["timestamp"]);
    let mut watermarks = vec![(
        "riffle_watermark_seconds",
        "riffle_watermark_lag_seconds",
        vec![],
        &last["watermark"],
    )];
    watermarks.push((
        "riffle_source_watermark_seconds",
        "riffle_source_watermark_lag_seconds",
        vec![("source", "transactions")],
        &last["sources"][0]["watermark"],
    ));
    for op in last["operators"].as_array().unwrap() {
        if !op["watermark"].is_null() {
            watermarks.push((
                "riffle_operator_watermark_seconds",
                "riffle_operator_watermark_lag_seconds",
                vec![("operator", op["id"].as_str().unwrap())],
                &op["watermark"],
            ));
        }
    }
    assert!(watermarks.len() >= 4, "an operator watermark: {last}");
    for (metric, lag, labels, expected) in watermarks {
        let got = value(&metrics, metric, &labels);
        assert!(
            close(got, unix(expected)),
            "{metric} {labels:?}: {got} vs {expected}"
        );
        let lag = value(&metrics, lag, &labels);
        assert!(
            lag >= written_at - unix(expected),
            "{metric} {labels:?}: lag {lag}"
        );
    }
    // UDF counters come from the module's own counters at scrape time: at least what the
    // committed epochs report (an epoch in flight may have called it since).
    let udf = [("function", "risk_score")];
    let udf_rows: u64 = lines
        .iter()
        .flat_map(|p| p["udfs"].as_array().unwrap().iter())
        .filter(|u| u["name"] == "risk_score")
        .map(|u| u["rows"].as_u64().unwrap())
        .sum();
    assert!(udf_rows > 0);
    assert!(value(&metrics, "riffle_udf_rows_total", &udf) >= udf_rows as f64);
    let udf_calls: u64 = lines
        .iter()
        .flat_map(|p| p["udfs"].as_array().unwrap().iter())
        .filter(|u| u["name"] == "risk_score")
        .map(|u| u["calls"].as_u64().unwrap())
        .sum();
    assert!(udf_calls > 0);
    assert!(value(&metrics, "riffle_udf_calls_total", &udf) >= udf_calls as f64);
    assert_eq!(value(&metrics, "riffle_udf_traps_total", &udf), 0.0);
    assert!(value(&metrics, "riffle_udf_instances", &[]) >= 1.0);

    // The JSON API: progress records are the progress file's lines, field for field.
    let progress = run.json("/api/progress?limit=1000");
    let file = common::progress_lines(&dir.path().join("checkpoint/progress.jsonl"));
    for record in progress["history"].as_array().unwrap() {
        let line = file
            .iter()
            .find(|l| l["run_id"] == record["run_id"] && l["epoch"] == record["epoch"])
            .unwrap_or_else(|| panic!("no line for {}", record["epoch"]));
        assert_eq!(line, record);
    }
    assert_eq!(
        run.json("/api/progress?limit=2")["history"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    let graph = run.json("/api/graph");
    let ids: Vec<&str> = graph["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["0-aggregate", "1-stateless"]);
    assert_eq!(graph["nodes"][0]["inputs"][0], "source:transactions");
    assert_eq!(graph["nodes"][1]["inputs"][0], "0-aggregate");
    assert_eq!(graph["sources"][0]["kind"], "generator");
    // The checkpoint history: one entry per commit, consecutive, each with the offsets its
    // progress line ends at.
    let checkpoints = run.json("/api/checkpoints");
    let checkpoints = checkpoints.as_array().unwrap();
    assert!(checkpoints.len() as u64 >= epoch);
    let file = common::progress_lines(&dir.path().join("checkpoint/progress.jsonl"));
    let first = checkpoints[0]["epoch"].as_u64().unwrap();
    for (i, c) in checkpoints.iter().enumerate() {
        assert_eq!(c["epoch"].as_u64().unwrap(), first + i as u64);
        let line = file.iter().find(|l| l["epoch"] == c["epoch"]).unwrap();
        assert_eq!(
            c["offsets"]["transactions"],
            line["sources"][0]["end_offset"]
        );
        assert_eq!(c["state_bytes_written"], line["state_bytes_written"]);
    }
    let udfs = run.json("/api/udfs");
    let sha = Command::new("sha256sum")
        .arg(riffle_tests::udf("fraud"))
        .output()
        .unwrap();
    let sha = String::from_utf8(sha.stdout).unwrap();
    assert_eq!(udfs[0]["sha256"], sha.split_whitespace().next().unwrap());
    assert_eq!(run.json("/api/errors"), Value::Array(vec![]));
    assert_eq!(run.get("/api/nothing").0, 404);

    // The dashboard in a real browser: it loads without console errors, every chart has
    // points, the counters increase, and a screenshot is kept.
    let screenshot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
    let out = Command::new("python3")
        .arg(tool("dashboard.py"))
        .arg(format!("http://{}/", run.addr))
        .arg(&screenshot)
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "the dashboard test failed (it needs Debian's chromium and chromium-driver and \
         `pip install selenium`): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(seen["console_errors"], Value::Array(vec![]), "{seen}");
    for (chart, points) in seen["points"].as_object().unwrap() {
        assert!(
            points.as_u64().unwrap() > 0,
            "{chart} has no points: {seen}"
        );
    }
    assert_eq!(seen["points"].as_object().unwrap().len(), 5);
    assert!(seen["second"]["epoch"].as_u64() > seen["first"]["epoch"].as_u64());
    assert!(seen["second"]["input_rows"].as_u64() > seen["first"]["input_rows"].as_u64());
    assert_eq!(
        seen["operators"],
        serde_json::json!(["source:transactions", "0-aggregate", "1-stateless", "sink"])
    );
    assert!(seen["udf_rows"].as_u64().unwrap() >= 1);
    assert!(seen["checkpoint_rows"].as_u64().unwrap() >= 1);
    assert_eq!(seen["status"], "running");
    // Readable on a laptop: nothing wider than a 1366-pixel window.
    assert!(seen["scroll_width"].as_u64() <= seen["window_width"].as_u64());
    assert!(std::fs::metadata(&screenshot).unwrap().len() > 10_000);
    eprintln!("dashboard screenshot: {}", screenshot.display());

    assert!(run.stop().success());
}

#[test]
fn a_taken_port_is_refused_before_any_work() {
    let dir = tempfile::tempdir().unwrap();
    let p = pipeline(dir.path());
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = common::riffle(&p, "stream")
        .args(["--http", &addr])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&addr) && stderr.contains("in use"),
        "{stderr}"
    );
    assert!(!dir.path().join("checkpoint").exists(), "work started");
}
