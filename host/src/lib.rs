//! Riffle: a stream-processing platform whose user-defined functions are sandboxed WebAssembly
//! components, run bit for bit the same over historical (batch) and live (streaming) data.
//!
//! # Layout
//!
//! - [`udf`]: the UDF runtime. wasmtime engine and compiled-module cache, loaded modules with a
//!   pool of sandboxed instances, CPU and memory limits, the Arrow <-> WIT column ABI, and the
//!   DataFusion `ScalarUDFImpl` adapter. It knows nothing about plans, so any operator (batch
//!   or streaming) calls [`udf::UdfModule::call`] the same way.
//! - [`session`]: batch SQL over files with UDFs registered from `.wasm` modules, including the
//!   `CREATE FUNCTIONS FROM 'module.wasm'` statement.
//! - [`plan`]: event-time window functions (`window`, `session_window`), their batch rewrite,
//!   and the compilation of a query into a streaming plan with Spark's output-mode rules.
//! - [`exec`]: streaming operators: the stateless DataFusion stage run per micro-batch, window
//!   and session aggregation, de-duplication, and the post-aggregation stage.
//! - [`stream`]: the epoch driver: triggers, watermarks, late rows, recovery, progress.
//! - [`checkpoint`]: write-ahead offsets, commits and incremental operator state on disk.
//! - [`pipeline`]: pipeline files (`riffle run PIPELINE --mode batch|stream`).
//! - [`connectors`]: sources and sinks: the data generator, files, a directory source, static
//!   tables for joins, Parquet/console/memory sinks.
//! - [`cli`]: the `riffle` command line (`udf inspect`, `sql`, `generate`); `main.rs` is a
//!   one-line wrapper.
//! - [`error`]: [`RiffleError`], which says whose fault every error is.
//!
//! The guest side lives in the workspace's `guest-sdk/` (crate `riffle-udf`), the contract in
//! `wit/udf.wit`, example and hostile UDF crates in `udfs/`, and end-to-end tests and
//! benchmarks in `tests/`.

#![warn(missing_docs)]

pub mod checkpoint;
pub mod cli;
pub mod connectors;
pub mod error;
pub mod exec;
pub mod pipeline;
pub mod plan;
pub mod session;
pub mod stream;
pub mod udf;

pub use error::{Blame, Result, RiffleError};
