//! NULLs and per-row errors for every supported type, through SQL and through the raw call
//! path, plus a property test of the Arrow <-> Wasm round trip over sliced arrays.

mod common;

use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, BinaryArray, BooleanArray, Date32Array, Float32Array, Float64Array,
    Int32Array, Int64Array, RecordBatch, StringArray, TimestampMicrosecondArray,
};
use arrow::datatypes::{Field, Int32Type, Int64Type, Schema};
use common::*;
use datafusion::datasource::MemTable;
use proptest::prelude::*;
use riffle::RiffleError;
use riffle::udf::RowErrorPolicy;

/// Per type: a column with good values, a bad value (row error) and NULLs, and the type name
/// used in the fixture function names.
fn columns() -> Vec<(&'static str, ArrayRef)> {
    vec![
        (
            "bool",
            Arc::new(BooleanArray::from(vec![
                Some(true),
                Some(false),
                None,
                Some(true),
            ])),
        ),
        (
            "int32",
            Arc::new(Int32Array::from(vec![
                Some(7),
                Some(-1),
                None,
                Some(i32::MAX),
            ])),
        ),
        (
            "int64",
            Arc::new(Int64Array::from(vec![
                Some(7),
                Some(-1),
                None,
                Some(i64::MAX),
            ])),
        ),
        (
            "float32",
            Arc::new(Float32Array::from(vec![
                Some(1.5),
                Some(f32::NAN),
                None,
                Some(0.0),
            ])),
        ),
        (
            "float64",
            Arc::new(Float64Array::from(vec![
                Some(1.5),
                Some(-2.0),
                None,
                Some(1e300),
            ])),
        ),
        (
            "utf8",
            Arc::new(StringArray::from(vec![
                Some("héllo"),
                Some(""),
                None,
                Some("z"),
            ])),
        ),
        (
            "binary",
            Arc::new(BinaryArray::from(vec![
                Some(&b"\x00\xff"[..]),
                Some(&b""[..]),
                None,
                Some(&b"b"[..]),
            ])),
        ),
        (
            "timestamp",
            Arc::new(TimestampMicrosecondArray::from(vec![
                Some(1_700_000_000_000_000),
                Some(-1),
                None,
                Some(0),
            ])),
        ),
        (
            "date",
            Arc::new(Date32Array::from(vec![
                Some(20_000),
                Some(-5),
                None,
                Some(0),
            ])),
        ),
    ]
}

/// Row 1 of every column is its bad value, row 2 its NULL.
const BAD: usize = 1;
const NULL: usize = 2;

async fn session_with_columns(policy: RowErrorPolicy) -> riffle::session::RiffleSession {
    let session = session(policy);
    let cols = columns();
    let schema = Arc::new(Schema::new(
        cols.iter()
            .map(|(name, a)| Field::new(*name, a.data_type().clone(), true))
            .collect::<Vec<_>>(),
    ));
    let batch =
        RecordBatch::try_new(schema.clone(), cols.into_iter().map(|(_, a)| a).collect()).unwrap();
    let table = MemTable::try_new(schema, vec![vec![batch]]).unwrap();
    session
        .context()
        .register_table("t", Arc::new(table))
        .unwrap();
    session
        .load_udfs(&udf("conformance"), Vec::new(), None)
        .unwrap();
    session
}

#[tokio::test]
async fn identity_functions_round_trip_every_type_with_nulls() {
    let session = session_with_columns(RowErrorPolicy::Fail).await;
    for (ty, input) in columns() {
        let out = query(
            &session,
            &format!("SELECT id_{ty}({ty}) AS v, strict_{ty}({ty}) AS s FROM t"),
        )
        .await
        .unwrap();
        // Option<T> sees the NULL and returns it; T skips the NULL row and yields NULL.
        assert_eq!(out.column(0).to_data(), input.to_data(), "id_{ty}");
        assert_eq!(out.column(1).to_data(), input.to_data(), "strict_{ty}");
        assert!(out.column(0).is_null(NULL) && out.column(1).is_null(NULL));
    }
}

#[tokio::test]
async fn row_errors_follow_the_policy_for_every_type() {
    let nulls = session_with_columns(RowErrorPolicy::Null).await;
    let fails = session_with_columns(RowErrorPolicy::Fail).await;
    for (ty, input) in columns() {
        let sql = format!("SELECT check_{ty}({ty}) AS v FROM t");
        let out = query(&nulls, &sql).await.unwrap();
        let v = out.column(0);
        for row in 0..input.len() {
            if row == BAD || row == NULL {
                assert!(v.is_null(row), "check_{ty} row {row} should be NULL");
            } else {
                assert_eq!(
                    v.slice(row, 1).to_data(),
                    input.slice(row, 1).to_data(),
                    "check_{ty} row {row}"
                );
            }
        }
        let err = fails.sql(&sql).await.unwrap_err();
        match riffle_error(&err) {
            RiffleError::RowError {
                function,
                row,
                message,
                ..
            } => {
                assert_eq!(function, &format!("check_{ty}"));
                assert_eq!(*row, BAD);
                assert!(message.starts_with("bad value"), "{message}");
            }
            other => panic!("check_{ty}: expected a row error, got {other}"),
        }
    }
}

