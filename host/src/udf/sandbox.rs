//! The capability-free world a UDF instance lives in.
//!
//! Rust's standard library links WASI imports (clocks, random, environment, stdio, filesystem,
//! sockets) even into pure functions, so the host must provide them to instantiate a module at
//! all. It provides them empty: no preopened directories, no environment variables, no
//! arguments, no network, and stdout/stderr captured into the host's log under the UDF's name.
//!
//! Determinism: a module whose functions are all declared deterministic sees a frozen clock
//! (the Unix epoch, never advancing) and randomness from a fixed seed, so std's `HashMap` seeds
//! and any accidental `SystemTime::now()` give the same result in a backfill and in a live
//! stream. Modules that declare a nondeterministic function get the real clock and real
//! randomness.
//!
//! Sleeping: CPU deadlines interrupt Wasm code, not a guest blocked in a host call, so waiting
//! on a clock is bounded here (see [`bound_sleeps`]): in a frozen world it completes at once,
//! in a real one it never outlasts the call's deadline.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use wasmtime::component::{Linker, Resource, ResourceTable};
use wasmtime::{ResourceLimiter, StoreContextMut};
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{DynPollable, OutputStream, Pollable, StreamError};
use wasmtime_wasi::{
    Deterministic, HostMonotonicClock, HostWallClock, WasiCtx, WasiCtxBuilder, WasiCtxView,
    WasiView,
};

/// Bytes of stdout/stderr kept per call; a chatty UDF loses the excess, never its call.
const CAPTURE_LIMIT: usize = 64 * 1024;

/// The store data of one UDF instance.
pub(crate) struct HostState {
    wasi: WasiCtx,
    table: ResourceTable,
    deterministic: bool,
    /// Origin of the real monotonic clock nondeterministic modules see.
    clock_origin: Instant,
    /// When the current call's CPU deadline expires.
    pub(crate) deadline: Option<Instant>,
    /// Set when a sleep was cut short at the deadline: the call overran, even if the guest
    /// got back to its own code before the epoch ticker noticed.
    pub(crate) overslept: Arc<AtomicBool>,
    pub(crate) memory: MemoryCap,
    pub(crate) stdout: CapturePipe,
    pub(crate) stderr: CapturePipe,
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl HostState {
    /// A fresh sandbox; `deterministic` freezes the clock and seeds randomness.
    pub(crate) fn new(deterministic: bool, memory_limit: usize) -> Self {
        let stdout = CapturePipe::default();
        let stderr = CapturePipe::default();
        let mut builder = WasiCtxBuilder::new();
        builder
            .stdout(stdout.clone())
            .stderr(stderr.clone())
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false);
        let clock_origin = Instant::now();
        if deterministic {
            builder
                .wall_clock(FrozenClock)
                .monotonic_clock(FrozenClock)
                .secure_random(Deterministic::new(seeded_bytes(0x5249_4646_4c45_0001)))
                .insecure_random(Deterministic::new(seeded_bytes(0x5249_4646_4c45_0002)))
                .insecure_random_seed(0x5249_4646_4c45_5345_4544);
        } else {
            builder.monotonic_clock(RealMonotonicClock(clock_origin));
        }
        HostState {
            wasi: builder.build(),
            table: ResourceTable::new(),
            deterministic,
            clock_origin,
            deadline: None,
            overslept: Arc::new(AtomicBool::new(false)),
            memory: MemoryCap {
                limit: memory_limit,
                refused: None,
                size: 0,
            },
            stdout,
            stderr,
        }
    }
}

/// 4 KiB of splitmix64 output from `seed`: the cycle wasmtime's `Deterministic` generator
/// repeats. Plenty for hash seeds; a UDF that needs real randomness is nondeterministic.
fn seeded_bytes(mut seed: u64) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(4096);
    while bytes.len() < 4096 {
        seed = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = seed;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        bytes.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    bytes
}

/// A clock stopped at the Unix epoch (wall) and at zero (monotonic).
struct FrozenClock;

impl HostWallClock for FrozenClock {
    fn resolution(&self) -> Duration {
        Duration::from_secs(1)
    }
    fn now(&self) -> Duration {
        Duration::ZERO
    }
}

impl HostMonotonicClock for FrozenClock {
    fn resolution(&self) -> u64 {
        1_000_000_000
    }
    fn now(&self) -> u64 {
        0
    }
}

/// The real monotonic clock, counted from a known origin so sleeps until an instant can be
/// bounded (wasmtime-wasi's own clock keeps its origin private).
struct RealMonotonicClock(Instant);

impl HostMonotonicClock for RealMonotonicClock {
    fn resolution(&self) -> u64 {
        1
    }
    fn now(&self) -> u64 {
        self.0.elapsed().as_nanos() as u64
    }
}

/// The WASI clock interface whose subscriptions are replaced; must match wasmtime-wasi's.
const MONOTONIC_CLOCK: &str = "wasi:clocks/monotonic-clock@0.2.12";

