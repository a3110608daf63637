//! Python UDFs: `udfs/fraud_py` is the fraud module written in Python with the Python SDK
//! (`guest-sdk-py`) and built by componentize-py into a component that embeds CPython. Over the
//! same generated transactions it must give the same values as the Rust module `udfs/fraud`,
//! bit for bit: scalars over every row (NULLs, row errors, UTF-8, timestamps, booleans), the
//! model weights taken from the init configuration, and the decayed-average aggregate through
//! DataFusion's partial and final aggregation (states written by one language's code are only
//! ever read back by the same module, so the equality checks the whole aggregate path).

mod common;

use std::sync::Arc;

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::{Float64Type, Int64Type};
use common::*;
use datafusion::datasource::MemTable;
use riffle::connectors::generate::{FraudConfig, FraudGenerator};
use riffle::session::{RiffleSession, SessionOptions};
use riffle::udf::{EngineOptions, RowErrorPolicy, UdfLimits};

/// A weight change that every country and amount feels, and one country's own weight.
const MODEL: &str = "intercept = -5.5\ncountry.ng = 3.1  # upper-cased by both modules\n";

fn transactions() -> RecordBatch {
    FraudGenerator::new(FraudConfig {
        cards: 200,
        ..FraudConfig::default()
    })
    .next_batch_of_ids(12_000)
}

/// A session with one fraud module (`fraud` or `fraud_py`) and the transactions in one
/// partition of several batches: one partition keeps the order of partial-state merges fixed,
/// so that the two languages' floating-point sums can be compared bit for bit.
fn session(module: &str, tx: &RecordBatch) -> RiffleSession {
    let session = RiffleSession::new(SessionOptions {
        engine: EngineOptions {
            cache_dir: Some(cache_dir()),
            // CPython's heap needs more than the other tests' 64 MiB.
            limits: UdfLimits {
                memory_bytes: 256 << 20,
                call_timeout: std::time::Duration::from_secs(5),
                ..limits()
            },
        },
        row_error_policy: RowErrorPolicy::Null,
        batch_size: None,
        memory_limit: None,
    })
    .expect("session");
    session
        .load_udfs(&udf(module), MODEL.as_bytes().to_vec(), None)
        .unwrap();
    let batches = (0..tx.num_rows())
        .step_by(2_500)
        .map(|at| tx.slice(at, 2_500.min(tx.num_rows() - at)))
        .collect();
    let table = MemTable::try_new(tx.schema(), vec![batches]).unwrap();
    session
        .context()
        .register_table("transactions", Arc::new(table))
        .unwrap();
    session
}

fn bits(batch: &RecordBatch, column: usize) -> Vec<Option<u64>> {
    batch
        .column(column)
        .as_primitive::<Float64Type>()
        .iter()
        .map(|v| v.map(f64::to_bits))
        .collect()
}

#[test]
fn the_python_fraud_module_equals_the_rust_one_bit_for_bit() {
    let tx = transactions();
    let rt = runtime();
    let rust = session("fraud", &tx);
    let python = session("fraud_py", &tx);
    let scalars = "SELECT tx_id, risk_score(amount, country) AS risk, \
                   haversine_km(lat, lon, 51.5, -0.12) AS km, amount_bucket(amount - 20) AS bucket, \
                   is_night(ts) AS night FROM transactions ORDER BY tx_id";
    let aggregates = "SELECT card_id, decayed_avg(amount, ts) AS recent, count(*) AS n \
                      FROM transactions GROUP BY card_id ORDER BY card_id";
    for sql in [scalars, aggregates] {
        let want = rt.block_on(query(&rust, sql)).unwrap();
        let got = rt.block_on(query(&python, sql)).unwrap();
        assert_eq!(got.num_rows(), want.num_rows(), "{sql}");
        assert_eq!(got.schema(), want.schema(), "{sql}");
        for c in 0..want.num_columns() {
            let name = want.schema().field(c).name().clone();
            if want.column(c).data_type() == &arrow::datatypes::DataType::Float64 {
                let (w, g) = (bits(&want, c), bits(&got, c));
                let differ = w.iter().zip(&g).filter(|(a, b)| a != b).count();
                assert_eq!(differ, 0, "{sql}: column {name} differs in {differ} rows");
            } else {
                assert_eq!(got.column(c), want.column(c), "{sql}: column {name}");
            }
        }
    }

    // The comparison means something: the configuration reached both modules, NULL amounts
    // gave NULL risks, and negative amounts gave row errors (NULL buckets under this policy).
    let got = rt.block_on(query(&python, scalars)).unwrap();
    let risk = got.column(1).as_primitive::<Float64Type>();
    assert!(risk.null_count() > 0 && risk.null_count() < got.num_rows());
    let buckets = got.column(3).as_string::<i32>();
    assert!(
        buckets.null_count() > risk.null_count(),
        "row errors became NULLs"
    );
    let cards = rt
        .block_on(query(
            &python,
            "SELECT count(*) FROM transactions WHERE country = 'NG' \
             AND risk_score(amount, country) > risk_score(amount, 'US') + 0.01",
        ))
        .unwrap();
    assert!(cards.column(0).as_primitive::<Int64Type>().value(0) > 0);
}

#[test]
fn a_configuration_the_python_module_rejects_names_the_line() {
    let session = RiffleSession::new(SessionOptions {
        engine: EngineOptions {
            cache_dir: Some(cache_dir()),
            limits: UdfLimits {
                memory_bytes: 256 << 20,
                ..limits()
            },
        },
        row_error_policy: RowErrorPolicy::Fail,
        batch_size: None,
        memory_limit: None,
    })
    .unwrap();
    let err = session
        .load_udfs(&udf("fraud_py"), b"intercept = -5\nbogus\n".to_vec(), None)
        .map(|_| ())
        .and_then(|()| {
            let rt = runtime();
            rt.block_on(query(&session, "SELECT risk_score(1.0, 'US')"))
                .map(|_| ())
        })
        .unwrap_err();
    let text = format!("{}", riffle_error(&err));
    assert!(
        text.contains("line 2: expected `key = value`") && text.contains("fraud_py"),
        "{text}"
    );
}
