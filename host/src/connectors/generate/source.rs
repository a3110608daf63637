//! A generator as a streaming source: the offset is the number of row ids generated so far,
//! and reading between two offsets always gives the same rows.

use std::sync::mpsc;
use std::time::{Duration, Instant};

use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{BLOCK_ROWS, ClickConfig, FraudConfig, GeneratorConfig, RowGenerator};
use crate::common::time::SqlDuration;
use crate::connectors::ConfigContext;
use crate::connectors::source::{Input, StreamSource, row_of};
use crate::error::{Result, RiffleError};

/// What a generator source generates.
#[derive(Debug, Default, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum GeneratedData {
    /// Card transactions.
    #[default]
    Fraud,
    /// Clickstream events.
    Clickstream,
}

/// A generator source in a pipeline file (`kind = "generator"`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GeneratorSourceConfig {
    /// `fraud` (default) or `clickstream`.
    #[serde(default)]
    pub data: GeneratedData,
    /// Stop after this many rows (omit: endless).
    pub rows: Option<i64>,
    /// Arrival rate in rows per second of wall-clock time (omit: as fast as the query reads).
    pub rows_per_second: Option<f64>,
    /// Seed; the same seed gives the same rows.
    pub seed: Option<u64>,
    /// Fraud: distinct cards.
    pub cards: Option<u64>,
    /// Bounded event-time disorder.
    pub disorder: Option<SqlDuration>,
    /// Fraud: fraction of rows delivered twice.
    pub duplicates: Option<f64>,
    /// Event-time rate: rows per second of event time.
    pub events_per_second: Option<f64>,
    /// Clickstream: distinct users.
    pub users: Option<u64>,
    /// Clickstream: distinct items.
    pub items: Option<u64>,
}

impl GeneratorSourceConfig {
    /// Checks the settings and builds the source.
    ///
    /// # Errors
    /// [`crate::RiffleError::Config`] naming the key of a value out of range.
    pub fn build(&self, ctx: &ConfigContext) -> Result<GeneratorSource> {
        let positive = |key: &str, v: Option<f64>| match v {
            Some(v) if !(v.is_finite() && v > 0.0) => {
                Err(ctx.error(key, format!("{v} must be a positive number")))
            }
            _ => Ok(()),
        };
        positive("rows_per_second", self.rows_per_second)?;
        positive("events_per_second", self.events_per_second)?;
        if let Some(rows) = self.rows
            && rows < 1
        {
            return Err(ctx.error(
                "rows",
                format!("{rows} must be at least 1 (omit it for an endless stream)"),
            ));
        }
        for (key, v) in [
            ("cards", self.cards),
            ("users", self.users),
            ("items", self.items),
        ] {
            if v == Some(0) {
                return Err(ctx.error(key, "must be at least 1"));
            }
        }
        if let Some(d) = self.duplicates
            && !(0.0..1.0).contains(&d)
        {
            return Err(ctx.error("duplicates", format!("{d} must be a fraction in [0, 1)")));
        }
        let only = |key: &str, set: bool, kind: &str| {
            if set {
                Err(ctx.error(key, format!("only applies to data = \"{kind}\"")))
            } else {
                Ok(())
            }
        };
        let disorder = self.disorder.map(SqlDuration::micros).unwrap_or(0);
        let config = match self.data {
            GeneratedData::Fraud => {
                only("users", self.users.is_some(), "clickstream")?;
                only("items", self.items.is_some(), "clickstream")?;
                let mut config = FraudConfig {
                    max_disorder_micros: disorder,
                    ..FraudConfig::default()
                };
                config.seed = self.seed.unwrap_or(config.seed);
                config.cards = self.cards.unwrap_or(config.cards);
                config.duplicate_rate = self.duplicates.unwrap_or(config.duplicate_rate);
                config.rows_per_second = self.events_per_second.unwrap_or(config.rows_per_second);
                GeneratorConfig::Fraud(config)
            }
            GeneratedData::Clickstream => {
                only("cards", self.cards.is_some(), "fraud")?;
                only("duplicates", self.duplicates.is_some(), "fraud")?;
                let mut config = ClickConfig {
                    max_disorder_micros: disorder,
                    ..ClickConfig::default()
                };
                config.seed = self.seed.unwrap_or(config.seed);
                config.users = self.users.unwrap_or(config.users);
                config.items = self.items.unwrap_or(config.items);
                config.rows_per_second = self.events_per_second.unwrap_or(config.rows_per_second);
                GeneratorConfig::Clickstream(config)
            }
        };
        Ok(GeneratorSource::new(
            config,
            self.rows_per_second,
            self.rows,
        ))
    }
}

