//! Partition-parallel operators: several instances of one operator, each given its share of
//! an epoch's rows, run at the same time on threads of the runtime.
//!
//! A stream used to run every operator on one core while the others idled. The graph now keeps
//! N instances of each operator that says how its rows may be split ([`Partitioning`]) and
//! runs an epoch's instances on threads of their own ([`run_instances`]), so N cores work on
//! one query:
//!
//! - [`Partitioning::RowWise`] (stateless stages of filters and projections, Wasm UDF calls
//!   included): each instance takes a contiguous share of the epoch's rows, so their outputs,
//!   put back together in instance order, are the rows one instance would have emitted, in the
//!   same order.
//! - [`Partitioning::ByKey`] (keyed stateful operators): each row goes to the instance its
//!   partition key's hash picks, so all rows of a key, and its state, meet in one instance.
//!   An aggregation whose aggregates merge exactly first folds each contiguous share of the
//!   epoch into one partial group per key ([`Combiner`]), and routes those instead: its
//!   per-row work is then split evenly even over a handful of keys.
//!
//! # State does not depend on N
//!
//! A partitioned operator's table reaches the checkpoint as the union of its instances' deltas
//! and snapshots: the same files, under the same names, as one instance would write. A restore
//! sends each entry to the instance its key hashes to *now*, with the same hash that routes
//! rows ([`PartitionKey::state_hashes`]), so a query restarted with another number of
//! partitions carries on with every key's state where that key's rows will arrive. The hash has
//! a fixed seed, not a per-process random one, so processes of one build agree on where a key
//! goes: the property that running partitions in several processes, each restoring only the
//! keys it owns, will need (with a hash of our own, should DataFusion's change between
//! versions).
//!
//! Within an epoch a keyed operator's output is its instances' outputs one after another, so
//! rows of different keys come out in an order that depends on the number of partitions (each
//! key's rows keep theirs). Only operators downstream that depend on arrival order across keys
//! notice: `DISTINCT ON` without `ORDER BY` keeps the first row to arrive, and OVER windows
//! order ties on the event time by arrival unless the `ORDER BY` is total.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use arrow::array::{ArrayRef, RecordBatch, UInt32Array};
use arrow::compute::{cast, take_record_batch};
use arrow::datatypes::DataType;
use datafusion::common::hash_utils::{QualityRandomState, create_hashes};
use tokio::runtime::RuntimeFlavor;

use super::{Operator, Output};
use crate::common::Watermark;
use crate::error::{Result, RiffleError};

/// How the graph may split an operator's rows among instances of it.
#[derive(Clone)]
pub enum Partitioning {
    /// One instance sees every row: right for any operator, and the default.
    Single,
    /// Each row's output depends on that row alone: instances may take any contiguous share
    /// of the rows. Such an operator keeps no state.
    RowWise,
    /// Rows with equal partition keys must meet in one instance, and so must the state
    /// entries of that key.
    ByKey(Arc<dyn PartitionKey>),
}

impl Partitioning {
    /// By `key` if the operator has one, else [`Single`](Self::Single).
    pub fn by_key<K: PartitionKey + 'static>(key: &Option<Arc<K>>) -> Partitioning {
        match key {
            Some(key) => Partitioning::ByKey(key.clone()),
            None => Partitioning::Single,
        }
    }
}

impl std::fmt::Debug for Partitioning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Partitioning::Single => "Single",
            Partitioning::RowWise => "RowWise",
            Partitioning::ByKey(_) => "ByKey",
        })
    }
}

/// The partition key of a keyed operator, hashed alike from its input rows and from the
/// entries of its state tables.
pub trait PartitionKey: Send + Sync {
    /// The partition key's hash ([`hash_columns`]) of each row of `batch`, which arrived on
    /// input `input`.
    ///
    /// # Errors
    /// Evaluation errors of the key expressions.
    fn input_hashes(&self, input: usize, batch: &RecordBatch) -> Result<Vec<u64>>;

