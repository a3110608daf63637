//! Batch windows over Parquet files read in the files' own order, with a watermark the files'
//! statistics prove exact, instead of a sort.
//!
//! Batch mode runs hopping and session windows with the streaming operators over input sorted
//! by event time ([`super::bounded`]). Sorting is what costs there: at 20,000,000 rows the sort
//! held the whole input (1.07 GB peak RSS against the stream's 0.3 GB) and took about a fifth
//! of the CPU. But the files such a query reads are seldom far from event-time order: logs,
//! topic dumps and tables a stream wrote are nearly sorted. A stream reads them as they come
//! and closes windows behind a watermark; batch mode can do the same once it knows how far
//! back a row can reach, and Parquet says that without reading the rows: each data page (in
//! the page index), or else each row group, carries the minimum and maximum of its column.
//!
//! Reading pages `p_1 .. p_n` in order, a row of page `j` is at least `min(p_j ..)` and every
//! row read before it at most `max(.. p_j)`, so no row lies more than
//! `D = max_j (max(p_1 .. p_j) - min(p_j .. p_n))` before one read earlier. After reading rows
//! up to event time `t`, `t - D` is an exact watermark: every later row is at least that late.
//! Filters and projections only drop rows, and a hash split of one ordered stream gives each
//! partition an ordered subsequence, so the bound holds at every operator partition.
//!
//! Batch mode plans a [`FileOrderExec`] under the window operator when its input is a chain of
//! projections and filters over a Parquet scan and `D` is small beside the files' time span
//! (the footers and page indexes are read while planning, into the session's metadata cache
//! the scan reads them from again). Otherwise DataFusion sorts each partition as before.
//! When it runs, the node checks that the optimized plan still reads those files, in that
//! order, through partition-preserving nodes; if not, it sorts (per scan partition, then a
//! merge) and `D` is 0. The operator ([`super::bounded::OperatorExec`]) checks every row against the
//! watermark it was promised and fails the query, never drops a row, if one is later.

use std::any::Any;
use std::fmt;
use std::sync::{Arc, Mutex};

use arrow::array::{Array, ArrayRef, AsArray};
use arrow::compute::SortOptions;
use arrow::datatypes::{DataType, Int64Type, SchemaRef, TimeUnit};
use datafusion::common::config::ConfigOptions;
use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::common::{Result as DfResult, internal_err};
use datafusion::datasource::listing::PartitionedFile;
use datafusion::datasource::physical_plan::parquet::metadata::DFParquetMetadata;
use datafusion::datasource::physical_plan::{FileScanConfig, ParquetSource};
use datafusion::datasource::source::DataSourceExec;
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::physical_expr::expressions::Column;
use datafusion::physical_expr::{EquivalenceProperties, LexOrdering, PhysicalSortExpr};
use datafusion::physical_optimizer::PhysicalOptimizerRule;
use datafusion::physical_plan::coop::CooperativeExec;
use datafusion::physical_plan::execution_plan::{Boundedness, EmissionType};
use datafusion::physical_plan::filter::FilterExec;
use datafusion::physical_plan::projection::ProjectionExec;
use datafusion::physical_plan::repartition::RepartitionExec;
use datafusion::physical_plan::sorts::sort::SortExec;
use datafusion::physical_plan::sorts::sort_preserving_merge::SortPreservingMergeExec;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{
    ChildrenPropertiesMode, DisplayAs, DisplayFormatType, Distribution, ExecutionPlan,
    Partitioning, PhysicalExpr, PlanProperties, ReplaceChildrenOptions,
};
use futures::{StreamExt, TryStreamExt};
use parquet::arrow::arrow_reader::statistics::StatisticsConverter;
use parquet::arrow::parquet_to_arrow_schema;
use parquet::file::metadata::{PageIndexPolicy, ParquetMetaData};

/// File order is used when `D` is at most this fraction of the files' event-time span: the
/// operator then holds at most about that share of the rows' windows open at once, where a
/// sort would hold every row.
const MAX_DISORDER_SHARE: i64 = 8;

/// What a [`FileOrderExec`] found, shared with the operator above it (which sees its rows
/// through a hash split, not the node itself).
#[derive(Debug, Default)]
pub struct Disorder {
    /// Microseconds a row can lie before one delivered earlier; set before the first row is
    /// delivered (0: the rows come sorted).
    bound: Mutex<Option<i64>>,
}

