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
//! - [`connectors`]: sources and sinks: the demo data generator, file writers.
//! - [`cli`]: the `riffle` command line (`udf inspect`, `sql`, `generate`); `main.rs` is a
//!   one-line wrapper.
//! - [`error`]: [`RiffleError`], which says whose fault every error is.
//!
//! The guest side lives in the workspace's `guest-sdk/` (crate `riffle-udf`), the contract in
//! `wit/udf.wit`, example and hostile UDF crates in `udfs/`, and end-to-end tests and
//! benchmarks in `tests/`.

#![warn(missing_docs)]

pub mod cli;
pub mod connectors;
pub mod error;
pub mod session;
pub mod udf;

pub use error::{Blame, Result, RiffleError};
