//! Wasm aggregate functions (`riffle:udf@0.2.0`) in batch plans: each equals its own native
//! build (the same crate compiled for the host, run row by row over the same rows: an oracle
//! that shares no code with DataFusion's aggregation or the Wasm call path), with NULLs,
//! FILTER, empty groups, partial/final merging across partitions and the per-row path
//! DataFusion takes when partial aggregation is skipped. Hostile aggregates fail cleanly, and a
//! module built for the 0.1.0 contract still loads. Streaming runs of the same aggregates are
//! in the golden queries (`streaming.rs`).

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::{Float64Type, Int64Type, TimestampMicrosecondType};
use common::*;
use datafusion::datasource::MemTable;
use riffle::RiffleError;
use riffle::connectors::generate::{FraudConfig, FraudGenerator};
use riffle::error::UdfFailureKind;
use riffle::session::RiffleSession;
use riffle::udf::{AggregateStep, RowErrorPolicy};
use riffle_udf::{AggregateState, Timestamp};
use riffle_udfs_fraud::DecayedAvg;
use riffle_udfs_sketch::DdQuantile;

const ROWS: usize = 20_000;

fn transactions() -> RecordBatch {
    FraudGenerator::new(FraudConfig {
        cards: 300,
        ..FraudConfig::default()
    })
    .next_batch_of_ids(ROWS)
}

/// A session with the fraud and sketch modules, and `transactions` split over two partitions
/// of four batches, so that batch plans aggregate partially per partition and then merge.
fn session(tx: &RecordBatch) -> RiffleSession {
    let session = common::session(RowErrorPolicy::Fail);
    for name in ["fraud", "sketch"] {
        session.load_udfs(&udf(name), Vec::new(), None).unwrap();
    }
    let quarter = tx.num_rows() / 4;
    let part = |i: usize| tx.slice(i * quarter, quarter.min(tx.num_rows() - i * quarter));
    let table = MemTable::try_new(
        tx.schema(),
        vec![vec![part(0), part(1)], vec![part(2), part(3)]],
    )
    .unwrap();
    session
        .context()
        .register_table("transactions", Arc::new(table))
        .unwrap();
    session
}

/// Per card, the native aggregates over the rows in table order, NULL amounts skipped.
fn native_per_card(
    tx: &RecordBatch,
    keep: impl Fn(f64) -> bool,
) -> BTreeMap<i64, (DdQuantile, DecayedAvg)> {
    let cards = column::<Int64Type>(tx, "card_id");
    let amounts = column::<Float64Type>(tx, "amount");
    let ts = column::<TimestampMicrosecondType>(tx, "ts");
    let mut out: BTreeMap<i64, (DdQuantile, DecayedAvg)> = BTreeMap::new();
    for i in 0..tx.num_rows() {
        let entry = out.entry(cards.value(i)).or_default();
        if amounts.is_valid(i) && keep(amounts.value(i)) {
            entry.0.update(amounts.value(i), 0.9);
            entry.1.update(amounts.value(i), Timestamp(ts.value(i)));
        }
    }
    out
}

/// Column `name` of `batch` as primitive type `T`.
fn column<'a, T: arrow::datatypes::ArrowPrimitiveType>(
    batch: &'a RecordBatch,
    name: &str,
) -> &'a arrow::array::PrimitiveArray<T> {
    batch.column_by_name(name).unwrap().as_primitive::<T>()
}

fn floats(batch: &RecordBatch, column: usize) -> Vec<Option<f64>> {
    batch
        .column(column)
        .as_primitive::<Float64Type>()
        .iter()
        .collect()
}

fn close(a: Option<f64>, b: Option<f64>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => (a - b).abs() <= 1e-12 * a.abs().max(b.abs()).max(1.0),
        (a, b) => a == b,
    }
}

#[test]
fn wasm_aggregates_in_group_by_equal_their_native_build() {
    let tx = transactions();
    let rt = runtime();
    let session = session(&tx);
    for (filter, keep) in [
        ("", (|_| true) as fn(f64) -> bool),
        (" FILTER (WHERE amount > 1000)", |a| a > 1000.0),
    ] {
        let sql = format!(
            "SELECT card_id, dd_quantile(amount, 0.9){filter} AS p90, \
             decayed_avg(amount, ts){filter} AS recent, count(*) AS n \
             FROM transactions GROUP BY card_id ORDER BY card_id"
        );
        let got = rt.block_on(query(&session, &sql)).unwrap();
        let want = native_per_card(&tx, keep);
        assert_eq!(got.num_rows(), want.len(), "{sql}");
        let cards = got.column(0).as_primitive::<Int64Type>();
        let (p90, recent) = (floats(&got, 1), floats(&got, 2));
        let mut empty_groups = 0;
        for (row, (card, (sketch, decayed))) in want.iter().enumerate() {
            assert_eq!(cards.value(row), *card);
            // The sketch's answer depends only on the multiset of values: bit for bit.
            let expected = sketch.finish().unwrap();
            assert_eq!(
                p90[row].map(f64::to_bits),
                expected.map(f64::to_bits),
                "{sql}: card {card}"
            );
            // The decayed average rescales sums as rows arrive: equal up to rounding.
            assert!(
                close(recent[row], decayed.finish()),
                "{sql}: card {card}: {:?} vs {:?}",
                recent[row],
                decayed.finish()
            );
            empty_groups += usize::from(expected.is_none());
        }
        if filter.is_empty() {
            assert_eq!(empty_groups, 0);
        } else {
            assert!(empty_groups > 0, "FILTER leaves some cards with no rows");
        }
    }
}

