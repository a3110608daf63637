//! The spine end to end: the fraud UDFs, built from source to Wasm, run inside DataFusion SQL
//! over Parquet and return exactly (bit for bit) what the same functions return natively.

mod common;

use std::sync::Arc;

use arrow::array::{Array, AsArray, Float64Array, RecordBatch, StringArray};
use arrow::datatypes::{Float64Type, Int64Type, TimestampMicrosecondType};
use common::*;
use datafusion::execution::FunctionRegistry;
use datafusion::prelude::col;
use riffle::RiffleError;
use riffle::connectors::files::write_file;
use riffle::connectors::generate::{FraudConfig, FraudGenerator};
use riffle::error::UdfFailureKind;
use riffle::udf::RowErrorPolicy;
use riffle_udf::Timestamp;

/// 3 full batches and a partial one, with NULLs and negative amounts in them.
const ROWS: usize = 3 * 8192 + 1234;

fn generated() -> Vec<RecordBatch> {
    let mut generator = FraudGenerator::new(FraudConfig::default());
    vec![
        generator.next_batch(10_000),
        generator.next_batch(ROWS - 10_000),
    ]
}

async fn session_over_parquet(
    policy: RowErrorPolicy,
) -> (riffle::session::RiffleSession, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tx.parquet");
    write_file(&path, FraudGenerator::schema(), generated()).unwrap();
    let session = session(policy);
    session.register_table("tx", &path).await.unwrap();
    (session, dir)
}

#[tokio::test]
async fn fraud_udfs_in_sql_equal_native_bit_for_bit() {
    let (session, _dir) = session_over_parquet(RowErrorPolicy::Null).await;
    let script = format!(
        "CREATE FUNCTIONS FROM '{}';
         SELECT tx_id,
                risk_score(amount, country) AS risk,
                haversine_km(lat, lon, home_lat, home_lon) AS km,
                amount_bucket(amount) AS bucket,
                is_night(ts) AS night
         FROM tx ORDER BY tx_id",
        udf("fraud").display()
    );
    let out = query(&session, &script).await.unwrap();
    assert_eq!(out.num_rows(), ROWS);

    let input = arrow::compute::concat_batches(&FraudGenerator::schema(), &generated()).unwrap();
    let amount = input
        .column_by_name("amount")
        .unwrap()
        .as_primitive::<Float64Type>();
    let country = input.column_by_name("country").unwrap().as_string::<i32>();
    let ts = input
        .column_by_name("ts")
        .unwrap()
        .as_primitive::<TimestampMicrosecondType>();
    let f = |name: &str| {
        input
            .column_by_name(name)
            .unwrap()
            .as_primitive::<Float64Type>()
            .clone()
    };
    let (lat, lon, hlat, hlon) = (f("lat"), f("lon"), f("home_lat"), f("home_lon"));

    let risk = out
        .column_by_name("risk")
        .unwrap()
        .as_primitive::<Float64Type>();
    let km = out
        .column_by_name("km")
        .unwrap()
        .as_primitive::<Float64Type>();
    let bucket = out.column_by_name("bucket").unwrap().as_string::<i32>();
    let night = out.column_by_name("night").unwrap().as_boolean();
    let ids = out
        .column_by_name("tx_id")
        .unwrap()
        .as_primitive::<Int64Type>();

    let (mut nulls, mut errors) = (0, 0);
    for row in 0..ROWS {
        assert_eq!(ids.value(row), row as i64);
        // NULL in a non-Option argument gives NULL without a call.
        let native_risk = match (amount.is_valid(row), country.is_valid(row)) {
            (true, true) => Some(riffle_udfs_fraud::risk_score(
                amount.value(row),
                country.value(row),
            )),
            _ => None,
        };
        let wasm_risk = risk.is_valid(row).then(|| risk.value(row));
        assert_eq!(
            native_risk.map(f64::to_bits),
            wasm_risk.map(f64::to_bits),
            "risk_score row {row}"
        );
        nulls += usize::from(native_risk.is_none());

        let native_km = riffle_udfs_fraud::haversine_km(
            lat.value(row),
            lon.value(row),
            hlat.value(row),
            hlon.value(row),
        );
        assert_eq!(
            native_km.to_bits(),
            km.value(row).to_bits(),
            "haversine row {row}"
        );

        // Row errors become NULL under the `null` policy.
        let native_bucket = amount
            .is_valid(row)
            .then(|| riffle_udfs_fraud::amount_bucket(amount.value(row)))
            .and_then(|r| r.inspect_err(|_| errors += 1).ok());
        assert_eq!(
            native_bucket.as_deref(),
            bucket.is_valid(row).then(|| bucket.value(row)),
            "bucket row {row}"
        );

        assert_eq!(
            riffle_udfs_fraud::is_night(Timestamp(ts.value(row))),
            night.value(row)
        );
    }
    assert!(
        nulls > 0 && errors > 0,
        "the data must exercise NULLs ({nulls}) and row errors ({errors})"
    );

    // The module's counters saw one call per batch, not one per row.
    let module = &session.modules()[0];
    let stats = module.stats(module.function_index("risk_score").unwrap());
    assert_eq!(stats.rows, ROWS as u64);
    assert!(
        stats.calls >= 4 && stats.calls <= 16,
        "calls per batch, got {}",
        stats.calls
    );
    assert_eq!(
        module
            .stats(module.function_index("amount_bucket").unwrap())
            .row_errors,
        errors as u64
    );
}

