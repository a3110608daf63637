//! A loaded UDF module: its self-description, a pool of ready instances, and the call path.
//!
//! Instances are reused across calls (instantiating costs ~16 µs, a call on 8192 rows a few
//! µs), and each caller takes its own from the pool so batches run in parallel. An instance
//! that trapped is dropped, never reused: its memory may be in any state.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use arrow::array::ArrayRef;
use serde::Serialize;
use wasmtime::component::{Component, InstancePre, TypedFunc};
use wasmtime::{Store, Trap};

use super::abi::{
    CallErrorOut, CallOutputOut, ColumnIn, ColumnOut, UdfType, WitList, lift_column, lower_column,
};
use super::bindings::{Scalars, riffle::udf::types as wire};
use super::engine::UdfEngine;
use super::sandbox::HostState;
use crate::error::{Result, RiffleError, UdfFailureKind};
use sha2::{Digest, Sha256};
use std::sync::Arc;

/// Version of `wit/udf.wit` this host implements: 2 is `riffle:udf@0.2.0` (aggregates). It also
/// loads modules of version 1 (`riffle:udf@0.1.0`, scalars only), whose contract 0.2.0 kept.
pub const ABI_VERSION: u32 = 2;

/// Most instances kept idle per module; more are created under load and dropped after.
const MAX_IDLE_INSTANCES: usize = 32;

/// An instance whose memory grew by more than this share of its cap (a quarter: 64 MiB of the
/// default 256) is dropped after its call rather than pooled. Linear memory never shrinks and
/// the guest's allocator keeps what it freed, so every pooled instance would pin the peak of
/// the largest call it ever served: calls running at once on several cores each fill an
/// instance of their own, and an aggregate's batched finish can need hundreds of MiB. A new
/// instance costs well under a millisecond, less than such a call.
const RETIRE_AFTER_GROWTH_DIVISOR: usize = 4;

/// One argument of a UDF.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ArgSpec {
    /// Name in the UDF's source.
    pub name: String,
    /// Column type.
    pub data_type: UdfType,
    /// The function receives NULLs itself; otherwise a NULL skips the row (result NULL).
    pub nullable: bool,
}

/// One function of a module, as the module describes it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FunctionSpec {
    /// SQL name.
    pub name: String,
    /// Arguments in order.
    pub args: Vec<ArgSpec>,
    /// Result type.
    pub returns: UdfType,
    /// The function may itself return NULL.
    pub returns_null: bool,
    /// The function may fail for single rows.
    pub fallible: bool,
    /// Same inputs give the same output.
    pub deterministic: bool,
    /// Documentation from the UDF's source.
    pub doc: String,
}

impl FunctionSpec {
    /// `name(amount DOUBLE, country VARCHAR) -> DOUBLE`, as `udf inspect` shows it.
    pub fn signature(&self) -> String {
        let args: Vec<String> = self
            .args
            .iter()
            .map(|a| {
                let null = if a.nullable { " NULL" } else { "" };
                format!("{} {}{null}", a.name, a.data_type.sql_name())
            })
            .collect();
        let mut ret = self.returns.sql_name().to_string();
        if self.returns_null {
            ret.push_str(" NULL");
        }
        if self.fallible {
            ret.push_str(" or row error");
        }
        format!("{}({}) -> {ret}", self.name, args.join(", "))
    }
}

/// One column of an aggregate's state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct StateFieldSpec {
    /// Field name in the UDF's source.
    pub name: String,
    /// Column type.
    pub data_type: UdfType,
    /// The column may hold NULLs.
    pub nullable: bool,
}

/// One aggregate function of a module, as the module describes it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct AggregateSpec {
    /// SQL name.
    pub name: String,
    /// Aggregated arguments in order.
    pub args: Vec<ArgSpec>,
    /// Result type.
    pub returns: UdfType,
    /// The result may be NULL.
    pub returns_null: bool,
    /// Finishing a group may fail (a row error for that group).
    pub fallible: bool,
    /// The state of one group: its columns.
    pub state: Vec<StateFieldSpec>,
    /// Rows can be taken back out of a state (sliding OVER frames).
    pub retractable: bool,
    /// Same inputs give the same output.
    pub deterministic: bool,
    /// Documentation from the UDF's source.
    pub doc: String,
}

impl AggregateSpec {
    /// `name(amount DOUBLE) -> DOUBLE`, as `udf inspect` shows it.
    pub fn signature(&self) -> String {
        FunctionSpec {
            name: self.name.clone(),
            args: self.args.clone(),
            returns: self.returns,
            returns_null: self.returns_null,
            fallible: self.fallible,
            deterministic: self.deterministic,
            doc: String::new(),
        }
        .signature()
    }

