//! A deterministic generator of clickstream events (the recommendation demo's input).
//!
//! Events come in per-user sessions: a user lands on a page from a referrer, views items,
//! sometimes adds one to the cart and sometimes buys. Key cardinality (users, items), event
//! rate and bounded disorder are configurable, and like the fraud generator it resumes at any
//! row from a checkpointed offset, so a streaming run can be compared exactly with a batch run.
//!
//! **Planted tastes**, so that recommendations can be scored: the catalogue is split into
//! categories (an item's category is its id modulo their number), each user prefers one, and
//! [`TASTE`] of a user's events (views and purchases alike) are of items in that category; the
//! rest are of any item. Within a category, as in the whole catalogue, low ids are the best
//! sellers. Items viewed together in a session therefore tend to share a category, and a
//! recommender that learns this from co-views beats recommending the best sellers.

use std::sync::Arc;

use arrow::array::{
    ArrayRef, Int32Builder, Int64Builder, StringBuilder, TimestampMicrosecondBuilder,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use arrow::record_batch::RecordBatch;
use rand::Rng;
use rand_chacha::ChaCha8Rng;

use super::{BLOCK_ROWS, RowGenerator, block_rng, block_start, mix};

/// Clickstream settings.
#[derive(Clone, Debug)]
pub struct ClickConfig {
    /// Seed; equal seeds give equal rows.
    pub seed: u64,
    /// Distinct users (key cardinality).
    pub users: u64,
    /// Distinct items in the catalogue.
    pub items: u64,
    /// Event time of the first row, microseconds since the epoch.
    pub start_micros: i64,
    /// Event-time rate: events per second of event time.
    pub rows_per_second: f64,
    /// Largest amount of event-time disorder, in microseconds.
    pub max_disorder_micros: i64,
}

impl Default for ClickConfig {
    fn default() -> Self {
        ClickConfig {
            seed: 42,
            users: 50_000,
            items: 5_000,
            // 2026-01-01T00:00:00Z
            start_micros: 1_767_225_600_000_000,
            rows_per_second: 100.0,
            max_disorder_micros: 0,
        }
    }
}

const ACTIONS: &[(&str, u32)] = &[
    ("view", 70),
    ("click", 20),
    ("add_to_cart", 7),
    ("purchase", 3),
];
/// The share of a user's events that are of items in the category the user prefers.
pub const TASTE: f64 = 0.8;
const DEVICES: &[&str] = &["desktop", "mobile", "tablet"];
const REFERRERS: &[&str] = &["direct", "search", "social", "email", "ads"];
const COUNTRIES: &[&str] = &["US", "GB", "DE", "FR", "IN", "BR", "JP", "ES"];
const CATEGORIES: &[&str] = &[
    "books", "music", "garden", "toys", "kitchen", "sports", "games",
];

/// Deterministic stream of clickstream events.
pub struct ClickGenerator {
    config: ClickConfig,
    rng: ChaCha8Rng,
    next_id: i64,
}

impl ClickGenerator {
    /// A generator whose next row is row `row`.
    pub fn starting_at(config: ClickConfig, row: i64) -> Self {
        let (rng, next_id, skip) = block_start(config.seed ^ 0xC11C, row);
        let mut generator = ClickGenerator {
            rng,
            config,
            next_id,
        };
        if skip > 0 {
            generator.next_batch_of_ids(skip);
        }
        generator
    }

    /// The schema of every batch.
    pub fn schema() -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new("event_id", DataType::Int64, false),
            Field::new(
                "ts",
                DataType::Timestamp(TimeUnit::Microsecond, None),
                false,
            ),
            Field::new("user_id", DataType::Int64, false),
            Field::new("session_id", DataType::Int64, false),
            Field::new("action", DataType::Utf8, false),
            Field::new("item_id", DataType::Int64, false),
            Field::new("category", DataType::Utf8, false),
            Field::new("price_cents", DataType::Int32, false),
            Field::new("device", DataType::Utf8, false),
            Field::new("referrer", DataType::Utf8, false),
            Field::new("country", DataType::Utf8, false),
        ]))
    }
}

impl RowGenerator for ClickGenerator {
    fn rows_generated(&self) -> i64 {
        self.next_id
    }

