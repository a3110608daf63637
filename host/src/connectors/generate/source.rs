//! A generator as a streaming source: the offset is the number of row ids generated so far,
//! and reading between two offsets always gives the same rows.

use std::time::{Duration, Instant};

use arrow::datatypes::SchemaRef;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{ClickConfig, FraudConfig, GeneratorConfig, RowGenerator};
use crate::common::time::SqlDuration;
use crate::connectors::ConfigContext;
use crate::connectors::source::{Input, StreamSource, row_of};
use crate::error::Result;

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
}

impl GeneratorSource {
    /// A generator source.
    pub fn new(config: GeneratorConfig, rate: Option<f64>, limit: Option<i64>) -> Self {
        GeneratorSource {
            config,
            rate,
            limit,
            clock: None,
            generator: None,
        }
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

    fn read(&mut self, from: &Value, to: &Value) -> Result<Input> {
        let (start, end) = (row_of(from, "rows")?, row_of(to, "rows")?);
        let generator = match &mut self.generator {
            Some(g) if g.rows_generated() == start => g,
            slot => slot.insert(self.config.starting_at(start)),
        };
        let batch = generator.next_batch_of_ids((end - start) as usize);
        let arrival = match (self.due(start), self.due(end - 1)) {
            (Some(a), Some(b)) if end > start => Some((a, b)),
            _ => None,
        };
        Ok(Input {
            batches: vec![batch],
            arrival,
            ..Input::default()
        })
    }

    fn finished(&self, at: &Value) -> bool {
        matches!((self.limit, at["rows"].as_i64()), (Some(l), Some(r)) if r >= l)
    }
}
