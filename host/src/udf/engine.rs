//! The shared wasmtime engine: configuration, the compiled-artifact cache, and the epoch ticker
//! that enforces CPU deadlines.

use std::hash::Hasher;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sha2::{Digest, Sha256};
use wasmtime::component::{Component, Linker};
use wasmtime::{Config, Engine, OptLevel};

use super::sandbox::{HostState, bound_sleeps};
use crate::error::{Result, RiffleError};

/// How often the engine's epoch advances. A call's CPU deadline is checked at this granularity,
/// so a runaway UDF stops at most one tick late. Epoch checks cost 10-17% of pure compute here
/// (fuel metering cost 15-46%), which is why deadlines use epochs.
pub const EPOCH_TICK: Duration = Duration::from_millis(5);

/// Per-instance and per-call limits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UdfLimits {
    /// CPU deadline for one call (one batch).
    pub call_timeout: Duration,
    /// CPU deadline for instantiation plus the init hook.
    pub init_timeout: Duration,
    /// Maximum linear memory of one instance, in bytes. An instance whose memory grew by more
    /// than a quarter of this during a call is dropped afterwards instead of being reused, so
    /// idle instances do not hold on to the peak of a large call.
    pub memory_bytes: usize,
}

impl Default for UdfLimits {
    fn default() -> Self {
        UdfLimits {
            call_timeout: Duration::from_secs(5),
            init_timeout: Duration::from_secs(30),
            memory_bytes: 256 << 20,
        }
    }
}

/// Engine settings.
#[derive(Clone, Debug, Default)]
pub struct EngineOptions {
    /// Where compiled modules are cached; `None` compiles every time.
    pub cache_dir: Option<PathBuf>,
    /// Limits applied to every module this engine loads.
    pub limits: UdfLimits,
}

impl EngineOptions {
    /// The default cache directory: `$RIFFLE_CACHE_DIR`, else `$XDG_CACHE_HOME/riffle/wasm`,
    /// else `~/.cache/riffle/wasm`.
    pub fn default_cache_dir() -> Option<PathBuf> {
        if let Some(dir) = std::env::var_os("RIFFLE_CACHE_DIR") {
            return Some(PathBuf::from(dir));
        }
        let base = std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
        Some(base.join("riffle").join("wasm"))
    }
}

/// A wasmtime engine set up for Riffle UDFs; cheap to clone and shared by every module.
#[derive(Clone)]
pub struct UdfEngine {
    inner: Arc<EngineInner>,
}

struct EngineInner {
    engine: Engine,
    linker: Linker<HostState>,
    options: EngineOptions,
    /// Identifies the engine build and settings, so a cached artifact from another wasmtime
    /// version or configuration is never loaded.
    compat_key: String,
    ticker_stop: Arc<AtomicBool>,
    /// Mapping a cached artifact failed once (see [`UdfEngine::cached`]): read them instead.
    no_map: AtomicBool,
}

impl Drop for EngineInner {
    fn drop(&mut self) {
        self.ticker_stop.store(true, Ordering::Relaxed);
    }
}

/// Feeds `Hash` output into sha256, for a cache key that is stable across processes.
struct ShaHasher(Sha256);

impl Hasher for ShaHasher {
    fn finish(&self) -> u64 {
        0
    }
    fn write(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }
}

impl UdfEngine {
    /// Creates the engine and starts its epoch ticker thread.
    ///
    /// # Errors
    /// Fails only if wasmtime rejects the configuration or WASI cannot be linked (a Riffle bug).
    pub fn new(options: EngineOptions) -> Result<Self> {
        let mut config = Config::new();
        config.wasm_component_model(true);
        config.epoch_interruption(true);
        config.cranelift_opt_level(OptLevel::Speed);
        // `perf` names guest functions from /tmp/perf-PID.map (how the numbers in
        // `abi.rs` were broken down); off by default, as it writes a file per process.
        if std::env::var_os("RIFFLE_WASM_PERFMAP").is_some() {
            config.profiler(wasmtime::ProfilingStrategy::PerfMap);
        }
        let engine = Engine::new(&config)
            .map_err(|e| RiffleError::Internal(format!("wasmtime engine: {e}")))?;

        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker)
            .and_then(|()| bound_sleeps(&mut linker))
            .map_err(|e| RiffleError::Internal(format!("linking WASI: {e}")))?;

