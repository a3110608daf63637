//! `riffle verify PIPELINE`: does what a stream wrote equal what batch mode computes from the
//! same inputs?
//!
//! Riffle promises that a pipeline's stream output is the rows its batch run gives over the
//! same data. This module checks the promise on real output, the way Chronon's online-offline
//! consistency job checks a feature store, but for any pipeline: it runs the query in batch
//! mode over the sources' `batch` inputs, reads back what stream mode wrote to its sink (a
//! Parquet directory, a Delta table or a Kafka topic), keeps the rows of an event-time range on
//! both sides, and pairs them up.
//!
//! **Pairing.** Rows pair by key columns (`--key`; a Delta sink's merge keys by default), so a
//! row whose values differ shows as *mismatched*, with the largest difference per column.
//! Without keys a row is its own key: the two sides are compared as multisets of whole rows,
//! and a changed row shows as one *missing* and one *extra*. Rows repeating a key are paired
//! in sorted order, so a row the stream wrote twice (an at-least-once replay) shows as
//! *extra*.
//!
//! **What the stream wrote.** Append mode: every row. Update mode: the last row written per
//! key (a Delta table's merge already keeps just that; a Kafka topic is read partition by
//! partition, so its record key should be among the key columns). Complete mode: the last
//! epoch's rows.
//! A Parquet directory may hold the files of several queries (checkpoints); only those of the
//! pipeline's checkpoint count.
//!
//! **Exactness.** Values compare exactly (floats by bit pattern, NULL equal to NULL) unless
//! `--tolerance` allows a relative difference on float columns: a `sum` of floats over the
//! same rows added in another order (batch mode splits its input across cores, the stream
//! adds epoch by epoch) can differ in the last bits. `--reference` recomputes
//! windows with plain DataFusion plans instead of the streaming operators that batch mode
//! shares with the stream (see [`crate::window::reference_rewrite`]), so the check does not
//! rest on the code it checks.
//!
//! Both sides are held in memory: this is a check over a range of output, not a join of two
//! tables of any size.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, BooleanArray, Float64Array, Int64Array, RecordBatch};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::util::display::{ArrayFormatter, FormatOptions};
use datafusion::datasource::MemTable;
use datafusion::prelude::SessionContext;
use serde::Serialize;

use crate::common::OutputMode;
use crate::common::time::Watermark;
use crate::connectors::delta;
use crate::connectors::files::read_file;
use crate::error::{Result, RiffleError};
use crate::pipeline::{Pipeline, RunOptions, StreamOutput};
use crate::session::RiffleSession;

/// What to compare.
#[derive(Clone, Debug, Default)]
pub struct VerifyOptions {
    /// UDF compile cache and the like, as for `riffle run`.
    pub run: RunOptions,
    /// Keep rows whose time column is at or after this (µs since the epoch).
    pub from: Option<i64>,
    /// ... and before this.
    pub to: Option<i64>,
    /// The output column the range applies to (default: a source's event-time column,
    /// `window_start` or `window`, whichever the output has; a window by its start).
    pub time_column: Option<String>,
    /// Columns that identify a row (default: a Delta sink's merge keys, else whole rows).
    pub keys: Vec<String>,
    /// Float values count as equal when they differ by at most this much relative to the
    /// larger (absolute below 1): a sum of floats added in another order may differ in its
    /// last bits (default 0: exact).
    pub tolerance: f64,
    /// Recompute windows with plain DataFusion plans, sharing no operator with the stream.
    pub reference: bool,
    /// Recompute from each source's rows that are before its watermark at the stream's last
    /// commit: the rows an OVER window has released, for an update- or complete-mode
    /// aggregation after one (whose rows cover only what the OVER window let through).
    /// `None`: do so exactly when the query is such an aggregation after an OVER window.
    pub until_watermark: Option<bool>,
    /// Rows of each kind shown as examples.
    pub examples: usize,
}

/// How one column differs among the rows found on both sides.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct ColumnDifference {
    /// The column.
    pub column: String,
    /// Paired rows whose value in this column differs.
    pub rows: u64,
    /// The largest absolute difference among them, for numbers (timestamps: µs); `None` when
    /// no two numbers differ (only NULLs or text).
    pub largest: Option<f64>,
}

