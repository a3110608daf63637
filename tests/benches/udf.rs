//! Wasm UDFs against the same functions compiled natively, side by side in one process.
//!
//! ```text
//! cargo bench -p riffle-tests --bench udf --profile dev
//! ```
//!
//! (The dev profile compiles the measured crates at opt-level 3 and every dependency at 2; see
//! the workspace Cargo.toml.) Reports time per batch and the Wasm/native ratio for batches of
//! 1, 1024, 8192 and 65536 rows, and the cold start of a module with and without the compiled
//! artifact cache. This is a benchmark, not a test: it asserts nothing about speed.

/// The allocator the `riffle` binary runs with.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::{ArrayRef, AsArray, Float64Array, StringArray};
use arrow::compute::kernels::arity::unary;
use arrow::datatypes::Float64Type;
use riffle::connectors::generate::{FraudConfig, FraudGenerator};
use riffle::udf::{EngineOptions, UdfEngine, UdfLimits};
use riffle_tests::udf;

/// Best (lowest) mean time per iteration over several timed rounds: robust to a busy machine.
fn measure(mut f: impl FnMut()) -> Duration {
    for _ in 0..3 {
        f();
    }
    let mut best = Duration::MAX;
    for _ in 0..7 {
        let started = Instant::now();
        let mut iterations = 0u32;
        while started.elapsed() < Duration::from_millis(60) || iterations < 3 {
            f();
            iterations += 1;
        }
        best = best.min(started.elapsed() / iterations);
    }
    best
}

fn new_engine(cache: Option<std::path::PathBuf>) -> UdfEngine {
    UdfEngine::new(EngineOptions {
        cache_dir: cache,
        limits: UdfLimits {
            call_timeout: Duration::from_secs(60),
            ..UdfLimits::default()
        },
    })
    .unwrap()
}

fn main() {
    // `cargo bench` passes --bench; nothing else to parse.
    let batch = FraudGenerator::new(FraudConfig::default()).next_batch(65_536);
    let amount: Float64Array = batch
        .column_by_name("amount")
        .unwrap()
        .as_primitive::<Float64Type>()
        .iter()
        .map(|v| v.unwrap_or(0.0))
        .collect();
    let country: StringArray = batch
        .column_by_name("country")
        .unwrap()
        .as_string::<i32>()
        .iter()
        .map(|v| Some(v.unwrap_or("US")))
        .collect();

    let engine = new_engine(None);
    let fraud = engine.load(&udf("fraud")).unwrap();
    let conformance = engine.load(&udf("conformance")).unwrap();
    let risk = fraud.function_index("risk_score").unwrap();
    let affine = conformance.function_index("affine").unwrap();

    println!("Wasm UDF vs the same function native, time per batch (best of 7 rounds)\n");
    println!(
        "{:<12} {:>7} {:>12} {:>12} {:>8}",
        "function", "rows", "wasm", "native", "ratio"
    );
    for rows in [1usize, 1024, 8192, 65_536] {
        let a: ArrayRef = Arc::new(amount.slice(0, rows));
        let c: ArrayRef = Arc::new(country.slice(0, rows));
        let (a_typed, c_typed) = (a.as_primitive::<Float64Type>(), c.as_string::<i32>());

        let wasm = measure(|| {
            black_box(fraud.call(risk, rows, &[a.clone(), c.clone()]).unwrap());
        });
        let native = measure(|| {
            let out: Float64Array = (0..rows)
                .map(|i| riffle_udfs_fraud::risk_score(a_typed.value(i), c_typed.value(i)))
                .collect::<Vec<_>>()
                .into();
            black_box(out);
        });
        report("risk_score", rows, wasm, native);

        let wasm = measure(|| {
            black_box(
                conformance
                    .call(affine, rows, std::slice::from_ref(&a))
                    .unwrap(),
            );
        });
        let native = measure(|| {
            black_box(unary::<_, _, Float64Type>(a_typed, |x| x * 2.0 + 1.0));
        });
        report("x*2+1", rows, wasm, native);
    }

    println!("\nCold start: load a module (read, hash, compile or fetch from cache, describe) and");
    println!("create its first instance\n");
    let cache = std::env::temp_dir().join(format!("riffle-bench-cache-{}", std::process::id()));
    for name in ["fraud", "conformance"] {
        let path = udf(name);
        let uncached = measure_cold(|| {
            black_box(engine.load(&path).unwrap());
        });
        let warm_engine = new_engine(Some(cache.clone()));
        warm_engine.load(&path).unwrap();
        let cached = measure_cold(|| {
            black_box(warm_engine.load(&path).unwrap());
        });
        println!(
            "{name:<12} uncached {:>9.2} ms   cached {:>7.2} ms",
            ms(uncached),
            ms(cached)
        );
    }
    let _ = std::fs::remove_dir_all(&cache);
}

/// Cold starts are slow and few: the median of 9.
fn measure_cold(mut f: impl FnMut()) -> Duration {
    let mut times: Vec<Duration> = (0..9)
        .map(|_| {
            let started = Instant::now();
            f();
            started.elapsed()
        })
        .collect();
    times.sort();
    times[times.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn report(name: &str, rows: usize, wasm: Duration, native: Duration) {
    let us = |d: Duration| format!("{:.2} µs", d.as_secs_f64() * 1e6);
    println!(
        "{name:<12} {rows:>7} {:>12} {:>12} {:>7.2}x",
        us(wasm),
        us(native),
        wasm.as_secs_f64() / native.as_secs_f64()
    );
}