    /// The partition key's hash of each entry of `batch`, a delta or snapshot batch of the
    /// operator's table `table`. An entry's hash must equal that of the input rows that made
    /// it.
    ///
    /// # Errors
    /// Batches that are not this operator's state.
    fn state_hashes(&self, table: &str, batch: &RecordBatch) -> Result<Vec<u64>>;
}

/// Folds a share of an epoch's rows into fewer rows before they are routed to an operator's
/// instances: what MapReduce calls a combiner, Spark a partial aggregation and Flink a
/// local-global aggregation.
///
/// Routing sends every row of a key to the one instance that owns the key, so the per-row
/// work of a keyed aggregation (its arguments, Wasm calls included, and its accumulators)
/// lands where the keys do: a handful of keys (eleven countries) can leave one core with
/// two thirds of it. With a combiner each routing task first folds each contiguous share of
/// the epoch it takes into entries of the operator's state table, one per key it saw, and
/// only those are routed; the owning instance merges them into its state
/// ([`Operator::process_combined`]). The per-row work is then split evenly whatever the keys.
///
/// A combiner must not change results: the operator's output must be the same, bit for bit,
/// whether its rows arrive folded or as they are, and however the epoch was cut into shares.
pub trait Combiner: Send + Sync {
    /// The state table whose entries [`combine`](Self::combine) makes (they are routed as its
    /// entries are, by [`PartitionKey::state_hashes`]).
    fn table(&self) -> &str;

    /// Folds `rows`, a contiguous share of the rows that arrived on input `input` in one
    /// epoch, into entries of [`table`](Self::table). `None` when folding would not leave
    /// markedly fewer rows: the rows are then routed as they are.
    ///
    /// # Errors
    /// Evaluation errors, as processing the rows would give.
    fn combine(&self, input: usize, rows: &[RecordBatch]) -> Result<Option<Vec<RecordBatch>>>;

    /// Into how many shares per routing task an epoch's rows are cut ([`split_by_key`]).
    /// More shares even out the tasks' time, and each costs its partial entries one more
    /// merge: worth it when those entries are a few small accumulators whatever the share's
    /// rows, not when they grow with the rows (distinct sets). One unless said otherwise.
    fn shares_per_task(&self) -> usize {
        1
    }
}

/// The fewest rows (of all inputs together) a share of [`split_by_key`] is cut to when its
/// combiner asks for several shares per task: each share pays a fold's fixed costs and its
/// partial entries' merges, and a combiner judges by a share's first rows whether folding
/// pays (`GroupCombiner` looks after 16,384).
const MIN_SHARE_ROWS: usize = 32_768;

/// Rows for an operator instance: as they arrived on input `input`, or folded by the
/// operator's [`Combiner`] from rows of that input.
#[derive(Clone, Debug)]
pub(crate) struct Delivery {
    pub input: usize,
    pub batch: RecordBatch,
    pub combined: bool,
}

impl Delivery {
    /// Rows as they arrived on `input`.
    pub fn rows(input: usize, batch: RecordBatch) -> Self {
        Delivery {
            input,
            batch,
            combined: false,
        }
    }
}

/// The hash every partition key uses: fixed, so that a key maps to the same partition in
/// every process (foldhash's quality hasher, as DataFusion's `create_hashes` applies it).
const ROUTE: QualityRandomState = QualityRandomState::with_seed(0x7269_6666_6c65);

/// The partition hash of each of `rows` rows of the key `columns` (NULL hashes alike).
///
/// Dictionary columns are hashed as their values: keys decoded from Arrow's row format (a
/// restore's) come back as plain values, and DataFusion hashes a dictionary column after the
/// first differently from the same values in a plain one.
///
/// # Errors
/// Column types DataFusion cannot hash.
pub fn hash_columns(columns: &[ArrayRef], rows: usize) -> Result<Vec<u64>> {
    let mut hashes = vec![0; rows];
    if !columns.is_empty() {
        let plain = columns
            .iter()
            .map(|c| match c.data_type() {
                DataType::Dictionary(_, values) => cast(c, values),
                _ => Ok(c.clone()),
            })
            .collect::<std::result::Result<Vec<_>, _>>()?;
        create_hashes(&plain, &ROUTE, &mut hashes)?;
    }
    Ok(hashes)
}

