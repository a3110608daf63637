//! Deterministic data generators for demos, tests and benchmarks: card transactions
//! ([`fraud`]), clickstream events ([`clickstream`]) and a shop's sales and restocks
//! ([`sales`]), and a generator as a streaming source ([`source`]).
//!
//! The same seed always yields the same rows (ChaCha8 is specified bit for bit), and every
//! generator can start at any row, so a batch run over a generated file and a streaming run
//! over the same generator, resumed from any checkpoint, can be compared exactly.

pub mod clickstream;
pub mod fraud;
pub mod sales;
pub mod source;

use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

pub use clickstream::{ClickConfig, ClickGenerator};
pub use fraud::{FraudConfig, FraudGenerator};
pub use sales::{SalesConfig, SalesGenerator};
pub use source::{GeneratorSource, GeneratorSourceConfig};

/// Rows per independently seeded block: a generator can start at any row by seeding that row's
/// block and skipping at most this many rows, which is how a streaming source resumes from a
/// checkpointed offset without replaying everything before it.
pub(crate) const BLOCK_ROWS: i64 = 4096;

/// A deterministic generator that can start at any row: what a replayable generator source
/// needs.
pub trait RowGenerator: Send {
    /// Row ids generated so far (the next row's id).
    fn rows_generated(&self) -> i64;
    /// The rows of the next `ids` ids (a generator may deliver some twice).
    fn next_batch_of_ids(&mut self, ids: usize) -> RecordBatch;
}

/// Which generator, with its settings.
#[derive(Clone, Debug)]
pub enum GeneratorConfig {
    /// Card transactions ([`FraudGenerator`]).
    Fraud(FraudConfig),
    /// Clickstream events ([`clickstream::ClickGenerator`]).
    Clickstream(clickstream::ClickConfig),
    /// Sales and restocks of a product catalogue ([`SalesGenerator`]).
    Sales(SalesConfig),
}

impl GeneratorConfig {
    /// The schema of the generated rows.
    pub fn schema(&self) -> SchemaRef {
        match self {
            GeneratorConfig::Fraud(_) => FraudGenerator::schema(),
            GeneratorConfig::Clickstream(_) => clickstream::ClickGenerator::schema(),
            GeneratorConfig::Sales(_) => SalesGenerator::schema(),
        }
    }

    /// A generator whose next row is `row`.
    pub fn starting_at(&self, row: i64) -> Box<dyn RowGenerator> {
        match self {
            GeneratorConfig::Fraud(c) => Box::new(FraudGenerator::starting_at(c.clone(), row)),
            GeneratorConfig::Clickstream(c) => {
                Box::new(clickstream::ClickGenerator::starting_at(c.clone(), row))
            }
            GeneratorConfig::Sales(c) => Box::new(SalesGenerator::starting_at(c.clone(), row)),
        }
    }
}

/// Where a generator that should next produce row `row` starts: its block's generator, the
/// block's first row, and how many rows to generate and drop to reach `row`.
pub(crate) fn block_start(seed: u64, row: i64) -> (ChaCha8Rng, i64, usize) {
    let block = row.div_euclid(BLOCK_ROWS);
    let first = block * BLOCK_ROWS;
    (block_rng(seed, block), first, (row - first) as usize)
}

pub(crate) fn block_rng(seed: u64, block: i64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(mix(seed ^ mix(block as u64)))
}

pub(crate) fn mix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}