    /// `sum DOUBLE, weight DOUBLE, last TIMESTAMP NULL`: the state's columns.
    pub fn state_schema(&self) -> String {
        self.state
            .iter()
            .map(|f| {
                let null = if f.nullable { " NULL" } else { "" };
                format!("{} {}{null}", f.name, f.data_type.sql_name())
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// What an aggregate call does with its rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AggregateStep {
    /// Add argument rows to their groups.
    Update,
    /// Take argument rows back out of their groups.
    Retract,
    /// The rows are partial states: merge each into its group.
    Merge,
}

/// What a module says about itself.
#[derive(Clone, Debug, Serialize)]
pub struct ModuleSpec {
    /// Contract version the module was built against.
    pub abi_version: u32,
    /// SDK that built it.
    pub sdk: String,
    /// Whether it has an init hook.
    pub has_init: bool,
    /// Whether every function is deterministic (the module then gets a frozen clock and a
    /// fixed random seed).
    pub deterministic: bool,
    /// Its functions, in call-index order.
    pub functions: Vec<FunctionSpec>,
    /// Its aggregate functions, in call-index order (none before contract 0.2.0).
    pub aggregates: Vec<AggregateSpec>,
}

/// Counters for one function, for progress reports and metrics.
#[derive(Debug, Default)]
pub struct FunctionStats {
    calls: AtomicU64,
    rows: AtomicU64,
    nanos: AtomicU64,
    row_errors: AtomicU64,
    failures: AtomicU64,
    timeouts: AtomicU64,
    out_of_memory: AtomicU64,
    traps: AtomicU64,
}

/// A snapshot of [`FunctionStats`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct StatsSnapshot {
    /// Calls made (batches).
    pub calls: u64,
    /// Rows passed in.
    pub rows: u64,
    /// Time spent in calls, including argument and result conversion.
    pub nanos: u64,
    /// Rows for which the function returned an error.
    pub row_errors: u64,
    /// Calls that failed as a whole (trap, timeout, out of memory).
    pub failures: u64,
    /// Of the failures, calls stopped at the time limit.
    pub timeouts: u64,
    /// Of the failures, calls stopped at the memory limit.
    pub out_of_memory: u64,
    /// Of the failures, the others: traps (a panic), a failure the guest reported, a result
    /// that broke the contract.
    pub traps: u64,
}

/// The result of one call.
#[derive(Debug)]
pub struct UdfOutput {
    /// One value per input row; NULL where a row error occurred.
    pub array: ArrayRef,
    /// Rows the function rejected, with its message, in row order.
    pub row_errors: Vec<(usize, String)>,
}

type CallFunc = TypedFunc<(u32, u32, Vec<ColumnIn>), (Result<CallOutputOut, CallErrorOut>,)>;
type AggregateFunc = TypedFunc<
    (
        u32,
        wire::AggregateStep,
        u32,
        Vec<ColumnIn>,
        WitList<u32>,
        Vec<ColumnIn>,
    ),
    (Result<Vec<ColumnOut>, CallErrorOut>,),
>;
type FinishFunc = TypedFunc<(u32, u32, Vec<ColumnIn>), (Result<CallOutputOut, CallErrorOut>,)>;

/// A live instance with its own store (memory, sandbox, limits).
struct Instance {
    store: Store<HostState>,
    /// Bytes of linear memory the instance had once created and initialised.
    baseline: usize,
    call: CallFunc,
    /// The aggregate entry points, when the module has aggregates.
    aggregates: Option<(AggregateFunc, FinishFunc)>,
    /// The module's count of live instances, which this one leaves when dropped (after a
    /// trap, or when the idle pool is full).
    live: Arc<AtomicU64>,
}

impl Drop for Instance {
    fn drop(&mut self) {
        self.live.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A loaded UDF module.
pub struct UdfModule {
    engine: UdfEngine,
    path: PathBuf,
    file_name: String,
    hash: String,
    spec: ModuleSpec,
    config: Vec<u8>,
    pre: InstancePre<HostState>,
    pool: Mutex<Vec<Instance>>,
    stats: Vec<FunctionStats>,
    live: Arc<AtomicU64>,
}

impl std::fmt::Debug for UdfModule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UdfModule")
            .field("path", &self.path)
            .field("hash", &self.hash)
            .finish_non_exhaustive()
    }
}

impl UdfModule {
    pub(crate) fn new(
        engine: UdfEngine,
        path: &Path,
        hash: String,
        component: &Component,
        config: Vec<u8>,
    ) -> Result<Self> {
        let (pre, spec) = describe(&engine, path, component)?;
        let file_name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| path.display().to_string());

        let module = UdfModule {
            engine,
            path: path.to_path_buf(),
            file_name,
            hash,
            stats: (0..spec.functions.len() + spec.aggregates.len())
                .map(|_| FunctionStats::default())
                .collect(),
            spec,
            config,
            pre,
            pool: Mutex::new(Vec::new()),
            live: Arc::new(AtomicU64::new(0)),
        };
        // Create the first instance now, so a bad init configuration fails at load time.
        let first = module.instantiate()?;
        module.pool.lock().expect("pool lock").push(first);
        Ok(module)
    }

    /// The module file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// sha256 of the module file, hex: the module's identity in both modes and in logs.
    pub fn hash(&self) -> &str {
        &self.hash
    }

    /// The module's file name.
    pub fn file_name(&self) -> &str {
        &self.file_name
    }

    /// sha256 of the init configuration the module was loaded with, hex (of no bytes when it
    /// has none): with [`hash`](Self::hash), what a checkpoint pins.
    pub fn config_hash(&self) -> String {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(&self.config))
    }