impl Disorder {
    /// The bound of the run under way, once its first row has been delivered.
    pub fn bound(&self) -> Option<i64> {
        *self.bound.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn set(&self, bound: i64) {
        *self.bound.lock().unwrap_or_else(|e| e.into_inner()) = Some(bound);
    }
}

/// Delivers its input as one partition whose rows lie at most [`Disorder::bound`] before any
/// row delivered earlier: the scan's partitions one after another, in the files' order, when
/// the files' statistics bound their disorder (see the [module docs](self)); sorted otherwise.
pub struct FileOrderExec {
    input: Arc<dyn ExecutionPlan>,
    /// The event time, over the input's rows.
    ts: Arc<dyn PhysicalExpr>,
    /// The files as planning read them, in order, and the bound their statistics gave.
    planned: Arc<(Vec<String>, i64)>,
    disorder: Arc<Disorder>,
    properties: Arc<PlanProperties>,
}

impl FileOrderExec {
    /// The node over `input`, when `input` may be read in file order: projections and filters
    /// over a Parquet scan, with `ts` one of the scan's columns, and files whose statistics
    /// bound their disorder closely enough. `None` otherwise: sort as DataFusion does, per
    /// partition after the split by key (this node's own sort, for files the optimizer
    /// reorders after planning, merges the partitions' sorted runs on one core).
    pub async fn try_new(
        input: &Arc<dyn ExecutionPlan>,
        ts: &Arc<dyn PhysicalExpr>,
        context: &TaskContext,
    ) -> DfResult<Option<(Self, Arc<Disorder>)>> {
        let Some((config, column)) = scanned_ts(input, ts) else {
            return Ok(None);
        };
        let bound = match disorder_bound(config, &column, context).await? {
            Some((bound, span)) if bound.saturating_mul(MAX_DISORDER_SHARE) <= span => bound,
            _ => return Ok(None),
        };
        let disorder = Arc::new(Disorder::default());
        let node = FileOrderExec {
            input: Arc::clone(input),
            ts: Arc::clone(ts),
            planned: Arc::new((file_names(config), bound)),
            disorder: Arc::clone(&disorder),
            properties: properties(input.schema()),
        };
        Ok(Some((node, disorder)))
    }
}

fn properties(schema: SchemaRef) -> Arc<PlanProperties> {
    Arc::new(PlanProperties::new(
        EquivalenceProperties::new(schema),
        Partitioning::UnknownPartitioning(1),
        EmissionType::Incremental,
        Boundedness::Bounded,
    ))
}

/// The physical optimizer rule that keeps a [`FileOrderExec`]'s input in file order: it takes
/// out the round-robin splits DataFusion puts above a scan with fewer partitions than cores
/// (for the filters and projections above it), which would deal the file's batches out to
/// several partitions. Runs after DataFusion's rules.
#[derive(Debug, Default)]
pub struct KeepFileOrder;

impl PhysicalOptimizerRule for KeepFileOrder {
    fn optimize(
        &self,
        plan: Arc<dyn ExecutionPlan>,
        _config: &ConfigOptions,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        plan.transform_down(|node| {
            if !(node.as_ref() as &dyn Any).is::<FileOrderExec>() {
                return Ok(Transformed::no(node));
            }
            let input = Arc::clone(node.children()[0]);
            let input = input
                .transform_down(|n| {
                    Ok(
                        match (n.as_ref() as &dyn Any).downcast_ref::<RepartitionExec>() {
                            Some(r)
                                if matches!(r.partitioning(), Partitioning::RoundRobinBatch(_)) =>
                            {
                                Transformed::yes(Arc::clone(r.input()))
                            }
                            _ => Transformed::no(n),
                        },
                    )
                })?
                .data;
            let node = node.replace_children(
                vec![input],
                ReplaceChildrenOptions::new(ChildrenPropertiesMode::Recompute),
            )?;
            Ok(Transformed::new(node, true, TreeNodeRecursion::Jump))
        })
        .map(|t| t.data)
    }

    fn name(&self) -> &str {
        "riffle_keep_file_order"
    }

