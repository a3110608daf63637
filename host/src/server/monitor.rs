//! What the HTTP server shows of a run: the driver tells the [`Monitor`] when a query starts,
//! when an epoch commits and when something fails; the server reads it from its own thread.
//!
//! The driver's side costs two short locks, a JSON encoding of the progress record and the
//! metric updates per committed epoch, never anything per row; the server never waits on the
//! driver: a slow epoch leaves the dashboard showing the last committed one, which is also what
//! the checkpoint says. UDF counters are the exception: they are read from the modules when
//! asked for, so they include calls of the epoch in flight.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::Serialize;
use serde_json::{Value, json};

use super::metrics::Metrics;
use crate::connectors::source::DeadLetter;
use crate::exec::graph::{Edge, Graph};
use crate::stream::QueryObserver;
use crate::stream::progress::EpochProgress;
use crate::udf::UdfModule;

/// Progress records kept for `/api/progress` and the dashboard's charts.
pub const HISTORY: usize = 600;
/// Commits kept for the checkpoint history.
const CHECKPOINTS: usize = 200;
/// Errors and warnings kept.
const ERRORS: usize = 200;
/// Dead letters kept (apart from the errors, so that a steady stream of bad records does not
/// push a failure out of sight).
const DEAD_LETTERS: usize = 100;

/// One operator of the graph, as the API shows it.
#[derive(Clone, Debug, Serialize)]
pub struct NodeView {
    /// Stable id (`<position>-<kind>`).
    pub id: String,
    /// Operator kind.
    pub kind: &'static str,
    /// Where its inputs come from: `source:<name>` or another operator's id.
    pub inputs: Vec<String>,
    /// Columns it emits.
    pub columns: Vec<String>,
}

/// The shape of a streaming query: sources, operators and which of them is the result.
#[derive(Clone, Debug, Default, Serialize)]
pub struct GraphView {
    /// Sources by name, with their kind (`kafka`, `generator`, ...).
    pub sources: Vec<(String, String)>,
    /// Operators in topological order.
    pub nodes: Vec<NodeView>,
    /// What the sink receives: `source:<name>` or an operator's id.
    pub output: String,
}

impl GraphView {
    /// The view of `graph` whose source `i` is `sources[i]` (name, kind).
    pub fn of(graph: &Graph, sources: Vec<(String, String)>) -> Self {
        let nodes = graph.nodes();
        let name = |e: &Edge| match e {
            Edge::Source { index, .. } => format!(
                "source:{}",
                sources.get(*index).map_or("?", |s| s.0.as_str())
            ),
            Edge::Node(i) => nodes.get(*i).map_or_else(|| "?".into(), |n| n.id.clone()),
        };
        GraphView {
            nodes: nodes
                .iter()
                .map(|n| NodeView {
                    id: n.id.clone(),
                    kind: n.metrics.kind,
                    inputs: n.inputs.iter().map(name).collect(),
                    columns: n.schema.fields().iter().map(|f| f.name().clone()).collect(),
                })
                .collect(),
            output: name(graph.output()),
            sources,
        }
    }
}

#[derive(Clone, Debug, Serialize)]
struct ErrorView {
    time: String,
    kind: String,
    message: String,
    /// For a dead letter: where the record came from, why it was rejected and the start of
    /// its bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    record: Option<Value>,
}

/// Bytes of a rejected record's key and value that `/api/errors` shows.
const RECORD_PREVIEW: usize = 256;

/// The start of `bytes`: as text when it is UTF-8, else in hex (`0x...`: Avro or Protobuf
/// bytes would be all replacement characters), marked when cut.
fn preview(bytes: &[u8]) -> String {
    let head = &bytes[..bytes.len().min(RECORD_PREVIEW)];
    let mut text = match std::str::from_utf8(head) {
        Ok(text) => text.to_string(),
        // A character cut at the end of the preview is still text.
        Err(e) if e.error_len().is_none() => String::from_utf8_lossy(head).into_owned(),
        Err(_) => format!("0x{}", hex::encode(head)),
    };
    if bytes.len() > RECORD_PREVIEW {
        text.push('…');
    }
    text
}