/// Which of `n` partitions a hash belongs to (the high bits of `hash * n`, which spread well
/// for any `n`).
pub fn partition_of(hash: u64, n: usize) -> usize {
    ((u128::from(hash) * n as u128) >> 64) as usize
}

/// Splits `batch` into `n` batches by the partitions of its rows' `hashes`, keeping the
/// order of the rows within each.
///
/// # Errors
/// Arrow errors copying the rows.
pub fn split_by_hash(batch: &RecordBatch, hashes: &[u64], n: usize) -> Result<Vec<RecordBatch>> {
    let mut rows: Vec<Vec<u32>> = vec![Vec::with_capacity(batch.num_rows() / n + 1); n];
    for (row, &hash) in hashes.iter().enumerate() {
        rows[partition_of(hash, n)].push(row as u32);
    }
    rows.into_iter()
        .map(|rows| {
            if rows.len() == batch.num_rows() {
                Ok(batch.clone())
            } else {
                Ok(take_record_batch(batch, &UInt32Array::from(rows))?)
            }
        })
        .collect()
}

/// Splits an epoch's `batches` into `n` contiguous shares of equal rows (the last may be
/// shorter), slicing batches at the boundaries (no copy).
pub fn split_contiguous(batches: Vec<RecordBatch>, n: usize) -> Vec<Vec<RecordBatch>> {
    let total: usize = batches.iter().map(RecordBatch::num_rows).sum();
    let share = total.div_ceil(n.max(1));
    let mut shares = vec![Vec::new(); n];
    let (mut part, mut filled) = (0, 0);
    for batch in batches {
        let mut offset = 0;
        while offset < batch.num_rows() {
            if filled == share && part + 1 < n {
                part += 1;
                filled = 0;
            }
            let len = (batch.num_rows() - offset).min(share - filled);
            shares[part].push(batch.slice(offset, len));
            offset += len;
            filled += len;
        }
    }
    shares
}