    /// `(riffle.udf.<file stem>, sha256)`: how sinks name this module on the output it
    /// produced (Kafka headers, Parquet key-value metadata, Delta commit metadata).
    pub fn stamp(&self) -> (String, String) {
        let stem = self
            .path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        (format!("riffle.udf.{stem}"), self.hash.clone())
    }

    /// The module file as it is on disk now, loaded with the same configuration, when its
    /// content changed since this module was loaded; `None` when it did not.
    ///
    /// # Errors
    /// As [`UdfEngine::load_with_config`].
    pub fn reload_if_changed(&self) -> Result<Option<Arc<UdfModule>>> {
        outside_async_runtime(|| {
            let hash = file_sha256(&self.path)?;
            if hash == self.hash {
                return Ok(None);
            }
            self.engine
                .load_hashed(&self.path, hash, self.config.clone())
                .map(Some)
        })
    }

    /// What the module says about itself.
    pub fn spec(&self) -> &ModuleSpec {
        &self.spec
    }

    /// Index of the function named `name`.
    pub fn function_index(&self, name: &str) -> Option<usize> {
        self.spec.functions.iter().position(|f| f.name == name)
    }

    /// Index of the aggregate function named `name`.
    pub fn aggregate_index(&self, name: &str) -> Option<usize> {
        self.spec.aggregates.iter().position(|f| f.name == name)
    }

    /// Every function and aggregate by name, with the index of its counters for
    /// [`stats`](Self::stats): functions first, then aggregates.
    pub fn counted(&self) -> impl Iterator<Item = (usize, &str)> {
        self.spec
            .functions
            .iter()
            .map(|f| f.name.as_str())
            .chain(self.spec.aggregates.iter().map(|a| a.name.as_str()))
            .enumerate()
    }

    /// Counters of aggregate `index` (rows are the rows updated, retracted or merged).
    pub fn aggregate_stats(&self, index: usize) -> StatsSnapshot {
        self.stats(self.spec.functions.len() + index)
    }

    /// Counters of function `index` (or, past the functions, of an aggregate: see
    /// [`counted`](Self::counted)).
    pub fn stats(&self, index: usize) -> StatsSnapshot {
        let s = &self.stats[index];
        StatsSnapshot {
            calls: s.calls.load(Ordering::Relaxed),
            rows: s.rows.load(Ordering::Relaxed),
            nanos: s.nanos.load(Ordering::Relaxed),
            row_errors: s.row_errors.load(Ordering::Relaxed),
            failures: s.failures.load(Ordering::Relaxed),
            timeouts: s.timeouts.load(Ordering::Relaxed),
            out_of_memory: s.out_of_memory.load(Ordering::Relaxed),
            traps: s.traps.load(Ordering::Relaxed),
        }
    }

    /// Sandbox instances alive now (idle in the pool or running a call).
    pub fn live_instances(&self) -> u64 {
        self.live.load(Ordering::Relaxed)
    }

    /// Creates a fresh instance (and runs the init hook).
    fn instantiate(&self) -> Result<Instance> {
        let limits = self.engine.limits();
        let mut store = Store::new(
            self.engine.engine(),
            HostState::new(self.spec.deterministic, limits.memory_bytes),
        );
        store.limiter(|s| &mut s.memory);
        store.set_epoch_deadline(UdfEngine::deadline_ticks(limits.init_timeout));
        store.epoch_deadline_trap();
        store.data_mut().deadline = Some(Instant::now() + limits.init_timeout);
        let instance = self
            .pre
            .instantiate(&mut store)
            .map_err(|e| self.failure("<instantiate>", e, &mut store, limits.init_timeout))?;
        if self.spec.has_init {
            let udf = Scalars::new(&mut store, &instance)
                .map_err(|e| self.failure("<init>", e, &mut store, limits.init_timeout))?;
            match udf.call_init(&mut store, &self.config) {
                Ok(Ok(())) => {}
                Ok(Err(message)) => {
                    return Err(self.error("<init>", UdfFailureKind::Init, message));
                }
                Err(e) => return Err(self.failure("<init>", e, &mut store, limits.init_timeout)),
            }
        }
        self.drain_output("<init>", &mut store);
        let call = instance.get_typed_func(&mut store, "call").map_err(|e| {
            self.error(
                "<instantiate>",
                UdfFailureKind::AbiViolation,
                format!("{e:#}"),
            )
        })?;
        let aggregates = if self.spec.aggregates.is_empty() {
            None
        } else {
            let abi = |e: wasmtime::Error| {
                self.error(
                    "<instantiate>",
                    UdfFailureKind::AbiViolation,
                    format!("{e:#}"),
                )
            };
            let aggregate = instance
                .get_typed_func(&mut store, "aggregate")
                .map_err(abi)?;
            let finish = instance.get_typed_func(&mut store, "finish").map_err(abi)?;
            Some((aggregate, finish))
        };
        self.live.fetch_add(1, Ordering::Relaxed);
        Ok(Instance {
            baseline: store.data().memory.size,
            store,
            call,
            aggregates,
            live: self.live.clone(),
        })
    }