/// A generator (fraud or clickstream) as a source: offset = row ids generated so far.
pub struct GeneratorSource {
    config: GeneratorConfig,
    /// Rows per second of wall-clock time; `None` = as fast as the query takes them.
    rate: Option<f64>,
    /// Total ids, `None` = endless.
    limit: Option<i64>,
    clock: Option<(Instant, i64)>,
    generator: Option<Box<dyn RowGenerator>>,
    /// Threads an epoch's rows may be generated on (the query's partitions).
    threads: usize,
    /// Threads that generate the parts after the first, kept from epoch to epoch.
    helpers: Vec<Helper>,
}

/// What a helper sends back: a part's rows and the generator that made them, or the message
/// of the panic that stopped it.
type Part = std::result::Result<(RecordBatch, Box<dyn RowGenerator>), String>;

/// What a helper is asked: a range of row ids, and where to send its [`Part`].
type Ask = ((i64, i64), mpsc::Sender<Part>);

/// A thread that generates the rows of the ranges it is asked for. It lives as long as its
/// source, so that an epoch does not start a thread and warm its heap up again (20,000,000
/// rows in 200,000-row epochs on two cores: reading took 7.1 s with a thread started per
/// epoch, 6.8 s with kept threads, 11.6 s on one thread). It stops when its source is
/// dropped.
struct Helper {
    asks: mpsc::Sender<Ask>,
}

impl Helper {
    fn start(config: GeneratorConfig) -> Result<Helper> {
        let (asks, asked) = mpsc::channel::<Ask>();
        std::thread::Builder::new()
            .name("riffle-generate".into())
            .spawn(move || {
                for ((from, to), reply) in asked {
                    let part = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        let mut g = config.starting_at(from);
                        (g.next_batch_of_ids((to - from) as usize), g)
                    }))
                    .map_err(|panic| {
                        panic
                            .downcast_ref::<&str>()
                            .map(|s| s.to_string())
                            .or_else(|| panic.downcast_ref::<String>().cloned())
                            .unwrap_or_else(|| "a panic".into())
                    });
                    let failed = part.is_err();
                    // The reader gave up only if it is failing already.
                    let _ = reply.send(part);
                    if failed {
                        return;
                    }
                }
            })
            .map_err(|e| RiffleError::External(format!("cannot start a generator thread: {e}")))?;
        Ok(Helper { asks })
    }

    /// Asks for the rows of `part`; they come on the returned channel, which closes without
    /// them if the thread is gone.
    fn ask(&self, part: (i64, i64)) -> mpsc::Receiver<Part> {
        let (reply, replies) = mpsc::channel();
        // A send fails only when the thread is gone; the receiver then reports it.
        let _ = self.asks.send((part, reply));
        replies
    }
}

/// The rows an epoch needs per thread before it is cut in parts: below this, handing a part
/// over and starting a generator for it costs more than it saves.
const ROWS_PER_THREAD: i64 = 8 * BLOCK_ROWS;

impl GeneratorSource {
    /// A generator source.
    pub fn new(config: GeneratorConfig, rate: Option<f64>, limit: Option<i64>) -> Self {
        GeneratorSource {
            config,
            rate,
            limit,
            clock: None,
            generator: None,
            threads: 1,
            helpers: Vec::new(),
        }
    }