#[test]
fn without_group_by_with_nulls_and_over_no_rows() {
    let tx = transactions();
    let rt = runtime();
    let session = session(&tx);
    let got = rt
        .block_on(query(
            &session,
            "SELECT dd_quantile(amount, 0.5), dd_quantile(amount, 0.5) FILTER (WHERE false) \
             FROM transactions",
        ))
        .unwrap();
    let mut whole = DdQuantile::default();
    let amounts = column::<Float64Type>(&tx, "amount");
    assert!(
        amounts.null_count() > 0,
        "the generator writes some NULL amounts"
    );
    for a in amounts.iter().flatten() {
        whole.update(a, 0.5);
    }
    assert_eq!(floats(&got, 0), vec![whole.finish().unwrap()]);
    assert_eq!(floats(&got, 1), vec![None], "a group with no rows is NULL");

    let got = rt
        .block_on(query(
            &session,
            "SELECT dd_quantile(x, 1.5) FROM (VALUES (1.0), (2.0)) t(x)",
        ))
        .unwrap_err();
    match riffle_error(&got) {
        RiffleError::RowError {
            function, message, ..
        } => {
            assert_eq!(function, "dd_quantile");
            assert!(message.contains("not between 0 and 1"), "{message}");
        }
        other => panic!("expected a row error from finish, got {other}"),
    }
}