/// The outcome of [`verify`].
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// The pipeline file.
    pub pipeline: PathBuf,
    /// What was read as the stream's output.
    pub stream_output: String,
    /// The output column the range applies to, and the range (RFC 3339).
    pub time_column: Option<String>,
    /// Start of the range.
    pub from: Option<String>,
    /// End of the range (exclusive).
    pub to: Option<String>,
    /// The columns rows were paired by (every column when no key was given).
    pub keys: Vec<String>,
    /// Whether rows were compared whole (no key).
    pub whole_rows: bool,
    /// The relative difference of floats still counted equal (0: exact).
    pub tolerance: f64,
    /// Rows in the range, recomputed in batch mode.
    pub batch_rows: u64,
    /// Rows in the range the stream wrote.
    pub stream_rows: u64,
    /// Rows found on both sides with the same values.
    pub matched: u64,
    /// Rows found on both sides (by key) with some value different.
    pub mismatched: u64,
    /// Rows batch mode computes that the stream did not write.
    pub missing: u64,
    /// Rows the stream wrote that batch mode does not compute.
    pub extra: u64,
    /// Per value column, how paired rows differ (columns that never differ included).
    pub columns: Vec<ColumnDifference>,
    /// The first few rows of each kind (`mismatched`, `missing`, `extra`), described.
    pub examples: Vec<Example>,
    /// What else a reader should know (skipped files, undecodable records, repeated keys).
    pub notes: Vec<String>,
}

/// One example row.
#[derive(Clone, Debug, Serialize)]
pub struct Example {
    /// `mismatched`, `missing` or `extra`.
    pub kind: &'static str,
    /// Its key and, when mismatched, the values that differ.
    pub row: String,
}

impl Report {
    /// Whether the stream wrote exactly the rows batch mode computes.
    pub fn consistent(&self) -> bool {
        self.mismatched == 0 && self.missing == 0 && self.extra == 0
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "verify {}", self.pipeline.display())?;
        writeln!(f, "  stream output  {}", self.stream_output)?;
        let range = match (&self.from, &self.to) {
            (None, None) => "all rows".to_string(),
            (from, to) => format!(
                "{} in [{}, {})",
                self.time_column.as_deref().unwrap_or("?"),
                from.as_deref().unwrap_or("start"),
                to.as_deref().unwrap_or("end")
            ),
        };
        writeln!(
            f,
            "  range          {range}: batch {} rows, stream {} rows",
            self.batch_rows, self.stream_rows
        )?;
        if self.whole_rows {
            writeln!(
                f,
                "  key            none: rows compared whole (give --key to pair rows and see \
                 differences per column)"
            )?;
        } else {
            writeln!(f, "  key            {}", self.keys.join(", "))?;
        }
        writeln!(
            f,
            "  matched {} · mismatched {} · missing {} · extra {}",
            self.matched, self.mismatched, self.missing, self.extra
        )?;
        if !self.columns.is_empty() && self.mismatched > 0 {
            writeln!(
                f,
                "  differences per column (rows that differ, largest difference):"
            )?;
            let width = self
                .columns
                .iter()
                .map(|c| c.column.len())
                .max()
                .unwrap_or(0);
            for c in &self.columns {
                let largest = c.largest.map(|d| format!("  {d}")).unwrap_or_default();
                writeln!(f, "    {:width$}  {}{largest}", c.column, c.rows)?;
            }
        }
        for kind in ["mismatched", "missing", "extra"] {
            let rows: Vec<&Example> = self.examples.iter().filter(|e| e.kind == kind).collect();
            if rows.is_empty() {
                continue;
            }
            let title = match kind {
                "mismatched" => "mismatched (batch / stream)",
                "missing" => "missing from the stream",
                _ => "extra in the stream",
            };
            writeln!(f, "  {title}, first {}:", rows.len())?;
            for e in rows {
                writeln!(f, "    {}", e.row)?;
            }
        }
        for note in &self.notes {
            writeln!(f, "  note: {note}")?;
        }
        if self.consistent() && self.tolerance > 0.0 {
            write!(
                f,
                "consistent: the stream wrote the rows batch mode computes, floats within a \
                 relative {:e}",
                self.tolerance
            )
        } else if self.consistent() {
            write!(
                f,
                "consistent: the stream wrote exactly the rows batch mode computes"
            )
        } else {
            write!(
                f,
                "INCONSISTENT: the stream's output differs from the batch result"
            )
        }
    }
}