#[derive(Default)]
struct Totals {
    epochs: u64,
    input_rows: u64,
    output_rows: u64,
    late_rows: u64,
    dead_letters: u64,
}

struct State {
    pipeline: String,
    mode: &'static str,
    status: String,
    started: String,
    query_id: Option<String>,
    run_id: Option<String>,
    runs: u64,
    graph: GraphView,
    modules: Vec<Arc<UdfModule>>,
    /// Progress records as JSON text: kept compact, and served without re-encoding.
    history: VecDeque<Arc<str>>,
    latest: Option<EpochProgress>,
    checkpoints: VecDeque<Value>,
    errors: VecDeque<ErrorView>,
    dead_letters: VecDeque<ErrorView>,
    totals: Totals,
}

impl QueryObserver for Monitor {
    fn query_started(
        &self,
        query_id: &str,
        run_id: &str,
        graph: &Graph,
        sources: Vec<(String, String)>,
        modules: &[Arc<UdfModule>],
    ) {
        self.run_started(
            query_id,
            run_id,
            GraphView::of(graph, sources),
            modules.to_vec(),
        );
    }

    fn epoch_committed(&self, progress: &EpochProgress, line: &str) {
        self.add_epoch(progress, line);
    }

    fn records_rejected(&self, epoch: u64, source: &str, rejected: u64, letters: &[DeadLetter]) {
        self.dead_letters(epoch, source, rejected, letters);
    }

    fn udfs_swapped(&self, modules: &[Arc<UdfModule>]) {
        // As in `start`: the metrics lock is held across the swap.
        let mut metrics = self.metrics();
        let old = std::mem::replace(&mut self.state().modules, modules.to_vec());
        metrics.udfs_swapped(&old, modules);
    }
}

/// A run's live view, shared by the driver and the HTTP server.
pub struct Monitor {
    state: Mutex<State>,
    metrics: Mutex<Metrics>,
}

impl std::fmt::Debug for Monitor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Monitor").finish_non_exhaustive()
    }
}