    fn error(&self, function: &str, kind: UdfFailureKind, detail: String) -> RiffleError {
        RiffleError::UdfFailure {
            function: function.to_string(),
            module: self.file_name.clone(),
            hash: self.hash.clone(),
            kind,
            detail,
        }
    }

    /// Classifies a wasmtime error from a call into a typed UDF failure, quoting stderr (where
    /// a Rust panic message lands).
    fn failure(
        &self,
        function: &str,
        error: wasmtime::Error,
        store: &mut Store<HostState>,
        timeout: Duration,
    ) -> RiffleError {
        let stderr = self.drain_output(function, store);
        let kind = if store.data_mut().memory.refused.take().is_some() {
            UdfFailureKind::OutOfMemory(self.engine.limits().memory_bytes)
        } else if error.downcast_ref::<Trap>() == Some(&Trap::Interrupt)
            || store.data().overslept.load(Ordering::Relaxed)
        {
            UdfFailureKind::Timeout(timeout)
        } else {
            UdfFailureKind::Trap
        };
        let mut detail = format!("{error:#}");
        let stderr = stderr.trim();
        if !stderr.is_empty() {
            let tail: String = stderr
                .chars()
                .rev()
                .take(2000)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            detail.push_str(&format!("; stderr: {tail}"));
        }
        self.error(function, kind, detail)
    }

    /// Logs what the instance printed and returns its stderr.
    fn drain_output(&self, function: &str, store: &mut Store<HostState>) -> String {
        let (stdout, stderr) = (store.data().stdout.take(), store.data().stderr.take());
        for line in stdout.lines() {
            tracing::info!(target: "riffle::udf", module = %self.file_name, udf = function, "stdout: {line}");
        }
        for line in stderr.lines() {
            tracing::warn!(target: "riffle::udf", module = %self.file_name, udf = function, "stderr: {line}");
        }
        stderr
    }

    /// Runs function `index` over one batch of `rows` rows.
    ///
    /// `args` must have the Arrow types the function declares (see [`UdfType::arrow`]); the
    /// DataFusion adapter casts them.
    ///
    /// # Errors
    /// [`RiffleError::UdfFailure`] when the call fails as a whole (trap, timeout, out of memory,
    /// a result that breaks the contract). Per-row errors are not errors here: they come back in
    /// [`UdfOutput::row_errors`].
    pub fn call(&self, index: usize, rows: usize, args: &[ArrayRef]) -> Result<UdfOutput> {
        let function = self
            .spec
            .functions
            .get(index)
            .ok_or_else(|| RiffleError::Internal(format!("no UDF with index {index}")))?;
        let started = Instant::now();
        let result = outside_async_runtime(|| self.call_inner(function, index, rows, args));
        self.count(index, rows, started, &result, |out| out.row_errors.len());
        result
    }

    /// Runs one step of aggregate `index` over a batch: `states` holds the current states of
    /// `groups` groups (each column `groups` rows, typed as the aggregate's state; empty for
    /// all-fresh groups), `group_of` the group of each row, `args` the rows (argument columns,
    /// or state columns for [`AggregateStep::Merge`]). Returns the new states of the groups.
    ///
    /// # Errors
    /// As [`UdfModule::call`].
    pub fn aggregate(
        &self,
        index: usize,
        step: AggregateStep,
        groups: usize,
        states: &[ArrayRef],
        group_of: &[u32],
        args: &[ArrayRef],
    ) -> Result<Vec<ArrayRef>> {
        let spec = self
            .spec
            .aggregates
            .get(index)
            .ok_or_else(|| RiffleError::Internal(format!("no aggregate with index {index}")))?;
        let started = Instant::now();
        let result = outside_async_runtime(|| {
            self.aggregate_inner(spec, index, step, groups, states, group_of, args)
        });
        self.count(
            self.spec.functions.len() + index,
            group_of.len(),
            started,
            &result,
            |_| 0,
        );
        result
    }

    /// The final values of `groups` states of aggregate `index` (an empty `states` means all
    /// fresh). A group whose `finish` failed is NULL with a row error for its index.
    ///
    /// # Errors
    /// As [`UdfModule::call`].
    pub fn finish(&self, index: usize, groups: usize, states: &[ArrayRef]) -> Result<UdfOutput> {
        let spec = self
            .spec
            .aggregates
            .get(index)
            .ok_or_else(|| RiffleError::Internal(format!("no aggregate with index {index}")))?;
        let started = Instant::now();
        let result = outside_async_runtime(|| {
            let states = self.lower_states(spec, groups, states)?;
            let output = self.run(&spec.name, |instance| {
                let (_, finish) = instance
                    .aggregates
                    .as_ref()
                    .expect("aggregate entry points");
                finish
                    .call(&mut instance.store, (index as u32, groups as u32, states))
                    .map(|(out,)| out)
            })?;
            let output = self.guest_result(&spec.name, output)?;
            self.lift_output(&spec.name, output, spec.returns, groups)
        });
        self.count(
            self.spec.functions.len() + index,
            0,
            started,
            &result,
            |out| out.row_errors.len(),
        );
        result
    }