/// Replaces `subscribe-duration` and `subscribe-instant` of WASI's monotonic clock (what
/// `std::thread::sleep` and timed polls wait on) with bounded versions.
pub(crate) fn bound_sleeps(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    linker.allow_shadowing(true);
    let mut clock = linker.instance(MONOTONIC_CLOCK)?;
    clock.func_wrap(
        "subscribe-duration",
        |mut store: StoreContextMut<'_, HostState>, (nanos,): (u64,)| {
            store
                .data_mut()
                .nap(Duration::from_nanos(nanos))
                .map(|p| (p,))
        },
    )?;
    clock.func_wrap(
        "subscribe-instant",
        |mut store: StoreContextMut<'_, HostState>, (when,): (u64,)| {
            let state = store.data_mut();
            let now = if state.deterministic {
                0
            } else {
                state.clock_origin.elapsed().as_nanos() as u64
            };
            state
                .nap(Duration::from_nanos(when.saturating_sub(now)))
                .map(|p| (p,))
        },
    )?;
    linker.allow_shadowing(false);
    Ok(())
}

impl HostState {
    /// A pollable that becomes ready after `duration`: at once when time is frozen, and never
    /// later than the current call's deadline.
    fn nap(&mut self, duration: Duration) -> wasmtime::Result<Resource<DynPollable>> {
        let nap = if self.deterministic {
            Nap {
                until: None,
                cut: None,
            }
        } else {
            let wanted = Instant::now() + duration;
            match self.deadline {
                Some(deadline) if deadline < wanted => Nap {
                    until: Some(deadline.into()),
                    cut: Some(self.overslept.clone()),
                },
                _ => Nap {
                    until: Some(wanted.into()),
                    cut: None,
                },
            }
        };
        let nap = self.table.push(nap)?;
        wasmtime_wasi::p2::subscribe(&mut self.table, nap)
    }
}

/// A bounded sleep; `cut` is raised if it ends at the deadline instead of when asked.
struct Nap {
    until: Option<tokio::time::Instant>,
    cut: Option<Arc<AtomicBool>>,
}

#[wasmtime_wasi::async_trait]
impl Pollable for Nap {
    async fn ready(&mut self) {
        if let Some(until) = self.until {
            tokio::time::sleep_until(until).await;
        }
        if let Some(cut) = &self.cut {
            cut.store(true, Ordering::Relaxed);
        }
    }
}

/// Memory cap for one instance; remembers a refused growth so a resulting trap can be reported
/// as out-of-memory rather than as a generic trap, and how large the instance's memories are.
pub(crate) struct MemoryCap {
    limit: usize,
    pub(crate) refused: Option<usize>,
    /// Bytes of linear memory the instance holds, all its memories together. Wasm memory never
    /// shrinks, and every page a guest once touched stays resident while the instance lives.
    pub(crate) size: usize,
}

impl ResourceLimiter for MemoryCap {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.limit {
            self.refused = Some(desired);
            return Ok(false);
        }
        // Past the memory's own maximum the growth still fails after this returns.
        if maximum.is_none_or(|max| desired <= max) {
            self.size += desired.saturating_sub(current);
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 1 << 20)
    }
}

/// Captures what a UDF writes to stdout or stderr during a call; the module drains it into the
/// log after each call and quotes stderr in trap reports (a Rust panic message lands there).
#[derive(Clone, Default)]
pub(crate) struct CapturePipe(Arc<Mutex<Vec<u8>>>);

impl CapturePipe {
    /// Appends up to the capture limit; the rest is dropped.
    fn append(&self, data: &[u8]) {
        let mut buf = self.0.lock().expect("capture lock");
        let room = CAPTURE_LIMIT.saturating_sub(buf.len());
        buf.extend_from_slice(&data[..data.len().min(room)]);
    }

    /// Everything captured since the last call, as text.
    pub(crate) fn take(&self) -> String {
        let bytes = std::mem::take(&mut *self.0.lock().expect("capture lock"));
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

impl OutputStream for CapturePipe {
    fn write(&mut self, bytes: Bytes) -> Result<(), StreamError> {
        self.append(&bytes);
        Ok(())
    }
    fn flush(&mut self) -> Result<(), StreamError> {
        Ok(())
    }
    fn check_write(&mut self) -> Result<usize, StreamError> {
        // Always writable: excess output is dropped rather than blocking or failing the guest.
        Ok(CAPTURE_LIMIT)
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for CapturePipe {
    async fn ready(&mut self) {}
}

impl IsTerminal for CapturePipe {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for CapturePipe {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }
    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(AsyncCapture(self.clone()))
    }
}

/// The same capture for WASI's async stream interface.
struct AsyncCapture(CapturePipe);

impl tokio::io::AsyncWrite for AsyncCapture {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.0.append(data);
        std::task::Poll::Ready(Ok(data.len()))
    }
    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}
