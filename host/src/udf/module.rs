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

use super::abi::{CallErrorOut, CallOutputOut, ColumnIn, UdfType, lift_column, lower_column};
use super::bindings::{Udf, riffle::udf::types as wire};
use super::engine::UdfEngine;
use super::sandbox::HostState;
use crate::error::{Result, RiffleError, UdfFailureKind};
use sha2::{Digest, Sha256};
use std::sync::Arc;

/// Version of `wit/udf.wit` this host implements.
pub const ABI_VERSION: u32 = 1;

/// Most instances kept idle per module; more are created under load and dropped after.
const MAX_IDLE_INSTANCES: usize = 32;

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

/// A live instance with its own store (memory, sandbox, limits).
struct Instance {
    store: Store<HostState>,
    call: CallFunc,
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
            stats: spec
                .functions
                .iter()
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

    /// What the module says about itself.
    pub fn spec(&self) -> &ModuleSpec {
        &self.spec
    }

    /// Index of the function named `name`.
    pub fn function_index(&self, name: &str) -> Option<usize> {
        self.spec.functions.iter().position(|f| f.name == name)
    }

    /// Counters of function `index`.
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
            let udf = Udf::new(&mut store, &instance)
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
        self.live.fetch_add(1, Ordering::Relaxed);
        Ok(Instance {
            store,
            call,
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
        let stats = &self.stats[index];
        stats.calls.fetch_add(1, Ordering::Relaxed);
        stats.rows.fetch_add(rows as u64, Ordering::Relaxed);
        stats
            .nanos
            .fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
        match &result {
            Ok(out) => {
                stats
                    .row_errors
                    .fetch_add(out.row_errors.len() as u64, Ordering::Relaxed);
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
        result
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
        let columns = args
            .iter()
            .zip(&function.args)
            .map(|(array, arg)| {
                if array.len() != rows {
                    return Err(format!(
                        "argument {} has {} rows, not {rows}",
                        arg.name,
                        array.len()
                    ));
                }
                lower_column(array, arg.data_type)
            })
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| RiffleError::Internal(format!("{}: {e}", function.name)))?;

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
        let result = instance
            .call
            .call(&mut instance.store, (index as u32, rows as u32, columns));
        let overslept = instance.store.data().overslept.load(Ordering::Relaxed);
        let output = match result {
            Ok(_) if overslept => {
                self.drain_output(&function.name, &mut instance.store);
                return Err(self.error(
                    &function.name,
                    UdfFailureKind::Timeout(timeout),
                    "slept past the deadline".into(),
                ));
            }
            Ok((output,)) => {
                self.drain_output(&function.name, &mut instance.store);
                self.checkin(instance);
                output
            }
            Err(e) => {
                // The instance is dropped here: after a trap its state is undefined.
                return Err(self.failure(&function.name, e, &mut instance.store, timeout));
            }
        };
        let output = output.map_err(|e| match e {
            CallErrorOut::Failed(message) => {
                self.error(&function.name, UdfFailureKind::Guest, message)
            }
            CallErrorOut::NoSuchFunction(i) => {
                RiffleError::Internal(format!("module has no function {i}"))
            }
            CallErrorOut::BadArguments(message) => RiffleError::Internal(format!(
                "{} rejected the arguments the host passed: {message}",
                function.name
            )),
        })?;
        let array = lift_column(output.column, function.returns, rows)
            .map_err(|e| self.error(&function.name, UdfFailureKind::AbiViolation, e))?;
        let mut row_errors = Vec::with_capacity(output.row_errors.len());
        for e in output.row_errors {
            let row = e.row as usize;
            if row >= rows || array.is_valid(row) {
                return Err(self.error(
                    &function.name,
                    UdfFailureKind::AbiViolation,
                    format!("row error for row {row}, which is out of range or not NULL"),
                ));
            }
            row_errors.push((row, e.message));
        }
        Ok(UdfOutput { array, row_errors })
    }

    fn checkout(&self) -> Result<Instance> {
        let idle = self.pool.lock().expect("pool lock").pop();
        match idle {
            Some(instance) => Ok(instance),
            None => self.instantiate(),
        }
    }

    fn checkin(&self, instance: Instance) {
        let mut pool = self.pool.lock().expect("pool lock");
        if pool.len() < MAX_IDLE_INSTANCES {
            pool.push(instance);
        }
    }
}

/// Runs `f`, which calls into Wasm, outside any tokio runtime's context.
///
/// wasmtime-wasi's synchronous bindings serve blocking WASI calls (a UDF's `println!`, a sleep)
/// by `block_on` with the ambient tokio runtime. On a runtime's worker thread, where DataFusion
/// runs operators, that panics ("Cannot start a runtime from within a runtime"), so one
/// `println!` in a UDF would bring the host down. On a multi-threaded runtime `block_in_place`
/// makes blocking legal (and hands the worker's other tasks to another thread); a
/// current-thread runtime cannot do that, so the call hops to a scoped helper thread.
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
    let info = pre
        .instantiate(&mut store)
        .and_then(|instance| Udf::new(&mut store, &instance))
        .and_then(|udf| udf.call_describe(&mut store))
        .map_err(|e| {
            invalid(format!(
                "it is not a Riffle UDF module (describe failed): {e:#}"
            ))
        })?;
    let spec = validate(info).map_err(invalid)?;
    Ok((pre, spec))
}

/// Checks a module's self-description before anything is registered.
fn validate(info: wire::ModuleInfo) -> std::result::Result<ModuleSpec, String> {
    if info.abi_version != ABI_VERSION {
        return Err(format!(
            "it was built for Riffle UDF ABI version {} ({}); this host speaks version {ABI_VERSION}",
            info.abi_version, info.sdk
        ));
    }
    if info.functions.is_empty() {
        return Err("it exports no functions".into());
    }
    let mut functions: Vec<FunctionSpec> = Vec::with_capacity(info.functions.len());
    for f in info.functions {
        let valid_name = !f.name.is_empty()
            && f.name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_')
            && !f.name.starts_with(|c: char| c.is_ascii_digit());
        if !valid_name {
            return Err(format!(
                "function name {:?} is not a valid SQL identifier",
                f.name
            ));
        }
        if functions.iter().any(|g| g.name == f.name) {
            return Err(format!("function {} is exported twice", f.name));
        }
        functions.push(FunctionSpec {
            name: f.name,
            args: f
                .args
                .into_iter()
                .map(|a| ArgSpec {
                    name: a.name,
                    data_type: UdfType::from_wire(a.data_type),
                    nullable: a.nullable,
                })
                .collect(),
            returns: UdfType::from_wire(f.returns),
            returns_null: f.returns_null,
            fallible: f.fallible,
            deterministic: f.deterministic,
            doc: f.doc,
        });
    }
    Ok(ModuleSpec {
        abi_version: info.abi_version,
        sdk: info.sdk,
        has_init: info.has_init,
        deterministic: functions.iter().all(|f| f.deterministic),
        functions,
    })
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
        outside_async_runtime(|| {
            let bytes = std::fs::read(path).map_err(|e| RiffleError::io("reading", path, e))?;
            let hash = hex::encode(Sha256::digest(&bytes));
            let component = self.compile(path, &bytes, &hash)?;
            UdfModule::new(self.clone(), path, hash, &component, config).map(Arc::new)
        })
    }

    /// What a module file says about itself, and its sha256, without running its init hook
    /// (which may need configuration the caller does not have): for `riffle udf inspect`.
    ///
    /// # Errors
    /// As [`UdfEngine::load`].
    pub fn describe(&self, path: &Path) -> Result<(String, ModuleSpec)> {
        outside_async_runtime(|| {
            let bytes = std::fs::read(path).map_err(|e| RiffleError::io("reading", path, e))?;
            let hash = hex::encode(Sha256::digest(&bytes));
            let component = self.compile(path, &bytes, &hash)?;
            describe(self, path, &component).map(|(_, spec)| (hash, spec))
        })
    }
}