    /// The ranges of row ids `start..end` is generated in: up to `threads` of about equal
    /// size, each after the first starting on a block's first row (where a generator starts
    /// without generating rows to skip). When there are several, none is shorter than
    /// [`ROWS_PER_THREAD`] less a block (the first part's end moves back to a block's start).
    fn parts(&self, start: i64, end: i64) -> Vec<(i64, i64)> {
        let rows = end - start;
        let n = (rows / ROWS_PER_THREAD).clamp(1, self.threads as i64);
        // A share is at least ROWS_PER_THREAD (eight blocks) and moving a cut back to a
        // block's start takes less than one, so the cuts rise strictly between start and end.
        let cuts = (1..n).map(|i| (start + rows * i / n).div_euclid(BLOCK_ROWS) * BLOCK_ROWS);
        let bounds: Vec<i64> = std::iter::once(start).chain(cuts).chain([end]).collect();
        bounds.windows(2).map(|w| (w[0], w[1])).collect()
    }

    fn due(&self, row: i64) -> Option<Instant> {
        let (t0, row0) = self.clock?;
        let rate = self.rate?;
        Some(t0 + Duration::from_secs_f64((row - row0).max(0) as f64 / rate))
    }
}

impl StreamSource for GeneratorSource {
    fn kind(&self) -> &'static str {
        "generator"
    }

    fn schema(&self) -> SchemaRef {
        self.config.schema()
    }

    fn initial(&mut self) -> Result<Value> {
        Ok(json!({ "rows": 0 }))
    }

    fn available(&mut self, from: &Value, max_rows: usize) -> Result<Value> {
        let start = row_of(from, "rows")?;
        // The rate clock starts at the first poll (also after a restart): rows become
        // available at `rate` per second from then on.
        let (t0, row0) = *self.clock.get_or_insert((Instant::now(), start));
        let mut end = start + max_rows as i64;
        if let Some(rate) = self.rate {
            let due = row0 + (t0.elapsed().as_secs_f64() * rate) as i64;
            end = end.min(due.max(start));
        }
        if let Some(limit) = self.limit {
            end = end.min(limit);
        }
        Ok(json!({ "rows": end.max(start) }))
    }

    /// Generates the epoch's rows on up to [`threads`](StreamSource::set_partitions) threads,
    /// a contiguous range of ids each: a generator is deterministic by row id, so the rows
    /// are the same however they are cut. Generating is slower per row than most queries
    /// over its rows (about 1.7 M fraud rows/s on one core, against over 5 M for a tumbling
    /// window with a UDF), so on one thread it held every partition of the query back.
    fn read(&mut self, from: &Value, to: &Value) -> Result<Input> {
        let (start, end) = (row_of(from, "rows")?, row_of(to, "rows")?);
        let parts = self.parts(start, end);
        let (first, rest) = parts.split_first().expect("at least one part");
        let config = &self.config;
        let generator = match &mut self.generator {
            Some(g) if g.rows_generated() == start => g,
            slot => slot.insert(config.starting_at(start)),
        };
        while self.helpers.len() < rest.len() {
            self.helpers.push(Helper::start(config.clone())?);
        }
        let replies: Vec<_> = rest
            .iter()
            .zip(&self.helpers)
            .map(|(&part, helper)| helper.ask(part))
            .collect();
        let mut batches = vec![generator.next_batch_of_ids((first.1 - first.0) as usize)];
        for reply in replies {
            let part = reply
                .recv()
                .unwrap_or_else(|_| Err("its thread is gone".into()));
            let (batch, g) = match part {
                Ok(part) => part,
                Err(panic) => {
                    // A helper that failed has stopped: the next read starts new ones.
                    self.helpers.clear();
                    return Err(RiffleError::Internal(format!(
                        "generating rows on a helper thread failed: {panic}"
                    )));
                }
            };
            batches.push(batch);
            // The generator that made the last rows goes on from there next epoch.
            self.generator = Some(g);
        }
        let arrival = match (self.due(start), self.due(end - 1)) {
            (Some(a), Some(b)) if end > start => Some((a, b)),
            _ => None,
        };
        Ok(Input {
            batches,
            arrival,
            ..Input::default()
        })
    }

    fn set_partitions(&mut self, partitions: usize) {
        self.threads = partitions.max(1);
    }

    fn finished(&self, at: &Value) -> bool {
        matches!((self.limit, at["rows"].as_i64()), (Some(l), Some(r)) if r >= l)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::connectors::generate::SalesConfig;
    use arrow::compute::concat_batches;

    /// Rows read in epochs on several threads are the rows one generator makes from row 0,
    /// in order, whatever the epochs' bounds (on a block's first row or not), for every
    /// generator, duplicated deliveries included.
    #[test]
    fn rows_made_on_several_threads_are_one_generators_rows() {
        let configs = [
            GeneratorConfig::Fraud(FraudConfig {
                duplicate_rate: 0.01,
                max_disorder_micros: 2_000_000,
                ..FraudConfig::default()
            }),
            GeneratorConfig::Clickstream(ClickConfig::default()),
            GeneratorConfig::Sales(SalesConfig::default()),
        ];
        // Epoch bounds: a short first epoch, one that starts mid-block, one that ends on a
        // block's first row, a long one.
        let bounds = [
            0,
            1_000,
            70_001,
            4 * ROWS_PER_THREAD,
            9 * ROWS_PER_THREAD + 17,
        ];
        let total = *bounds.last().unwrap();
        for config in configs {
            let expected = config.starting_at(0).next_batch_of_ids(total as usize);
            let mut source = GeneratorSource::new(config.clone(), None, None);
            source.set_partitions(3);
            let mut got = Vec::new();
            let mut threads_used = 0;
            for w in bounds.windows(2) {
                threads_used = threads_used.max(source.parts(w[0], w[1]).len());
                let input = source
                    .read(&json!({ "rows": w[0] }), &json!({ "rows": w[1] }))
                    .unwrap();
                got.extend(input.batches);
                // The generator kept for the next epoch is the one that made the last rows.
                let kept = source.generator.as_ref().expect("a generator is kept");
                assert_eq!(kept.rows_generated(), w[1], "{config:?}");
            }
            assert_eq!(threads_used, 3, "{config:?}: the long epochs were split");
            let got = concat_batches(&config.schema(), &got).unwrap();
            assert_eq!(got, expected, "{config:?}");
        }
    }

    /// The parts cover the range in order, at most one per thread, each after the first
    /// starting on a block's first row, none too small to be worth a thread.
    #[test]
    fn an_epoch_is_cut_into_contiguous_parts_on_block_bounds() {
        let mut source =
            GeneratorSource::new(GeneratorConfig::Fraud(FraudConfig::default()), None, None);
        source.set_partitions(4);
        let odd = BLOCK_ROWS - 1;
        for (start, end) in [
            (0, 0),
            (5, 6),
            (3, 200_000),
            (4_096, 1_000_000),
            (odd, odd + ROWS_PER_THREAD * 2),
        ] {
            let parts = source.parts(start, end);
            assert!(parts.len() <= 4);
            assert_eq!(parts.first().unwrap().0, start);
            assert_eq!(parts.last().unwrap().1, end);
            for w in parts.windows(2) {
                assert_eq!(w[0].1, w[1].0, "{parts:?}");
                assert_eq!(w[1].0 % BLOCK_ROWS, 0, "{parts:?}");
            }
            if parts.len() > 1 {
                let shortest = ROWS_PER_THREAD - BLOCK_ROWS;
                assert!(parts.iter().all(|(a, b)| b - a >= shortest), "{parts:?}");
            }
        }
        assert_eq!(source.parts(odd, odd + ROWS_PER_THREAD * 2).len(), 2);
        assert_eq!(source.parts(0, 1_000_000).len(), 4);
        source.set_partitions(1);
        assert_eq!(source.parts(0, 1_000_000), vec![(0, 1_000_000)]);
    }
}