    fn next_batch_of_ids(&mut self, rows: usize) -> RecordBatch {
        let mut event_id = Int64Builder::with_capacity(rows);
        let mut ts = TimestampMicrosecondBuilder::with_capacity(rows);
        let mut user = Int64Builder::with_capacity(rows);
        let mut session = Int64Builder::with_capacity(rows);
        let mut action = StringBuilder::with_capacity(rows, rows * 6);
        let mut item = Int64Builder::with_capacity(rows);
        let mut category = StringBuilder::with_capacity(rows, rows * 6);
        let mut price = Int32Builder::with_capacity(rows);
        let mut device = StringBuilder::with_capacity(rows, rows * 7);
        let mut referrer = StringBuilder::with_capacity(rows, rows * 6);
        let mut country = StringBuilder::with_capacity(rows, rows * 2);
        let step = 1_000_000.0 / self.config.rows_per_second;
        let action_total: u32 = ACTIONS.iter().map(|a| a.1).sum();

        for _ in 0..rows {
            let id = self.next_id;
            if id % BLOCK_ROWS == 0 {
                self.rng = block_rng(self.config.seed ^ 0xC11C, id / BLOCK_ROWS);
            }
            self.next_id += 1;
            let mut t = self.config.start_micros + (id as f64 * step) as i64;
            if self.config.max_disorder_micros > 0 {
                t -= self.rng.gen_range(0..=self.config.max_disorder_micros);
            }
            // Popular users and items: a squared uniform skews towards low ids, as real
            // traffic is skewed towards a few heavy users and best sellers.
            let skewed = |rng: &mut ChaCha8Rng, n: u64| {
                let u: f64 = rng.r#gen();
                ((u * u) * n as f64) as u64 % n.max(1)
            };
            let user_id = skewed(&mut self.rng, self.config.users);
            let categories = CATEGORIES.len() as u64;
            let taste = mix(user_id ^ self.config.seed ^ 0x7A57) % categories;
            let in_taste = self.config.items.div_ceil(categories);
            let item_id = if self.rng.gen_bool(TASTE) && taste < self.config.items {
                // The category's k-th best seller; the last round of ids may be short.
                let k = skewed(&mut self.rng, in_taste);
                let id = k * categories + taste;
                if id < self.config.items { id } else { taste }
            } else {
                skewed(&mut self.rng, self.config.items)
            };
            // A session is a user's activity within a 30-minute slot of event time.
            let slot = t.div_euclid(1_800_000_000);
            let h = mix(user_id ^ self.config.seed);
            let mut pick = self.rng.gen_range(0..action_total);
            let mut chosen = ACTIONS[0].0;
            for &(a, w) in ACTIONS {
                if pick < w {
                    chosen = a;
                    break;
                }
                pick -= w;
            }
            let ih = mix(item_id ^ 0x17E5);

            event_id.append_value(id);
            ts.append_value(t);
            user.append_value(user_id as i64);
            session.append_value((mix(h ^ slot as u64) >> 1) as i64);
            action.append_value(chosen);
            item.append_value(item_id as i64);
            category.append_value(CATEGORIES[(item_id % categories) as usize]);
            price.append_value(199 + ((ih >> 16) % 20_000) as i32);
            device.append_value(DEVICES[((h >> 8) % DEVICES.len() as u64) as usize]);
            referrer.append_value(REFERRERS[self.rng.gen_range(0..REFERRERS.len())]);
            country.append_value(COUNTRIES[((h >> 24) % COUNTRIES.len() as u64) as usize]);
        }
        let columns: Vec<ArrayRef> = vec![
            Arc::new(event_id.finish()),
            Arc::new(ts.finish()),
            Arc::new(user.finish()),
            Arc::new(session.finish()),
            Arc::new(action.finish()),
            Arc::new(item.finish()),
            Arc::new(category.finish()),
            Arc::new(price.finish()),
            Arc::new(device.finish()),
            Arc::new(referrer.finish()),
            Arc::new(country.finish()),
        ];
        RecordBatch::try_new(Self::schema(), columns).expect("columns match the schema")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resumes_at_any_row_and_is_deterministic() {
        let config = ClickConfig {
            max_disorder_micros: 3_000_000,
            ..ClickConfig::default()
        };
        let all = ClickGenerator::starting_at(config.clone(), 0).next_batch_of_ids(9_000);
        assert_eq!(all.num_rows(), 9_000);
        for start in [1, 4095, 4096, 8000] {
            let rest = ClickGenerator::starting_at(config.clone(), start)
                .next_batch_of_ids(9_000 - start as usize);
            assert_eq!(rest, all.slice(start as usize, 9_000 - start as usize));
        }
        let other = ClickGenerator::starting_at(ClickConfig { seed: 1, ..config }, 0)
            .next_batch_of_ids(9_000);
        assert_ne!(other, all);
    }

    #[test]
    fn users_and_items_stay_within_their_cardinality_and_actions_are_mixed() {
        let config = ClickConfig {
            users: 100,
            items: 10,
            ..ClickConfig::default()
        };
        let batch = ClickGenerator::starting_at(config, 0).next_batch_of_ids(20_000);
        let col = |name: &str| batch.column_by_name(name).unwrap().clone();
        let users = arrow::compute::max(
            col("user_id")
                .as_any()
                .downcast_ref::<arrow::array::Int64Array>()
                .unwrap(),
        );
        assert!(users.unwrap() < 100);
        let actions = col("action");
        let actions = actions
            .as_any()
            .downcast_ref::<arrow::array::StringArray>()
            .unwrap();
        let purchases = actions.iter().filter(|a| *a == Some("purchase")).count();
        assert!((300..900).contains(&purchases), "{purchases} purchases");
    }

    /// Each user's events mostly fall in one category: the planted taste recommendations find.
    #[test]
    fn users_mostly_see_the_category_they_prefer() {
        let config = ClickConfig {
            users: 200,
            items: 700,
            ..ClickConfig::default()
        };
        let batch = ClickGenerator::starting_at(config, 0).next_batch_of_ids(50_000);
        let users = batch
            .column(2)
            .as_any()
            .downcast_ref::<arrow::array::Int64Array>()
            .unwrap();
        let items = batch
            .column(5)
            .as_any()
            .downcast_ref::<arrow::array::Int64Array>()
            .unwrap();
        let categories = batch
            .column(6)
            .as_any()
            .downcast_ref::<arrow::array::StringArray>()
            .unwrap();
        let mut seen: std::collections::HashMap<i64, [u32; 7]> = Default::default();
        for i in 0..batch.num_rows() {
            assert!(items.value(i) < 700);
            assert_eq!(
                categories.value(i),
                CATEGORIES[(items.value(i) % 7) as usize]
            );
            seen.entry(users.value(i)).or_default()[(items.value(i) % 7) as usize] += 1;
        }
        let (top, all): (u32, u32) = seen
            .values()
            .map(|c| (*c.iter().max().unwrap(), c.iter().sum::<u32>()))
            .fold((0, 0), |(a, b), (t, n)| (a + t, b + n));
        let share = top as f64 / all as f64;
        // TASTE of the events, plus the untargeted ones that land there by chance.
        assert!((0.8..0.88).contains(&share), "{share}");
    }
}