#[tokio::test]
async fn udfs_work_from_the_dataframe_api() {
    let (session, _dir) = session_over_parquet(RowErrorPolicy::Fail).await;
    session
        .load_udfs(&udf("fraud"), Vec::new(), Some(&["risk_score".to_string()]))
        .unwrap();
    let ctx = session.context();
    let risk = ctx.udf("risk_score").unwrap();
    let df = ctx
        .table("tx")
        .await
        .unwrap()
        .filter(col("tx_id").lt(datafusion::prelude::lit(100i64)))
        .unwrap()
        .select(vec![
            col("tx_id"),
            risk.call(vec![col("amount"), col("country")]).alias("risk"),
        ])
        .unwrap();
    let batches = df.collect().await.unwrap();
    let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
    assert_eq!(rows, 100);
    // Only the named function was registered.
    assert!(ctx.udf("haversine_km").is_err());
}

#[tokio::test]
async fn row_errors_fail_the_query_by_default_naming_the_udf() {
    let (session, _dir) = session_over_parquet(RowErrorPolicy::Fail).await;
    session.load_udfs(&udf("fraud"), Vec::new(), None).unwrap();
    let err = session
        .sql("SELECT amount_bucket(amount) FROM tx")
        .await
        .unwrap_err();
    match riffle_error(&err) {
        RiffleError::RowError {
            function,
            hash,
            message,
            ..
        } => {
            assert_eq!(function, "amount_bucket");
            assert_eq!(hash.len(), 64);
            assert!(message.contains("invalid amount -"), "{message}");
        }
        other => panic!("expected a row error, got {other}"),
    }
    // The same session keeps working.
    let ok = query(&session, "SELECT count(*) AS n FROM tx WHERE amount >= 0")
        .await
        .unwrap();
    assert!(ok.column(0).as_primitive::<Int64Type>().value(0) > 0);
}

