//! Riffle: a stream-processing platform whose user-defined functions are sandboxed WebAssembly
//! components, run bit for bit the same over historical (batch) and live (streaming) data.
//!
//! # Layout
//!
//! Modules depend only on modules listed before them:
//!
//! - [`error`]: [`RiffleError`], which says whose fault every error is.
//! - [`common`]: durable file writes, event time and durations, output modes, file formats.
//! - [`udf`]: the UDF runtime. wasmtime engine and compiled-module cache, loaded modules with a
//!   pool of sandboxed instances, CPU and memory limits, the Arrow <-> WIT column ABI, and the
//!   DataFusion `ScalarUDFImpl` adapter. It knows nothing about plans, so any operator (batch
//!   or streaming) calls [`udf::UdfModule::call`] the same way.
//! - [`window`]: event-time window functions (`window`, `session_window`) and their
//!   plain-DataFusion reference rewrite (batch mode runs them with the streaming operators,
//!   [`exec::bounded`]).
//! - [`state`]: operator state tables with change tracking, expiry by event time, and
//!   delta/snapshot encoding to Arrow.
//! - [`exec`]: the one [`exec::Operator`] trait, the dataflow graph (which runs an operator as
//!   one instance per partition, on as many cores, where its rows allow), and the streaming
//!   operators (stateless DataFusion stages, window and session aggregation, de-duplication,
//!   OVER windows, interval joins).
//! - [`plan`]: from a DataFusion logical plan to an operator graph, with Spark's rules for what
//!   a stream supports, and the checkpoint fingerprint.
//! - [`checkpoint`]: write-ahead offsets, commits with state manifests, operator state files.
//! - [`config`]: `riffle.toml` (tables, UDF modules, limits), shared by `riffle sql` and
//!   pipeline files.
//! - [`connectors`]: sources and sinks (generators, files and directories, static tables,
//!   Kafka, Delta Lake), each owning its configuration.
//! - [`session`]: batch SQL over files with UDFs registered from `.wasm` modules, including the
//!   `CREATE FUNCTIONS FROM 'module.wasm'` statement, and the batch progress bar.
//! - [`stream`]: the epoch driver: triggers, watermarks, late rows, recovery, progress, and the
//!   [`stream::QueryObserver`] hook monitoring attaches to.
//! - [`server`]: `riffle run --http`: Prometheus metrics, the JSON API and the web dashboard,
//!   fed through that hook.
//! - [`pipeline`]: pipeline files (`riffle run PIPELINE --mode batch|stream`).
//! - [`verify`]: `riffle verify PIPELINE`: a stream's output against the batch result over the
//!   same inputs.
//! - [`cli`]: the `riffle` command line; `main.rs` is a one-line wrapper.
//!
//! The guest side lives in the workspace's `guest-sdk/` (crate `riffle-udf`), the contract in
//! `wit/udf.wit`, example and hostile UDF crates in `udfs/`, and end-to-end tests and
//! benchmarks in `tests/`.

#![warn(missing_docs)]

pub mod checkpoint;
pub mod cli;
pub mod common;
pub mod config;
pub mod connectors;
pub mod error;
pub mod exec;
pub mod pipeline;
pub mod plan;
pub mod server;
pub mod session;
pub mod state;
pub mod stream;
pub mod udf;
pub mod verify;
pub mod window;

pub use error::{Blame, Result, RiffleError};