#[tokio::test]
async fn several_nullable_arguments_and_zero_arguments() {
    let session = session_with_columns(RowErrorPolicy::Fail).await;
    let out = query(
        &session,
        "SELECT count_nulls(int64, utf8, float64) AS n, forty_two() AS c FROM t",
    )
    .await
    .unwrap();
    let n = out.column(0).as_primitive::<Int32Type>();
    assert_eq!(n.values().to_vec(), vec![0, 0, 3, 0]);
    let c = out.column(1).as_primitive::<Int64Type>();
    assert_eq!(c.values().to_vec(), vec![42; 4]);
    // Arguments are cast to the declared types: an INT column where BIGINT is declared.
    let out = query(&session, "SELECT id_int64(int32) AS v FROM t")
        .await
        .unwrap();
    assert_eq!(out.column(0).as_primitive::<Int64Type>().value(0), 7);
    // An impossible cast fails at planning time, quoting the signature.
    let err = session
        .sql("SELECT id_date(bool) FROM t")
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("id_date(x DATE NULL) -> DATE NULL"), "{err}");
}

fn arrays() -> impl Strategy<Value = (ArrayRef, usize, usize)> {
    let len = 0usize..300;
    (len, 0usize..9, any::<bool>()).prop_flat_map(move |(len, kind, nullable)| {
        // Arrays without NULLs must carry no validity bitmap at all: a separate strategy.
        let value = if nullable {
            prop::option::weighted(0.8, any::<i64>()).boxed()
        } else {
            any::<i64>().prop_map(Some).boxed()
        };
        (prop::collection::vec(value, len), Just(kind)).prop_flat_map(|(values, kind)| {
            let n = values.len();
            let array: ArrayRef = match kind {
                0 => Arc::new(
                    values
                        .iter()
                        .map(|v| v.map(|x| x & 1 == 0))
                        .collect::<BooleanArray>(),
                ),
                1 => Arc::new(
                    values
                        .iter()
                        .map(|v| v.map(|x| x as i32))
                        .collect::<Int32Array>(),
                ),
                2 => Arc::new(values.iter().copied().collect::<Int64Array>()),
                3 => Arc::new(
                    values
                        .iter()
                        .map(|v| v.map(|x| x as f32))
                        .collect::<Float32Array>(),
                ),
                4 => Arc::new(
                    values
                        .iter()
                        .map(|v| v.map(|x| f64::from_bits(x as u64)))
                        .collect::<Float64Array>(),
                ),
                5 => Arc::new(
                    values
                        .iter()
                        .map(|v| v.map(|x| format!("ü{}", x % 1000)))
                        .collect::<StringArray>(),
                ),
                6 => Arc::new(
                    values
                        .iter()
                        .map(|v| v.map(|x| x.to_le_bytes()[..(x as usize & 7)].to_vec()))
                        .collect::<BinaryArray>(),
                ),
                7 => Arc::new(
                    values
                        .iter()
                        .copied()
                        .collect::<TimestampMicrosecondArray>(),
                ),
                _ => Arc::new(
                    values
                        .iter()
                        .map(|v| v.map(|x| x as i32))
                        .collect::<Date32Array>(),
                ),
            };
            (Just(array), 0..=n).prop_flat_map(|(array, start)| {
                let rest = array.len() - start;
                (Just(array), Just(start), 0..=rest)
            })
        })
    })
}

const TYPES: [&str; 9] = [
    "bool",
    "int32",
    "int64",
    "float32",
    "float64",
    "utf8",
    "binary",
    "timestamp",
    "date",
];

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 200,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// Any slice of any array (odd offsets, sliced validity bitmaps and string offsets) comes
    /// back from the identity UDF exactly as it went in.
    #[test]
    fn abi_round_trip_of_sliced_arrays((array, start, len) in arrays()) {
        static MODULE: std::sync::OnceLock<Arc<riffle::udf::UdfModule>> = std::sync::OnceLock::new();
        let module = MODULE.get_or_init(|| module("conformance"));
        let kind = TYPES.iter().position(|t| {
            let spec = &module.spec().functions[module.function_index(&format!("id_{t}")).unwrap()];
            spec.args[0].data_type.arrow() == *array.data_type()
        }).unwrap();
        let slice = array.slice(start, len);
        let index = module.function_index(&format!("id_{}", TYPES[kind])).unwrap();
        let out = module.call(index, len, std::slice::from_ref(&slice)).unwrap();
        prop_assert!(out.row_errors.is_empty());
        // Compare logically: the output is freshly laid out, the input is a slice.
        let expected = arrow::compute::concat(&[slice.as_ref()]).unwrap();
        prop_assert_eq!(out.array.to_data(), expected.to_data());
    }
}