/// Splits an epoch's rows (`inputs[k]`: input `k`'s batches) among `n` instances by `key`,
/// returning each instance's rows. The hashing and copying run on `n` tasks at once, over
/// contiguous shares of every input, so that routing does not hold the other cores up; with a
/// `combiner`, each task first folds each share it takes ([`Combiner`]). Each instance gets its
/// rows input by input, and each input's rows (or folded rows) in the order they arrived.
/// Also returns the time the tasks took, added up.
///
/// # Errors
/// The key's (or the combiner's) evaluation errors.
pub(crate) async fn split_by_key(
    key: &Arc<dyn PartitionKey>,
    combiner: Option<&Arc<dyn Combiner>>,
    inputs: Vec<Vec<RecordBatch>>,
    n: usize,
) -> Result<(Vec<Vec<Delivery>>, Duration)> {
    type Parts = Vec<Vec<Delivery>>;
    /// Routes `batches` (all of input `input`) by `hashes` of each into `parts`.
    fn route(
        parts: &mut Parts,
        input: usize,
        batches: Vec<RecordBatch>,
        combined: bool,
        hashes: impl Fn(&RecordBatch) -> Result<Vec<u64>>,
    ) -> Result<()> {
        let n = parts.len();
        for batch in batches {
            let hashes = hashes(&batch)?;
            for (part, batch) in parts.iter_mut().zip(split_by_hash(&batch, &hashes, n)?) {
                if batch.num_rows() > 0 {
                    part.push(Delivery {
                        input,
                        batch,
                        combined,
                    });
                }
            }
        }
        Ok(())
    }
    fn split(
        key: &dyn PartitionKey,
        combiner: Option<&dyn Combiner>,
        inputs: Vec<Vec<RecordBatch>>,
        n: usize,
    ) -> Result<(Parts, Duration)> {
        let started = Instant::now();
        let mut parts = vec![Vec::new(); n];
        for (k, batches) in inputs.into_iter().enumerate() {
            if batches.is_empty() {
                continue;
            }
            let combined = match combiner {
                Some(c) => c.combine(k, &batches)?.map(|entries| (c.table(), entries)),
                None => None,
            };
            match combined {
                Some((table, entries)) => {
                    route(&mut parts, k, entries, true, |b| key.state_hashes(table, b))?
                }
                None => route(&mut parts, k, batches, false, |b| key.input_hashes(k, b))?,
            }
        }
        Ok((parts, started.elapsed()))
    }

    // The epoch is cut into contiguous shares of every input, up to `shares_per_task` for
    // each task, and the tasks take them in turn as each finishes one: equal rows do not take
    // equal time (a core may be slowed by its sibling or the host), and with one share each
    // the epoch waited for the slower task. Share `i` is `work[i]`; the tasks' results are
    // put back in share order, so each share's deliveries keep their place however the
    // tasks took them (whether a share was folded may depend on its combiner's state, which
    // a combiner must not let change results).
    let total: usize = inputs.iter().flatten().map(RecordBatch::num_rows).sum();
    let per_task = combiner.map_or(1, |c| c.shares_per_task().max(1));
    // A multiple of `n`, so that every task gets as many shares (3 shares for 2 tasks would
    // leave one of them two thirds of the epoch).
    let cuts = ((n * per_task).min(total / MIN_SHARE_ROWS) / n).max(1) * n;
    let mut work: Vec<Vec<Vec<RecordBatch>>> = vec![Vec::with_capacity(inputs.len()); cuts];
    for batches in inputs {
        for (w, share) in work.iter_mut().zip(split_contiguous(batches, cuts)) {
            w.push(share);
        }
    }
    let split_shares: Vec<Result<(Parts, Duration)>> = match tokio::runtime::Handle::try_current() {
        Ok(runtime) if n > 1 => {
            let work = Arc::new(work);
            let next = Arc::new(AtomicUsize::new(0));
            let tasks: Vec<_> = (0..n)
                .map(|_| {
                    let (key, combiner) = (Arc::clone(key), combiner.cloned());
                    let (work, next) = (Arc::clone(&work), Arc::clone(&next));
                    runtime.spawn(async move {
                        let mut done = Vec::new();
                        loop {
                            let i = next.fetch_add(1, Ordering::Relaxed);
                            let Some(rows) = work.get(i) else {
                                return done;
                            };
                            done.push((
                                i,
                                split(key.as_ref(), combiner.as_deref(), rows.clone(), n),
                            ));
                        }
                    })
                })
                .collect();
            let mut done = Vec::with_capacity(cuts);
            for task in tasks {
                match task.await {
                    Ok(parts) => done.extend(parts),
                    Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                    Err(e) => {
                        return Err(RiffleError::Internal(format!(
                            "a routing task was cancelled: {e}"
                        )));
                    }
                }
            }
            done.sort_unstable_by_key(|(i, _)| *i);
            done.into_iter().map(|(_, parts)| parts).collect()
        }
        _ => work
            .into_iter()
            .map(|rows| split(key.as_ref(), combiner.map(Arc::as_ref), rows, n))
            .collect(),
    };
    let mut shares: Vec<Vec<Delivery>> = vec![Vec::new(); n];
    let mut busy = Duration::ZERO;
    for split in split_shares {
        let (parts, took) = split?;
        busy += took;
        for (share, part) in shares.iter_mut().zip(parts) {
            share.extend(part);
        }
    }
    for share in &mut shares {
        // Stable: within an input, the contiguous shares' rows stay in arrival order.
        share.sort_by_key(|d| d.input);
    }
    Ok((shares, busy))
}

/// Runs one epoch of `operator`: `input` (rows or combined rows of each input, in order), then
/// the watermark.
///
/// # Errors
/// The operator's first error.
pub(crate) async fn run_epoch(
    operator: &mut dyn Operator,
    input: Vec<Delivery>,
    watermark: Watermark,
) -> Result<Output> {
    let mut out = Output::default();
    for d in input {
        if d.combined {
            operator
                .process_combined(d.input, d.batch, &mut out)
                .await?;
        } else {
            operator.process_batch(d.input, d.batch, &mut out).await?;
        }
    }
    operator.on_watermark(watermark, &mut out).await?;
    Ok(out)
}

