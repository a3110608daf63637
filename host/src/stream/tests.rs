//! The driver with a sink whose output is acknowledged after `write_epoch` returns
//! ([`Sink::acknowledgement`], as the at-least-once Kafka sink's): the next epochs run while an
//! acknowledgement is due, the epoch commits only once it came, and a failed one leaves that
//! epoch and every later one uncommitted, to run again. And with a sink that carries the plans
//! ([`Sink::carries_plans`], as the exactly-once Kafka sink's): a plan the checkpoint lost
//! comes back from it. And the late-row split the driver makes before the operators.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use arrow::array::{Array, AsArray, Int64Array, RecordBatch};
use arrow::datatypes::{DataType, Field, Int64Type, Schema, SchemaRef};

use super::*;
use crate::checkpoint::status;
use crate::connectors::memory::ReplaySource;
use crate::session::SessionOptions;

/// Each epoch's acknowledgement: held while its epoch is in `held`, failed if it is in
/// `failing`, else given.
#[derive(Default)]
struct Broker {
    state: Mutex<BrokerState>,
    changed: Condvar,
}

#[derive(Default)]
struct BrokerState {
    /// Epochs written, in order.
    written: Vec<u64>,
    /// Epochs whose acknowledgement is being waited for now.
    awaited: BTreeSet<u64>,
    held: BTreeSet<u64>,
    failing: BTreeSet<u64>,
    /// Rows by epoch (a replayed epoch replaces its rows).
    rows: BTreeMap<u64, Vec<i64>>,
    /// The plans carried with each epoch written.
    carried: BTreeMap<u64, Vec<serde_json::Value>>,
    /// The plans a carrying sink says it recorded with the last epoch it holds.
    recorded: Vec<serde_json::Value>,
}

impl Broker {
    /// Waits until `done` holds, failing the test (instead of hanging it) if it never does.
    fn wait_until(&self, what: &str, done: impl Fn(&BrokerState) -> bool) {
        let state = self.state.lock().unwrap();
        let (state, timeout) = self
            .changed
            .wait_timeout_while(state, Duration::from_secs(120), |s| !done(s))
            .unwrap();
        drop(state);
        assert!(!timeout.timed_out(), "never happened: {what}");
    }

    fn update(&self, f: impl FnOnce(&mut BrokerState)) {
        f(&mut self.state.lock().unwrap());
        self.changed.notify_all();
    }

    fn write(&self, epoch: u64, batches: &[RecordBatch]) {
        let rows = batches
            .iter()
            .flat_map(|b| b.column(0).as_primitive::<Int64Type>().values().to_vec())
            .collect();
        self.update(|s| {
            s.written.push(epoch);
            s.rows.insert(epoch, rows);
        });
    }
}

struct AcknowledgedSink(Arc<Broker>);

#[async_trait::async_trait]
impl Sink for AcknowledgedSink {
    async fn write_epoch(
        &mut self,
        epoch: u64,
        _schema: &SchemaRef,
        batches: &[RecordBatch],
    ) -> Result<()> {
        self.0.write(epoch, batches);
        Ok(())
    }

    fn acknowledgement(&mut self, epoch: u64) -> Option<Acknowledgement> {
        let broker = self.0.clone();
        Some(Box::new(move || {
            broker.update(|s| {
                s.awaited.insert(epoch);
            });
            let state = broker.state.lock().unwrap();
            let mut state = broker
                .changed
                .wait_while(state, |s| s.held.contains(&epoch))
                .unwrap();
            state.awaited.remove(&epoch);
            if state.failing.contains(&epoch) {
                return Err(RiffleError::External(format!(
                    "broker refused epoch {epoch}"
                )));
            }
            Ok(())
        }))
    }

    fn keeps_replayed_epochs(&self) -> bool {
        false
    }
}

/// A sink that keeps the epochs it holds and carries the plans not yet durable. (It writes
/// a replayed epoch again, so that a test sees what the replay read.)
struct CarryingSink(Arc<Broker>, Vec<serde_json::Value>);

#[async_trait::async_trait]
impl Sink for CarryingSink {
    async fn write_epoch(
        &mut self,
        epoch: u64,
        _schema: &SchemaRef,
        batches: &[RecordBatch],
    ) -> Result<()> {
        self.0.write(epoch, batches);
        let plans = std::mem::take(&mut self.1);
        self.0.update(|s| {
            s.carried.insert(epoch, plans);
        });
        Ok(())
    }

    fn carries_plans(&self) -> bool {
        true
    }

