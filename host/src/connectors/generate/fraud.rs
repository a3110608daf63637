//! A deterministic generator of fraud-detection transactions, for demos, tests and benchmarks.
//!
//! The same seed always yields the same rows (ChaCha8 is specified bit for bit), so a batch run
//! over a generated file and a streaming run over the same generator can be compared exactly.
//! Rows look like card payments: a card with a home location and an email (typed in several
//! spellings), a merchant in a country, an amount, a channel, and an `is_fraud` label that
//! correlates with large amounts, risky countries, distance from home and night time.

use std::sync::Arc;

use arrow::array::{
    ArrayRef, BooleanBuilder, Float64Builder, Int64Builder, StringBuilder,
    TimestampMicrosecondBuilder,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use arrow::record_batch::RecordBatch;
use rand::Rng;
use rand_chacha::ChaCha8Rng;

use super::{BLOCK_ROWS, RowGenerator, block_rng, block_start, mix};

/// Generator settings.
#[derive(Clone, Debug)]
pub struct FraudConfig {
    /// Seed; equal seeds give equal rows.
    pub seed: u64,
    /// Distinct cards (key cardinality).
    pub cards: u64,
    /// Distinct merchants.
    pub merchants: u64,
    /// Event time of the first row, microseconds since the epoch.
    pub start_micros: i64,
    /// Event-time rate: rows per second of event time.
    pub rows_per_second: f64,
    /// Fraction of fraudulent rows.
    pub fraud_rate: f64,
    /// Largest amount of event-time disorder, in microseconds (a row's time is moved back by up
    /// to this much).
    pub max_disorder_micros: i64,
    /// Fraction of rows delivered twice (an exact copy right after the original), as
    /// at-least-once feeds do; what streaming de-duplication is for.
    pub duplicate_rate: f64,
}

impl Default for FraudConfig {
    fn default() -> Self {
        FraudConfig {
            seed: 42,
            cards: 10_000,
            merchants: 2_000,
            // 2026-01-01T00:00:00Z
            start_micros: 1_767_225_600_000_000,
            // About 86,000 transactions a day: a spread of days and nights in a few hundred
            // thousand rows.
            rows_per_second: 1.0,
            fraud_rate: 0.01,
            max_disorder_micros: 0,
            duplicate_rate: 0.0,
        }
    }
}

const COUNTRIES: &[(&str, f64, f64, f64)] = &[
    // code, weight, latitude, longitude of a typical merchant location
    ("US", 30.0, 39.8, -98.6),
    ("GB", 12.0, 52.4, -1.5),
    ("DE", 10.0, 51.2, 10.4),
    ("FR", 9.0, 46.6, 2.2),
    ("NL", 5.0, 52.1, 5.3),
    ("IN", 8.0, 21.1, 78.0),
    ("BR", 7.0, -10.8, -52.9),
    ("CN", 7.0, 35.0, 103.0),
    ("NG", 3.0, 9.1, 8.7),
    ("RU", 3.0, 61.5, 105.3),
    ("ES", 6.0, 40.4, -3.7),
];
const RISKY: &[&str] = &["NG", "RU", "BR"];
const CHANNELS: &[&str] = &["pos", "web", "app"];
const FIRST: &[&str] = &[
    "ann", "bob", "carla", "dev", "eve", "finn", "gita", "hugo", "ines", "jon",
];
const DOMAINS: &[&str] = &[
    "gmail.com",
    "example.org",
    "mail.de",
    "yahoo.com",
    "corp.example",
];

/// Deterministic stream of fraud transactions.
pub struct FraudGenerator {
    config: FraudConfig,
    rng: ChaCha8Rng,
    next_id: i64,
}
impl FraudGenerator {
    /// A generator starting at row 0.
    pub fn new(config: FraudConfig) -> Self {
        FraudGenerator {
            rng: block_rng(config.seed, 0),
            config,
            next_id: 0,
        }
    }

    /// A generator whose next row is row `row` (the same row a generator started at 0 would
    /// produce there).
    pub fn starting_at(config: FraudConfig, row: i64) -> Self {
        let (rng, next_id, skip) = block_start(config.seed, row);
        let mut generator = FraudGenerator {
            rng,
            config,
            next_id,
        };
        generator.generate(skip);
        generator
    }

    /// The schema of every batch.
    pub fn schema() -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new("tx_id", DataType::Int64, false),
            Field::new(
                "ts",
                DataType::Timestamp(TimeUnit::Microsecond, None),
                false,
            ),
            Field::new("card_id", DataType::Int64, false),
            Field::new("merchant_id", DataType::Int64, false),
            Field::new("amount", DataType::Float64, true),
            Field::new("country", DataType::Utf8, true),
            Field::new("channel", DataType::Utf8, false),
            Field::new("email", DataType::Utf8, true),
            Field::new("lat", DataType::Float64, false),
            Field::new("lon", DataType::Float64, false),
            Field::new("home_lat", DataType::Float64, false),
            Field::new("home_lon", DataType::Float64, false),
            Field::new("is_fraud", DataType::Boolean, false),
        ]))
    }

    /// Rows generated so far.
    pub fn rows_generated(&self) -> i64 {
        self.next_id
    }

    fn country(&mut self, risky: bool) -> (&'static str, f64, f64) {
        if risky {
            let code = RISKY[self.rng.gen_range(0..RISKY.len())];
            let &(c, _, lat, lon) = COUNTRIES.iter().find(|c| c.0 == code).expect("listed");
            return (c, lat, lon);
        }
        let total: f64 = COUNTRIES.iter().map(|c| c.1).sum();
        let mut pick = self.rng.gen_range(0.0..total);
        for &(c, w, lat, lon) in COUNTRIES {
            if pick < w {
                return (c, lat, lon);
            }
            pick -= w;
        }
        let &(c, _, lat, lon) = COUNTRIES.last().expect("non-empty");
        (c, lat, lon)
    }

    /// A standard normal sample (Box-Muller).
    fn normal(&mut self) -> f64 {
        let u1: f64 = self.rng.gen_range(f64::EPSILON..1.0);
        let u2: f64 = self.rng.r#gen();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }

    /// The rows of the next `ids` transaction ids: `ids` rows plus any duplicated deliveries
    /// (see [`FraudConfig::duplicate_rate`]).
    pub fn next_batch_of_ids(&mut self, ids: usize) -> RecordBatch {
        let batch = self.generate(ids);
        if self.config.duplicate_rate <= 0.0 {
            return batch;
        }
        // Whether a row is delivered twice depends on its id only, so it does not disturb the
        // rows themselves and a resumed generator makes the same choice.
        let first_id = self.next_id - ids as i64;
        let mut take = Vec::with_capacity(ids + ids / 8);
        for i in 0..ids {
            take.push(i as u32);
            let u = mix(self.config.seed ^ 0xD0B1 ^ (first_id + i as i64) as u64) as f64
                / u64::MAX as f64;
            if u < self.config.duplicate_rate {
                take.push(i as u32);
            }
        }
        let indices = arrow::array::UInt32Array::from(take);
        arrow::compute::take_record_batch(&batch, &indices).expect("indices in range")
    }

    /// The next `rows` rows (no duplicated deliveries, whatever the config says).
    pub fn next_batch(&mut self, rows: usize) -> RecordBatch {
        self.generate(rows)
    }

    fn generate(&mut self, rows: usize) -> RecordBatch {
        let mut tx_id = Int64Builder::with_capacity(rows);
        let mut ts = TimestampMicrosecondBuilder::with_capacity(rows);
        let mut card = Int64Builder::with_capacity(rows);
        let mut merchant = Int64Builder::with_capacity(rows);
        let mut amount = Float64Builder::with_capacity(rows);
        let mut country = StringBuilder::with_capacity(rows, rows * 2);
        let mut channel = StringBuilder::with_capacity(rows, rows * 3);
        let mut email = StringBuilder::with_capacity(rows, rows * 20);
        let mut lat = Float64Builder::with_capacity(rows);
        let mut lon = Float64Builder::with_capacity(rows);
        let mut home_lat = Float64Builder::with_capacity(rows);
        let mut home_lon = Float64Builder::with_capacity(rows);
        let mut fraud = BooleanBuilder::with_capacity(rows);
        let step = 1_000_000.0 / self.config.rows_per_second;

        for _ in 0..rows {
            let id = self.next_id;
            if id % BLOCK_ROWS == 0 {
                self.rng = block_rng(self.config.seed, id / BLOCK_ROWS);
            }
            self.next_id += 1;
            let mut t = self.config.start_micros + (id as f64 * step) as i64;
            if self.config.max_disorder_micros > 0 {
                t -= self.rng.gen_range(0..=self.config.max_disorder_micros);
            }
            // Fraud clusters at night (01:00-05:00 UTC): three times the rate there, less
            // elsewhere. Times are never moved, so disorder stays within its bound.
            let hour = t.rem_euclid(86_400_000_000) / 3_600_000_000;
            let rate = if (1..5).contains(&hour) {
                self.config.fraud_rate * 3.0
            } else {
                self.config.fraud_rate * 0.8
            };
            let is_fraud = self.rng.gen_bool(rate.min(1.0));
            let card_id = self.rng.gen_range(0..self.config.cards) as i64;
            let merchant_id = self.rng.gen_range(0..self.config.merchants) as i64;

            let mu = if is_fraud { 6.0 } else { 3.6 };
            let value = (mu + 1.1 * self.normal()).exp().min(50_000.0);
            let value = (value * 100.0).round() / 100.0;

            let h = mix(card_id as u64 ^ self.config.seed);
            let &(home_country, _, hlat, hlon) = &COUNTRIES[(h % COUNTRIES.len() as u64) as usize];
            let home = (
                hlat + ((h >> 8) % 600) as f64 / 100.0 - 3.0,
                hlon + ((h >> 20) % 600) as f64 / 100.0 - 3.0,
            );
            let away = is_fraud || self.rng.gen_bool(0.05);
            let (code, clat, clon) = if away {
                let risky = is_fraud && self.rng.gen_bool(0.7);
                self.country(risky)
            } else {
                (home_country, home.0, home.1)
            };

            // A few rows are dirty, as real feeds are: NULL countries, emails and amounts,
            // and refunds (negative amounts).
            let dirt = self.rng.gen_range(0..1000);
            tx_id.append_value(id);
            ts.append_value(t);
            card.append_value(card_id);
            merchant.append_value(merchant_id);
            match dirt {
                0 => amount.append_null(),
                1 => amount.append_value(-value),
                _ => amount.append_value(value),
            }
            if dirt == 2 {
                country.append_null();
            } else {
                country.append_value(code);
            }
            channel.append_value(CHANNELS[self.rng.gen_range(0..CHANNELS.len())]);
            if dirt == 3 {
                email.append_null();
            } else {
                let first = FIRST[(h >> 32) as usize % FIRST.len()];
                let domain = DOMAINS[(h >> 40) as usize % DOMAINS.len()];
                let n = (h >> 48) % 1000;
                let spelled = match self.rng.gen_range(0..4) {
                    0 => format!("{first}.{n}@{domain}"),
                    1 => format!("{}.{n}@{}", first.to_uppercase(), domain.to_uppercase()),
                    2 => format!("{first}.{n}+shop@{domain}"),
                    _ => format!(" {first}.{n}@{domain} "),
                };
                email.append_value(spelled);
            }
            lat.append_value(clat + self.rng.gen_range(-0.5..0.5));
            lon.append_value(clon + self.rng.gen_range(-0.5..0.5));
            home_lat.append_value(home.0);
            home_lon.append_value(home.1);
            fraud.append_value(is_fraud);
        }

        let columns: Vec<ArrayRef> = vec![
            Arc::new(tx_id.finish()),
            Arc::new(ts.finish()),
            Arc::new(card.finish()),
            Arc::new(merchant.finish()),
            Arc::new(amount.finish()),
            Arc::new(country.finish()),
            Arc::new(channel.finish()),
            Arc::new(email.finish()),
            Arc::new(lat.finish()),
            Arc::new(lon.finish()),
            Arc::new(home_lat.finish()),
            Arc::new(home_lon.finish()),
            Arc::new(fraud.finish()),
        ];
        RecordBatch::try_new(Self::schema(), columns).expect("columns match the schema")
    }
}

