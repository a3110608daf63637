//! `riffle run --http`: a streaming run serves Prometheus metrics, a JSON API and a dashboard,
//! and what they say agrees with the progress file the run writes.
//!
//! The metrics are parsed by the `prometheus_client` Python package's OpenMetrics parser and
//! the dashboard is driven in headless Chromium (Debian's `chromium` and `chromium-driver`,
//! through Selenium): readers we did not write. `scripts/test.sh` installs all three.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

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

/// A running `riffle run --http 127.0.0.1:0` and the address it reported.
struct Run {
    child: Child,
    addr: SocketAddr,
    /// Kept so the reader thread goes on draining the pipe.
    _stderr: std::sync::mpsc::Receiver<String>,
}

impl Run {
    fn start(pipeline: &Path) -> Run {
        let mut child = common::riffle(pipeline, "stream")
            .args(["--http", "127.0.0.1:0"])
            .spawn()
            .unwrap();
        // Read stderr on a thread for the whole run (a full pipe would stall the process).
        let (tx, rx) = std::sync::mpsc::channel();
        let err = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut seen = Vec::new();
        let addr = loop {
            let line = rx
                .recv_timeout(Duration::from_secs(120))
                .unwrap_or_else(|_| panic!("no address announced; stderr: {seen:?}"));
            if let Some(rest) = line.split("serving the dashboard at http://").nth(1) {
                break rest.split('/').next().unwrap().parse().unwrap();
            }
            seen.push(line);
        };
        Run {
            child,
            addr,
            _stderr: rx,
        }
    }

    fn get(&self, path: &str) -> (u16, String, String) {
        get(self.addr, path)
    }

    fn json(&self, path: &str) -> Value {
        let (status, _, body) = self.get(path);
        assert_eq!(status, 200, "{path}: {body}");
        serde_json::from_str(&body).unwrap()
    }

    /// Waits until the run has committed epoch `n` (polling the API, bounded by a deadline
    /// far beyond any machine's speed).
    fn wait_for_epoch(&self, n: u64) -> Value {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let q = self.json("/api/query");
            if q["last_epoch"].as_u64().is_some_and(|e| e >= n) {
                return q;
            }
            assert!(Instant::now() < deadline, "epoch {n} never committed: {q}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM, then the exit status.
    fn stop(mut self) -> std::process::ExitStatus {
        // SAFETY: `kill` has no memory effects; the pid is our own child, not yet reaped.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        self.child.wait().unwrap()
    }
}

impl Drop for Run {
    /// A failed assertion must not leave the query running.
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A plain HTTP/1.0 GET: status, content type, body.
fn get(addr: SocketAddr, path: &str) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let status = head[9..12].parse().unwrap();
    let content_type = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-type: ")
                .map(str::to_string)
        })
        .unwrap_or_default();
    (status, content_type, body.to_string())
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
            value(&metrics, "riffle_operator_state_rows", &labels),
            op["state"]["rows"].as_f64().unwrap()
        );
    }
    assert_eq!(
        value(&metrics, "riffle_epoch_duration_seconds_count", &q),
        epoch as f64
    );
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