#[tokio::test]
async fn init_configuration_reaches_every_instance_and_bad_configuration_is_rejected() {
    let config = "intercept = -2\ncountry.US = 1.5\n";
    let module = engine()
        .load_with_config(&udf("fraud"), config.as_bytes().to_vec())
        .unwrap();
    let model = riffle_udfs_fraud::Model::parse(config).unwrap();
    let amounts = Arc::new(Float64Array::from(vec![10.0, 500.0, 5000.0]));
    let countries = Arc::new(StringArray::from(vec!["US", "NG", "US"]));
    let out = module.call(0, 3, &[amounts, countries]).unwrap();
    let got = out.array.as_primitive::<Float64Type>();
    for (i, (a, c)) in [(10.0, "US"), (500.0, "NG"), (5000.0, "US")]
        .into_iter()
        .enumerate()
    {
        assert_eq!(got.value(i).to_bits(), model.score(a, c).to_bits());
        assert_ne!(
            got.value(i),
            riffle_udfs_fraud::Model::default().score(a, c)
        );
    }

    let err = engine()
        .load_with_config(&udf("fraud"), b"intercept = -2\nweights = 3\n".to_vec())
        .unwrap_err();
    match &err {
        RiffleError::UdfFailure {
            kind: UdfFailureKind::Init,
            detail,
            ..
        } => {
            assert!(
                detail.contains("line 2") && detail.contains("weights"),
                "{detail}"
            );
        }
        other => panic!("expected an init failure, got {other}"),
    }
}

#[tokio::test]
async fn csv_and_json_tables_work_too_and_bad_tables_are_clear() {
    let dir = tempfile::tempdir().unwrap();
    let batch = FraudGenerator::new(FraudConfig::default()).next_batch(500);
    for ext in ["csv", "json"] {
        let path = dir.path().join(format!("tx.{ext}"));
        write_file(&path, batch.schema(), vec![batch.clone()]).unwrap();
        let session = session(RowErrorPolicy::Null);
        session.register_table("tx", &path).await.unwrap();
        session.load_udfs(&udf("text"), Vec::new(), None).unwrap();
        let out = query(
            &session,
            "SELECT normalize_email(email) AS e FROM tx WHERE email IS NOT NULL",
        )
        .await
        .unwrap();
        let e = out.column(0).as_string::<i32>();
        assert!(e.len() > 400);
        for v in e.iter().flatten() {
            assert!(
                !v.contains('+') && v == v.to_lowercase() && !v.starts_with(' '),
                "{v}"
            );
        }
    }
    let session = session(RowErrorPolicy::Null);
    let missing = session
        .register_table("t", &dir.path().join("nope.parquet"))
        .await
        .unwrap_err();
    assert!(missing.to_string().contains("does not exist"), "{missing}");
    let unknown = dir.path().join("t.xlsx");
    std::fs::write(&unknown, b"x").unwrap();
    let err = session.register_table("t", &unknown).await.unwrap_err();
    assert!(err.to_string().contains("unknown file format"), "{err}");
}

#[tokio::test]
async fn a_module_that_needs_configuration_says_so_and_can_still_be_described() {
    let engine = engine();
    // Describing runs no init hook.
    let (hash, spec) = engine.describe(&udf("configured")).unwrap();
    assert!(spec.has_init && hash.len() == 64);
    assert_eq!(spec.functions[0].signature(), "scaled(x DOUBLE) -> DOUBLE");

    // Loading without its configuration fails with the module's own words.
    let err = engine.load(&udf("configured")).unwrap_err();
    match &err {
        RiffleError::UdfFailure {
            kind: UdfFailureKind::Init,
            detail,
            ..
        } => {
            assert!(detail.contains("configuration required"), "{detail}");
        }
        other => panic!("expected an init failure, got {other}"),
    }

    // With it, every instance (here: two concurrent queries' worth) is configured.
    let session = session(RowErrorPolicy::Fail);
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("scale.txt");
    std::fs::write(&config, "scale = 2.5\n").unwrap();
    let script = format!(
        "CREATE FUNCTIONS FROM '{}' WITH CONFIG '{}';
         SELECT scaled(x) AS y FROM (VALUES (1.0), (4.0)) AS t(x)",
        udf("configured").display(),
        config.display()
    );
    let out = query(&session, &script).await.unwrap();
    assert_eq!(
        out.column(0)
            .as_primitive::<Float64Type>()
            .values()
            .to_vec(),
        vec![2.5, 10.0]
    );
}
