//! A deterministic generator of clickstream events (the recommendation demo's input).
//!
//! Events come in sessions: a user views items, sometimes adds one to the cart and sometimes
//! buys. Key cardinality (users, items), event rate and bounded disorder are configurable, and
//! like the fraud generator it resumes at any row from a checkpointed offset, so a streaming
//! run can be compared exactly with a batch run.
//!
//! **Sessions interleave, as on a real site.** Rows are dealt round-robin to a number of
//! concurrent session *lanes*; every [`SESSION_EVENTS`] turns a lane starts a new session of
//! another user (heavy users get more sessions). The number of lanes follows the event rate so
//! that a session lasts about [`SESSION_SECONDS`] of event time, within the 30 minutes the
//! demo's co-view join allows. Who a row belongs to is a function of its id alone, which is
//! what lets the generator start at any row.
//!
//! **Planted tastes**, so that recommendations can be scored: the catalogue is split into
//! clusters of [`CLUSTER_ITEMS`] related items (an item's cluster is its id modulo the number
//! of clusters; a category is a group of clusters). Each user has [`INTERESTS`] clusters they
//! like, each session is about one of them, and [`TASTE`] of a session's events (views and
//! purchases alike) are of items in that cluster; the rest are of any item. Within a cluster,
//! as in the whole catalogue, low ids sell best. Items viewed in one session therefore tend to
//! share a cluster, which co-views learn and the best sellers cannot show: a session's next
//! purchase is best predicted from what it viewed.

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
/// The share of a session's events that are of items in the cluster the session is about.
pub const TASTE: f64 = 0.8;
/// Items per taste cluster.
pub const CLUSTER_ITEMS: u64 = 10;
/// Clusters each user likes; each session is about one of them.
pub const INTERESTS: u64 = 3;
/// Events per session.
pub const SESSION_EVENTS: i64 = 12;
/// About how long a session lasts in event time, in seconds: sets the number of concurrent
/// sessions for the event rate.
pub const SESSION_SECONDS: f64 = 600.0;
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
    /// Concurrent sessions: rows are dealt to them round-robin.
    lanes: i64,
}

impl ClickGenerator {
    /// A generator whose next row is row `row`.
    pub fn starting_at(config: ClickConfig, row: i64) -> Self {
        let (rng, next_id, skip) = block_start(config.seed ^ 0xC11C, row);
        let lanes = (config.rows_per_second * SESSION_SECONDS / SESSION_EVENTS as f64)
            .round()
            .max(1.0) as i64;
        let mut generator = ClickGenerator {
            rng,
            config,
            next_id,
            lanes,
        };
        if skip > 0 {
            generator.next_batch_of_ids(skip);
        }
        generator
    }

    /// The session row `id` belongs to, as (session key, user): a function of the id alone.
    fn session_of(&self, id: i64) -> (u64, u64) {
        let lane = id % self.lanes;
        let nth = id / self.lanes / SESSION_EVENTS;
        let key = mix(mix(self.config.seed ^ 0x5E55 ^ lane as u64) ^ nth as u64);
        // Heavy users: a squared uniform skews towards low ids, as real traffic is skewed
        // towards a few heavy users.
        let u = (mix(key ^ 0x05E4) >> 11) as f64 / (1u64 << 53) as f64;
        let user = ((u * u) * self.config.users as f64) as u64 % self.config.users.max(1);
        (key, user)
    }