    /// Adds one call to the counters of entry `stat`.
    fn count<T>(
        &self,
        stat: usize,
        rows: usize,
        started: Instant,
        result: &Result<T>,
        row_errors: impl Fn(&T) -> usize,
    ) {
        let stats = &self.stats[stat];
        stats.calls.fetch_add(1, Ordering::Relaxed);
        stats.rows.fetch_add(rows as u64, Ordering::Relaxed);
        stats
            .nanos
            .fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
        match result {
            Ok(out) => {
                stats
                    .row_errors
                    .fetch_add(row_errors(out) as u64, Ordering::Relaxed);
            }
            Err(e) => {
                stats.failures.fetch_add(1, Ordering::Relaxed);
                match e {
                    RiffleError::UdfFailure {
                        kind: UdfFailureKind::Timeout(_),
                        ..
                    } => stats.timeouts.fetch_add(1, Ordering::Relaxed),
                    RiffleError::UdfFailure {
                        kind: UdfFailureKind::OutOfMemory(_),
                        ..
                    } => stats.out_of_memory.fetch_add(1, Ordering::Relaxed),
                    _ => stats.traps.fetch_add(1, Ordering::Relaxed),
                };
            }
        }
    }

    /// Runs `f` on a pooled instance under the call time limit. The instance goes back to the
    /// pool only when the call returned in time; after a trap its state is undefined.
    fn run<T>(
        &self,
        function: &str,
        f: impl FnOnce(&mut Instance) -> wasmtime::Result<T>,
    ) -> Result<T> {
        let mut instance = self.checkout()?;
        let timeout = self.engine.limits().call_timeout;
        instance
            .store
            .set_epoch_deadline(UdfEngine::deadline_ticks(timeout));
        instance.store.data_mut().deadline = Some(Instant::now() + timeout);
        instance
            .store
            .data()
            .overslept
            .store(false, Ordering::Relaxed);
        let result = f(&mut instance);
        let overslept = instance.store.data().overslept.load(Ordering::Relaxed);
        match result {
            Ok(_) if overslept => {
                self.drain_output(function, &mut instance.store);
                Err(self.error(
                    function,
                    UdfFailureKind::Timeout(timeout),
                    "slept past the deadline".into(),
                ))
            }
            Ok(value) => {
                self.drain_output(function, &mut instance.store);
                self.checkin(instance);
                Ok(value)
            }
            Err(e) => Err(self.failure(function, e, &mut instance.store, timeout)),
        }
    }

    /// Maps an error the guest returned (rather than a trap).
    fn guest_result<T>(
        &self,
        function: &str,
        result: std::result::Result<T, CallErrorOut>,
    ) -> Result<T> {
        result.map_err(|e| match e {
            CallErrorOut::Failed(message) => self.error(function, UdfFailureKind::Guest, message),
            CallErrorOut::NoSuchFunction(i) => {
                RiffleError::Internal(format!("module has no function {i}"))
            }
            CallErrorOut::BadArguments(message) => RiffleError::Internal(format!(
                "{function} rejected the arguments the host passed: {message}"
            )),
        })
    }

    /// Lifts a column of `rows` results and checks its row errors.
    fn lift_output(
        &self,
        function: &str,
        output: CallOutputOut,
        returns: UdfType,
        rows: usize,
    ) -> Result<UdfOutput> {
        let array = lift_column(output.column, returns, rows)
            .map_err(|e| self.error(function, UdfFailureKind::AbiViolation, e))?;
        let mut row_errors = Vec::with_capacity(output.row_errors.len());
        for e in output.row_errors {
            let row = e.row as usize;
            if row >= rows || array.is_valid(row) {
                return Err(self.error(
                    function,
                    UdfFailureKind::AbiViolation,
                    format!("row error for row {row}, which is out of range or not NULL"),
                ));
            }
            row_errors.push((row, e.message));
        }
        Ok(UdfOutput { array, row_errors })
    }

    /// Lowers `groups` states of `spec` (or none, for all-fresh groups).
    fn lower_states(
        &self,
        spec: &AggregateSpec,
        groups: usize,
        states: &[ArrayRef],
    ) -> Result<Vec<ColumnIn>> {
        if states.is_empty() {
            return Ok(Vec::new());
        }
        lower_all(
            states,
            spec.state.iter().map(|f| (&f.name, f.data_type)),
            groups,
        )
        .map_err(|e| RiffleError::Internal(format!("{} state: {e}", spec.name)))
    }