    fn schema_check(&self) -> bool {
        true
    }
}

/// The Parquet scan under a chain of partition-preserving nodes, and the name of its table
/// column that is the chain's output column `index`; `None` for any other shape. Such a chain
/// delivers each partition in the order of the files' rows, so its partitions one after
/// another are the files in order. (The optimizer may split the scan into byte ranges, which
/// keeps that order, or put a round-robin split above it, which does not: [`KeepFileOrder`]
/// takes those out, and any left make this `None`.)
fn scanned_column(
    plan: &Arc<dyn ExecutionPlan>,
    index: usize,
) -> Option<(&FileScanConfig, String)> {
    let any: &dyn Any = plan.as_ref();
    if let Some(p) = any.downcast_ref::<ProjectionExec>() {
        let expr: &dyn Any = p.expr().get(index)?.expr.as_ref();
        let column = expr.downcast_ref::<Column>()?;
        return scanned_column(p.input(), column.index());
    }
    if let Some(f) = any.downcast_ref::<FilterExec>() {
        let index = match f.projection() {
            Some(projection) => *projection.get(index)?,
            None => index,
        };
        return scanned_column(f.input(), index);
    }
    if any.is::<CooperativeExec>() {
        return scanned_column(plan.children().first()?, index);
    }
    let (config, _) = any
        .downcast_ref::<DataSourceExec>()?
        .downcast_to_file_source::<ParquetSource>()?;
    let table = config.file_source().table_schema().table_schema();
    let index = match config.file_source().projection() {
        Some(projection) => {
            let expr: &dyn Any = projection.as_ref().get(index)?.expr.as_ref();
            expr.downcast_ref::<Column>()?.index()
        }
        None => index,
    };
    let name = table.fields().get(index)?.name().clone();
    // A partition column is not in the files.
    config.file_schema().field_with_name(&name).ok()?;
    Some((config, name))
}

/// `D` for `column` over the files `config` scans, in the order its partitions read them, or
/// `None` when a page or row group has no statistics to bound it by. Also the files' event-time
/// span. Microseconds.
async fn disorder_bound(
    config: &FileScanConfig,
    column: &str,
    context: &TaskContext,
) -> DfResult<Option<(i64, i64)>> {
    let store = context
        .runtime_env()
        .object_store(&config.object_store_url)?;
    let mut pages: Vec<(i64, i64)> = Vec::new();
    for file in files_in_order(config) {
        // Through the session's metadata cache, which the scan then reads it from.
        let metadata = DFParquetMetadata::new(store.as_ref(), &file.object_meta)
            .with_page_index_policy(Some(PageIndexPolicy::Optional))
            .with_file_metadata_cache(Some(
                context
                    .runtime_env()
                    .cache_manager
                    .get_file_metadata_cache(),
            ))
            .fetch_metadata()
            .await?;
        if !file_pages(&metadata, column, &mut pages)? {
            return Ok(None);
        }
    }
    let Some(first) = pages.first() else {
        return Ok(Some((0, 0)));
    };
    let mut suffix_min = vec![i64::MAX; pages.len()];
    let mut low = i64::MAX;
    for (i, (min, _)) in pages.iter().enumerate().rev() {
        low = low.min(*min);
        suffix_min[i] = low;
    }
    let (mut high, mut bound) = (first.1, 0i64);
    for (i, (_, max)) in pages.iter().enumerate() {
        high = high.max(*max);
        bound = bound.max(high.saturating_sub(suffix_min[i]));
    }
    Ok(Some((bound, high.saturating_sub(low))))
}

/// Appends the (min, max) of `column` of each of a file's pages, or of each row group when the
/// file has no page index, in row order, skipping pages with no value. False when a part with
/// values has no statistics.
fn file_pages(
    metadata: &ParquetMetaData,
    column: &str,
    pages: &mut Vec<(i64, i64)>,
) -> DfResult<bool> {
    let file = metadata.file_metadata();
    let schema = parquet_to_arrow_schema(file.schema_descr(), file.key_value_metadata())?;
    let groups = metadata.row_groups();
    let indices: Vec<usize> = (0..groups.len()).collect();
    // A file without the column, or with another type in it, has nothing to bound it by.
    let Ok(converter) = StatisticsConverter::try_new(column, &schema, file.schema_descr()) else {
        return Ok(false);
    };
    if let (Some(column_index), Some(offset_index)) =
        (metadata.column_index(), metadata.offset_index())
    {
        let mins = converter.data_page_mins(column_index, offset_index, &indices)?;
        let maxes = converter.data_page_maxes(column_index, offset_index, &indices)?;
        let nulls = converter.data_page_null_counts(column_index, offset_index, &indices)?;
        let rows = converter.data_page_row_counts(offset_index, groups, &indices)?;
        if let (Some(mins), Some(maxes), Some(rows)) = (micros(&mins), micros(&maxes), rows) {
            let mut found = Vec::with_capacity(mins.len());
            let mut complete = mins.len() == rows.len();
            for i in 0..mins.len().min(rows.len()) {
                match (mins[i], maxes[i]) {
                    (Some(min), Some(max)) => found.push((min, max)),
                    _ if nulls.is_valid(i) && nulls.value(i) == rows.value(i) => {}
                    _ => complete = false,
                }
            }
            if complete {
                pages.extend(found);
                return Ok(true);
            }
        }
    }
    let mins = converter.row_group_mins(groups)?;
    let maxes = converter.row_group_maxes(groups)?;
    let nulls = converter.row_group_null_counts(groups)?;
    let (Some(mins), Some(maxes)) = (micros(&mins), micros(&maxes)) else {
        return Ok(false);
    };
    for (i, group) in groups.iter().enumerate() {
        match (mins[i], maxes[i]) {
            (Some(min), Some(max)) => pages.push((min, max)),
            _ if nulls.is_valid(i) && nulls.value(i) == group.num_rows() as u64 => {}
            _ => return Ok(false),
        }
    }
    Ok(true)
}

/// Timestamp statistics as microseconds since the epoch (the operators' unit), whatever the
/// file's unit and time zone (a zone changes how a value reads, not the instant); `None` for
/// any other type.
fn micros(values: &ArrayRef) -> Option<Vec<Option<i64>>> {
    let DataType::Timestamp(unit, _) = values.data_type() else {
        return None;
    };
    let to_micros = |v: i64| match unit {
        TimeUnit::Second => v.saturating_mul(1_000_000),
        TimeUnit::Millisecond => v.saturating_mul(1_000),
        TimeUnit::Microsecond => v,
        // Rounded down for a minimum and up for a maximum would be tighter; one microsecond
        // either way only widens the bound by as much.
        TimeUnit::Nanosecond => v.div_euclid(1_000),
    };
    let raw = arrow::compute::cast(values, &DataType::Int64).ok()?;
    let raw = raw.as_primitive::<Int64Type>();
    Some(raw.iter().map(|v| v.map(to_micros)).collect())
}

impl fmt::Debug for FileOrderExec {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "FileOrderExec(by {})", self.ts)
    }
}