    /// The cluster a session is about: one of its user's interests.
    fn session_cluster(&self, key: u64, user: u64, clusters: u64) -> u64 {
        let interest = mix(key ^ 0x1475) % INTERESTS;
        mix(user ^ self.config.seed ^ 0x7A57 ^ (interest << 32)) % clusters
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
        let items = self.config.items.max(1);
        let clusters = items.div_ceil(CLUSTER_ITEMS);
        let per_cluster = items.div_ceil(clusters);
        // Best sellers: a squared uniform skews towards low ids.
        let skewed = |rng: &mut ChaCha8Rng, n: u64| {
            let u: f64 = rng.r#gen();
            ((u * u) * n as f64) as u64 % n.max(1)
        };

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
            let (key, user_id) = self.session_of(id);
            let cluster = self.session_cluster(key, user_id, clusters);
            let item_id = if self.rng.gen_bool(TASTE) {
                // The cluster's k-th best seller; the last round of ids may be short.
                let id = skewed(&mut self.rng, per_cluster) * clusters + cluster;
                if id < items { id } else { cluster }
            } else {
                skewed(&mut self.rng, items)
            };
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
            session.append_value((key >> 1) as i64);
            action.append_value(chosen);
            item.append_value(item_id as i64);
            category.append_value(category_of(item_id, clusters));
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

/// An item's category: a group of clusters.
fn category_of(item: u64, clusters: u64) -> &'static str {
    CATEGORIES[((item % clusters) % CATEGORIES.len() as u64) as usize]
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

    /// Sessions interleave, each of one user and a few minutes long, and mostly about one
    /// cluster, one of the few its user likes: the planted tastes recommendations find.
    #[test]
    fn sessions_are_about_one_of_their_users_interests() {
        use std::collections::HashMap;
        let config = ClickConfig {
            users: 200,
            items: 700,
            rows_per_second: 2.0,
            ..ClickConfig::default()
        };
        let batch = ClickGenerator::starting_at(config, 0).next_batch_of_ids(50_000);
        let column = |i: usize| {
            batch
                .column(i)
                .as_any()
                .downcast_ref::<arrow::array::Int64Array>()
                .unwrap()
                .clone()
        };
        let (ts, users, sessions, items) = (
            batch
                .column(1)
                .as_any()
                .downcast_ref::<arrow::array::TimestampMicrosecondArray>()
                .unwrap()
                .clone(),
            column(2),
            column(3),
            column(5),
        );
        let categories = batch
            .column(6)
            .as_any()
            .downcast_ref::<arrow::array::StringArray>()
            .unwrap();
        // session -> (user, first ts, last ts, events per cluster)
        let mut seen: HashMap<i64, (i64, i64, i64, HashMap<i64, u32>)> = HashMap::new();
        for i in 0..batch.num_rows() {
            assert!(items.value(i) < 700);
            assert_eq!(
                categories.value(i),
                CATEGORIES[(items.value(i) % 70 % 7) as usize]
            );
            let entry = seen.entry(sessions.value(i)).or_insert((
                users.value(i),
                ts.value(i),
                ts.value(i),
                HashMap::new(),
            ));
            assert_eq!(entry.0, users.value(i), "a session has one user");
            entry.2 = ts.value(i);
            *entry.3.entry(items.value(i) % 70).or_default() += 1;
        }
        // 100 lanes of 12 events at 2 events per second: 10 minutes.
        let longest = seen.values().map(|s| s.2 - s.1).max().unwrap();
        assert!(longest <= 600_000_000, "{longest}");
        assert!(seen.len() > 4_000, "{} sessions", seen.len());
        let (mut top, mut all) = (0, 0);
        let mut interests: HashMap<i64, HashMap<i64, u32>> = HashMap::new();
        for (user, _, _, clusters) in seen.values() {
            let (&cluster, &n) = clusters.iter().max_by_key(|(c, n)| (**n, -**c)).unwrap();
            top += n;
            all += clusters.values().sum::<u32>();
            *interests
                .entry(*user)
                .or_default()
                .entry(cluster)
                .or_default() += 1;
        }
        let share = top as f64 / all as f64;
        // TASTE of the events, plus the untargeted ones that land there by chance.
        assert!((0.8..0.9).contains(&share), "{share}");
        // Each user's sessions are about at most INTERESTS clusters, but for the odd session
        // whose untargeted events outnumber its cluster's.
        let (mut within, mut sessions_total) = (0, 0);
        for clusters in interests.values() {
            let mut counts: Vec<u32> = clusters.values().copied().collect();
            counts.sort_unstable_by(|a, b| b.cmp(a));
            within += counts.iter().take(INTERESTS as usize).sum::<u32>();
            sessions_total += counts.iter().sum::<u32>();
        }
        assert!(
            within as f64 >= 0.98 * sessions_total as f64,
            "{within} of {sessions_total}"
        );
    }
}
