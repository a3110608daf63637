//! The UDF runtime: WebAssembly component UDFs on wasmtime, callable from any operator.
//!
//! - [`UdfEngine`] owns the wasmtime engine, the on-disk cache of compiled modules (keyed by the
//!   module's sha256 and the engine's compatibility hash) and the epoch ticker behind CPU
//!   deadlines.
//! - [`UdfModule`] is one loaded `.wasm` file: its self-description, a pool of pre-instantiated
//!   sandboxes, and [`UdfModule::call`], which runs one function over one batch of Arrow arrays.
//!   Nothing in it knows about query plans, so batch and streaming operators call it alike.
//! - [`WasmScalarUdf`] adapts a function to DataFusion's `ScalarUDFImpl`, and
//!   [`WasmAggregateUdf`] an aggregate to `AggregateUDFImpl` (with a groups accumulator for
//!   batch plans and a per-group accumulator for the streaming operators).
//!
//! The contract with guests is `wit/udf.wit`; `abi` maps it to Arrow and `sandbox` provides the
//! capability-free WASI world instances run in.

mod abi;
mod aggregate_function;
mod engine;
mod module;
mod sandbox;
mod slot;
mod sql_function;
mod state_store;

pub use abi::UdfType;
pub(crate) use aggregate_function::AggregateCalls;
pub use aggregate_function::WasmAggregateUdf;
pub use engine::{EPOCH_TICK, EngineOptions, UdfEngine, UdfLimits};
pub use module::{
    ABI_VERSION, AggregateSpec, AggregateStep, ArgSpec, FunctionSpec, ModuleSpec, StateFieldSpec,
    StatsSnapshot, UdfModule, UdfOutput,
};
pub use slot::{ModuleSlot, swap_blockers};
pub use sql_function::{RowErrorPolicy, WasmScalarUdf};

/// Host bindings generated from `wit/udf.wit`, for the `scalars` world that every module
/// exports (describe, init). `call` and the aggregate entry points are invoked through typed
/// functions with Riffle's own argument types (see `abi`), not through these bindings.
mod bindings {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "riffle:udf/scalars",
    });
}
