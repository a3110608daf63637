//! Wasm UDFs against the same functions compiled natively, side by side in one process.
//!
//! ```text
//! cargo bench -p riffle-tests --bench udf --profile dev
//! ```
//!
//! (The dev profile compiles the measured crates at opt-level 3 and every dependency at 2; see
//! the workspace Cargo.toml.) Reports time per batch and the Wasm/native ratio for batches of
//! 1, 1024, 8192 and 65536 rows, and the cold start of a module with and without the compiled
//! artifact cache. Each time is the median of several rounds, and the rounds of the two sides
//! of a comparison alternate, since single runs on our machines vary by a third. Name sections
//! to run only those (`-- calls`, `aggregates`, `python`, `cold`). `RIFFLE_WASM_PERFMAP=1`
//! lets `perf` name the guest's functions. This is a benchmark, not a test: it asserts nothing
//! about speed.

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
use riffle::udf::{EngineOptions, UdfEngine, UdfLimits, UdfModule};
use riffle_tests::udf;

/// Rounds per measurement: each reports the median round.
const ROUNDS: usize = 9;

/// Mean time per iteration in one ~60 ms round (at least 3 iterations).
fn round(f: &mut impl FnMut()) -> Duration {
    let started = Instant::now();
    let mut iterations = 0u32;
    while started.elapsed() < Duration::from_millis(60) || iterations < 3 {
        f();
        iterations += 1;
    }
    started.elapsed() / iterations
}

/// Median time per iteration over [`ROUNDS`] rounds, after a warm-up.
fn measure(mut f: impl FnMut()) -> Duration {
    for _ in 0..3 {
        f();
    }
    median((0..ROUNDS).map(|_| round(&mut f)).collect())
}

/// Two contenders measured side by side: their rounds alternate, so a machine that slows down
/// or speeds up mid-run affects both alike. Returns each one's median round.
fn measure_pair(mut a: impl FnMut(), mut b: impl FnMut()) -> (Duration, Duration) {
    for _ in 0..3 {
        a();
        b();
    }
    let (mut ta, mut tb) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        ta.push(round(&mut a));
        tb.push(round(&mut b));
    }
    (median(ta), median(tb))
}