    #[allow(clippy::too_many_arguments)]
    fn aggregate_inner(
        &self,
        spec: &AggregateSpec,
        index: usize,
        step: AggregateStep,
        groups: usize,
        states: &[ArrayRef],
        group_of: &[u32],
        args: &[ArrayRef],
    ) -> Result<Vec<ArrayRef>> {
        if step == AggregateStep::Retract && !spec.retractable {
            return Err(RiffleError::Internal(format!(
                "{} cannot retract rows",
                spec.name
            )));
        }
        let lowered_states = self.lower_states(spec, groups, states)?;
        let rows = group_of.len();
        let lowered_args = match step {
            AggregateStep::Merge => lower_all(
                args,
                spec.state.iter().map(|f| (&f.name, f.data_type)),
                rows,
            ),
            AggregateStep::Update | AggregateStep::Retract => {
                lower_all(args, spec.args.iter().map(|a| (&a.name, a.data_type)), rows)
            }
        }
        .map_err(|e| RiffleError::Internal(format!("{}: {e}", spec.name)))?;
        let wire_step = match step {
            AggregateStep::Update => wire::AggregateStep::Update,
            AggregateStep::Retract => wire::AggregateStep::Retract,
            AggregateStep::Merge => wire::AggregateStep::Merge,
        };
        let group_of = WitList::new(group_of.to_vec().into());
        let output = self.run(&spec.name, |instance| {
            let (aggregate, _) = instance
                .aggregates
                .as_ref()
                .expect("aggregate entry points");
            aggregate
                .call(
                    &mut instance.store,
                    (
                        index as u32,
                        wire_step,
                        groups as u32,
                        lowered_states,
                        group_of,
                        lowered_args,
                    ),
                )
                .map(|(out,)| out)
        })?;
        let columns = self.guest_result(&spec.name, output)?;
        if columns.len() != spec.state.len() {
            return Err(self.error(
                &spec.name,
                UdfFailureKind::AbiViolation,
                format!(
                    "returned {} state columns, its state has {}",
                    columns.len(),
                    spec.state.len()
                ),
            ));
        }
        columns
            .into_iter()
            .zip(&spec.state)
            .map(|(column, field)| {
                let array = lift_column(column, field.data_type, groups)
                    .map_err(|e| self.error(&spec.name, UdfFailureKind::AbiViolation, e))?;
                if !field.nullable && array.null_count() > 0 {
                    return Err(self.error(
                        &spec.name,
                        UdfFailureKind::AbiViolation,
                        format!(
                            "state field {} is not nullable but came back NULL",
                            field.name
                        ),
                    ));
                }
                Ok(array)
            })
            .collect()
    }

    fn call_inner(
        &self,
        function: &FunctionSpec,
        index: usize,
        rows: usize,
        args: &[ArrayRef],
    ) -> Result<UdfOutput> {
        if args.len() != function.args.len() {
            return Err(RiffleError::Internal(format!(
                "{} takes {} arguments, got {}",
                function.name,
                function.args.len(),
                args.len()
            )));
        }
        let columns = lower_all(
            args,
            function.args.iter().map(|a| (&a.name, a.data_type)),
            rows,
        )
        .map_err(|e| RiffleError::Internal(format!("{}: {e}", function.name)))?;
        let output = self.run(&function.name, |instance| {
            instance
                .call
                .call(&mut instance.store, (index as u32, rows as u32, columns))
                .map(|(out,)| out)
        })?;
        let output = self.guest_result(&function.name, output)?;
        self.lift_output(&function.name, output, function.returns, rows)
    }

    fn checkout(&self) -> Result<Instance> {
        let idle = self.pool.lock().expect("pool lock").pop();
        match idle {
            Some(instance) => Ok(instance),
            None => self.instantiate(),
        }
    }

    fn checkin(&self, instance: Instance) {
        let grown = instance.store.data().memory.size - instance.baseline;
        if grown > self.engine.limits().memory_bytes / RETIRE_AFTER_GROWTH_DIVISOR {
            return;
        }
        let mut pool = self.pool.lock().expect("pool lock");
        if pool.len() < MAX_IDLE_INSTANCES {
            pool.push(instance);
        }
    }
}

/// Lowers columns of `rows` rows, each with its declared name and type.
fn lower_all<'a>(
    arrays: &[ArrayRef],
    declared: impl ExactSizeIterator<Item = (&'a String, UdfType)>,
    rows: usize,
) -> std::result::Result<Vec<ColumnIn>, String> {
    if arrays.len() != declared.len() {
        return Err(format!(
            "{} columns passed, {} declared",
            arrays.len(),
            declared.len()
        ));
    }
    arrays
        .iter()
        .zip(declared)
        .map(|(array, (name, ty))| {
            if array.len() != rows {
                return Err(format!("{name} has {} rows, not {rows}", array.len()));
            }
            lower_column(array, ty)
        })
        .collect()
}