impl RowGenerator for FraudGenerator {
    fn rows_generated(&self) -> i64 {
        self.next_id
    }

    fn next_batch_of_ids(&mut self, ids: usize) -> RecordBatch {
        FraudGenerator::next_batch_of_ids(self, ids)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_rows_different_seed_different_rows() {
        let a = FraudGenerator::new(FraudConfig::default()).next_batch(500);
        let b = FraudGenerator::new(FraudConfig::default()).next_batch(500);
        let c = FraudGenerator::new(FraudConfig {
            seed: 7,
            ..FraudConfig::default()
        })
        .next_batch(500);
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(a.num_rows(), 500);
    }

    #[test]
    fn default_rows_cover_days_and_nights() {
        // Three whole days at the default rate of one row per second.
        let batch = FraudGenerator::new(FraudConfig::default()).next_batch(3 * 86_400);
        let ts = batch
            .column(1)
            .as_any()
            .downcast_ref::<arrow::array::TimestampMicrosecondArray>()
            .unwrap();
        let night = ts
            .values()
            .iter()
            .filter(|t| t.rem_euclid(86_400_000_000) < 6 * 3_600_000_000)
            .count();
        // A quarter of each day (64,800 rows), plus the fraud that clusters at night.
        assert!((62_000..70_000).contains(&night), "{night} night rows");
    }

    #[test]
    fn disorder_is_bounded() {
        let config = FraudConfig {
            max_disorder_micros: 2_000_000,
            fraud_rate: 0.0,
            ..FraudConfig::default()
        };
        let step = 1_000_000.0 / config.rows_per_second;
        let batch = FraudGenerator::new(config.clone()).next_batch(2000);
        let ts = batch
            .column(1)
            .as_any()
            .downcast_ref::<arrow::array::TimestampMicrosecondArray>()
            .unwrap();
        for (i, t) in ts.values().iter().enumerate() {
            let nominal = config.start_micros + (i as f64 * step) as i64;
            assert!(*t <= nominal && nominal - *t <= config.max_disorder_micros);
        }
    }

    #[test]
    fn a_generator_resumes_at_any_row() {
        let config = FraudConfig {
            max_disorder_micros: 5_000_000,
            ..FraudConfig::default()
        };
        let all = FraudGenerator::new(config.clone()).next_batch(10_000);
        for start in [0, 1, 4095, 4096, 4097, 9000] {
            let mut resumed = FraudGenerator::starting_at(config.clone(), start);
            let rest = resumed.next_batch(10_000 - start as usize);
            assert_eq!(
                rest,
                all.slice(start as usize, 10_000 - start as usize),
                "{start}"
            );
        }
    }

    #[test]
    fn duplicates_are_exact_copies_of_the_row_before() {
        let config = FraudConfig {
            duplicate_rate: 0.1,
            ..FraudConfig::default()
        };
        let batch = FraudGenerator::new(config.clone()).next_batch_of_ids(2000);
        assert!(
            (2150..2250).contains(&batch.num_rows()),
            "{}",
            batch.num_rows()
        );
        let ids = batch
            .column(0)
            .as_any()
            .downcast_ref::<arrow::array::Int64Array>()
            .unwrap();
        for i in 1..batch.num_rows() {
            if ids.value(i) == ids.value(i - 1) {
                assert_eq!(batch.slice(i, 1), batch.slice(i - 1, 1));
            }
        }
        // Split anywhere, the same rows come out.
        let mut g = FraudGenerator::new(config.clone());
        let a = g.next_batch_of_ids(700);
        let b = FraudGenerator::starting_at(config, 700).next_batch_of_ids(1300);
        let joined = arrow::compute::concat_batches(&batch.schema(), [&a, &b]).unwrap();
        assert_eq!(joined, batch);
    }
}