impl DisplayAs for FileOrderExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        write!(
            f,
            "FileOrderExec: in file order by {} where the Parquet statistics bound its disorder, else sorted",
            self.ts
        )
    }
}

impl ExecutionPlan for FileOrderExec {
    fn name(&self) -> &str {
        "FileOrderExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![&self.input]
    }

    fn required_input_distribution(&self) -> Vec<Distribution> {
        vec![Distribution::UnspecifiedDistribution]
    }

    /// False: a round-robin split of the scan would lose the files' order.
    fn benefits_from_input_partitioning(&self) -> Vec<bool> {
        vec![false]
    }

    fn maintains_input_order(&self) -> Vec<bool> {
        vec![false]
    }

    fn apply_expressions(
        &self,
        f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> DfResult<TreeNodeRecursion>,
    ) -> DfResult<TreeNodeRecursion> {
        f(&self.ts)
    }

    fn with_new_children(
        self: Arc<Self>,
        mut children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        if children.len() != 1 {
            return internal_err!("FileOrderExec has one input");
        }
        let input = children.remove(0);
        Ok(Arc::new(FileOrderExec {
            properties: properties(input.schema()),
            input,
            ts: Arc::clone(&self.ts),
            planned: Arc::clone(&self.planned),
            disorder: Arc::clone(&self.disorder),
        }))
    }

    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> DfResult<SendableRecordBatchStream> {
        if partition != 0 {
            return internal_err!("FileOrderExec has one partition, not {partition}");
        }
        let (input, ts, disorder) = (
            Arc::clone(&self.input),
            Arc::clone(&self.ts),
            Arc::clone(&self.disorder),
        );
        // The optimizer may have changed the plan since: the bound holds while the scan still
        // reads the planned files in the planned order.
        let (files, bound) = self.planned.as_ref();
        let in_order = scanned_ts(&input, &ts).is_some_and(|(c, _)| file_names(c) == *files);
        let bound = in_order.then_some(*bound);
        let schema = input.schema();
        let rows = futures::stream::once(async move {
            let stream = match bound {
                Some(bound) => {
                    disorder.set(bound);
                    tracing::debug!("batch window input in file order, disorder bound {bound} µs");
                    let partitions = input.properties().partitioning.partition_count();
                    futures::stream::iter(0..partitions)
                        .map(move |p| input.execute(p, Arc::clone(&context)))
                        .try_flatten()
                        .boxed()
                }
                None => {
                    disorder.set(0);
                    let by_time = PhysicalSortExpr::new(
                        ts,
                        SortOptions {
                            descending: false,
                            nulls_first: true,
                        },
                    );
                    let ordering = LexOrdering::new([by_time]).expect("one sort expression");
                    let sorted =
                        SortExec::new(ordering.clone(), input).with_preserve_partitioning(true);
                    let merged = SortPreservingMergeExec::new(ordering, Arc::new(sorted));
                    merged.execute(0, context)?.boxed()
                }
            };
            Ok::<_, datafusion::error::DataFusionError>(stream)
        })
        .try_flatten();
        Ok(Box::pin(RecordBatchStreamAdapter::new(schema, rows)))
    }
}