/// Runs `f`, which calls into Wasm, outside any tokio runtime's context.
///
/// wasmtime-wasi's synchronous bindings serve blocking WASI calls (a UDF's `println!`, a sleep)
/// by `block_on` with the ambient tokio runtime. On a runtime's worker thread, where DataFusion
/// runs operators, that panics ("Cannot start a runtime from within a runtime"), so one
/// `println!` in a UDF would bring the host down. On a multi-threaded runtime `block_in_place`
/// makes blocking legal (and hands the worker's other tasks to another thread); a
/// current-thread runtime cannot do that, so the call hops to a scoped helper thread. Handing
/// a worker's tasks over queues a thread of the blocking pool each time, so on a
/// multi-threaded runtime streaming operators run off the workers already
/// (`exec::partition::run_instances`), where `block_in_place` only marks the thread as
/// outside the runtime.
pub(crate) fn outside_async_runtime<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current() {
        Err(_) => f(),
        Ok(handle) if handle.runtime_flavor() == RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        Ok(_) => std::thread::scope(|scope| match scope.spawn(f).join() {
            Ok(result) => result,
            Err(panic) => std::panic::resume_unwind(panic),
        }),
    }
}

/// Links a compiled module against the sandbox and asks it to describe itself, in a throwaway
/// deterministic instance (no init hook runs: describing needs no configuration).
pub(crate) fn describe(
    engine: &UdfEngine,
    path: &Path,
    component: &Component,
) -> Result<(InstancePre<HostState>, ModuleSpec)> {
    let invalid = |reason: String| RiffleError::InvalidModule {
        path: path.to_path_buf(),
        reason,
    };
    let pre = engine.linker().instantiate_pre(component).map_err(|e| {
        invalid(format!(
            "it needs imports the Riffle sandbox does not provide: {e:#}"
        ))
    })?;
    let mut store = Store::new(
        engine.engine(),
        HostState::new(true, engine.limits().memory_bytes),
    );
    store.limiter(|s| &mut s.memory);
    store.set_epoch_deadline(UdfEngine::deadline_ticks(engine.limits().init_timeout));
    store.epoch_deadline_trap();
    let (info, aggregates) = pre
        .instantiate(&mut store)
        .and_then(|instance| {
            let info = Scalars::new(&mut store, &instance)?.call_describe(&mut store)?;
            // Aggregates came with contract 0.2.0; a 0.1.0 module has no such export. A module
            // of a version this host does not know is not asked (`validate` says why).
            let known = (1..=ABI_VERSION).contains(&info.abi_version);
            let aggregates = match instance
                .get_func(&mut store, "describe-aggregates")
                .filter(|_| known)
            {
                Some(f) => {
                    let f = f.typed::<(), (Vec<wire::AggregateInfo>,)>(&store)?;
                    f.call(&mut store, ())?.0
                }
                None => Vec::new(),
            };
            Ok((info, aggregates))
        })
        .map_err(|e| {
            invalid(format!(
                "it is not a Riffle UDF module (describe failed): {e:#}"
            ))
        })?;
    if (info.abi_version >= 2 || !aggregates.is_empty())
        && !has_aggregate_exports(component, engine)
    {
        return Err(invalid(
            "it says it was built for contract 0.2.0 but does not export its aggregate entry \
             points"
                .into(),
        ));
    }
    let spec = validate(info, aggregates).map_err(invalid)?;
    Ok((pre, spec))
}

/// Whether a component exports the aggregate entry points of contract 0.2.0.
fn has_aggregate_exports(component: &Component, engine: &UdfEngine) -> bool {
    let ty = component.component_type();
    let names: Vec<&str> = ty.exports(engine.engine()).map(|(name, _)| name).collect();
    ["describe-aggregates", "aggregate", "finish"]
        .iter()
        .all(|n| names.contains(n))
}

/// Checks a name a module gives a function: it must be usable unquoted in SQL.
fn check_name(name: &str, taken: &[&str]) -> std::result::Result<(), String> {
    let valid = !name.is_empty()
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !name.starts_with(|c: char| c.is_ascii_digit());
    if !valid {
        return Err(format!(
            "function name {name:?} is not a valid SQL identifier"
        ));
    }
    if taken.contains(&name) {
        return Err(format!("function {name} is exported twice"));
    }
    Ok(())
}

fn arg_specs(args: Vec<wire::ArgInfo>) -> Vec<ArgSpec> {
    args.into_iter()
        .map(|a| ArgSpec {
            name: a.name,
            data_type: UdfType::from_wire(a.data_type),
            nullable: a.nullable,
        })
        .collect()
}