#[test]
fn one_group_per_row_when_partial_aggregation_is_skipped() {
    let tx = transactions();
    let rt = runtime();
    let session = session(&tx);
    // Make DataFusion give up on partial aggregation at once: every row then becomes its own
    // state (`convert_to_state`) before the final merge.
    for setting in [
        "SET datafusion.execution.skip_partial_aggregation_probe_rows_threshold = 10",
        "SET datafusion.execution.skip_partial_aggregation_probe_ratio_threshold = 0.0",
    ] {
        rt.block_on(session.context().sql(setting)).unwrap();
    }
    let sql = "SELECT card_id, dd_quantile(amount, 0.9) FILTER (WHERE amount > 100) AS p90 \
               FROM transactions GROUP BY card_id ORDER BY card_id";
    let got = rt.block_on(query(&session, sql)).unwrap();
    // The plan really skipped partial aggregation (so states came from `convert_to_state`).
    let plan = rt
        .block_on(query(&session, &format!("EXPLAIN ANALYZE {sql}")))
        .unwrap();
    let text = arrow::util::pretty::pretty_format_batches(&[plan])
        .unwrap()
        .to_string();
    let skipped: u64 = text
        .split("skipped_aggregation_rows=")
        .skip(1)
        .filter_map(|s| {
            s.split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum();
    assert!(skipped > 0, "partial aggregation was not skipped:\n{text}");
    let want = native_per_card(&tx, |a| a > 100.0);
    let p90 = floats(&got, 1);
    for (row, (_, (sketch, _))) in want.iter().enumerate() {
        assert_eq!(p90[row], sketch.finish().unwrap());
    }
}

#[test]
fn the_batch_entry_point_updates_many_groups_in_one_call_and_states_round_trip() {
    let module = module("sketch");
    let index = module.aggregate_index("dd_quantile").unwrap();
    let spec = &module.spec().aggregates[index];
    assert_eq!(
        spec.state_schema(),
        "q DOUBLE NULL, zeros BIGINT, positive BYTEA, negative BYTEA"
    );
    assert!(spec.retractable);
    let values: arrow::array::ArrayRef = Arc::new(arrow::array::Float64Array::from(vec![
        5.0, -1.0, 7.0, 0.0, 5.0,
    ]));
    let q: arrow::array::ArrayRef = Arc::new(arrow::array::Float64Array::from(vec![0.5; 5]));
    let group_of = [0, 1, 0, 2, 2];
    let states = module
        .aggregate(
            index,
            AggregateStep::Update,
            3,
            &[],
            &group_of,
            &[values.clone(), q.clone()],
        )
        .unwrap();
    assert_eq!(states.len(), 4);
    assert!(states.iter().all(|s| s.len() == 3));
    // Retracting the same rows gives back empty states.
    let back = module
        .aggregate(
            index,
            AggregateStep::Retract,
            3,
            &states,
            &group_of,
            &[values, q],
        )
        .unwrap();
    let finished = module.finish(index, 3, &back).unwrap();
    assert_eq!(finished.array.null_count(), 3, "every group is empty again");
    // Merging the three states into one group equals one sketch of all the values.
    let merged = module
        .aggregate(index, AggregateStep::Merge, 1, &[], &[0, 0, 0], &states)
        .unwrap();
    let value = module.finish(index, 1, &merged).unwrap();
    let mut native = DdQuantile::default();
    for v in [5.0, -1.0, 7.0, 0.0, 5.0] {
        native.update(v, 0.5);
    }
    assert_eq!(
        value.array.as_primitive::<Float64Type>().value(0),
        native.finish().unwrap().unwrap()
    );
    assert_eq!(DdQuantile::state_fields().len(), 4);
    let stats = module.aggregate_stats(index);
    assert_eq!((stats.calls, stats.rows), (5, 13));
}

#[test]
fn hostile_aggregates_fail_cleanly_with_the_aggregate_named() {
    let tx = transactions();
    let rt = runtime();
    let session = session(&tx);
    session
        .load_udfs(&udf("hostile"), Vec::new(), None)
        .unwrap();
    let cases = [
        // A state that grows by a megabyte a row outgrows the 64 MiB sandbox.
        ("SELECT hoard(tx_id) FROM transactions", "hoard"),
        // Partial states from two partitions are merged: merge panics.
        (
            "SELECT card_id, merge_boom(tx_id) FROM transactions GROUP BY card_id",
            "merge_boom",
        ),
    ];
    for (sql, name) in cases {
        let err = rt.block_on(query(&session, sql)).unwrap_err();
        match riffle_error(&err) {
            RiffleError::UdfFailure {
                function,
                kind,
                detail,
                ..
            } => {
                assert_eq!(function, name, "{err}");
                match name {
                    "hoard" => assert!(
                        matches!(kind, UdfFailureKind::OutOfMemory(_)),
                        "{kind:?}: {detail}"
                    ),
                    _ => assert!(detail.contains("panicked on purpose"), "{detail}"),
                }
            }
            other => panic!("{sql}: expected a UDF failure, got {other}"),
        }
    }
    // The session and its modules keep serving.
    let ok = rt
        .block_on(query(
            &session,
            "SELECT count(*), dd_quantile(amount, 0.5) FROM transactions",
        ))
        .unwrap();
    assert_eq!(
        ok.column(0).as_primitive::<Int64Type>().value(0),
        ROWS as i64
    );
}

#[test]
fn a_module_built_for_contract_0_1_0_still_loads_and_runs() {
    let module = module("legacy");
    assert_eq!(module.spec().abi_version, 1);
    assert!(module.spec().aggregates.is_empty());
    let rt = runtime();
    let session = common::session(RowErrorPolicy::Fail);
    session.load_udfs(&udf("legacy"), Vec::new(), None).unwrap();
    let got = rt
        .block_on(query(
            &session,
            "SELECT legacy_triple(x) FROM (VALUES (1), (NULL), (-4)) t(x)",
        ))
        .unwrap();
    let values: Vec<Option<i64>> = got.column(0).as_primitive::<Int64Type>().iter().collect();
    assert_eq!(values, vec![Some(3), None, Some(-12)]);
}

#[test]
fn a_sliding_over_window_takes_rows_back_out_with_retract() {
    let tx = transactions();
    let rt = runtime();
    let session = session(&tx);
    let got = rt
        .block_on(query(
            &session,
            "SELECT tx_id, dd_quantile(amount, 0.5) OVER (PARTITION BY card_id ORDER BY ts, tx_id \
             ROWS BETWEEN 3 PRECEDING AND CURRENT ROW) AS med4 FROM transactions",
        ))
        .unwrap();
    // Oracle: per card in (ts, tx_id) order, a fresh native sketch of each row's frame.
    let cards = column::<Int64Type>(&tx, "card_id");
    let ids = column::<Int64Type>(&tx, "tx_id");
    let amounts = column::<Float64Type>(&tx, "amount");
    let ts = column::<TimestampMicrosecondType>(&tx, "ts");
    let mut rows: Vec<usize> = (0..tx.num_rows()).collect();
    rows.sort_by_key(|&i| (cards.value(i), ts.value(i), ids.value(i)));
    let mut want: Vec<(i64, Option<u64>)> = Vec::new();
    for (n, &i) in rows.iter().enumerate() {
        let mut sketch = DdQuantile::default();
        for &j in &rows[n.saturating_sub(3)..=n] {
            if cards.value(j) == cards.value(i) && amounts.is_valid(j) {
                sketch.update(amounts.value(j), 0.5);
            }
        }
        want.push((ids.value(i), sketch.finish().unwrap().map(f64::to_bits)));
    }
    let got_ids = got.column(0).as_primitive::<Int64Type>();
    let mut got: Vec<(i64, Option<u64>)> = floats(&got, 1)
        .into_iter()
        .enumerate()
        .map(|(r, v)| (got_ids.value(r), v.map(f64::to_bits)))
        .collect();
    got.sort_unstable();
    want.sort_unstable();
    assert_eq!(got.len(), ROWS);
    assert!(got == want, "every frame's median, bit for bit");
}
