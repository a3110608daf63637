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

use crate::stream::progress::{EpochProgress, rate};
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
    output_rate: FloatLevel,
    phase_seconds: Seconds,
    epoch_seconds: Timings,
    sink_seconds: Timings,
    checkpoint_seconds: Timings,
    checkpoint_bytes: Count,
    watermark: FloatLevel,
    watermark_lag: FloatLevel,
    source_watermark: FloatLevel,
    source_watermark_lag: FloatLevel,
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
    operator_in_rate: FloatLevel,
    operator_out_rate: FloatLevel,
    operator_watermark: FloatLevel,
    operator_watermark_lag: FloatLevel,
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
    /// The last watermark (Unix microseconds) of each series of the three watermark families
    /// (query, source, operator): their lag gauges are worked out again at every scrape, so
    /// that a stalled query shows its lag growing rather than the lag of its last commit.
    watermarks: [HashMap<Labels, i64>; 3],
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
            output_rate: family(
                &mut r,
                "output_rows_per_second",
                "Output rate of the last epoch (rows written per second of processing time)",
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
                "Time the sinks (the output's, and the late rows' where configured) took to \
                 write and commit an epoch",
            ),
            checkpoint_seconds: timings(
                &mut r,
                "checkpoint_duration",
                "Time to write an epoch's state changes and commit record (and to tell the \
                 sources, e.g. Kafka's committed offsets, which are for monitoring only)",
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
                "Wall-clock time now minus the query's watermark",
                s.clone(),
            ),
            source_watermark: family(
                &mut r,
                "source_watermark",
                "A source's event-time watermark, Unix time",
                s.clone(),
            ),
            source_watermark_lag: family(
                &mut r,
                "source_watermark_lag",
                "Wall-clock time now minus a source's watermark",
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
            operator_in_rate: family(
                &mut r,
                "operator_rows_in_per_second",
                "Rows into an operator in the last epoch, per second of the epoch's processing \
                 time",
                None,
            ),
            operator_out_rate: family(
                &mut r,
                "operator_rows_out_per_second",
                "Rows out of an operator in the last epoch, per second of the epoch's \
                 processing time",
                None,
            ),
            operator_watermark: family(
                &mut r,
                "operator_watermark",
                "An operator's output watermark (the least of its inputs' less what it holds \
                 back), Unix time",
                s.clone(),
            ),
            operator_watermark_lag: family(
                &mut r,
                "operator_watermark_lag",
                "Wall-clock time now minus an operator's output watermark",
                s.clone(),
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
            watermarks: Default::default(),
            udf_seen: HashMap::new(),
        }
    }

    /// The text exposition of every metric, with the watermark lags as of `now_micros`.
    pub(crate) fn render(&self, now_micros: i64) -> String {
        self.set_lags(now_micros);
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
        // Levels of the old run's sources and operators (a retry may not reach the same
        // watermarks or state again before its first commit).
        for f in [
            &self.watermark,
            &self.watermark_lag,
            &self.source_watermark,
            &self.source_watermark_lag,
            &self.operator_watermark,
            &self.operator_watermark_lag,
            &self.operator_in_rate,
            &self.operator_out_rate,
        ] {
            f.clear();
        }
        self.operator_state_rows.clear();
        self.operator_state_bytes.clear();
        for w in &mut self.watermarks {
            w.clear();
        }
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
    pub(crate) fn epoch(&mut self, p: &EpochProgress) {
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
        let per_second = |rows: u64| rate(rows, d.total_ms);
        self.output_rate
            .get_or_create(&query)
            .set(per_second(p.output_rows));
        for (phase, ms) in [
            ("plan", d.plan_ms),
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
        self.set_watermark(0, &query, p.watermark.as_deref());
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
            self.set_watermark(1, &labels, s.watermark.as_deref());
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
            self.operator_in_rate
                .get_or_create(&labels)
                .set(per_second(o.rows_in));
            self.operator_out_rate
                .get_or_create(&labels)
                .set(per_second(o.rows_out));
            self.set_watermark(2, &labels, o.watermark.as_deref());
            self.operator_state_rows
                .get_or_create(&labels)
                .set(o.state.rows as i64);
            self.operator_state_bytes
                .get_or_create(&labels)
                .set(o.state.bytes as i64);
        }
    }

    /// Records watermark `w` (RFC 3339; none before the first event time) of the series
    /// `labels` of the query's (`which` 0), a source's (1) or an operator's (2) family.
    fn set_watermark(&mut self, which: usize, labels: &Labels, w: Option<&str>) {
        let family = [
            &self.watermark,
            &self.source_watermark,
            &self.operator_watermark,
        ][which];
        match w.and_then(unix_micros) {
            Some(w) => {
                family.get_or_create(labels).set(w as f64 / 1e6);
                self.watermarks[which].insert(labels.clone(), w);
            }
            None => {
                family.remove(labels);
                self.watermarks[which].remove(labels);
                [
                    &self.watermark_lag,
                    &self.source_watermark_lag,
                    &self.operator_watermark_lag,
                ][which]
                    .remove(labels);
            }
        }
    }

    /// Sets every watermark lag as of `now_micros`.
    fn set_lags(&self, now_micros: i64) {
        let lags = [
            &self.watermark_lag,
            &self.source_watermark_lag,
            &self.operator_watermark_lag,
        ];
        for (family, watermarks) in lags.into_iter().zip(&self.watermarks) {
            for (labels, w) in watermarks {
                family
                    .get_or_create(labels)
                    .set((now_micros - w) as f64 / 1e6);
            }
        }
    }

    /// Brings the UDF counters up to the modules' own.
    pub(crate) fn udfs(&mut self, modules: &[Arc<UdfModule>]) {
        // The same file may be loaded more than once (with another configuration): its
        // instances add up.
        let mut instances: HashMap<Labels, i64> = HashMap::new();
        for module in modules {
            let hash: String = module.hash().chars().take(12).collect();
            *instances
                .entry(vec![
                    ("module", hash.clone()),
                    ("file", module.file_name().to_string()),
                ])
                .or_default() += module.live_instances() as i64;
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
        for (labels, n) in instances {
            self.udf_instances.get_or_create(&labels).set(n);
        }
    }
}

/// Microseconds since the Unix epoch of an RFC 3339 time.
pub(crate) fn unix_micros(text: &str) -> Option<i64> {
    chrono::DateTime::parse_from_rfc3339(text)
        .ok()
        .map(|t| t.timestamp_micros())
}