        let mut hasher = ShaHasher(Sha256::new());
        std::hash::Hash::hash(&engine.precompile_compatibility_hash(), &mut hasher);
        let compat_key = hex::encode(&hasher.0.finalize()[..8]);

        let ticker_stop = Arc::new(AtomicBool::new(false));
        let (tick_engine, stop) = (engine.clone(), ticker_stop.clone());
        std::thread::Builder::new()
            .name("riffle-udf-epoch".into())
            .spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(EPOCH_TICK);
                    tick_engine.increment_epoch();
                }
            })
            .map_err(|e| RiffleError::Internal(format!("starting the epoch ticker: {e}")))?;

        Ok(UdfEngine {
            inner: Arc::new(EngineInner {
                engine,
                linker,
                options,
                compat_key,
                ticker_stop,
                no_map: AtomicBool::new(false),
            }),
        })
    }

    /// The compiled module cached in `file` (see [`cache_file`](Self::cache_file)), when it
    /// is there and intact.
    ///
    /// Compiled artifacts are native code that wasmtime loads without validating it, so the
    /// cache is guarded three ways: its directory is created private (0700) and not used at
    /// all when other users could write to it; each artifact has a checksum beside it that is
    /// checked before loading (a file cut short or damaged is recompiled and replaced); and
    /// the file name pins the module's hash and the engine build, whose header wasmtime checks
    /// again. The checksum catches corruption, not an attacker who can write as this user:
    /// such an attacker owns the process anyway. So it is CRC-32 (a few milliseconds for a
    /// 35 MB Python artifact) rather than a cryptographic digest.
    ///
    /// The artifact is mapped from its file, not read into memory: wasmtime then maps each
    /// instance's initial linear memory copy-on-write straight from the file too. A Python
    /// module's memory image is the whole pre-initialized interpreter, and reading and copying
    /// it (and the artifact) into fresh memory was most of its cold start. Where files cannot
    /// be mapped executable (a cache on a `noexec` mount), the artifact is read instead.
    pub(crate) fn cached(&self, file: &Path) -> Option<Component> {
        if !intact(file) {
            return None;
        }
        // SAFETY (both loads): the file's content matched the checksum written with it by an
        // engine of this build (the name says so), in a directory only this user can write.
        // The file is opened again to load it, but files there are only ever replaced whole
        // (renamed into place), never changed in place, so whatever is loaded is a complete
        // artifact of this engine build; wasmtime checks its header again.
        if !self.inner.no_map.load(Ordering::Relaxed) {
            match unsafe { Component::deserialize_file(&self.inner.engine, file) } {
                Ok(component) => return Some(component),
                Err(e) => {
                    tracing::warn!(
                        path = %file.display(),
                        "cannot map cached artifacts ({e:#}); reading them instead"
                    );
                    self.inner.no_map.store(true, Ordering::Relaxed);
                }
            }
        }
        let bytes = std::fs::read(file).ok()?;
        match unsafe { Component::deserialize(&self.inner.engine, &bytes) } {
            Ok(component) => Some(component),
            Err(e) => {
                tracing::warn!(
                    path = %file.display(),
                    "ignoring unusable cached artifact ({e:#}); recompiling"
                );
                None
            }
        }
    }

    /// Compiles the component in `bytes` (the file `path`) and, with a cache file, caches the
    /// artifact there; see [`cached`](Self::cached) for how the cache is guarded.
    pub(crate) fn compile(
        &self,
        path: &Path,
        bytes: &[u8],
        file: Option<&Path>,
    ) -> Result<Component> {
        let invalid = |e: wasmtime::Error| RiffleError::InvalidModule {
            path: path.to_path_buf(),
            reason: format!("{e:#}"),
        };
        let Some(file) = file else {
            return Component::from_binary(&self.inner.engine, bytes).map_err(invalid);
        };
        let artifact = self
            .inner
            .engine
            .precompile_component(bytes)
            .map_err(invalid)?;
        let sum = checksum_record(&artifact);
        let written = crate::common::fs::write_atomic(file, &artifact)
            .and_then(|()| crate::common::fs::write_atomic(&sum_file(file), &sum));
        if let Err(e) = written {
            tracing::warn!(path = %file.display(), "could not cache compiled UDF: {e}");
        } else if let Some(component) = self.cached(file) {
            return Ok(component);
        }
        // SAFETY: `artifact` was produced by this engine a moment ago.
        unsafe { Component::deserialize(&self.inner.engine, &artifact) }.map_err(invalid)
    }

    /// The cache file for the module whose sha256 is `hash`, from this engine build; `None`
    /// when caching is off or the cache directory is not safe to use. `-v2` files are raw
    /// artifacts with a checksum file beside them; earlier Riffle versions sharing the cache
    /// keep their own files (the checksum inside) under the name without it.
    pub(crate) fn cache_file(&self, hash: &str) -> Option<PathBuf> {
        let dir = self.inner.options.cache_dir.as_ref()?;
        if let Err(reason) = private_dir(dir) {
            tracing::warn!(path = %dir.display(), "not using the compiled-UDF cache: {reason}");
            return None;
        }
        Some(dir.join(format!("{hash}-{}-v2.cwasm", self.inner.compat_key)))
    }

    pub(crate) fn engine(&self) -> &Engine {
        &self.inner.engine
    }

    pub(crate) fn linker(&self) -> &Linker<HostState> {
        &self.inner.linker
    }

    /// The limits every module of this engine runs under.
    pub fn limits(&self) -> &UdfLimits {
        &self.inner.options.limits
    }

    /// Epoch ticks that cover `timeout`, plus one for the partly elapsed current tick.
    pub(crate) fn deadline_ticks(timeout: Duration) -> u64 {
        (timeout.as_nanos() / EPOCH_TICK.as_nanos()) as u64 + 1
    }
}

