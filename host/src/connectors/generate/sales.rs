//! A deterministic generator of a shop's stock movements (the LiveInventory demo's input):
//! sales and restocks of a product catalogue, with planted demand surges.
//!
//! Like the other generators it starts at any row (so a Kafka topic, a file and a resumed
//! stream all hold the same rows), which rules out a restock policy that looks at the stock:
//! nothing may depend on the rows before. Restocks therefore follow a fixed round: every
//! [`RESTOCK_EVERY`]th row restocks the next product in turn, with what that product is
//! expected to sell until its next turn. Stock then wanders around its opening level, except
//! after a **surge**: in each hour of event time one product (never one of the best sellers,
//! whose normal rate would hide it) sells [`SURGE_DAYS`] of its usual demand, so it ends the
//! hour below its reorder point, and stays there until a replenishment arrives with its first
//! restock [`REPLENISH_AFTER_HOURS`] after the surge began. Surge sales are labelled (`surge`),
//! so a pricing query that flags fast sellers running low can be scored against the truth.
//!
//! [`products`] writes the catalogue the events refer to: the dimension table, whose opening
//! stock and reorder point are days of each product's expected sales.

use std::sync::Arc;

use arrow::array::{
    ArrayRef, BooleanBuilder, Int32Builder, Int64Builder, StringBuilder,
    TimestampMicrosecondBuilder,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use arrow::record_batch::RecordBatch;
use rand::Rng;
use rand_chacha::ChaCha8Rng;

use super::{BLOCK_ROWS, RowGenerator, block_rng, block_start, mix};

/// Sales generator settings.
#[derive(Clone, Debug)]
pub struct SalesConfig {
    /// Seed; equal seeds give equal rows.
    pub seed: u64,
    /// Products in the catalogue.
    pub products: u64,
    /// Event time of the first row, microseconds since the epoch.
    pub start_micros: i64,
    /// Event-time rate: events per second of event time.
    pub rows_per_second: f64,
}

impl Default for SalesConfig {
    fn default() -> Self {
        SalesConfig {
            seed: 42,
            products: 100,
            // 2026-01-01T00:00:00Z
            start_micros: 1_767_225_600_000_000,
            rows_per_second: 1.0,
        }
    }
}

/// Every this many rows, one is a restock (of the next product in turn).
pub const RESTOCK_EVERY: i64 = 20;
/// Days of its usual sales that a surging product sells in its hour.
pub const SURGE_DAYS: f64 = 1.5;
/// Hours from the start of a product's surge to the restock that replaces what it sold.
pub const REPLENISH_AFTER_HOURS: i64 = 12;
/// Days of expected sales in the opening stock, and at the reorder point: one surge takes a
/// product from its opening level to below its reorder point.
const OPENING_DAYS: f64 = 2.5;
const REORDER_DAYS: f64 = 1.5;
/// Units per sale and their weights: a sale is mostly one unit.
const QUANTITIES: &[(i32, u32)] = &[(1, 70), (2, 20), (3, 10)];
const CATEGORIES: &[&str] = &[
    "books", "music", "garden", "toys", "kitchen", "sports", "games",
];
const HOUR_MICROS: i64 = 3_600_000_000;
const DAY_MICROS: f64 = 86_400e6;

/// Units in an average sale.
fn mean_qty() -> f64 {
    let units: u32 = QUANTITIES.iter().map(|&(q, w)| q as u32 * w).sum();
    units as f64 / QUANTITIES.iter().map(|&(_, w)| w).sum::<u32>() as f64
}

impl SalesConfig {
    /// Product `id`'s share of ordinary sales: ids are drawn as `u² · products` for a uniform
    /// `u`, so low ids are the best sellers, as in real catalogues.
    pub fn share(&self, id: u64) -> f64 {
        let n = self.products as f64;
        ((id + 1) as f64 / n).sqrt() - (id as f64 / n).sqrt()
    }

    /// The first product that may surge: the best-selling tenth never does.
    fn first_surging(&self) -> u64 {
        self.products / 10
    }

    /// The chance that a sale in an hour when product `id` surges is one of its surge.
    fn surge_chance(&self, id: u64) -> f64 {
        (SURGE_DAYS * 24.0 * self.share(id)).min(0.5)
    }

    /// Units each product sells per average row, outside surges (by product id).
    fn units_per_row(&self) -> Vec<f64> {
        // Each hour's surge takes its chance of the hour's sales from the ordinary ones.
        let surging = self.first_surging()..self.products;
        let mean_surge = surging.clone().map(|p| self.surge_chance(p)).sum::<f64>()
            / surging.count().max(1) as f64;
        let ordinary = (1.0 - 1.0 / RESTOCK_EVERY as f64) * (1.0 - mean_surge) * mean_qty();
        (0..self.products)
            .map(|p| ordinary * self.share(p))
            .collect()
    }

    /// Units product `id` is expected to sell in its surge hour.
    fn surge_units(&self, id: u64) -> f64 {
        let rows_per_hour = self.rows_per_second * 3600.0 * (1.0 - 1.0 / RESTOCK_EVERY as f64);
        self.surge_chance(id) * mean_qty() * rows_per_hour
    }

    /// What product `id`'s restock at `t` adds for the surges it replaces: those that began
    /// [`REPLENISH_AFTER_HOURS`] before a time in `(previous, t]` (`previous`: its restock
    /// before; surges before the first event never happened).
    fn replenishment(&self, id: u64, previous: i64, t: i64) -> f64 {
        let delay = REPLENISH_AFTER_HOURS * HOUR_MICROS;
        let first = ((previous - delay).div_euclid(HOUR_MICROS) + 1)
            .max(self.start_micros.div_euclid(HOUR_MICROS));
        let last = (t - delay).div_euclid(HOUR_MICROS);
        (first..=last)
            .filter(|&hour| self.surge_product(hour) == id)
            .map(|_| self.surge_units(id))
            .sum()
    }

    /// Units expected to sell in `days` of event time, outside surges, at `per_row` units a
    /// row.
    fn expected_units(&self, per_row: f64, days: f64) -> i64 {
        (per_row * self.rows_per_second * days * DAY_MICROS / 1e6).round() as i64
    }

    /// The product that surges in event-time hour `hour` (hours since the epoch): one of the
    /// catalogue outside its best-selling tenth, each in turn (in an order the seed shuffles),
    /// so no product surges twice before every other has surged once.
    pub fn surge_product(&self, hour: i64) -> u64 {
        let first = self.first_surging();
        let m = (self.products - first).max(1);
        // A step coprime to m visits every product once per m hours.
        let step = [7, 11, 13, 17, 19, 23, 29, 31]
            .into_iter()
            .find(|k| !m.is_multiple_of(*k))
            .unwrap_or(1);
        let offset = mix(self.seed ^ 0x5E6E) % m;
        first + (hour.rem_euclid(m as i64) as u64 * step + offset) % m
    }
}

/// Deterministic stream of stock movements.
pub struct SalesGenerator {
    config: SalesConfig,
    /// [`SalesConfig::units_per_row`], computed once: each restock needs its product's.
    units_per_row: Vec<f64>,
    rng: ChaCha8Rng,
    next_id: i64,
}

impl SalesGenerator {
    /// A generator whose next row is row `row`.
    pub fn starting_at(config: SalesConfig, row: i64) -> Self {
        let (rng, next_id, skip) = block_start(config.seed ^ 0x5A1E, row);
        let mut generator = SalesGenerator {
            units_per_row: config.units_per_row(),
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
            Field::new("product_id", DataType::Int64, false),
            // "sale" or "restock".
            Field::new("kind", DataType::Utf8, false),
            Field::new("qty", DataType::Int32, false),
            // Ground truth: a sale of the hour's planted surge.
            Field::new("surge", DataType::Boolean, false),
        ]))
    }
}