    fn carry_plans(&mut self, plans: Vec<serde_json::Value>) {
        self.1 = plans;
    }

    fn carried_plans(&self) -> Vec<serde_json::Value> {
        self.0.state.lock().unwrap().recorded.clone()
    }
}

/// Four epochs of 10 rows each: 0..40.
fn batches() -> Vec<RecordBatch> {
    let schema = Arc::new(Schema::new(vec![Field::new("x", DataType::Int64, false)]));
    (0..4)
        .map(|e| {
            RecordBatch::try_new(
                schema.clone(),
                vec![Arc::new(Int64Array::from_iter_values(e * 10..e * 10 + 10))],
            )
            .unwrap()
        })
        .collect()
}

/// A checkpoint directory to use (in a directory dropped with the first value) and a broker.
fn setup() -> (tempfile::TempDir, PathBuf, Arc<Broker>) {
    let dir = tempfile::tempdir().unwrap();
    let checkpoint = dir.path().join("checkpoint");
    (dir, checkpoint, Arc::new(Broker::default()))
}

/// Runs the query into `sink` until its input ends.
async fn run(checkpoint: &std::path::Path, sink: Box<dyn Sink>) -> Result<RunSummary> {
    query_into(checkpoint, sink)
        .await
        .run(&AtomicBool::new(false))
        .await
}

async fn query_into(checkpoint: &std::path::Path, sink: Box<dyn Sink>) -> StreamingQuery {
    let session = RiffleSession::new(SessionOptions::default()).unwrap();
    let batches = batches();
    let source = ReplaySource::new(batches[0].schema(), batches);
    let input = StreamInput::register(&session, "t", Box::new(source)).unwrap();
    let plan = session
        .context()
        .state()
        .create_logical_plan("SELECT x FROM t")
        .await
        .unwrap();
    StreamingQuery::new(
        &session,
        vec![input],
        plan,
        sink,
        StreamOptions {
            trigger: Trigger::AvailableNow,
            checkpoint: checkpoint.to_path_buf(),
            ..StreamOptions::default()
        },
    )
    .await
    .unwrap()
}