/// What one instance did in an epoch.
struct InstanceRun {
    operator: Box<dyn Operator>,
    output: Result<Output>,
    busy: Duration,
}

/// Runs one epoch of every instance at once, each on a task of its own: `inputs[i]` are
/// instance `i`'s rows (input number and batch, in order), then each instance gets the
/// watermark. Returns the instances' outputs in instance order and the time they were busy,
/// added up.
///
/// On a multi-threaded runtime each instance runs on a thread of the runtime's blocking pool,
/// not on a worker. An operator may call into Wasm many times an epoch, and a call from a
/// worker must first hand the worker's queue to another thread
/// ([`tokio::task::block_in_place`], see `udf::module::outside_async_runtime`), which queues
/// a thread of the blocking pool every call. When a session window still called its Wasm
/// aggregate once per session, two instances calling at once kept the pool starting and
/// retiring threads (240 over a 20,000,000-row query, up to 53 at a time), and the allocator
/// keeps pages for every thread: the two-core stream of that query peaked at 1.1 GB against
/// 0.24 GB on one core. A pool thread may block already, so a Wasm call there costs nothing
/// extra, and the pool reuses its idle threads from one epoch to the next. A lone instance
/// called outside any task (the stream's driver runs in `Runtime::block_on`) runs where it is
/// called: that thread may block too.
///
/// # Errors
/// The first instance's error; every instance is back in `instances` either way. A panic in
/// an instance resumes here, as it would have without partitions.
pub(crate) async fn run_instances(
    instances: &mut Vec<Box<dyn Operator>>,
    inputs: Vec<Vec<Delivery>>,
    watermark: Watermark,
) -> Result<(Vec<Output>, Duration)> {
    async fn run(
        mut operator: Box<dyn Operator>,
        input: Vec<Delivery>,
        watermark: Watermark,
    ) -> InstanceRun {
        let started = Instant::now();
        let output = run_epoch(operator.as_mut(), input, watermark).await;
        InstanceRun {
            operator,
            output,
            busy: started.elapsed(),
        }
    }

    // One instance, called outside any task (the driver runs in `Runtime::block_on`): there
    // it may block already, and a hop to another thread would gain nothing.
    let inline = instances.len() == 1 && tokio::task::try_id().is_none();
    let runs: Vec<InstanceRun> = match tokio::runtime::Handle::try_current() {
        Ok(runtime) if !inline => {
            let may_block = runtime.runtime_flavor() == RuntimeFlavor::MultiThread;
            let tasks: Vec<_> = instances
                .drain(..)
                .zip(inputs)
                .map(|(operator, input)| {
                    let epoch = run(operator, input, watermark);
                    if may_block {
                        let handle = runtime.clone();
                        runtime.spawn_blocking(move || handle.block_on(epoch))
                    } else {
                        runtime.spawn(epoch)
                    }
                })
                .collect();
            // Every task is awaited before anything returns, so that every instance that
            // survived is back in place.
            let mut runs = Vec::with_capacity(tasks.len());
            let mut failed = None;
            for task in tasks {
                match task.await {
                    Ok(run) => runs.push(run),
                    Err(e) => {
                        failed.get_or_insert(e);
                    }
                }
            }
            if let Some(e) = failed {
                instances.extend(runs.into_iter().map(|r| r.operator));
                if e.is_panic() {
                    std::panic::resume_unwind(e.into_panic());
                }
                return Err(RiffleError::Internal(format!(
                    "an operator instance's task was cancelled: {e}"
                )));
            }
            runs
        }
        // Not on a Tokio runtime, or one instance inline: one instance after another.
        _ => {
            let mut runs = Vec::with_capacity(instances.len());
            for (operator, input) in instances.drain(..).zip(inputs) {
                runs.push(run(operator, input, watermark).await);
            }
            runs
        }
    };
    let mut outputs = Vec::with_capacity(runs.len());
    let mut busy = Duration::ZERO;
    let mut error = None;
    for run in runs {
        instances.push(run.operator);
        busy += run.busy;
        match run.output {
            Ok(output) => outputs.push(output),
            Err(e) => {
                error.get_or_insert(e);
            }
        }
    }
    match error {
        Some(e) => Err(e),
        None => Ok((outputs, busy)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{AsArray, Int64Array, StringArray};
    use arrow::datatypes::{DataType, Field, Int64Type, Schema};

    fn batch(values: &[i64]) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![Field::new("v", DataType::Int64, false)]));
        RecordBatch::try_new(schema, vec![Arc::new(Int64Array::from(values.to_vec()))]).unwrap()
    }

    fn values(batches: &[RecordBatch]) -> Vec<i64> {
        batches
            .iter()
            .flat_map(|b| b.column(0).as_primitive::<Int64Type>().values().to_vec())
            .collect()
    }

    #[test]
    fn contiguous_shares_are_even_and_keep_the_order() {
        let batches = vec![batch(&[1, 2, 3]), batch(&[]), batch(&[4, 5, 6, 7])];
        let shares = split_contiguous(batches, 3);
        let got: Vec<Vec<i64>> = shares.iter().map(|s| values(s)).collect();
        assert_eq!(got, vec![vec![1, 2, 3], vec![4, 5, 6], vec![7]]);
        let shares = split_contiguous(vec![batch(&[1])], 4);
        assert_eq!(shares.len(), 4);
        assert_eq!(values(&shares[0]), vec![1]);
        assert!(shares[1..].iter().all(|s| s.is_empty()));
        assert!(split_contiguous(Vec::new(), 2).iter().all(Vec::is_empty));
    }

    #[test]
    fn equal_keys_go_to_one_partition_whatever_their_type_or_batch() {
        let keys: ArrayRef = Arc::new(StringArray::from(vec!["a", "b", "a", "c", "b"]));
        let hashes = hash_columns(std::slice::from_ref(&keys), 5).unwrap();
        assert_eq!(hashes[0], hashes[2]);
        assert_eq!(hashes[1], hashes[4]);
        // The same key in another batch, and as a dictionary, hashes the same.
        let again: ArrayRef = Arc::new(StringArray::from(vec!["b"]));
        assert_eq!(hash_columns(&[again], 1).unwrap()[0], hashes[1]);
        let dict: ArrayRef = Arc::new(
            vec!["c", "a"]
                .into_iter()
                .collect::<arrow::array::DictionaryArray<arrow::datatypes::Int32Type>>(),
        );
        let d = hash_columns(&[dict], 2).unwrap();
        assert_eq!((d[0], d[1]), (hashes[3], hashes[0]));
        // ...also after the first column, and for dictionaries of numbers (a restore decodes
        // keys into plain values).
        let first: ArrayRef = Arc::new(Int64Array::from(vec![1, 2]));
        let plain: ArrayRef = Arc::new(Int64Array::from(vec![7, 9]));
        let dict: ArrayRef = Arc::new(
            arrow::array::DictionaryArray::<arrow::datatypes::Int32Type>::try_new(
                arrow::array::Int32Array::from(vec![1, 0]),
                Arc::new(Int64Array::from(vec![9, 7])),
            )
            .unwrap(),
        );
        assert_eq!(
            hash_columns(&[first.clone(), dict], 2).unwrap(),
            hash_columns(&[first, plain], 2).unwrap()
        );

        let rows = batch(&[10, 11, 12, 13, 14]);
        let parts = split_by_hash(&rows, &hashes, 2).unwrap();
        assert_eq!(parts.iter().map(|p| p.num_rows()).sum::<usize>(), 5);
        for part in &parts {
            let vs = values(std::slice::from_ref(part));
            assert!(vs.windows(2).all(|w| w[0] < w[1]), "row order kept");
        }
        let part_of = |row: usize| partition_of(hashes[row], 2);
        assert_eq!(part_of(0), part_of(2));
        assert_eq!(part_of(1), part_of(4));
    }

    /// Partition key: column 0 of every input.
    struct FirstColumn;

    impl PartitionKey for FirstColumn {
        fn input_hashes(&self, _: usize, batch: &RecordBatch) -> Result<Vec<u64>> {
            hash_columns(&[batch.column(0).clone()], batch.num_rows())
        }
        fn state_hashes(&self, _: &str, batch: &RecordBatch) -> Result<Vec<u64>> {
            self.input_hashes(0, batch)
        }
    }

    /// A combiner that never folds (its shares' rows are routed as they are) and asks for
    /// several shares per task; counts its calls.
    struct Cuts(std::sync::atomic::AtomicUsize);

    impl Combiner for Cuts {
        fn table(&self) -> &str {
            "t"
        }
        fn combine(&self, _: usize, _: &[RecordBatch]) -> Result<Option<Vec<RecordBatch>>> {
            self.0.fetch_add(1, Ordering::Relaxed);
            Ok(None)
        }
        fn shares_per_task(&self) -> usize {
            4
        }
    }

    /// Rows of a key meet in one share whichever batch and contiguous share they were in,
    /// input by input, each input's rows in arrival order; also when the epoch is cut into
    /// more shares than tasks, which the tasks take as they come (the same deliveries every
    /// time).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn split_by_key_keeps_each_keys_rows_together_and_in_order() {
        // Value = key * 1,000,000 + arrival position: keys 0..7, in many batches, two inputs.
        let rows: Vec<i64> = (0..200_000).map(|i| (i * 7 % 8) * 1_000_000 + i).collect();
        let keys = |values: &[i64]| values.iter().map(|v| v / 1_000_000).collect::<Vec<_>>();
        let keyed = |values: &[i64]| {
            let schema = Arc::new(Schema::new(vec![
                Field::new("k", DataType::Int64, false),
                Field::new("v", DataType::Int64, false),
            ]));
            RecordBatch::try_new(
                schema,
                vec![
                    Arc::new(Int64Array::from(keys(values))),
                    Arc::new(Int64Array::from(values.to_vec())),
                ],
            )
            .unwrap()
        };
        let input: Vec<RecordBatch> = rows.chunks(6_500).map(keyed).collect();
        let other: Vec<RecordBatch> = rows[..50_000].chunks(3_500).map(keyed).collect();
        let key: Arc<dyn PartitionKey> = Arc::new(FirstColumn);
        let cuts = Arc::new(Cuts(std::sync::atomic::AtomicUsize::new(0)));
        let as_combiner: Arc<dyn Combiner> = cuts.clone();
        let deliveries = |shares: &[Vec<Delivery>]| -> Vec<Vec<(usize, Vec<i64>)>> {
            shares
                .iter()
                .map(|share| {
                    share
                        .iter()
                        .map(|d| {
                            let values = d.batch.column(1).as_primitive::<Int64Type>();
                            (d.input, values.values().to_vec())
                        })
                        .collect()
                })
                .collect()
        };
        for combiner in [None, Some(&as_combiner)] {
            for n in [1, 2, 3] {
                cuts.0.store(0, Ordering::Relaxed);
                let inputs = vec![input.clone(), other.clone()];
                let (shares, _) = split_by_key(&key, combiner, inputs, n).await.unwrap();
                if combiner.is_some() {
                    // 250,000 rows: min(4 n, 250,000 / 32,768 rounded down) shares, rounded
                    // down to a multiple of n, both inputs in each.
                    let expected = ((4 * n).min(7) / n) * n;
                    assert_eq!(
                        cuts.0.load(Ordering::Relaxed),
                        2 * expected,
                        "{n} partitions"
                    );
                    let inputs = vec![input.clone(), other.clone()];
                    let (again, _) = split_by_key(&key, combiner, inputs, n).await.unwrap();
                    assert_eq!(
                        deliveries(&again),
                        deliveries(&shares),
                        "the same deliveries"
                    );
                }
                let mut seen_keys = std::collections::BTreeMap::new();
                let mut total = 0;
                for (s, share) in shares.iter().enumerate() {
                    let inputs: Vec<usize> = share.iter().map(|d| d.input).collect();
                    assert!(inputs.windows(2).all(|w| w[0] <= w[1]), "input by input");
                    for input in 0..2 {
                        let values: Vec<i64> = share
                            .iter()
                            .filter(|d| d.input == input)
                            .flat_map(|d| {
                                d.batch
                                    .column(1)
                                    .as_primitive::<Int64Type>()
                                    .values()
                                    .to_vec()
                            })
                            .collect();
                        total += values.len();
                        for key in keys(&values) {
                            assert_eq!(
                                *seen_keys.entry(key).or_insert(s),
                                s,
                                "key {key} in one share"
                            );
                        }
                        for key in 0..8 {
                            let of_key: Vec<i64> = values
                                .iter()
                                .copied()
                                .filter(|v| v / 1_000_000 == key)
                                .collect();
                            assert!(of_key.windows(2).all(|w| w[0] < w[1]), "arrival order");
                        }
                    }
                }
                assert_eq!(total, 250_000, "{n} partitions: every row once");
                assert_eq!(seen_keys.len(), 8);
            }
        }
    }

    /// An instance that blocks its thread until every instance of the epoch has started, as a
    /// Wasm call does while it waits on a clock or a blocking write.
    struct WaitsForTheOthers {
        /// How many instances have started, and the signal that one did.
        arrived: Arc<(std::sync::Mutex<usize>, std::sync::Condvar)>,
        instances: usize,
    }

    #[async_trait::async_trait]
    impl Operator for WaitsForTheOthers {
        fn kind(&self) -> &'static str {
            "waits"
        }

        async fn process_batch(&mut self, _: usize, _: RecordBatch, _: &mut Output) -> Result<()> {
            let (count, signal) = &*self.arrived;
            let mut count = count.lock().unwrap();
            *count += 1;
            signal.notify_all();
            // On a runtime worker this blocks the worker, and with one worker the other
            // instance never starts: the bound turns that hang into a failure.
            let (count, waited) = signal
                .wait_timeout_while(count, Duration::from_secs(60), |c| *c < self.instances)
                .unwrap();
            if waited.timed_out() {
                return Err(RiffleError::Internal(format!(
                    "{} of {} instances started",
                    *count, self.instances
                )));
            }
            Ok(())
        }
    }

    /// Instances run on threads that may block (the runtime's blocking pool), not on its
    /// workers: two instances that wait for each other finish on a runtime of one worker.
    #[test]
    fn instances_may_block_without_stalling_the_runtime() {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .build()
            .unwrap();
        let arrived = Arc::new((std::sync::Mutex::new(0), std::sync::Condvar::new()));
        let mut instances: Vec<Box<dyn Operator>> = (0..2)
            .map(|_| {
                Box::new(WaitsForTheOthers {
                    arrived: Arc::clone(&arrived),
                    instances: 2,
                }) as Box<dyn Operator>
            })
            .collect();
        let inputs = (0..2)
            .map(|_| vec![Delivery::rows(0, batch(&[1]))])
            .collect();
        let (outputs, _) = runtime
            .block_on(run_instances(&mut instances, inputs, Watermark::NONE))
            .unwrap();
        assert_eq!(outputs.len(), 2);
        assert_eq!(instances.len(), 2, "every instance is back in place");
    }

    #[test]
    fn keys_spread_over_partitions() {
        let keys: ArrayRef = Arc::new(Int64Array::from((0..10_000).collect::<Vec<i64>>()));
        let hashes = hash_columns(&[keys], 10_000).unwrap();
        for n in [2, 3, 8] {
            let mut counts = vec![0usize; n];
            for &h in &hashes {
                counts[partition_of(h, n)] += 1;
            }
            let even = 10_000 / n;
            assert!(
                counts
                    .iter()
                    .all(|&c| c > even * 9 / 10 && c < even * 11 / 10),
                "{n} partitions: {counts:?}"
            );
        }
    }
}