/// The Parquet scan under `input` and its column that is the event time `ts`, when `input`
/// may be read in file order (see [`scanned_column`]).
fn scanned_ts<'a>(
    input: &'a Arc<dyn ExecutionPlan>,
    ts: &Arc<dyn PhysicalExpr>,
) -> Option<(&'a FileScanConfig, String)> {
    let column = (ts.as_ref() as &dyn Any).downcast_ref::<Column>()?;
    scanned_column(input, column.index())
}

/// The files `config` scans, in the order its partitions read them, each once (a file split
/// into byte ranges appears once per range, one after another).
fn files_in_order(config: &FileScanConfig) -> Vec<&PartitionedFile> {
    let mut files: Vec<&PartitionedFile> = Vec::new();
    for file in config.file_groups.iter().flat_map(|g| g.iter()) {
        if files
            .last()
            .is_none_or(|f| f.object_meta.location != file.object_meta.location)
        {
            files.push(file);
        }
    }
    files
}

fn file_names(config: &FileScanConfig) -> Vec<String> {
    files_in_order(config)
        .iter()
        .map(|f| f.object_meta.location.to_string())
        .collect()
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use arrow::array::{Int64Array, RecordBatch, TimestampMicrosecondArray};
    use arrow::datatypes::{Field, Schema};
    use datafusion::prelude::ParquetReadOptions;
    use parquet::arrow::ArrowWriter;
    use parquet::file::properties::WriterProperties;
    use rand::seq::SliceRandom;
    use rand::{Rng, SeedableRng};

    use super::*;
    use crate::exec::testing::sorted_lines;
    use crate::session::{RiffleSession, SessionOptions};

    /// Writes `files` Parquet files of `rows` rows each under `dir`, event times a second
    /// apart across the files, each moved by up to `jitter` seconds either way (every 29th
    /// NULL), or shuffled across each file when `shuffle`. Small pages and row groups, so the
    /// statistics have many parts. The event times in the order written.
    fn write(dir: &Path, files: usize, rows: usize, jitter: i64, shuffle: bool) -> Vec<i64> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(files as u64 * 31 + jitter as u64);
        let schema = Arc::new(Schema::new(vec![
            Field::new("ts", DataType::Timestamp(TimeUnit::Microsecond, None), true),
            Field::new("k", DataType::Int64, false),
            Field::new("u", DataType::Int64, false),
        ]));
        let props = WriterProperties::builder()
            .set_data_page_row_count_limit(50)
            .set_write_batch_size(50)
            .set_max_row_group_row_count(Some(500))
            .build();
        let mut written = Vec::new();
        for f in 0..files {
            let mut ts: Vec<Option<i64>> = (0..rows)
                .map(|i| {
                    let second = (f * rows + i) as i64 + rng.gen_range(-jitter..=jitter);
                    (i % 29 != 7).then_some(1_700_000_000_000_000 + second * 1_000_000)
                })
                .collect();
            if shuffle {
                ts.shuffle(&mut rng);
            }
            written.extend(ts.iter().flatten());
            let k: Int64Array = (0..rows).map(|_| Some(rng.gen_range(0..4i64))).collect();
            let u: Int64Array = (0..rows).map(|_| Some(rng.gen_range(0..40i64))).collect();
            let batch = RecordBatch::try_new(
                schema.clone(),
                vec![
                    Arc::new(TimestampMicrosecondArray::from(ts)),
                    Arc::new(k),
                    Arc::new(u),
                ],
            )
            .unwrap();
            let file = std::fs::File::create(dir.join(format!("part-{f}.parquet"))).unwrap();
            let mut writer =
                ArrowWriter::try_new(file, schema.clone(), Some(props.clone())).unwrap();
            writer.write(&batch).unwrap();
            writer.close().unwrap();
        }
        written
    }

    /// A session over the files in `dir` as table `p`, in three partitions whatever the
    /// machine's cores; with `split`, the files are split into byte ranges as large ones are.
    async fn session(dir: &Path, split: bool) -> RiffleSession {
        let session = RiffleSession::new(SessionOptions {
            batch_size: Some(64),
            ..SessionOptions::default()
        })
        .unwrap();
        {
            let state = session.context().state_ref();
            let mut state = state.write();
            let options = state.config_mut().options_mut();
            options.execution.target_partitions = 3;
            options.optimizer.repartition_file_min_size = 0;
            options.optimizer.repartition_file_scans = split;
        }
        session
            .context()
            .register_parquet("p", dir.to_str().unwrap(), ParquetReadOptions::default())
            .await
            .unwrap();
        session
    }

    /// The rows of `sql` in batch mode, the reference plan's, the physical plan as shown, and
    /// the disorder bound its window operator ran with (`None`: sorted by DataFusion).
    async fn run(
        session: &RiffleSession,
        sql: &str,
    ) -> (Vec<String>, Vec<String>, String, Option<i64>) {
        let df = session.dataframe(sql).await.unwrap();
        let plan = df.create_physical_plan().await.unwrap();
        let shown = datafusion::physical_plan::displayable(plan.as_ref())
            .indent(false)
            .to_string();
        let got = datafusion::physical_plan::collect(plan.clone(), session.context().task_ctx())
            .await
            .unwrap();
        let bound = find::<FileOrderExec>(&plan).and_then(|n| {
            let node = (n.as_ref() as &dyn Any).downcast_ref::<FileOrderExec>()?;
            node.disorder.bound()
        });
        let df = session.dataframe(sql).await.unwrap();
        let expected = session.reference(df).unwrap().collect().await.unwrap();
        (sorted_lines(&got), sorted_lines(&expected), shown, bound)
    }

    /// The first node of type `T` in `plan`, top down.
    fn find<T: 'static>(plan: &Arc<dyn ExecutionPlan>) -> Option<Arc<dyn ExecutionPlan>> {
        if (plan.as_ref() as &dyn Any).is::<T>() {
            return Some(Arc::clone(plan));
        }
        plan.children().into_iter().find_map(find::<T>)
    }

    const QUERIES: [&str; 3] = [
        "SELECT window(ts, '10 minutes', '2 minutes') AS w, k, count(*) AS n, \
         count(DISTINCT u) AS users, min(u) AS lo \
         FROM p WHERE u > 3 GROUP BY window(ts, '10 minutes', '2 minutes'), k",
        "SELECT window(ts, '5 minutes', '1 minute') AS w, count(DISTINCT u) AS users \
         FROM p GROUP BY window(ts, '5 minutes', '1 minute')",
        "SELECT session_window(ts, '20 seconds') AS s, k, count(*) AS n, max(u) AS hi \
         FROM p GROUP BY session_window(ts, '20 seconds'), k",
    ];

    #[tokio::test]
    async fn nearly_sorted_files_are_read_in_their_order_and_give_the_reference_rows() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), 3, 2_000, 30, false);
        let session = session(dir.path(), true).await;
        for sql in QUERIES {
            let (got, expected, plan, bound) = run(&session, sql).await;
            assert!(plan.contains("FileOrderExec"), "{sql}: {plan}");
            assert!(plan.contains("over rows in file order"), "{sql}: {plan}");
            assert!(!plan.contains("SortExec"), "{sql}: {plan}");
            // In file order: the pages' own spread (49 s) and jitter, not the files' hours.
            assert!(
                bound.is_some_and(|b| (60_000_000..=200_000_000).contains(&b)),
                "{sql}: bound {bound:?}"
            );
            assert!(expected.len() > 50, "{sql}: {}", expected.len());
            assert_eq!(got, expected, "{sql}");
        }
    }

    /// One file in one partition, fewer than the cores: DataFusion deals its batches out
    /// round-robin for the filter above it, and `KeepFileOrder` takes that out again.
    #[tokio::test]
    async fn a_scan_in_fewer_partitions_than_cores_keeps_its_order() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), 1, 3_000, 30, false);
        let session = session(dir.path(), false).await;
        let (got, expected, plan, bound) = run(&session, QUERIES[0]).await;
        assert!(!plan.contains("RoundRobin"), "{plan}");
        assert!(bound.is_some_and(|b| b > 0), "sorted: {plan}");
        assert_eq!(got, expected);
    }

    #[tokio::test]
    async fn shuffled_files_are_sorted_and_give_the_reference_rows() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), 2, 2_000, 0, true);
        let session = session(dir.path(), true).await;
        for sql in QUERIES {
            let (got, expected, plan, bound) = run(&session, sql).await;
            assert!(!plan.contains("FileOrderExec"), "{sql}: {plan}");
            assert!(plan.contains("SortExec"), "{sql}: {plan}");
            assert_eq!(bound, None);
            assert_eq!(got, expected, "{sql}");
        }
    }

    /// A plan changed after planning so that its input is no longer the files in order (here,
    /// each partition reversed) is sorted when it runs.
    #[tokio::test]
    async fn input_reordered_after_planning_is_sorted_when_it_runs() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), 2, 2_000, 30, false);
        let session = session(dir.path(), true).await;
        let df = session.dataframe(QUERIES[0]).await.unwrap();
        let plan = df.create_physical_plan().await.unwrap();
        let mut node = None;
        let plan = plan
            .transform_down(|n| {
                let Some(f) = (n.as_ref() as &dyn Any).downcast_ref::<FileOrderExec>() else {
                    return Ok(Transformed::no(n));
                };
                node = Some(Arc::clone(&f.disorder));
                let by_time = PhysicalSortExpr::new(
                    Arc::clone(&f.ts),
                    SortOptions {
                        descending: true,
                        nulls_first: false,
                    },
                );
                let reversed =
                    SortExec::new(LexOrdering::new([by_time]).unwrap(), Arc::clone(&f.input))
                        .with_preserve_partitioning(true);
                let n = n.replace_children(
                    vec![Arc::new(reversed)],
                    ReplaceChildrenOptions::new(ChildrenPropertiesMode::Recompute),
                )?;
                Ok(Transformed::new(n, true, TreeNodeRecursion::Jump))
            })
            .unwrap()
            .data;
        let got = datafusion::physical_plan::collect(plan, session.context().task_ctx())
            .await
            .unwrap();
        assert_eq!(node.expect("a FileOrderExec").bound(), Some(0));
        let df = session.dataframe(QUERIES[0]).await.unwrap();
        let expected = session.reference(df).unwrap().collect().await.unwrap();
        assert_eq!(sorted_lines(&got), sorted_lines(&expected));
    }

    /// The bound from the statistics is never below the true disorder of the rows in file
    /// order (else rows would be dropped as late), and not far above it.
    #[tokio::test]
    async fn the_bound_covers_every_row_read_after_a_later_one() {
        for (jitter, shuffle) in [(0, false), (30, false), (300, false), (0, true)] {
            let dir = tempfile::tempdir().unwrap();
            let written = write(dir.path(), 2, 1_500, jitter, shuffle);
            let mut latest = i64::MIN;
            let mut truth = 0;
            for &ts in &written {
                latest = latest.max(ts);
                truth = truth.max(latest - ts);
            }
            let session = session(dir.path(), true).await;
            let df = session.dataframe("SELECT ts FROM p").await.unwrap();
            let plan = df.create_physical_plan().await.unwrap();
            let scan = find::<DataSourceExec>(&plan).expect("a scan");
            let (config, _) = (scan.as_ref() as &dyn Any)
                .downcast_ref::<DataSourceExec>()
                .and_then(|s| s.downcast_to_file_source::<ParquetSource>())
                .expect("a Parquet scan");
            let (bound, span) = disorder_bound(config, "ts", &session.context().task_ctx())
                .await
                .unwrap()
                .unwrap();
            assert!(bound >= truth, "jitter {jitter}: bound {bound} < {truth}");
            // Within a page's spread (50 rows of a second, and their jitter) of the truth.
            let slack = (50 + 4 * jitter) * 1_000_000;
            if !shuffle {
                assert!(
                    bound <= truth + slack,
                    "jitter {jitter}: {bound} vs {truth}"
                );
            }
            assert!(span > 2_900 * 1_000_000, "{span}");
        }
    }
}