/// Recomputes `pipeline`'s output in batch mode and compares it with what its stream wrote.
///
/// # Errors
/// A pipeline without batch inputs or with a console sink, a stream that has not run (no
/// checkpoint), columns that do not line up, unreadable output, and batch-mode errors.
pub async fn verify(pipeline: &Pipeline, options: &VerifyOptions) -> Result<Report> {
    let mut notes = Vec::new();
    let output = pipeline.stream_output()?;
    let mode = pipeline.output_mode();
    let default_keys: Vec<String> = match &output {
        StreamOutput::Delta { keys, .. } => keys.to_vec(),
        _ => Vec::new(),
    };
    let keys = if options.keys.is_empty() {
        default_keys
    } else {
        options.keys.clone()
    };
    if mode == OutputMode::Update && keys.is_empty() {
        return Err(RiffleError::Config(
            "an update-mode stream writes each result row again when it changes: give --key, \
             the columns that identify a result row (its GROUP BY columns)"
                .into(),
        ));
    }
    let (session, _) = pipeline.batch_session(&options.run).await?;
    let cut = match options.until_watermark {
        Some(cut) => cut,
        None => {
            matches!(mode, OutputMode::Update | OutputMode::Complete)
                && has_over_window(&session, pipeline.query()).await?
        }
    };
    if cut {
        let cut = until_watermark(pipeline, &session).await?;
        notes.push(format!(
            "recomputed from the rows before the stream's watermark: {cut}{}",
            if options.until_watermark.is_none() {
                " (an OVER window releases a row once the watermark passes it, so an \
                 update-mode result after one covers only those rows; --all-events compares \
                 every row)"
            } else {
                ""
            }
        ));
    }
    let mut df = session.dataframe(pipeline.query()).await?;
    if options.reference {
        df = session.reference(df)?;
    }
    let expected: SchemaRef = Arc::new(df.schema().as_arrow().clone());
    // One schema for both sides: the query's, every column nullable (a sink may have stored
    // a column as nullable that the query declares not null).
    let schema = Arc::new(Schema::new(
        expected
            .fields()
            .iter()
            .map(|f| Field::new(f.name(), f.data_type().clone(), true))
            .collect::<Vec<_>>(),
    ));
    // Bad arguments first, then the stream's output: neither should wait for a batch run.
    for k in &keys {
        if schema.field_with_name(k).is_err() {
            return Err(RiffleError::Config(format!(
                "key column {k:?} is not a column of the output ({})",
                column_list(&schema)
            )));
        }
    }
    let time_column = time_column(pipeline, &schema, options)?;
    let (stream_batches, description) =
        read_stream_output(pipeline, &output, mode, &expected, &mut notes).await?;
    let rows = |batches: &[RecordBatch]| batches.iter().map(RecordBatch::num_rows).sum::<usize>();
    tracing::info!(
        "read {} rows from {description}; recomputing them in batch mode",
        rows(&stream_batches)
    );
    session.show_progress(options.run.live);
    let batch_batches = session.collect(df).await?;
    tracing::info!(
        "batch mode gave {} rows; pairing them up",
        rows(&batch_batches)
    );

    let batch_side = conform(&batch_batches, &schema, "the batch result")?;
    let mut stream_side = conform(&stream_batches, &schema, &description)?;
    if mode == OutputMode::Update && !matches!(output, StreamOutput::Delta { .. }) {
        stream_side = last_per_key(&stream_side, &schema, &keys)?;
    }
    let compare = Comparison::new(&schema, &keys, options.tolerance);
    let range = match &time_column {
        Some(c) => range_filter(&schema, c, options.from, options.to),
        None => "TRUE".to_string(),
    };
    let paired = pair_up(
        &compare,
        &schema,
        [batch_side, stream_side],
        &range,
        options.examples,
    )
    .await?;
    if paired.repeated_batch_keys > 0 && !keys.is_empty() {
        notes.push(format!(
            "{} keys occur more than once in the batch result, so ({}) does not identify a \
             row; rows sharing a key were paired in sorted order",
            paired.repeated_batch_keys,
            keys.join(", ")
        ));
    }
    let [batch_rows, stream_rows, matched, mismatched, missing, extra] = paired.counts;
    if batch_rows == 0 && stream_rows == 0 {
        notes.push("neither side has rows in the range, so nothing was compared".into());
    }

    let time = |t: Option<i64>| {
        t.map(|t| {
            crate::common::time::Watermark(t)
                .rfc3339()
                .unwrap_or_else(|| t.to_string())
        })
    };
    Ok(Report {
        pipeline: pipeline.file().to_path_buf(),
        stream_output: description,
        time_column: time_column.filter(|_| options.from.is_some() || options.to.is_some()),
        from: time(options.from),
        to: time(options.to),
        whole_rows: keys.is_empty(),
        tolerance: options.tolerance,
        keys: if keys.is_empty() {
            schema.fields().iter().map(|f| f.name().clone()).collect()
        } else {
            keys
        },
        batch_rows,
        stream_rows,
        matched,
        mismatched,
        missing,
        extra,
        columns: paired.columns,
        examples: paired.examples,
        notes,
    })
}

/// Whether `query` has an OVER window, in itself or in a view it reads.
async fn has_over_window(session: &RiffleSession, query: &str) -> Result<bool> {
    use datafusion::common::tree_node::TreeNode;
    use datafusion::logical_expr::LogicalPlan;
    // Analyzed, so that views are inlined (batch mode has made OVER windows `Over` nodes).
    let plan = session.dataframe(query).await?.into_optimized_plan()?;
    Ok(plan.exists(|p| {
        Ok(match p {
            LogicalPlan::Window(_) => true,
            LogicalPlan::Extension(e) => e.node.name() == "Over",
            _ => false,
        })
    })?)
}

