//! Helpers shared by the end-to-end tests.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arrow::array::RecordBatch;
use riffle::session::{RiffleSession, SessionOptions};
use riffle::udf::{EngineOptions, RowErrorPolicy, UdfEngine, UdfLimits, UdfModule};
use riffle::{Result, RiffleError};

pub use riffle_tests::udf;

/// A compiled-artifact cache shared by the test processes (safe: writes are atomic renames).
pub fn cache_dir() -> PathBuf {
    std::env::temp_dir().join("riffle-test-wasm-cache")
}

pub fn limits() -> UdfLimits {
    UdfLimits {
        call_timeout: Duration::from_millis(500),
        init_timeout: Duration::from_secs(10),
        memory_bytes: 64 << 20,
    }
}

pub fn engine() -> UdfEngine {
    UdfEngine::new(EngineOptions {
        cache_dir: Some(cache_dir()),
        limits: limits(),
    })
    .expect("engine")
}

pub fn module(name: &str) -> Arc<UdfModule> {
    engine().load(&udf(name)).expect("module loads")
}

pub fn session(policy: RowErrorPolicy) -> RiffleSession {
    RiffleSession::new(SessionOptions {
        engine: EngineOptions {
            cache_dir: Some(cache_dir()),
            limits: limits(),
        },
        row_error_policy: policy,
        batch_size: None,
        memory_limit: None,
    })
    .expect("session")
}

/// Runs `sql` and returns all rows in one batch.
pub async fn query(session: &RiffleSession, sql: &str) -> Result<RecordBatch> {
    let batches = session.sql(sql).await?;
    let schema = batches
        .first()
        .map(|b| b.schema())
        .ok_or_else(|| RiffleError::Internal("no result".into()))?;
    Ok(arrow::compute::concat_batches(&schema, &batches).expect("concat"))
}

/// The Riffle error inside a query error, or a panic naming what came instead.
pub fn riffle_error(e: &RiffleError) -> &RiffleError {
    match e {
        RiffleError::Query(df) => RiffleError::find_in(df)
            .unwrap_or_else(|| panic!("expected a Riffle error inside, got {df}")),
        other => other,
    }
}

/// A two-thread runtime for tests that drive the engine from Rust.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Registers `batch` as an in-memory table `name` of the session.
pub fn register_batch(session: &RiffleSession, name: &str, batch: &RecordBatch) {
    let table =
        datafusion::datasource::MemTable::try_new(batch.schema(), vec![vec![batch.clone()]])
            .expect("a batch makes a table");
    session
        .context()
        .register_table(name, Arc::new(table))
        .expect("registered");
}