fn now_rfc3339() -> String {
    chrono::DateTime::<chrono::Utc>::from(std::time::SystemTime::now())
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

fn push_bounded<T>(queue: &mut VecDeque<T>, item: T, bound: usize) {
    if queue.len() == bound {
        queue.pop_front();
    }
    queue.push_back(item);
}

impl Monitor {
    /// A monitor for a run of the pipeline `pipeline` in `mode` (`stream` or `batch`).
    pub fn new(pipeline: &str, mode: &'static str) -> Arc<Self> {
        Arc::new(Monitor {
            state: Mutex::new(State {
                pipeline: pipeline.to_string(),
                mode,
                status: "starting".into(),
                started: now_rfc3339(),
                query_id: None,
                run_id: None,
                runs: 0,
                graph: GraphView::default(),
                modules: Vec::new(),
                history: VecDeque::new(),
                latest: None,
                checkpoints: VecDeque::new(),
                errors: VecDeque::new(),
                dead_letters: VecDeque::new(),
                totals: Totals::default(),
            }),
            metrics: Mutex::new(Metrics::new()),
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain data behind; keep serving it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn metrics(&self) -> MutexGuard<'_, Metrics> {
        self.metrics.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A query run starts (again, after a retry): its ids, shape and UDF modules.
    pub fn run_started(
        &self,
        query_id: &str,
        run_id: &str,
        graph: GraphView,
        modules: Vec<Arc<UdfModule>>,
    ) {
        self.start(query_id, run_id, Some(graph), modules);
    }

    /// A batch run starts: its id (it names the query, UDFs, inputs and run name) and UDF
    /// modules; it has no operator graph.
    pub fn batch_started(&self, run_id: &str, modules: Vec<Arc<UdfModule>>) {
        self.start(run_id, run_id, None, modules);
    }

    fn start(
        &self,
        query_id: &str,
        run_id: &str,
        graph: Option<GraphView>,
        modules: Vec<Arc<UdfModule>>,
    ) {
        // The metrics lock is held across the swap of modules, so that no scrape counts the
        // new modules before the old ones' counters are settled (nothing takes the two locks
        // the other way round: every other path lets go of the state before the metrics).
        let mut metrics = self.metrics();
        let (mode, old) = {
            let mut s = self.state();
            s.query_id = Some(query_id.to_string());
            s.run_id = Some(run_id.to_string());
            s.runs += 1;
            s.status = "running".into();
            if let Some(graph) = graph {
                s.graph = graph;
            }
            (s.mode, std::mem::replace(&mut s.modules, modules))
        };
        metrics.run_started(query_id, run_id, mode, &old);
    }

    /// Sets the run's status (`running`, `retrying`, `stopped`, `finished`, `failed`).
    pub fn set_status(&self, status: &str) {
        self.state().status = status.to_string();
    }

    /// An epoch committed; `p` is its complete progress record, `line` its JSON text (kept as
    /// the history, so that the API serves what the progress file has).
    pub fn add_epoch(&self, p: &EpochProgress, line: &str) {
        let record: Arc<str> = line.into();
        let checkpoint = json!({
            "epoch": p.epoch,
            "committed_at": now_rfc3339(),
            "state_bytes_written": p.state_bytes_written,
            "state_rows": p.state.rows,
            "state_ms": p.durations.state_ms,
            "commit_ms": p.durations.commit_ms,
            "watermark": p.watermark,
            "offsets": p.sources.iter()
                .map(|s| (s.name.clone(), s.end_offset.clone()))
                .collect::<BTreeMap<_, _>>(),
        });
        let modules = {
            let mut s = self.state();
            push_bounded(&mut s.history, record, HISTORY);
            s.latest = Some(p.clone());
            push_bounded(&mut s.checkpoints, checkpoint, CHECKPOINTS);
            s.totals.epochs += 1;
            s.totals.input_rows += p.input_rows;
            s.totals.output_rows += p.output_rows;
            s.totals.late_rows += p.late_rows;
            s.totals.dead_letters += p.sources.iter().map(|x| x.dead_letters).sum::<u64>();
            for w in &p.warnings {
                push_bounded(
                    &mut s.errors,
                    ErrorView {
                        time: p.timestamp.clone(),
                        kind: "warning".into(),
                        message: w.clone(),
                        record: None,
                    },
                    ERRORS,
                );
            }
            s.modules.clone()
        };
        let mut m = self.metrics();
        m.epoch(p);
        for _ in &p.warnings {
            m.error(&p.query_id, "warning");
        }
        m.udfs(&modules);
    }

    /// Source `source` rejected `rejected` records in the committed epoch `epoch`, the first
    /// of them `letters`: each of those becomes an entry of `/api/errors` with where it came
    /// from, why, and the start of its bytes, and one more entry counts the rest.
    pub fn dead_letters(&self, epoch: u64, source: &str, rejected: u64, letters: &[DeadLetter]) {
        let time = now_rfc3339();
        let mut s = self.state();
        for letter in letters {
            let header = |name: &str| {
                letter
                    .headers
                    .iter()
                    .find(|(k, _)| k == name)
                    .map(|(_, v)| v.clone())
            };
            let reason = header("riffle.error").unwrap_or_default();
            let message = format!(
                "epoch {epoch}: a record of source {source} (topic {}, partition {}, offset {}) \
                 went to {}: {reason}",
                header("riffle.topic").unwrap_or_default(),
                header("riffle.partition").unwrap_or_default(),
                header("riffle.offset").unwrap_or_default(),
                letter.topic,
            );
            let record = json!({
                "epoch": epoch,
                "source": source,
                "topic": header("riffle.topic"),
                "partition": header("riffle.partition").and_then(|p| p.parse::<i64>().ok()),
                "offset": header("riffle.offset").and_then(|o| o.parse::<i64>().ok()),
                "error": reason,
                "dead_letter_topic": letter.topic,
                "key": letter.key.as_deref().map(preview),
                "value": letter.value.as_deref().map(preview),
                "key_bytes": letter.key.as_ref().map(Vec::len),
                "value_bytes": letter.value.as_ref().map(Vec::len),
            });
            push_bounded(
                &mut s.dead_letters,
                ErrorView {
                    time: time.clone(),
                    kind: "dead-letter".into(),
                    message,
                    record: Some(record),
                },
                DEAD_LETTERS,
            );
        }
        let more = rejected.saturating_sub(letters.len() as u64);
        if more > 0 {
            push_bounded(
                &mut s.dead_letters,
                ErrorView {
                    time,
                    kind: "dead-letters".into(),
                    message: format!(
                        "epoch {epoch}: {more} more records of source {source} went to its \
                         dead-letter topic (the first {} are listed)",
                        letters.len()
                    ),
                    record: None,
                },
                DEAD_LETTERS,
            );
        }
    }

    /// Something failed (`kind`: `failure` for a run that ends or retries, `warning` for one
    /// that goes on).
    pub fn error(&self, kind: &str, message: &str) {
        let query = {
            let mut s = self.state();
            push_bounded(
                &mut s.errors,
                ErrorView {
                    time: now_rfc3339(),
                    kind: kind.to_string(),
                    message: message.to_string(),
                    record: None,
                },
                ERRORS,
            );
            s.query_id.clone().unwrap_or_default()
        };
        self.metrics().error(&query, kind);
    }

    /// `/metrics`: every metric in Prometheus' text format.
    pub fn render_metrics(&self) -> String {
        let modules = self.state().modules.clone();
        let mut m = self.metrics();
        m.udfs(&modules);
        m.render(chrono::Utc::now().timestamp_micros())
    }

    /// `/api/query`: ids, status and totals.
    pub fn overview(&self) -> Value {
        let s = self.state();
        let last = s.latest.as_ref();
        json!({
            "pipeline": s.pipeline,
            "mode": s.mode,
            "status": s.status,
            "started": s.started,
            "query_id": s.query_id,
            "run_id": s.run_id,
            "runs": s.runs,
            "last_epoch": last.map(|p| p.epoch),
            "watermark": last.and_then(|p| p.watermark.clone()),
            "totals": {
                "epochs": s.totals.epochs,
                "input_rows": s.totals.input_rows,
                "output_rows": s.totals.output_rows,
                "late_rows": s.totals.late_rows,
                "dead_letters": s.totals.dead_letters,
            },
        })
    }

    /// `/api/progress`: the latest record and up to `limit` earlier ones, oldest first, as
    /// JSON text (the records are kept encoded; this only joins them).
    pub fn progress(&self, limit: usize) -> String {
        // Only the handles are copied under the lock: the driver waits for it at every commit.
        let (latest, kept): (Option<Arc<str>>, Vec<Arc<str>>) = {
            let s = self.state();
            let skip = s.history.len().saturating_sub(limit);
            (
                s.history.back().cloned(),
                s.history.iter().skip(skip).cloned().collect(),
            )
        };
        let mut out = String::with_capacity(kept.iter().map(|r| r.len() + 1).sum::<usize>() + 64);
        out.push_str("{\"latest\":");
        out.push_str(latest.as_deref().unwrap_or("null"));
        out.push_str(",\"history\":[");
        out.push_str(&kept.join(","));
        out.push_str("]}");
        out
    }

    /// `/api/graph`: the operators with their latest and cumulative counters.
    pub fn graph(&self) -> Value {
        let s = self.state();
        let latest = s.latest.as_ref();
        let sources: Vec<Value> = s
            .graph
            .sources
            .iter()
            .map(|(name, kind)| {
                let latest = latest.and_then(|p| p.sources.iter().find(|x| &x.name == name));
                json!({ "name": name, "kind": kind, "latest": latest })
            })
            .collect();
        let nodes: Vec<Value> = s
            .graph
            .nodes
            .iter()
            .map(|n| {
                let mut v = serde_json::to_value(n).expect("serialisable");
                v["metrics"] = latest
                    .and_then(|p| p.operators.iter().find(|o| o.id == n.id))
                    .map_or(Value::Null, |o| {
                        serde_json::to_value(o).expect("serialisable")
                    });
                v
            })
            .collect();
        json!({ "sources": sources, "nodes": nodes, "output": s.graph.output })
    }

    /// `/api/checkpoints`: the commits of this process, oldest first.
    pub fn checkpoints(&self) -> Value {
        Value::Array(self.state().checkpoints.iter().cloned().collect())
    }

    /// `/api/udfs`: modules with their hashes, functions and cumulative counters.
    pub fn udfs(&self) -> Value {
        let modules = self.state().modules.clone();
        Value::Array(
            modules
                .iter()
                .map(|m| {
                    let functions: Vec<Value> = m
                        .spec()
                        .functions
                        .iter()
                        .enumerate()
                        .map(|(i, f)| {
                            json!({
                                "name": f.name,
                                "args": f.args.iter()
                                    .map(|a| format!("{}: {:?}", a.name, a.data_type))
                                    .collect::<Vec<_>>(),
                                "returns": format!("{:?}", f.returns),
                                "stats": m.stats(i),
                            })
                        })
                        .collect();
                    let aggregates: Vec<Value> = m
                        .spec()
                        .aggregates
                        .iter()
                        .enumerate()
                        .map(|(i, a)| {
                            json!({
                                "name": a.name,
                                "signature": a.signature(),
                                "state": a.state_schema(),
                                "stats": m.aggregate_stats(i),
                            })
                        })
                        .collect();
                    json!({
                        "file": m.file_name(),
                        "path": m.path(),
                        "sha256": m.hash(),
                        "config_sha256": m.config_hash(),
                        "instances": m.live_instances(),
                        "functions": functions,
                        "aggregates": aggregates,
                    })
                })
                .collect(),
        )
    }

    /// `/api/errors`: recent failures, warnings and dead letters, oldest first.
    pub fn errors(&self) -> Value {
        let s = self.state();
        let mut all: Vec<&ErrorView> = s.errors.iter().chain(&s.dead_letters).collect();
        // RFC 3339 times of one format sort as text; the sort is stable, so entries of one
        // time keep their order.
        all.sort_by(|a, b| a.time.cmp(&b.time));
        serde_json::to_value(all).expect("serialisable")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{ArrayRef, Float64Array, StringArray};

    fn call(module: &UdfModule, rows: usize) {
        let amounts: ArrayRef = Arc::new(Float64Array::from(vec![10.0; rows]));
        let countries: ArrayRef = Arc::new(StringArray::from(vec!["FR"; rows]));
        let f = module.function_index("risk_score").unwrap();
        module.call(f, rows, &[amounts, countries]).unwrap();
    }

    /// `riffle_udf_calls_total` and `riffle_udf_rows_total` of `risk_score`.
    fn udf_counters(monitor: &Monitor) -> (u64, u64) {
        let text = monitor.render_metrics();
        let value = |name: &str| -> u64 {
            text.lines()
                .find(|l| l.starts_with(name) && l.contains("function=\"risk_score\""))
                .and_then(|l| l.rsplit(' ').next()?.parse().ok())
                .unwrap_or_else(|| panic!("no {name} in\n{text}"))
        };
        (
            value("riffle_udf_calls_total"),
            value("riffle_udf_rows_total"),
        )
    }

    fn session() -> crate::session::RiffleSession {
        crate::session::RiffleSession::new(crate::session::SessionOptions::default()).unwrap()
    }

    #[test]
    fn udf_counters_add_up_over_modules_and_runs_and_never_count_twice() {
        let path = riffle_tests::udf("fraud");
        // The same file loaded twice (another configuration could differ): two modules with
        // one hash, whose calls add up.
        let (a, b) = (session(), session());
        let a = a.load_udfs(&path, Vec::new(), None).unwrap();
        let b = b.load_udfs(&path, Vec::new(), None).unwrap();
        let monitor = Monitor::new("p.toml", "stream");
        monitor.run_started("q", "r1", GraphView::default(), vec![a.clone(), b.clone()]);
        call(&a, 10);
        call(&b, 5);
        assert_eq!(udf_counters(&monitor), (2, 15));
        assert_eq!(
            udf_counters(&monitor),
            (2, 15),
            "a second scrape adds nothing"
        );
        // Their live instances add up too, under the one hash and file name.
        let instances = monitor
            .render_metrics()
            .lines()
            .find(|l| l.starts_with("riffle_udf_instances{"))
            .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .unwrap();
        assert!(a.live_instances() > 0 && b.live_instances() > 0);
        assert_eq!(instances, a.live_instances() + b.live_instances());
        call(&a, 1);
        // A retry replaces the modules: the old ones' last calls still count, and the new
        // module starts from its own zero.
        let c = session().load_udfs(&path, Vec::new(), None).unwrap();
        monitor.run_started("q", "r2", GraphView::default(), vec![c.clone()]);
        call(&c, 100);
        assert_eq!(udf_counters(&monitor), (4, 116));
        assert!(monitor.render_metrics().contains("run=\"r2\""));
        assert!(!monitor.render_metrics().contains("run=\"r1\""));
    }

    fn letter(offset: i64, value: &[u8]) -> DeadLetter {
        DeadLetter {
            topic: "t.dlq".into(),
            key: None,
            value: Some(value.to_vec()),
            headers: vec![
                ("riffle.topic".into(), "t".into()),
                ("riffle.partition".into(), "0".into()),
                ("riffle.offset".into(), offset.to_string()),
                ("riffle.error".into(), "not JSON".into()),
            ],
        }
    }

    #[test]
    fn dead_letters_show_their_bytes_count_the_rest_and_leave_failures_in_sight() {
        let monitor = Monitor::new("p.toml", "stream");
        monitor.error("failure", "the broker went away");
        let long = vec![b'x'; RECORD_PREVIEW + 10];
        monitor.dead_letters(
            3,
            "s",
            5,
            &[
                letter(7, b"plain text"),
                letter(8, &[0xff, 0x00, 0x01]),
                letter(9, &long),
            ],
        );
        let errors = monitor.errors();
        let records: Vec<&Value> = errors
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|e| e.get("record"))
            .collect();
        assert_eq!(records.len(), 3);
        assert_eq!(records[0]["value"], "plain text");
        assert_eq!(records[0]["offset"], 7);
        assert_eq!(records[1]["value"], "0xff0001");
        let cut = records[2]["value"].as_str().unwrap();
        assert_eq!(cut.chars().count(), RECORD_PREVIEW + 1);
        assert!(cut.ends_with('…'));
        assert_eq!(records[2]["value_bytes"], RECORD_PREVIEW + 10);
        let more: Vec<&Value> = errors
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["kind"] == "dead-letters")
            .collect();
        assert_eq!(more.len(), 1);
        assert!(
            more[0]["message"]
                .as_str()
                .unwrap()
                .contains("2 more records")
        );
        // However many dead letters come, the failure stays listed.
        for epoch in 0..100 {
            let letters: Vec<DeadLetter> = (0..20).map(|i| letter(i, b"{")).collect();
            monitor.dead_letters(epoch, "s", 20, &letters);
        }
        let errors = monitor.errors();
        assert!(
            errors
                .as_array()
                .unwrap()
                .iter()
                .any(|e| e["kind"] == "failure")
        );
        assert_eq!(errors.as_array().unwrap().len(), 1 + DEAD_LETTERS);
    }
}