/// Replaces each streaming source's batch table in `session` by its rows before the source's
/// watermark at the stream's last commit, and says where each source was cut.
async fn until_watermark(pipeline: &Pipeline, session: &RiffleSession) -> Result<String> {
    use datafusion::logical_expr::{cast, col, lit};
    use datafusion::scalar::ScalarValue;

    let checkpoint = pipeline
        .checkpoint_dir()
        .ok_or_else(|| RiffleError::Config("the pipeline names no stream.checkpoint".into()))?;
    let commit = crate::checkpoint::status::read(checkpoint, None)?
        .last_commit
        .ok_or_else(|| {
            RiffleError::Config(
                "--until-watermark: the stream has committed no epoch yet, so it has no \
                 watermark"
                    .into(),
            )
        })?;
    let ctx = session.context();
    let mut cuts = Vec::new();
    for (name, event_time) in pipeline.sources_with_event_time() {
        let watermark = commit.sources.get(name).map(|p| p.watermark);
        let Some(watermark) = watermark.filter(|w| *w != Watermark::NONE) else {
            return Err(RiffleError::Config(format!(
                "--until-watermark: source {name} has no watermark in the last commit (epoch \
                 {}): it has read no rows yet",
                commit.epoch
            )));
        };
        let table = ctx.table(name).await?;
        let ts_type = table
            .schema()
            .field_with_unqualified_name(event_time)?
            .data_type()
            .clone();
        let before = col(ident(event_time)).lt(cast(
            lit(ScalarValue::TimestampMicrosecond(
                Some(watermark.micros()),
                None,
            )),
            ts_type,
        ));
        let view = table.filter(before)?.into_view();
        ctx.deregister_table(name)?;
        ctx.register_table(name, view)?;
        cuts.push(format!(
            "{name}.{event_time} < {}",
            watermark
                .rfc3339()
                .unwrap_or_else(|| watermark.micros().to_string())
        ));
    }
    if cuts.is_empty() {
        return Err(RiffleError::Config(
            "--until-watermark: the pipeline's sources declare no event_time".into(),
        ));
    }
    Ok(cuts.join(", "))
}

/// How the two sides paired up.
struct Paired {
    /// Batch rows, stream rows, matched, mismatched, missing, extra.
    counts: [u64; 6],
    columns: Vec<ColumnDifference>,
    examples: Vec<Example>,
    /// Keys the batch side has more than once.
    repeated_batch_keys: u64,
}

/// Pairs the rows of `sides` (batch, then stream; both of `schema`) within `range` and counts
/// how they pair, with up to `examples` rows of each kind.
async fn pair_up(
    compare: &Comparison,
    schema: &SchemaRef,
    sides: [Vec<RecordBatch>; 2],
    range: &str,
    examples: usize,
) -> Result<Paired> {
    let ctx = SessionContext::new();
    let [batch_side, stream_side] = sides;
    for (name, batches) in [("batch_all", batch_side), ("stream_all", stream_side)] {
        ctx.register_table(
            name,
            Arc::new(MemTable::try_new(schema.clone(), vec![batches])?),
        )?;
    }
    for (side, all) in [("b", "batch_all"), ("s", "stream_all")] {
        let sql = compare.numbered(all, range);
        ctx.register_table(side, ctx.sql(&sql).await?.into_view())?;
    }
    // Held once: the counts and each kind of example read it again.
    let joined = ctx.sql(&compare.joined()).await?;
    let joined_schema = Arc::new(joined.schema().as_arrow().clone());
    let joined = joined.collect().await?;
    ctx.register_table(
        "joined",
        Arc::new(MemTable::try_new(joined_schema, vec![joined])?),
    )?;

    let counts = ctx.sql(&compare.counts()).await?.collect().await?;
    let counts = counts
        .first()
        .ok_or_else(|| RiffleError::Internal("verify: the count query returned no row".into()))?;
    let int = |i: usize| -> u64 {
        counts
            .column(i)
            .as_any()
            .downcast_ref::<Int64Array>()
            .filter(|a| a.is_valid(0))
            .map_or(0, |a| a.value(0).max(0) as u64)
    };
    let columns = compare
        .values
        .iter()
        .enumerate()
        .map(|(j, &i)| {
            let largest = counts
                .column(7 + 2 * j + 1)
                .as_any()
                .downcast_ref::<Float64Array>()
                .filter(|a| a.is_valid(0))
                .map(|a| a.value(0));
            ColumnDifference {
                column: schema.field(i).name().clone(),
                rows: int(7 + 2 * j),
                largest,
            }
        })
        .collect();
    let mut shown = Vec::new();
    for kind in ["mismatched", "missing", "extra"] {
        if examples == 0 {
            break;
        }
        let rows = ctx
            .sql(&compare.examples(kind, examples))
            .await?
            .collect()
            .await?;
        for b in &rows {
            shown.extend(compare.describe(kind, b, schema)?);
        }
    }
    Ok(Paired {
        counts: [int(0), int(1), int(2), int(3), int(4), int(5)],
        columns,
        examples: shown,
        repeated_batch_keys: int(6),
    })
}