impl RowGenerator for SalesGenerator {
    fn rows_generated(&self) -> i64 {
        self.next_id
    }

    fn next_batch_of_ids(&mut self, rows: usize) -> RecordBatch {
        let config = &self.config;
        let mut event_id = Int64Builder::with_capacity(rows);
        let mut ts = TimestampMicrosecondBuilder::with_capacity(rows);
        let mut product = Int64Builder::with_capacity(rows);
        let mut kind = StringBuilder::with_capacity(rows, rows * 4);
        let mut qty = Int32Builder::with_capacity(rows);
        let mut surge = BooleanBuilder::with_capacity(rows);
        let step = 1_000_000.0 / config.rows_per_second;
        let weights: u32 = QUANTITIES.iter().map(|q| q.1).sum();
        let round = RESTOCK_EVERY * config.products as i64;

        for _ in 0..rows {
            let id = self.next_id;
            if id % BLOCK_ROWS == 0 {
                self.rng = block_rng(config.seed ^ 0x5A1E, id / BLOCK_ROWS);
            }
            self.next_id += 1;
            let t = config.start_micros + (id as f64 * step) as i64;
            event_id.append_value(id);
            ts.append_value(t);
            if id % RESTOCK_EVERY == 0 {
                // The round: what this product sells, on average, until its next turn.
                let p = (id / RESTOCK_EVERY) as u64 % config.products;
                let previous = config.start_micros + ((id - round) as f64 * step) as i64;
                let units = (self.units_per_row[p as usize] * round as f64
                    + config.replenishment(p, previous, t))
                .round()
                .max(1.0);
                product.append_value(p as i64);
                kind.append_value("restock");
                qty.append_value(units as i32);
                surge.append_value(false);
                continue;
            }
            let hot = config.surge_product(t.div_euclid(HOUR_MICROS));
            let surging = self.rng.gen_bool(config.surge_chance(hot));
            let p = if surging {
                hot
            } else {
                let u: f64 = self.rng.r#gen();
                ((u * u) * config.products as f64) as u64 % config.products.max(1)
            };
            let mut pick = self.rng.gen_range(0..weights);
            let mut units = QUANTITIES[0].0;
            for &(q, w) in QUANTITIES {
                if pick < w {
                    units = q;
                    break;
                }
                pick -= w;
            }
            product.append_value(p as i64);
            kind.append_value("sale");
            qty.append_value(units);
            surge.append_value(surging);
        }
        let columns: Vec<ArrayRef> = vec![
            Arc::new(event_id.finish()),
            Arc::new(ts.finish()),
            Arc::new(product.finish()),
            Arc::new(kind.finish()),
            Arc::new(qty.finish()),
            Arc::new(surge.finish()),
        ];
        RecordBatch::try_new(Self::schema(), columns).expect("columns match the schema")
    }
}