/// Checks a module's self-description before anything is registered.
fn validate(
    info: wire::ModuleInfo,
    aggregates: Vec<wire::AggregateInfo>,
) -> std::result::Result<ModuleSpec, String> {
    if !(1..=ABI_VERSION).contains(&info.abi_version) {
        return Err(format!(
            "it was built for Riffle UDF ABI version {} ({}); this host speaks versions 1 to \
             {ABI_VERSION}",
            info.abi_version, info.sdk
        ));
    }
    if info.functions.is_empty() && aggregates.is_empty() {
        return Err("it exports no functions".into());
    }
    let mut functions: Vec<FunctionSpec> = Vec::with_capacity(info.functions.len());
    let mut names: Vec<String> = Vec::new();
    for f in info.functions {
        check_name(
            &f.name,
            &names.iter().map(String::as_str).collect::<Vec<_>>(),
        )?;
        names.push(f.name.clone());
        functions.push(FunctionSpec {
            name: f.name,
            args: arg_specs(f.args),
            returns: UdfType::from_wire(f.returns),
            returns_null: f.returns_null,
            fallible: f.fallible,
            deterministic: f.deterministic,
            doc: f.doc,
        });
    }
    let mut specs = Vec::with_capacity(aggregates.len());
    for a in aggregates {
        check_name(
            &a.name,
            &names.iter().map(String::as_str).collect::<Vec<_>>(),
        )?;
        names.push(a.name.clone());
        if a.state.is_empty() {
            return Err(format!("aggregate {} declares no state", a.name));
        }
        if a.args.is_empty() {
            return Err(format!("aggregate {} takes no arguments", a.name));
        }
        specs.push(AggregateSpec {
            name: a.name,
            args: arg_specs(a.args),
            returns: UdfType::from_wire(a.returns),
            returns_null: a.returns_null,
            fallible: a.fallible,
            state: a
                .state
                .into_iter()
                .map(|f| StateFieldSpec {
                    name: f.name,
                    data_type: UdfType::from_wire(f.data_type),
                    nullable: f.nullable,
                })
                .collect(),
            retractable: a.retractable,
            deterministic: a.deterministic,
            doc: a.doc,
        });
    }
    Ok(ModuleSpec {
        abi_version: info.abi_version,
        sdk: info.sdk,
        has_init: info.has_init,
        deterministic: functions.iter().all(|f| f.deterministic)
            && specs.iter().all(|a| a.deterministic),
        functions,
        aggregates: specs,
    })
}

/// The sha256 of a file, hex, read in chunks: a module whose compiled artifact is cached is
/// only hashed, and a Python module is 19 MB that would otherwise first be copied into fresh
/// memory.
fn file_sha256(path: &Path) -> Result<String> {
    let mut hasher = Sha256::new();
    crate::common::fs::for_each_chunk(path, |chunk| hasher.update(chunk))
        .map_err(|e| RiffleError::io("reading", path, e))?;
    Ok(hex::encode(hasher.finalize()))
}

/// Loading modules: here rather than beside the engine so that the engine, which modules use,
/// does not depend on them.
impl UdfEngine {
    /// Loads a UDF module from a `.wasm` component file, with no init configuration.
    ///
    /// # Errors
    /// [`RiffleError::InvalidModule`] when the file is not a Riffle UDF component,
    /// [`RiffleError::Io`] when it cannot be read.
    pub fn load(&self, path: &Path) -> Result<Arc<UdfModule>> {
        self.load_with_config(path, Vec::new())
    }

    /// Loads a UDF module whose init hook receives `config` once per instance.
    ///
    /// # Errors
    /// As [`UdfEngine::load`], plus a [`RiffleError::UdfFailure`] when init rejects `config`.
    pub fn load_with_config(&self, path: &Path, config: Vec<u8>) -> Result<Arc<UdfModule>> {
        // Compiling blocks for a while and describe/init run Wasm: keep both off async workers.
        outside_async_runtime(|| self.load_hashed(path, file_sha256(path)?, config))
    }

    /// As [`load_with_config`](Self::load_with_config), for a module file whose sha256 was
    /// just computed. Blocks: call it outside async workers.
    fn load_hashed(&self, path: &Path, hash: String, config: Vec<u8>) -> Result<Arc<UdfModule>> {
        let (hash, component) = self.component(path, hash)?;
        UdfModule::new(self.clone(), path, hash, &component, config).map(Arc::new)
    }

    /// The compiled module file `path`, whose sha256 was just computed as `hash`: from the
    /// artifact cache when it holds it (the module's bytes are then never needed, only their
    /// hash), else compiled. Gives the hash of what was compiled: the file is read again to
    /// compile it, and may have changed in between.
    fn component(&self, path: &Path, hash: String) -> Result<(String, Component)> {
        let file = self.cache_file(&hash);
        if let Some(component) = file.as_deref().and_then(|f| self.cached(f)) {
            return Ok((hash, component));
        }
        let bytes = std::fs::read(path).map_err(|e| RiffleError::io("reading", path, e))?;
        let compiled = hex::encode(Sha256::digest(&bytes));
        let file = if compiled == hash {
            file
        } else {
            self.cache_file(&compiled)
        };
        let component = self.compile(path, &bytes, file.as_deref())?;
        Ok((compiled, component))
    }

    /// What a module file says about itself, and its sha256, without running its init hook
    /// (which may need configuration the caller does not have): for `riffle udf inspect`.
    ///
    /// # Errors
    /// As [`UdfEngine::load`].
    pub fn describe(&self, path: &Path) -> Result<(String, ModuleSpec)> {
        outside_async_runtime(|| {
            let (hash, component) = self.component(path, file_sha256(path)?)?;
            describe(self, path, &component).map(|(_, spec)| (hash, spec))
        })
    }
}
