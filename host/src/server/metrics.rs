//! The Prometheus metrics of a running query, rendered by `prometheus-client` (the text format
//! is the library's, not ours).
//!
//! Metrics are updated once per committed epoch from its progress record, and UDF counters
//! from the modules' own atomic counters when an epoch commits or `/metrics` is scraped: nothing
//! here runs per row, which is what keeps the cost of `--http` out of the hot path.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

use crate::stream::progress::EpochProgress;
use crate::udf::{StatsSnapshot, UdfModule};

type Labels = Vec<(&'static str, String)>;
type Count = Family<Labels, Counter>;
type Seconds = Family<Labels, Counter<f64, AtomicU64>>;
type Level = Family<Labels, Gauge>;
type FloatLevel = Family<Labels, Gauge<f64, AtomicU64>>;
type Timings = Family<Labels, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 1 ms .. ~33 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

/// Every metric family, registered once.
pub(crate) struct Metrics {
    registry: Registry,
    run_info: Level,
    epochs: Count,
    last_epoch: Level,
    input_rows: Count,
    output_rows: Count,
    late_rows: Count,
    input_rate: FloatLevel,
    processed_rate: FloatLevel,
    phase_seconds: Seconds,
    epoch_seconds: Timings,
    sink_seconds: Timings,
    checkpoint_seconds: Timings,
    checkpoint_bytes: Count,
    watermark: FloatLevel,
    watermark_lag: FloatLevel,
    state_rows: Level,
    state_bytes: Level,
    source_rows: Count,
    source_late_rows: Count,
    source_dead_letters: Count,
    source_lost_records: Count,
    kafka_lag: Level,
    operator_rows_in: Count,
    operator_rows_out: Count,
    operator_late_rows: Count,
    operator_seconds: Seconds,
    operator_state_rows: Level,
    operator_state_bytes: Level,
    udf_calls: Count,
    udf_rows: Count,
    udf_seconds: Seconds,
    udf_row_errors: Count,
    udf_timeouts: Count,
    udf_traps: Count,
    udf_out_of_memory: Count,
    udf_instances: Level,
    errors: Count,
    /// UDF counters already added, per loaded module (by address: the same file may be loaded
    /// twice, with another configuration) and function index, so that the modules' cumulative
    /// counters become increments. Emptied, after a last reading, when a run's modules are
    /// replaced.
    udf_seen: HashMap<(usize, usize), StatsSnapshot>,
}

fn family<M: prometheus_client::registry::Metric + Clone + Default>(
    registry: &mut Registry,
    name: &str,
    help: &str,
    unit: Option<Unit>,
) -> Family<Labels, M>
where
    Family<Labels, M>: prometheus_client::registry::Metric,
{
    let f = Family::<Labels, M>::default();
    match unit {
        Some(u) => registry.register_with_unit(name, help, u, f.clone()),
        None => registry.register(name, help, f.clone()),
    }
    f
}

fn timings(registry: &mut Registry, name: &str, help: &str) -> Timings {
    let f: Timings = Family::new_with_constructor(latency_histogram);
    registry.register_with_unit(name, help, Unit::Seconds, f.clone());
    f
}

impl Metrics {
    pub(crate) fn new() -> Self {
        let mut r = Registry::with_prefix("riffle");
        let s = Some(Unit::Seconds);
        Metrics {
            run_info: family(
                &mut r,
                "run_info",
                "1 for the query run this process serves (labels: query id, run id, mode)",
                None,
            ),
            epochs: family(&mut r, "epochs", "Committed epochs", None),
            last_epoch: family(
                &mut r,
                "last_epoch",
                "Number of the last committed epoch",
                None,
            ),
            input_rows: family(&mut r, "input_rows", "Rows read from all sources", None),
            output_rows: family(&mut r, "output_rows", "Rows written to the sink", None),
            late_rows: family(
                &mut r,
                "late_rows",
                "Rows dropped behind the watermark (sources and operators)",
                None,
            ),
            input_rate: family(
                &mut r,
                "input_rows_per_second",
                "Input rate of the last epoch (rows per second of wall time)",
                None,
            ),
            processed_rate: family(
                &mut r,
                "processed_rows_per_second",
                "Processing rate of the last epoch (rows per second of processing time)",
                None,
            ),
            phase_seconds: family(
                &mut r,
                "epoch_phase",
                "Time spent per epoch phase (read, operators, state, sink, commit)",
                s.clone(),
            ),
            epoch_seconds: timings(&mut r, "epoch_duration", "Duration of whole epochs"),
            sink_seconds: timings(
                &mut r,
                "sink_commit",
                "Time the sink took to write and commit an epoch",
            ),
            checkpoint_seconds: timings(
                &mut r,
                "checkpoint_duration",
                "Time to write an epoch's state changes and commit record",
            ),
            checkpoint_bytes: family(
                &mut r,
                "checkpoint_written",
                "State bytes written to the checkpoint",
                Some(Unit::Bytes),
            ),
            watermark: family(
                &mut r,
                "watermark",
                "The query's event-time watermark, Unix time",
                s.clone(),
            ),
            watermark_lag: family(
                &mut r,
                "watermark_lag",
                "Wall-clock time minus the watermark when the epoch committed",
                s.clone(),
            ),
            state_rows: family(&mut r, "state_rows", "Entries in operator state", None),
            state_bytes: family(
                &mut r,
                "state",
                "Approximate operator state in memory",
                Some(Unit::Bytes),
            ),
            source_rows: family(&mut r, "source_input_rows", "Rows read per source", None),
            source_late_rows: family(
                &mut r,
                "source_late_rows",
                "Rows behind a source's watermark, dropped",
                None,
            ),
            source_dead_letters: family(
                &mut r,
                "source_dead_letters",
                "Records a source could not decode, sent to its dead-letter topic",
                None,
            ),
            source_lost_records: family(
                &mut r,
                "source_lost_records",
                "Records gone from a source before they were read (skipped on request)",
                None,
            ),
            kafka_lag: family(
                &mut r,
                "kafka_consumer_lag",
                "Records in a Kafka partition beyond the last epoch's end offset (against the \
                 high watermark of the fetch that epoch read with)",
                None,
            ),
            operator_rows_in: family(&mut r, "operator_rows_in", "Rows into an operator", None),
            operator_rows_out: family(&mut r, "operator_rows_out", "Rows out of an operator", None),
            operator_late_rows: family(
                &mut r,
                "operator_late_rows",
                "Rows an operator dropped as late",
                None,
            ),
            operator_seconds: family(&mut r, "operator", "Time inside an operator", s.clone()),
            operator_state_rows: family(
                &mut r,
                "operator_state_rows",
                "Entries in an operator's state",
                None,
            ),
            operator_state_bytes: family(
                &mut r,
                "operator_state",
                "Approximate bytes of an operator's state",
                Some(Unit::Bytes),
            ),
            udf_calls: family(&mut r, "udf_calls", "UDF calls (one per batch)", None),
            udf_rows: family(&mut r, "udf_rows", "Rows passed to a UDF", None),
            udf_seconds: family(
                &mut r,
                "udf",
                "Time inside UDF calls, with argument and result conversion",
                s,
            ),
            udf_row_errors: family(
                &mut r,
                "udf_row_errors",
                "Rows a UDF returned an error for",
                None,
            ),
            udf_timeouts: family(
                &mut r,
                "udf_timeouts",
                "UDF calls stopped at the time limit",
                None,
            ),
            udf_traps: family(
                &mut r,
                "udf_traps",
                "UDF calls that trapped or failed as a whole",
                None,
            ),
            udf_out_of_memory: family(
                &mut r,
                "udf_out_of_memory",
                "UDF calls stopped at the memory limit",
                None,
            ),
            udf_instances: family(
                &mut r,
                "udf_instances",
                "Live sandbox instances of a UDF module",
                None,
            ),
            errors: family(
                &mut r,
                "errors",
                "Failures and warnings of the run, by kind",
                None,
            ),
            registry: r,
            udf_seen: HashMap::new(),
        }
    }

    /// The text exposition of every metric.
    pub(crate) fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }

    /// A run starts with new modules: the old ones' last calls are counted, and what was only
    /// true of the old run (its instances, the partitions it read) is forgotten.
    /// A running query swapped UDF modules: settle the old ones' counters, and forget what
    /// was seen of the modules that no longer serve (those still serving keep their marks, or
    /// their totals would be counted twice).
    pub(crate) fn udfs_swapped(
        &mut self,
        old_modules: &[Arc<UdfModule>],
        new_modules: &[Arc<UdfModule>],
    ) {
        self.udfs(old_modules);
        let serving: Vec<usize> = new_modules
            .iter()
            .map(|m| Arc::as_ptr(m) as usize)
            .collect();
        self.udf_seen
            .retain(|(module, _), _| serving.contains(module));
        self.udf_instances.clear();
    }

    pub(crate) fn run_started(
        &mut self,
        query: &str,
        run: &str,
        mode: &str,
        old_modules: &[Arc<UdfModule>],
    ) {
        self.udfs(old_modules);
        self.udf_seen.clear();
        self.udf_instances.clear();
        self.kafka_lag.clear();
        let q = query.to_string();
        // Only the current run is 1: an earlier run of this process (before a retry) is gone.
        self.run_info.clear();
        self.run_info
            .get_or_create(&vec![
                ("query", q),
                ("run", run.to_string()),
                ("mode", mode.to_string()),
            ])
            .set(1);
    }

    pub(crate) fn error(&self, query: &str, kind: &str) {
        self.errors
            .get_or_create(&vec![
                ("query", query.to_string()),
                ("kind", kind.to_string()),
            ])
            .inc();
    }

    /// Adds a committed epoch.
    pub(crate) fn epoch(&self, p: &EpochProgress, now_micros: i64) {
        let q = || vec![("query", p.query_id.clone())];
        let query = q();
        self.epochs.get_or_create(&query).inc();
        self.last_epoch.get_or_create(&query).set(p.epoch as i64);
        self.input_rows.get_or_create(&query).inc_by(p.input_rows);
        self.output_rows.get_or_create(&query).inc_by(p.output_rows);
        self.late_rows.get_or_create(&query).inc_by(p.late_rows);
        self.input_rate
            .get_or_create(&query)
            .set(p.input_rows_per_second);
        self.processed_rate
            .get_or_create(&query)
            .set(p.processed_rows_per_second);
        let d = &p.durations;
        for (phase, ms) in [
            ("read", d.read_ms),
            ("operators", d.operators_ms),
            ("state", d.state_ms),
            ("sink", d.sink_ms),
            ("commit", d.commit_ms),
        ] {
            let mut labels = q();
            labels.push(("phase", phase.to_string()));
            self.phase_seconds.get_or_create(&labels).inc_by(ms / 1e3);
        }
        self.epoch_seconds
            .get_or_create(&query)
            .observe(d.total_ms / 1e3);
        self.sink_seconds
            .get_or_create(&query)
            .observe(d.sink_ms / 1e3);
        self.checkpoint_seconds
            .get_or_create(&query)
            .observe((d.state_ms + d.commit_ms) / 1e3);
        self.checkpoint_bytes
            .get_or_create(&query)
            .inc_by(p.state_bytes_written);
        if let Some(w) = p.watermark.as_deref().and_then(unix_micros) {
            self.watermark.get_or_create(&query).set(w as f64 / 1e6);
            self.watermark_lag
                .get_or_create(&query)
                .set((now_micros - w) as f64 / 1e6);
        }
        self.state_rows
            .get_or_create(&query)
            .set(p.state.rows as i64);
        self.state_bytes
            .get_or_create(&query)
            .set(p.state.bytes as i64);
        for s in &p.sources {
            let mut labels = q();
            labels.push(("source", s.name.clone()));
            self.source_rows.get_or_create(&labels).inc_by(s.input_rows);
            self.source_late_rows
                .get_or_create(&labels)
                .inc_by(s.late_rows);
            self.source_dead_letters
                .get_or_create(&labels)
                .inc_by(s.dead_letters);
            self.source_lost_records
                .get_or_create(&labels)
                .inc_by(s.lost_records);
            for (partition, lag) in &s.lag {
                let mut labels = labels.clone();
                labels.push(("partition", partition.clone()));
                self.kafka_lag.get_or_create(&labels).set(*lag);
            }
        }
        for o in &p.operators {
            let mut labels = q();
            labels.push(("operator", o.id.clone()));
            labels.push(("kind", o.kind.to_string()));
            self.operator_rows_in
                .get_or_create(&labels)
                .inc_by(o.rows_in);
            self.operator_rows_out
                .get_or_create(&labels)
                .inc_by(o.rows_out);
            self.operator_late_rows
                .get_or_create(&labels)
                .inc_by(o.late_rows);
            self.operator_seconds
                .get_or_create(&labels)
                .inc_by(o.time_ms / 1e3);
            self.operator_state_rows
                .get_or_create(&labels)
                .set(o.state.rows as i64);
            self.operator_state_bytes
                .get_or_create(&labels)
                .set(o.state.bytes as i64);
        }
    }

    /// Brings the UDF counters up to the modules' own.
    pub(crate) fn udfs(&mut self, modules: &[Arc<UdfModule>]) {
        for module in modules {
            let hash: String = module.hash().chars().take(12).collect();
            self.udf_instances
                .get_or_create(&vec![
                    ("module", hash.clone()),
                    ("file", module.file_name().to_string()),
                ])
                .set(module.live_instances() as i64);
            for (i, name) in module.counted() {
                let now = module.stats(i);
                let seen = self
                    .udf_seen
                    .entry((Arc::as_ptr(module) as usize, i))
                    .or_default();
                let labels = vec![("function", name.to_string()), ("module", hash.clone())];
                // Counters only go up: what was seen is never lowered.
                let add = |c: &Count, new: u64, old: &mut u64| {
                    c.get_or_create(&labels).inc_by(new.saturating_sub(*old));
                    *old = (*old).max(new);
                };
                add(&self.udf_calls, now.calls, &mut seen.calls);
                add(&self.udf_rows, now.rows, &mut seen.rows);
                add(&self.udf_row_errors, now.row_errors, &mut seen.row_errors);
                add(&self.udf_timeouts, now.timeouts, &mut seen.timeouts);
                add(&self.udf_traps, now.traps, &mut seen.traps);
                add(
                    &self.udf_out_of_memory,
                    now.out_of_memory,
                    &mut seen.out_of_memory,
                );
                self.udf_seconds
                    .get_or_create(&labels)
                    .inc_by(now.nanos.saturating_sub(seen.nanos) as f64 / 1e9);
                seen.nanos = seen.nanos.max(now.nanos);
            }
        }
    }
}

/// Microseconds since the Unix epoch of an RFC 3339 time.
pub(crate) fn unix_micros(text: &str) -> Option<i64> {
    chrono::DateTime::parse_from_rfc3339(text)
        .ok()
        .map(|t| t.timestamp_micros())
}