/// The checksum file beside artifact `file`.
fn sum_file(file: &Path) -> PathBuf {
    let mut name = file.as_os_str().to_owned();
    name.push(".sum");
    PathBuf::from(name)
}

/// What the checksum file holds: the artifact's length and CRC-32, little-endian.
fn checksum_record(artifact: &[u8]) -> Vec<u8> {
    let mut record = (artifact.len() as u64).to_le_bytes().to_vec();
    record.extend_from_slice(&crc32fast::hash(artifact).to_le_bytes());
    record
}

/// Whether artifact `file` exists and matches the checksum file beside it. Reads the file in
/// chunks: the bytes are only checked here, and wasmtime maps the file itself.
fn intact(file: &Path) -> bool {
    let Ok(record) = std::fs::read(sum_file(file)) else {
        return false;
    };
    let check = || -> std::io::Result<bool> {
        let mut crc = crc32fast::Hasher::new();
        let len = crate::common::fs::for_each_chunk(file, |chunk| crc.update(chunk))?;
        let mut want = len.to_le_bytes().to_vec();
        want.extend_from_slice(&crc.finalize().to_le_bytes());
        Ok(record == want)
    };
    match check() {
        Ok(true) => true,
        Ok(false) => {
            tracing::warn!(path = %file.display(), "cached artifact fails its checksum; recompiling");
            false
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(e) => {
            tracing::warn!(path = %file.display(), "cannot read cached artifact ({e}); recompiling");
            false
        }
    }
}

/// Creates `dir` private to this user if missing; an existing one must not be writable by
/// group or others.
fn private_dir(dir: &Path) -> std::result::Result<(), String> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        if !dir.is_dir() {
            if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                crate::common::fs::create_dir_durable(parent).map_err(|e| e.to_string())?;
            }
            match std::fs::DirBuilder::new().mode(0o700).create(dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(format!("creating it: {e}")),
            }
        }
        let mode = std::fs::metadata(dir)
            .map_err(|e| e.to_string())?
            .permissions()
            .mode();
        if mode & 0o022 != 0 {
            return Err(format!(
                "it is writable by other users (mode {:o}); make it private with `chmod 700`",
                mode & 0o777
            ));
        }
        Ok(())
    }
    #[cfg(not(unix))]
    crate::common::fs::create_dir_durable(dir).map_err(|e| e.to_string())
}