/// The product catalogue the events refer to: `product_id`, `name`, `category`,
/// `price_cents`, `opening_stock` (the stock before the first event: [`OPENING_DAYS`] of the
/// product's expected sales) and `reorder_point` ([`REORDER_DAYS`]' worth: below it, stock is
/// low).
pub fn products(config: &SalesConfig) -> RecordBatch {
    let n = config.products as usize;
    let mut id = Int64Builder::with_capacity(n);
    let mut name = StringBuilder::with_capacity(n, n * 12);
    let mut category = StringBuilder::with_capacity(n, n * 6);
    let mut price = Int32Builder::with_capacity(n);
    let mut opening = Int64Builder::with_capacity(n);
    let mut reorder = Int64Builder::with_capacity(n);
    let units_per_row = config.units_per_row();
    for p in 0..config.products {
        let h = mix(p ^ config.seed ^ 0x9D0D);
        let cat = CATEGORIES[(h % CATEGORIES.len() as u64) as usize];
        id.append_value(p as i64);
        name.append_value(format!("{cat}-{p:04}"));
        category.append_value(cat);
        price.append_value(199 + ((h >> 16) % 20_000) as i32);
        let per_row = units_per_row[p as usize];
        opening.append_value(config.expected_units(per_row, OPENING_DAYS).max(5));
        reorder.append_value(config.expected_units(per_row, REORDER_DAYS).max(2));
    }
    let schema = Arc::new(Schema::new(vec![
        Field::new("product_id", DataType::Int64, false),
        Field::new("name", DataType::Utf8, false),
        Field::new("category", DataType::Utf8, false),
        Field::new("price_cents", DataType::Int32, false),
        Field::new("opening_stock", DataType::Int64, false),
        Field::new("reorder_point", DataType::Int64, false),
    ]));
    let columns: Vec<ArrayRef> = vec![
        Arc::new(id.finish()),
        Arc::new(name.finish()),
        Arc::new(category.finish()),
        Arc::new(price.finish()),
        Arc::new(opening.finish()),
        Arc::new(reorder.finish()),
    ];
    RecordBatch::try_new(schema, columns).expect("columns match the schema")
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use arrow::array::{AsArray, BooleanArray};
    use arrow::datatypes::{Int32Type, Int64Type, TimestampMicrosecondType};

    use super::*;

    #[test]
    fn resumes_at_any_row_and_is_deterministic() {
        let config = SalesConfig::default();
        let all = SalesGenerator::starting_at(config.clone(), 0).next_batch_of_ids(9_000);
        for start in [1, 4095, 4096, 8000] {
            let rest = SalesGenerator::starting_at(config.clone(), start)
                .next_batch_of_ids(9_000 - start as usize);
            assert_eq!(rest, all.slice(start as usize, 9_000 - start as usize));
        }
        let other = SalesGenerator::starting_at(SalesConfig { seed: 1, ..config }, 0)
            .next_batch_of_ids(9_000);
        assert_ne!(other, all);
    }

    /// Over three days: each hour's surge product sells far more than its usual hour and ends
    /// it below its reorder point; at the end, products whose surge was replenished and
    /// products that never surged are above theirs, and those still waiting are below.
    #[test]
    fn surges_drain_stock_until_replenished() {
        let config = SalesConfig::default();
        let hours = 72;
        let rows = (hours as f64 * 3600.0 * config.rows_per_second) as usize;
        let batch = SalesGenerator::starting_at(config.clone(), 0).next_batch_of_ids(rows);
        let ts = batch.column(1).as_primitive::<TimestampMicrosecondType>();
        let product = batch.column(2).as_primitive::<Int64Type>();
        let kind = batch.column(3).as_string::<i32>();
        let qty = batch.column(4).as_primitive::<Int32Type>();
        let surge: &BooleanArray = batch.column(5).as_boolean();
        let dim = products(&config);
        let opening = dim.column(4).as_primitive::<Int64Type>();
        let reorder = dim.column(5).as_primitive::<Int64Type>();
        assert_eq!(dim.num_rows(), config.products as usize);
        assert!((0..dim.num_rows()).all(|i| opening.value(i) > reorder.value(i)));

        let mut stock: Vec<i64> = opening.values().to_vec();
        let (mut sold, mut surge_units) = (0i64, 0i64);
        let mut last_surge: HashMap<usize, i64> = HashMap::new();
        let (mut surges, mut drained) = (0, 0);
        for i in 0..rows {
            let (p, q) = (product.value(i) as usize, qty.value(i) as i64);
            let hour = ts.value(i).div_euclid(HOUR_MICROS);
            match (kind.value(i), surge.value(i)) {
                ("restock", _) => stock[p] += q,
                (_, true) => {
                    (stock[p], surge_units) = (stock[p] - q, surge_units + q);
                    last_surge.insert(p, hour);
                }
                _ => (stock[p], sold) = (stock[p] - q, sold + q),
            }
            if i + 1 < rows && ts.value(i + 1).div_euclid(HOUR_MICROS) != hour {
                let hot = config.surge_product(hour) as usize;
                surges += 1;
                drained += usize::from(stock[hot] < reorder.value(hot));
            }
        }
        assert!(
            surges >= 70 && drained * 10 >= surges * 9,
            "{drained} of {surges} drained"
        );
        // 72 surges of 1.5 days of one product's sales: more than a tenth of all sales.
        assert!(
            surge_units * 10 > sold,
            "{surge_units} surge units, {sold} others"
        );
        let low = |p: usize| stock[p] < reorder.value(p);
        // Replenished in the hour REPLENISH_AFTER_HOURS after the surge's: in the last hour,
        // some are and some are not yet.
        let end = ts.value(rows - 1).div_euclid(HOUR_MICROS);
        let due = |p: usize| last_surge.get(&p).map(|&h| h + REPLENISH_AFTER_HOURS);
        let waiting: Vec<usize> = (0..stock.len()).filter(|&p| due(p) > Some(end)).collect();
        let others: Vec<usize> = (0..stock.len())
            .filter(|&p| due(p).is_none_or(|d| d < end))
            .collect();
        let waiting_low = waiting.iter().filter(|&&p| low(p)).count();
        let others_low = others.iter().filter(|&&p| low(p)).count();
        assert!(
            waiting.len() >= 10 && waiting_low * 10 >= waiting.len() * 9,
            "{waiting_low} of {} waiting low",
            waiting.len()
        );
        assert!(
            others_low * 10 <= others.len(),
            "{others_low} of {} others low",
            others.len()
        );
    }
}