fn median(mut times: Vec<Duration>) -> Duration {
    times.sort();
    times[times.len() / 2]
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

/// Sections to run: `calls`, `aggregates`, `python`, `cold` (default: all). `cargo bench`
/// also passes `--bench`, which is not a section.
fn wanted() -> impl Fn(&str) -> bool {
    let sections: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    move |section| sections.is_empty() || sections.iter().any(|s| s == section)
}

fn main() {
    let wanted = wanted();
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

    if wanted("calls") {
        calls(&fraud, risk, &conformance, affine, &amount, &country);
    }
    if wanted("aggregates") {
        aggregates(&engine, &batch);
    }
    if wanted("python") {
        python(&engine, &fraud, risk, &amount, &country);
    }
    if wanted("cold") {
        cold(&engine);
    }
}

/// Scalar calls: Wasm against the same Rust function compiled natively.
fn calls(
    fraud: &UdfModule,
    risk: usize,
    conformance: &UdfModule,
    affine: usize,
    amount: &Float64Array,
    country: &StringArray,
) {
    println!(
        "Wasm UDF vs the same function native, time per batch (median of {ROUNDS} rounds, \
         taken in turn)\n"
    );
    println!(
        "{:<12} {:>7} {:>12} {:>12} {:>8}",
        "function", "rows", "wasm", "native", "ratio"
    );
    for rows in [1usize, 1024, 8192, 65_536] {
        let a: ArrayRef = Arc::new(amount.slice(0, rows));
        let c: ArrayRef = Arc::new(country.slice(0, rows));
        let (a_typed, c_typed) = (a.as_primitive::<Float64Type>(), c.as_string::<i32>());

        let (wasm, native) = measure_pair(
            || {
                black_box(fraud.call(risk, rows, &[a.clone(), c.clone()]).unwrap());
            },
            || {
                let out: Float64Array = (0..rows)
                    .map(|i| riffle_udfs_fraud::risk_score(a_typed.value(i), c_typed.value(i)))
                    .collect::<Vec<_>>()
                    .into();
                black_box(out);
            },
        );
        report("risk_score", rows, wasm, native);

        let (wasm, native) = measure_pair(
            || {
                black_box(
                    conformance
                        .call(affine, rows, std::slice::from_ref(&a))
                        .unwrap(),
                );
            },
            || {
                black_box(unary::<_, _, Float64Type>(a_typed, |x| x * 2.0 + 1.0));
            },
        );
        report("x*2+1", rows, wasm, native);

        // What any ABI that copies the argument in and the result out costs before the guest
        // runs at all: the same native loop between two copies (no sandbox, no call).
        let mut guest_side = vec![0f64; rows];
        let (copied, native) = measure_pair(
            || {
                guest_side.copy_from_slice(black_box(a_typed.values()));
                let out: Vec<f64> = guest_side.iter().map(|x| x * 2.0 + 1.0).collect();
                black_box(Float64Array::from(black_box(&out[..]).to_vec()));
            },
            || {
                black_box(unary::<_, _, Float64Type>(a_typed, |x| x * 2.0 + 1.0));
            },
        );
        report("  2 copies", rows, copied, native);
    }
}

/// The Python port of the fraud module (componentize-py: CPython inside the component) against
/// the Rust one, both in the sandbox.
fn python(
    engine: &UdfEngine,
    fraud: &UdfModule,
    risk: usize,
    amount: &Float64Array,
    country: &StringArray,
) {
    println!("\nPython against Rust, both in the sandbox: risk_score per batch\n");
    println!(
        "{:<12} {:>7} {:>12} {:>12} {:>8}",
        "function", "rows", "python", "rust", "ratio"
    );
    let python = engine.load(&udf("fraud_py")).unwrap();
    let python_risk = python.function_index("risk_score").unwrap();
    for rows in [1usize, 1024, 8192] {
        let args: [ArrayRef; 2] = [
            Arc::new(amount.slice(0, rows)),
            Arc::new(country.slice(0, rows)),
        ];
        let (py, rust) = measure_pair(
            || {
                black_box(python.call(python_risk, rows, &args).unwrap());
            },
            || {
                black_box(fraud.call(risk, rows, &args).unwrap());
            },
        );
        report("risk_score", rows, py, rust);
    }
}

/// Cold start of a module, with and without the compiled-artifact cache.
fn cold(engine: &UdfEngine) {
    println!("\nCold start: load a module (read, hash, compile or fetch from cache, describe) and");
    println!("create its first instance\n");
    let cache = std::env::temp_dir().join(format!("riffle-bench-cache-{}", std::process::id()));
    // A Python module is ~18 MB of Wasm (CPython and its standard library): compiling it takes
    // long enough that three uncached runs say enough.
    for (name, uncached_runs) in [("fraud", 9), ("conformance", 9), ("fraud_py", 3)] {
        let path = udf(name);
        let uncached = measure_cold(uncached_runs, || {
            black_box(engine.load(&path).unwrap());
        });
        let warm_engine = new_engine(Some(cache.clone()));
        warm_engine.load(&path).unwrap();
        let cached = measure_cold(9, || {
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

/// Wasm aggregates against the same state types compiled natively: 8192-row batches spread
/// over 1,000 groups. "call" is one `aggregate` call carrying all the groups' states in and
/// out, as the guest sees it; "groups acc" adds the host's side of a batch `GROUP BY`
/// (DataFusion's groups accumulator: gathering the touched groups' states from Arrow's row
/// format and storing them back). Native keeps a `Vec` of states and calls `update` per row.
fn aggregates(engine: &UdfEngine, batch: &arrow::array::RecordBatch) {
    use arrow::datatypes::{DataType, Field, Schema, TimestampMicrosecondType};
    use datafusion::logical_expr::AggregateUDFImpl;
    use datafusion::logical_expr::function::AccumulatorArgs;
    use riffle::udf::{AggregateStep, ModuleSlot, RowErrorPolicy, WasmAggregateUdf};
    use riffle_udf::Timestamp;

    const ROWS: usize = 8192;
    const GROUPS: usize = 1000;
    let amount: ArrayRef = Arc::new(
        batch
            .column_by_name("amount")
            .unwrap()
            .as_primitive::<Float64Type>()
            .iter()
            .take(ROWS)
            .map(|v| v.unwrap_or(1.0))
            .collect::<Float64Array>(),
    );
    let ts: ArrayRef = batch.column_by_name("ts").unwrap().slice(0, ROWS);
    let q: ArrayRef = Arc::new(Float64Array::from(vec![0.9; ROWS]));
    let group_of: Vec<u32> = (0..ROWS as u32)
        .map(|i| (i * 7919) % GROUPS as u32)
        .collect();
    let group_indices: Vec<usize> = group_of.iter().map(|g| *g as usize).collect();
    let (amounts, times) = (
        amount.as_primitive::<Float64Type>(),
        ts.as_primitive::<TimestampMicrosecondType>(),
    );

    println!("\nWasm aggregate vs the same state type native: {ROWS} rows over {GROUPS} groups\n");
    println!(
        "{:<24} {:>12} {:>12} {:>8}",
        "aggregate", "wasm", "native", "ratio"
    );
    let sketch = engine.load(&udf("sketch")).unwrap();
    let fraud = engine.load(&udf("fraud")).unwrap();
    let cases: [(&str, &Arc<riffle::udf::UdfModule>, Vec<ArrayRef>); 2] = [
        ("decayed_avg", &fraud, vec![amount.clone(), ts.clone()]),
        ("dd_quantile", &sketch, vec![amount.clone(), q.clone()]),
    ];
    for (name, module, args) in cases {
        let index = module.aggregate_index(name).unwrap();
        let mut states: Vec<ArrayRef> = Vec::new();
        let call = measure(|| {
            states = module
                .aggregate(
                    index,
                    AggregateStep::Update,
                    GROUPS,
                    &states,
                    &group_of,
                    &args,
                )
                .unwrap();
        });
        let udaf =
            WasmAggregateUdf::new(ModuleSlot::new(module.clone()), index, RowErrorPolicy::Fail);
        let schema = Schema::new(vec![Field::new("x", DataType::Float64, true)]);
        let mut acc = udaf
            .create_groups_accumulator(AccumulatorArgs {
                return_field: Arc::new(Field::new(name, DataType::Float64, true)),
                schema: &schema,
                ignore_nulls: false,
                order_bys: &[],
                is_reversed: false,
                name,
                is_distinct: false,
                exprs: &[],
                expr_fields: &[],
            })
            .unwrap();
        let groups_acc = measure(|| {
            acc.update_batch(&args, &group_indices, None, GROUPS)
                .unwrap();
        });
        let native = match name {
            "decayed_avg" => {
                let mut states = vec![riffle_udfs_fraud::DecayedAvg::default(); GROUPS];
                measure(|| {
                    for (i, g) in group_of.iter().enumerate() {
                        states[*g as usize].update(amounts.value(i), Timestamp(times.value(i)));
                    }
                    black_box(&states);
                })
            }
            _ => {
                let mut states = vec![riffle_udfs_sketch::DdQuantile::default(); GROUPS];
                measure(|| {
                    for (i, g) in group_of.iter().enumerate() {
                        states[*g as usize].update(amounts.value(i), 0.9);
                    }
                    black_box(&states);
                })
            }
        };
        let us = |d: Duration| format!("{:.1} µs", d.as_secs_f64() * 1e6);
        for (what, wasm) in [("call", call), ("groups acc", groups_acc)] {
            println!(
                "{:<24} {:>12} {:>12} {:>7.2}x",
                format!("{name} ({what})"),
                us(wasm),
                us(native),
                wasm.as_secs_f64() / native.as_secs_f64()
            );
        }
    }
}

/// Cold starts are slow and few: the median of `runs`.
fn measure_cold(runs: usize, mut f: impl FnMut()) -> Duration {
    median(
        (0..runs)
            .map(|_| {
                let started = Instant::now();
                f();
                started.elapsed()
            })
            .collect(),
    )
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