fn committed(checkpoint: &std::path::Path) -> (u64, Vec<u64>) {
    let s = status::read(checkpoint, None).unwrap();
    (
        s.last_commit.map_or(0, |c| c.epoch),
        s.uncommitted.iter().map(|p| p.epoch).collect(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn later_epochs_run_while_one_waits_for_its_acknowledgement_and_it_commits_after() {
    let (_dir, checkpoint, broker) = setup();
    broker.update(|s| {
        s.held.insert(2);
    });
    let mut q = query_into(&checkpoint, Box::new(AcknowledgedSink(broker.clone()))).await;
    let look = {
        let (broker, checkpoint) = (broker.clone(), checkpoint.clone());
        tokio::task::spawn_blocking(move || {
            broker.wait_until("epoch 4 written while epoch 2 waits", |s| {
                s.written.contains(&4) && s.awaited.contains(&2)
            });
            // The commit writer is inside epoch 2's commit: epoch 1's is made, 2's is not.
            let (last, uncommitted) = committed(&checkpoint);
            assert_eq!(last, 1);
            assert_eq!(uncommitted.first(), Some(&2), "{uncommitted:?}");
            broker.update(|s| {
                s.held.clear();
            });
        })
    };
    let summary = q.run(&AtomicBool::new(false)).await.unwrap();
    look.await.unwrap();
    assert_eq!(summary.epochs, 4);
    assert_eq!(committed(&checkpoint), (4, vec![]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_acknowledgement_leaves_its_epoch_and_every_later_one_to_run_again() {
    let (_dir, checkpoint, broker) = setup();
    broker.update(|s| {
        s.failing.insert(2);
    });
    let err = run(&checkpoint, Box::new(AcknowledgedSink(broker.clone())))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("broker refused epoch 2"), "{err}");
    let (last, uncommitted) = committed(&checkpoint);
    assert_eq!(
        last, 1,
        "epochs after the failed one committed: {uncommitted:?}"
    );

    broker.update(|s| {
        s.failing.clear();
        s.written.clear();
    });
    run(&checkpoint, Box::new(AcknowledgedSink(broker.clone())))
        .await
        .unwrap();
    let state = broker.state.lock().unwrap();
    assert_eq!(state.written.first(), Some(&2), "{:?}", state.written);
    assert_eq!(
        state.rows.values().flatten().copied().collect::<Vec<_>>(),
        (0..40).collect::<Vec<_>>()
    );
    drop(state);
    assert_eq!(committed(&checkpoint), (4, vec![]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plan_the_checkpoint_lost_comes_back_from_the_sink_that_carried_it() {
    let (_dir, checkpoint, broker) = setup();
    let carrying = || Box::new(CarryingSink(broker.clone(), Vec::new()));
    run(&checkpoint, carrying()).await.unwrap();
    // Each epoch carried the plans not yet durable when it was written, in order, its own
    // last; or none, when the plan writer (a thread of its own) had already made its own plan
    // durable, and with it every earlier one.
    let carried = broker.state.lock().unwrap().carried.clone();
    assert_eq!(carried.len(), 4, "{carried:?}");
    for (epoch, plans) in &carried {
        let epochs: Vec<u64> = plans
            .iter()
            .map(|p| {
                serde_json::from_value::<EpochPlan>(p.clone())
                    .unwrap()
                    .epoch
            })
            .collect();
        let from = epoch + 1 - epochs.len() as u64;
        assert_eq!(epochs, (from..=*epoch).collect::<Vec<_>>(), "epoch {epoch}");
    }

    // A crash took epoch 4's plan and commit, and the sink recorded for epoch 4 a plan that
    // does not end the input: one the driver would not make now (planned anew, epoch 4 would
    // be the last), so that the test sees which plan ran.
    assert_eq!(committed(&checkpoint), (4, vec![]));
    let plan_file = |epoch: u64| checkpoint.join(format!("offsets/{epoch:010}.json"));
    let mut plan4: EpochPlan =
        serde_json::from_slice(&std::fs::read(plan_file(4)).unwrap()).unwrap();
    assert!(plan4.last);
    plan4.last = false;
    std::fs::remove_file(plan_file(4)).unwrap();
    std::fs::remove_file(checkpoint.join(format!("commits/{:010}.json", 4))).unwrap();
    broker.update(|s| {
        s.recorded = vec![serde_json::to_value(&plan4).unwrap()];
        s.written.clear();
    });
    run(&checkpoint, carrying()).await.unwrap();
    {
        let state = broker.state.lock().unwrap();
        assert_eq!(state.written, vec![4, 5]);
        assert_eq!(state.rows[&4], (30..40).collect::<Vec<_>>());
        assert!(state.rows[&5].is_empty());
    }
    assert_eq!(committed(&checkpoint), (5, vec![]));

    // A recorded plan that contradicts the checkpoint's stops the query.
    let (last, _) = committed(&checkpoint);
    std::fs::remove_file(checkpoint.join(format!("commits/{last:010}.json"))).unwrap();
    let mut other =
        serde_json::from_slice::<EpochPlan>(&std::fs::read(plan_file(last)).unwrap()).unwrap();
    other.last = !other.last;
    broker.update(|s| s.recorded = vec![serde_json::to_value(&other).unwrap()]);
    let err = run(&checkpoint, carrying()).await.unwrap_err();
    assert!(
        err.to_string()
            .contains("plan differs from its sink's record"),
        "{err}"
    );
}

/// The late-row split against a row-by-row reference: on time is `t >= watermark`, a NULL
/// time is on time, and `None` means every row is (no mask to build or apply).
#[test]
fn rows_on_time_are_those_at_or_after_the_watermark_and_untimed_ones() {
    let reference = |ts: &Int64Array, w: Watermark| -> Vec<bool> {
        ts.iter().map(|t| t.is_none_or(|t| !w.is_late(t))).collect()
    };
    let cases: Vec<(Vec<Option<i64>>, i64)> = vec![
        (vec![Some(5), Some(9), Some(7)], 5),
        (vec![Some(5), Some(4), None, Some(6)], 5),
        (vec![None, None], 5),
        (vec![], 5),
        (vec![Some(1), Some(2)], 10),
        (vec![None, Some(-3), Some(i64::MAX)], 0),
    ];
    for (times, w) in cases {
        let ts = Int64Array::from(times.clone());
        let w = Watermark(w);
        let expected = reference(&ts, w);
        match on_time(&ts, w).unwrap() {
            None => assert!(
                expected.iter().all(|k| *k),
                "{times:?} at {w:?}: a row is late"
            ),
            Some(mask) => {
                assert_eq!(
                    mask.null_count(),
                    0,
                    "{times:?}: a NULL in the mask drops the row"
                );
                let got: Vec<bool> = mask.iter().map(|k| k.unwrap()).collect();
                assert_eq!(got, expected, "{times:?} at {w:?}");
                assert!(got.iter().any(|k| !k), "{times:?}: a mask with no late row");
            }
        }
    }
}