fn column_list(schema: &Schema) -> String {
    schema
        .fields()
        .iter()
        .map(|f| f.name().as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// A SQL identifier for any column name.
fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// The output column a time range applies to.
fn time_column(
    pipeline: &Pipeline,
    schema: &Schema,
    options: &VerifyOptions,
) -> Result<Option<String>> {
    if options.from.is_none() && options.to.is_none() {
        return Ok(options.time_column.clone());
    }
    let column = match &options.time_column {
        Some(c) => c.clone(),
        None => pipeline
            .event_time_columns()
            .into_iter()
            .chain(["window_start", "window"])
            .find(|c| schema.field_with_name(c).is_ok())
            .ok_or_else(|| {
                RiffleError::Config(format!(
                    "--from/--to: no output column to apply them to; name one with \
                     --time-column (the output has {})",
                    column_list(schema)
                ))
            })?
            .to_string(),
    };
    match schema.field_with_name(&column).map(|f| f.data_type()) {
        Ok(DataType::Timestamp(..) | DataType::Date32 | DataType::Date64) => Ok(Some(column)),
        Ok(DataType::Struct(fields)) if fields.iter().any(|f| f.name() == "start") => {
            Ok(Some(column))
        }
        Ok(other) => Err(RiffleError::Config(format!(
            "--time-column {column}: a {other} column, not a timestamp"
        ))),
        Err(_) => Err(RiffleError::Config(format!(
            "--time-column {column}: not a column of the output ({})",
            column_list(schema)
        ))),
    }
}

/// The SQL condition for the range; a window column (a struct of `start` and `end`) is placed
/// by its start.
fn range_filter(schema: &Schema, column: &str, from: Option<i64>, to: Option<i64>) -> String {
    let time = match schema.field_with_name(column).map(|f| f.data_type()) {
        Ok(DataType::Struct(_)) => format!("{}['start']", ident(column)),
        _ => ident(column),
    };
    let c = format!("CAST({time} AS TIMESTAMP)");
    let mut parts = vec!["TRUE".to_string()];
    if let Some(from) = from {
        parts.push(format!("{c} >= to_timestamp_micros({from})"));
    }
    if let Some(to) = to {
        parts.push(format!("{c} < to_timestamp_micros({to})"));
    }
    parts.join(" AND ")
}

/// The SQL that pairs the two sides. Columns are addressed by position (`b_3`, `s_3`), so any
/// column name works.
struct Comparison {
    names: Vec<String>,
    types: Vec<DataType>,
    /// Indexes of the key columns (all columns when no key was given).
    keys: Vec<usize>,
    /// Indexes of the other columns.
    values: Vec<usize>,
    tolerance: f64,
}

impl Comparison {
    fn new(schema: &Schema, keys: &[String], tolerance: f64) -> Self {
        let names: Vec<String> = schema.fields().iter().map(|f| f.name().clone()).collect();
        let key_idx: Vec<usize> = if keys.is_empty() {
            (0..names.len()).collect()
        } else {
            keys.iter()
                .filter_map(|k| names.iter().position(|n| n == k))
                .collect()
        };
        let values = (0..names.len()).filter(|i| !key_idx.contains(i)).collect();
        Comparison {
            types: schema
                .fields()
                .iter()
                .map(|f| f.data_type().clone())
                .collect(),
            names,
            keys: key_idx,
            values,
            tolerance,
        }
    }

    /// One side's rows in the range, each with its copy number among rows of the same key
    /// (in value order) and a marker that it exists.
    fn numbered(&self, table: &str, range: &str) -> String {
        let keys: Vec<String> = self.keys.iter().map(|&i| ident(&self.names[i])).collect();
        let order = if self.values.is_empty() {
            String::new()
        } else {
            let values: Vec<String> = self
                .values
                .iter()
                .map(|&i| format!("{} NULLS FIRST", ident(&self.names[i])))
                .collect();
            format!(" ORDER BY {}", values.join(", "))
        };
        let columns: Vec<String> = self
            .names
            .iter()
            .enumerate()
            .map(|(i, n)| format!("{} AS c_{i}", ident(n)))
            .collect();
        format!(
            "SELECT {}, row_number() OVER (PARTITION BY {}{order}) AS nth, TRUE AS here \
             FROM {table} WHERE {range}",
            columns.join(", "),
            keys.join(", ")
        )
    }

    fn joined(&self) -> String {
        // Each predicate in parentheses: sqlparser binds `IS NOT DISTINCT FROM` looser than
        // `AND`.
        let mut on: Vec<String> = self
            .keys
            .iter()
            .map(|i| format!("(b.c_{i} IS NOT DISTINCT FROM s.c_{i})"))
            .collect();
        on.push("(b.nth IS NOT DISTINCT FROM s.nth)".into());
        // Which copy of its key a batch row is: the second copies count keys that repeat.
        let mut select = vec![
            "b.here IS NOT NULL AS in_b".to_string(),
            "s.here IS NOT NULL AS in_s".to_string(),
            "b.nth AS b_nth".to_string(),
        ];
        for i in 0..self.names.len() {
            select.push(format!("b.c_{i} AS b_{i}"));
            select.push(format!("s.c_{i} AS s_{i}"));
        }
        for &i in &self.values {
            let mut same = format!("(b_{i} IS NOT DISTINCT FROM s_{i})");
            if self.tolerance > 0.0 && self.types[i].is_floating() {
                same = format!(
                    "({same} OR abs(b_{i} - s_{i}) <= {:e} * greatest(1.0, abs(b_{i}), abs(s_{i})))",
                    self.tolerance
                );
            }
            select.push(format!("in_b AND in_s AND NOT ({same}) AS d_{i}"));
        }
        // `d_*` refer to `in_*` and `b_*`, so they are computed one level up.
        let inner = select[..3 + 2 * self.names.len()].join(", ");
        let outer = select[3 + 2 * self.names.len()..].join(", ");
        let outer = if outer.is_empty() {
            "*".to_string()
        } else {
            format!("*, {outer}")
        };
        format!(
            "SELECT {outer} FROM (SELECT {inner} FROM b FULL OUTER JOIN s ON {})",
            on.join(" AND ")
        )
    }

    fn any_difference(&self) -> String {
        if self.values.is_empty() {
            return "FALSE".into();
        }
        let d: Vec<String> = self.values.iter().map(|i| format!("d_{i}")).collect();
        format!("({})", d.join(" OR "))
    }

    fn counts(&self) -> String {
        let count = |cond: &str| format!("CAST(sum(CASE WHEN {cond} THEN 1 ELSE 0 END) AS BIGINT)");
        let any = self.any_difference();
        let mut select = vec![
            count("in_b"),
            count("in_s"),
            count(&format!("in_b AND in_s AND NOT {any}")),
            count(&format!("in_b AND in_s AND {any}")),
            count("NOT in_s"),
            count("NOT in_b"),
            count("b_nth = 2"),
        ];
        for &i in &self.values {
            select.push(count(&format!("d_{i}")));
            let largest = match &self.types[i] {
                t if t.is_numeric() => {
                    format!("abs(CAST(b_{i} AS DOUBLE) - CAST(s_{i} AS DOUBLE))")
                }
                DataType::Timestamp(..) => format!(
                    "abs(CAST(CAST(CAST(b_{i} AS TIMESTAMP) AS BIGINT) AS DOUBLE) - \
                     CAST(CAST(CAST(s_{i} AS TIMESTAMP) AS BIGINT) AS DOUBLE)) / 1000.0"
                ),
                _ => "CAST(NULL AS DOUBLE)".to_string(),
            };
            select.push(format!(
                "CAST(max(CASE WHEN d_{i} THEN {largest} END) AS DOUBLE)"
            ));
        }
        format!("SELECT {} FROM joined", select.join(", "))
    }

    fn examples(&self, kind: &str, limit: usize) -> String {
        let any = self.any_difference();
        let (cond, side) = match kind {
            "mismatched" => (format!("in_b AND in_s AND {any}"), "b"),
            "missing" => ("NOT in_s".to_string(), "b"),
            _ => ("NOT in_b".to_string(), "s"),
        };
        let order: Vec<String> = self
            .keys
            .iter()
            .map(|i| format!("{side}_{i} NULLS FIRST"))
            .collect();
        format!(
            "SELECT * FROM joined WHERE {cond} ORDER BY {} LIMIT {limit}",
            order.join(", ")
        )
    }

    /// Describes the example rows of `batch` (rows of `joined`).
    fn describe(
        &self,
        kind: &'static str,
        batch: &RecordBatch,
        schema: &Schema,
    ) -> Result<Vec<Example>> {
        let options = FormatOptions::default().with_null("NULL");
        let column = |name: &str| -> Result<&ArrayRef> {
            batch.column_by_name(name).ok_or_else(|| {
                RiffleError::Internal(format!("verify: column {name} missing from the join"))
            })
        };
        let side = if kind == "extra" { "s" } else { "b" };
        let mut out = Vec::new();
        for row in 0..batch.num_rows() {
            let mut text = String::new();
            for (n, &i) in self.keys.iter().enumerate() {
                let value =
                    ArrayFormatter::try_new(column(&format!("{side}_{i}"))?.as_ref(), &options)?
                        .value(row)
                        .to_string();
                let sep = if n == 0 { "" } else { ", " };
                let _ = write!(text, "{sep}{}={value}", schema.field(i).name());
            }
            if kind == "mismatched" {
                for &i in &self.values {
                    let differs = column(&format!("d_{i}"))?
                        .as_any()
                        .downcast_ref::<BooleanArray>()
                        .is_some_and(|d| d.is_valid(row) && d.value(row));
                    if differs {
                        let b =
                            ArrayFormatter::try_new(column(&format!("b_{i}"))?.as_ref(), &options)?;
                        let s =
                            ArrayFormatter::try_new(column(&format!("s_{i}"))?.as_ref(), &options)?;
                        let _ = write!(
                            text,
                            "; {} {} / {}",
                            schema.field(i).name(),
                            b.value(row),
                            s.value(row)
                        );
                    }
                }
            }
            out.push(Example { kind, row: text });
        }
        Ok(out)
    }
}

/// `batches` with `schema`'s columns, found by name and cast to its types. `what` names the
/// side in errors.
fn conform(batches: &[RecordBatch], schema: &SchemaRef, what: &str) -> Result<Vec<RecordBatch>> {
    let mut out = Vec::with_capacity(batches.len());
    for b in batches {
        let have = b.schema();
        let extra: Vec<&str> = have
            .fields()
            .iter()
            .map(|f| f.name().as_str())
            .filter(|n| schema.field_with_name(n).is_err())
            .collect();
        let mut columns = Vec::with_capacity(schema.fields().len());
        for f in schema.fields() {
            let Some(column) = b.column_by_name(f.name()) else {
                return Err(RiffleError::Config(format!(
                    "{what} has no column {:?}: its columns are {}, the query's are {} (was \
                     it written by another query?)",
                    f.name(),
                    column_list(&have),
                    column_list(schema)
                )));
            };
            columns.push(if column.data_type() == f.data_type() {
                column.clone()
            } else {
                arrow::compute::cast(column, f.data_type()).map_err(|e| {
                    RiffleError::Config(format!(
                        "{what}: column {:?} is {}, the query gives {}: {e}",
                        f.name(),
                        column.data_type(),
                        f.data_type()
                    ))
                })?
            });
        }
        if !extra.is_empty() {
            return Err(RiffleError::Config(format!(
                "{what} has columns the query does not give: {} (was it written by another \
                 query?)",
                extra.join(", ")
            )));
        }
        out.push(RecordBatch::try_new(schema.clone(), columns)?);
    }
    Ok(out)
}

/// The last row per key, in the order written: what an update-mode stream's output means.
fn last_per_key(
    batches: &[RecordBatch],
    schema: &SchemaRef,
    keys: &[String],
) -> Result<Vec<RecordBatch>> {
    use arrow::row::{RowConverter, SortField};
    let key_idx: Vec<usize> = keys
        .iter()
        .filter_map(|k| schema.index_of(k).ok())
        .collect();
    let converter = RowConverter::new(
        key_idx
            .iter()
            .map(|&i| SortField::new(schema.field(i).data_type().clone()))
            .collect(),
    )?;
    let mut last: HashMap<Vec<u8>, (usize, usize)> = HashMap::new();
    let mut order: Vec<Vec<u8>> = Vec::new();
    for (bi, b) in batches.iter().enumerate() {
        let columns: Vec<ArrayRef> = key_idx.iter().map(|&i| b.column(i).clone()).collect();
        let rows = converter.convert_columns(&columns)?;
        for r in 0..b.num_rows() {
            let key = rows.row(r).as_ref().to_vec();
            if last.insert(key.clone(), (bi, r)).is_none() {
                order.push(key);
            }
        }
    }
    let picks: Vec<(usize, usize)> = order.iter().map(|k| last[k]).collect();
    if picks.is_empty() {
        return Ok(Vec::new());
    }
    let refs: Vec<&RecordBatch> = batches.iter().collect();
    Ok(vec![arrow::compute::interleave_record_batch(
        &refs, &picks,
    )?])
}

/// The files of a Parquet directory sink written by query `query_id`, by epoch.
fn epoch_files(dir: &Path, query_id: &str, notes: &mut Vec<String>) -> Result<Vec<(u64, PathBuf)>> {
    let entries = std::fs::read_dir(dir).map_err(|e| RiffleError::io("listing", dir, e))?;
    let mut files = Vec::new();
    let mut others = 0;
    for entry in entries {
        let entry = entry.map_err(|e| RiffleError::io("listing", dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(stem) = name
            .strip_prefix("part-")
            .and_then(|n| n.strip_suffix(".parquet"))
        else {
            continue;
        };
        let Some((epoch, id)) = stem.split_once('-') else {
            continue;
        };
        let Ok(epoch) = epoch.parse::<u64>() else {
            continue;
        };
        if id == query_id {
            files.push((epoch, entry.path()));
        } else {
            others += 1;
        }
    }
    if others > 0 {
        notes.push(format!(
            "{others} files in {} were written by other queries (other checkpoints) and are \
             not compared",
            dir.display()
        ));
    }
    files.sort();
    Ok(files)
}

/// Reads what stream mode wrote; returns its rows (in the order written) and a description.
/// Kafka records decode against `schema`, the query's.
async fn read_stream_output(
    pipeline: &Pipeline,
    output: &StreamOutput<'_>,
    mode: OutputMode,
    schema: &SchemaRef,
    notes: &mut Vec<String>,
) -> Result<(Vec<RecordBatch>, String)> {
    match output {
        StreamOutput::ParquetDir(dir) => {
            let checkpoint = pipeline.checkpoint_dir().ok_or_else(|| {
                RiffleError::Config("the pipeline names no stream.checkpoint".into())
            })?;
            let query_id = crate::checkpoint::status::read(checkpoint, None)
                .map_err(|e| {
                    RiffleError::Config(format!(
                        "has the stream run? its checkpoint says which files it wrote: {e}"
                    ))
                })?
                .query_id;
            let mut files = epoch_files(dir, &query_id, notes)?;
            if mode == OutputMode::Complete {
                // Each epoch wrote the whole result; the last one is current.
                files = files.split_off(files.len().saturating_sub(1));
            }
            let mut batches = Vec::new();
            for (_, path) in &files {
                batches.extend(read_file(path, crate::common::FileFormat::Parquet, None)?);
            }
            Ok((
                batches,
                format!(
                    "{} (Parquet, {} files of query {query_id})",
                    dir.display(),
                    files.len()
                ),
            ))
        }
        StreamOutput::Delta { path, .. } => {
            let ctx = SessionContext::new();
            let version =
                delta::register(&ctx, "stream", Path::new(path), &delta::AsOf::Latest).await?;
            let batches = ctx.sql("SELECT * FROM stream").await?.collect().await?;
            Ok((batches, format!("{path} (Delta, version {version})")))
        }
        StreamOutput::Kafka {
            kafka,
            topic,
            format,
        } => {
            if mode == OutputMode::Complete {
                return Err(RiffleError::Unsupported(
                    "verify reads a Kafka topic written in append or update mode; a complete-mode \
                     stream writes its whole result every epoch"
                        .into(),
                ));
            }
            let schema = schema.clone();
            let (kafka, topic_name, format) = (kafka.clone(), topic.to_string(), *format);
            let snapshot = tokio::task::spawn_blocking(move || {
                crate::connectors::kafka::read_topic(&kafka, &topic_name, format, &schema)
            })
            .await
            .map_err(|e| RiffleError::Internal(format!("kafka read task: {e}")))??;
            if snapshot.undecodable > 0 {
                notes.push(format!(
                    "{} records of topic {topic} did not decode and are not compared (first: {})",
                    snapshot.undecodable,
                    snapshot.first_error.as_deref().unwrap_or("?")
                ));
            }
            Ok((
                snapshot.batches,
                format!(
                    "Kafka topic {topic} ({} committed records)",
                    snapshot.records
                ),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{AsArray, StringArray};
    use arrow::datatypes::Int64Type;

    fn batch(keys: &[Option<&str>], values: &[i64]) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new("k", DataType::Utf8, true),
            Field::new("v", DataType::Int64, true),
        ]));
        RecordBatch::try_new(
            schema,
            vec![
                Arc::new(StringArray::from(keys.to_vec())),
                Arc::new(Int64Array::from(values.to_vec())),
            ],
        )
        .unwrap()
    }

    #[test]
    fn an_update_stream_means_its_last_row_per_key_null_keys_included() {
        let epochs = [
            batch(&[Some("a"), Some("b"), None], &[1, 2, 3]),
            batch(&[Some("b"), None], &[20, 30]),
            batch(&[Some("a")], &[100]),
        ];
        let schema = epochs[0].schema();
        let last = last_per_key(&epochs, &schema, &["k".to_string()]).unwrap();
        let rows: Vec<(Option<String>, i64)> = last
            .iter()
            .flat_map(|b| {
                let k = b.column(0).as_string::<i32>().clone();
                let v = b.column(1).as_primitive::<Int64Type>().clone();
                (0..b.num_rows())
                    .map(move |i| (k.is_valid(i).then(|| k.value(i).to_string()), v.value(i)))
            })
            .collect();
        assert_eq!(
            rows,
            vec![(Some("a".into()), 100), (Some("b".into()), 20), (None, 30)]
        );
    }

    #[test]
    fn output_from_another_query_is_refused_by_name() {
        let schema = batch(&[], &[]).schema();
        let other = RecordBatch::try_new(
            Arc::new(Schema::new(vec![Field::new("k", DataType::Utf8, true)])),
            vec![Arc::new(StringArray::from(vec!["a"]))],
        )
        .unwrap();
        let err = conform(&[other], &schema, "the stream")
            .unwrap_err()
            .to_string();
        assert!(err.contains("has no column \"v\""), "{err}");
    }
}
