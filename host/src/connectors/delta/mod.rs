//! Delta Lake tables (the `deltalake` crate): a transactional sink for streaming and batch
//! runs, and a batch source with time travel.
//!
//! Streaming writes are exactly-once through Delta's own idempotency mechanism: every epoch's
//! commit carries a `txn` action (application id = `riffle-<query id>`, version = epoch). After
//! a crash, an epoch whose version the table already records is skipped, so a replay never
//! adds rows twice. Appends from a concurrent backfill are separate optimistic commits that
//! delta-rs retries on a newer version; they never conflict with the stream's appends.
//!
//! A batch run (a backfill) is idempotent the same way: its commit carries a `txn` action whose
//! application id is the run's id (`riffle-batch-<digest>` of the query, the UDF modules and
//! their configurations, the inputs' versions and the run name), so rerunning a run whose
//! commit landed finds the id and writes nothing.

use std::path::Path;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use arrow::row::{RowConverter, SortField};
use datafusion::prelude::SessionContext;
use deltalake::kernel::Transaction;
use deltalake::kernel::transaction::CommitProperties;
use deltalake::protocol::SaveMode;
use deltalake::{DeltaTable, DeltaTableError};
use url::Url;

use crate::common::OutputMode;
use crate::connectors::sink::Sink;
use crate::error::{Result, RiffleError};

/// A Delta table as a sink in a pipeline file (`kind = "delta"`).
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeltaSinkConfig {
    /// The table: a directory (relative to the pipeline file) or a URL.
    pub path: String,
    /// Update mode: the columns rows are merged on.
    #[serde(default)]
    pub keys: Vec<String>,
}

impl DeltaSinkConfig {
    /// Makes a relative table path relative to `base`.
    pub fn resolve(&mut self, base: &Path) {
        if !self.path.contains("://") && Path::new(&self.path).is_relative() {
            self.path = base.join(&self.path).to_string_lossy().into_owned();
        }
    }
}

/// A Delta error, classified by what helps: storage that may come back (the object store, I/O,
/// another writer's commit) is retried by a streaming run; a table that does not fit the
/// pipeline is the user's to fix; anything else (a log Riffle cannot use, a merge delta-rs
/// could not plan) ends the run at once. Retrying those only delays the error: a merge that
/// failed to plan was once retried for the whole of `--retry-for`.
fn delta_error(path: &Url, e: DeltaTableError) -> RiffleError {
    use DeltaTableError as E;
    let message = format!("delta table {path}: {e}");
    match e {
        E::ObjectStore { .. }
        | E::Io { .. }
        | E::Transaction { .. }
        | E::VersionAlreadyExists(_)
        | E::VersionMismatch(..) => RiffleError::External(message),
        E::SchemaMismatch { .. }
        | E::NotATable(_)
        | E::NoSchema
        | E::InvalidTableLocation(_)
        | E::InvalidPartitionFilter { .. }
        | E::PartitionError { .. }
        | E::MissingFeature { .. }
        | E::InvalidVersion(_) => RiffleError::Config(message),
        _ => RiffleError::Refused(message),
    }
}

/// The URL of a local table directory (created if missing) or of a URL given as such.
///
/// # Errors
/// A path that cannot be created or made absolute.
pub fn table_url(location: &str) -> Result<Url> {
    if location.contains("://") {
        return Url::parse(location)
            .map_err(|e| RiffleError::Config(format!("{location}: not a URL: {e}")));
    }
    let path = Path::new(location);
    std::fs::create_dir_all(path).map_err(|e| RiffleError::io("creating", path, e))?;
    let absolute =
        std::fs::canonicalize(path).map_err(|e| RiffleError::io("resolving", path, e))?;
    Url::from_directory_path(&absolute)
        .map_err(|()| RiffleError::Config(format!("{}: not a usable path", absolute.display())))
}

/// Whether `path` is a Delta table directory.
pub fn is_delta_table(path: &Path) -> bool {
    path.join("_delta_log").is_dir()
}

async fn open(url: &Url) -> Result<DeltaTable> {
    // A local directory without a log is a table to be created: don't ask the log reader,
    // which reports the missing log as an error in the logs before returning "not a table".
    if let Ok(path) = url.to_file_path()
        && !is_delta_table(&path)
    {
        return deltalake::DeltaTableBuilder::from_url(url.clone())
            .and_then(|b| b.build())
            .map_err(|e| delta_error(url, e));
    }
    DeltaTable::try_from_url(url.clone())
        .await
        .map_err(|e| delta_error(url, e))
}

/// Which version of a table a batch run reads.
#[derive(Clone, Debug, Default)]
pub enum AsOf {
    /// The newest.
    #[default]
    Latest,
    /// A version number.
    Version(u64),
    /// The newest version committed at or before an RFC 3339 time.
    Timestamp(String),
}

/// Registers a Delta table (at a version) as `name` in `context`. Returns the version read.
///
/// # Errors
/// A missing table or version.
pub async fn register(
    context: &SessionContext,
    name: &str,
    path: &Path,
    as_of: &AsOf,
) -> Result<i64> {
    let url = table_url(&path.to_string_lossy())?;
    if !is_delta_table(path) {
        return Err(RiffleError::Config(format!(
            "{}: not a Delta table (no _delta_log)",
            path.display()
        )));
    }
    let table = match as_of {
        AsOf::Latest => deltalake::open_table(url.clone()).await,
        AsOf::Version(v) => deltalake::open_table_with_version(url.clone(), *v).await,
        AsOf::Timestamp(t) => deltalake::open_table_with_ds(url.clone(), t).await,
    }
    .map_err(|e| delta_error(&url, e))?;
    table
        .update_datafusion_session(&context.state())
        .map_err(|e| delta_error(&url, e))?;
    let provider = table
        .table_provider()
        .await
        .map_err(|e| delta_error(&url, e.into()))?;
    context.register_table(name, provider)?;
    Ok(table.version().unwrap_or(0) as i64)
}

/// Whether the table at `location` already holds the batch run `run_id` (a `txn` action of
/// that application id, written by [`append`]).
///
/// # Errors
/// Storage errors.
pub async fn holds_run(location: &str, run_id: &str) -> Result<bool> {
    let url = table_url(location)?;
    let table = open(&url).await?;
    if table.version().is_none() {
        return Ok(false);
    }
    let state = table.snapshot().map_err(|e| delta_error(&url, e))?;
    Ok(state
        .transaction_version(table.log_store().as_ref(), run_id)
        .await
        .map_err(|e| delta_error(&url, e))?
        .is_some())
}

/// Appends `batches` to a table as one commit (a batch run or backfill), creating it if
/// missing, with a `txn` action for `run_id` so that a rerun can see the rows are there
/// ([`holds_run`]), and `metadata` (the UDF modules that produced the rows) in the commit's
/// metadata. Returns the new table version.
///
/// # Errors
/// Storage errors and schema mismatches.
pub async fn append(
    location: &str,
    batches: Vec<RecordBatch>,
    run_id: &str,
    metadata: Vec<(String, String)>,
) -> Result<i64> {
    let url = table_url(location)?;
    let table = open(&url)
        .await?
        .write(batches)
        .with_save_mode(SaveMode::Append)
        .with_commit_properties(
            CommitProperties::default()
                .with_application_transaction(Transaction::new(run_id, 1))
                .with_metadata(
                    metadata
                        .into_iter()
                        .map(|(k, v)| (k, serde_json::Value::String(v))),
                ),
        )
        .await
        .map_err(|e| delta_error(&url, e))?;
    Ok(table.version().unwrap_or(0) as i64)
}

/// A Delta table as a streaming sink: append, update (merge on keys) or complete (overwrite),
/// exactly once per epoch.
pub struct DeltaSink {
    url: Url,
    mode: OutputMode,
    /// Update mode: the columns identifying a row.
    keys: Vec<String>,
    app_id: String,
    /// The newest epoch the table already holds.
    done: i64,
    /// The table as of the last commit; brought up to date incrementally before each epoch
    /// (other writers, such as a backfill, may have committed since) instead of reloaded.
    table: Option<DeltaTable>,
    /// Commit metadata of every epoch: the UDF modules that produced it.
    udf_modules: Vec<(String, String)>,
}

impl DeltaSink {
    /// A sink into the table at `location` (a directory or URL).
    ///
    /// # Errors
    /// Update mode without key columns.
    pub fn new(location: &str, mode: OutputMode, keys: Vec<String>) -> Result<Self> {
        if mode == OutputMode::Update && keys.is_empty() {
            return Err(RiffleError::Config(
                "a Delta sink in update mode merges on key columns: set `keys`".into(),
            ));
        }
        Ok(DeltaSink {
            url: table_url(location)?,
            mode,
            keys,
            app_id: String::new(),
            done: -1,
            table: None,
            udf_modules: Vec::new(),
        })
    }

    /// Stamps every commit's metadata (`commitInfo`) with `(riffle.udf.<module>, sha256)`
    /// pairs.
    pub fn with_udf_modules(mut self, modules: Vec<(String, String)>) -> Self {
        self.udf_modules = modules;
        self
    }

    fn fenced(&self, held: i64) -> RiffleError {
        RiffleError::Checkpoint(format!(
            "delta table {}: another process committed epoch {held} of this query (this \
             one last wrote epoch {}); this process is fenced off and stops. Only one process \
             may run a query's checkpoint",
            self.url, self.done
        ))
    }

    /// A failed commit; one that lost to a concurrent commit of this query's own transaction
    /// id is fencing, not a storage fault.
    fn commit_error(&self, e: DeltaTableError) -> RiffleError {
        use deltalake::kernel::transaction::{CommitConflictError, TransactionError};
        if let DeltaTableError::Transaction {
            source: TransactionError::CommitConflict(CommitConflictError::ConcurrentTransaction),
        } = &e
        {
            return RiffleError::Checkpoint(format!(
                "delta table {}: another process committed for this query at the same time \
                 ({e}); this process is fenced off and stops. Only one process may run a \
                 query's checkpoint",
                self.url
            ));
        }
        delta_error(&self.url, e)
    }

    fn commit_properties(&self, epoch: u64) -> CommitProperties {
        CommitProperties::default()
            .with_application_transaction(Transaction::new(&self.app_id, epoch as i64))
            .with_metadata(
                self.udf_modules
                    .iter()
                    .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
                    .chain([("riffle.epoch".to_string(), serde_json::json!(epoch))]),
            )
    }
}

/// The epoch's rows with one row per key, the last one (a key updated twice in one epoch ends
/// with its latest value). A merge with two source rows for one target row would fail, and
/// fail again on every replay of the epoch.
fn last_per_key(
    schema: &SchemaRef,
    batches: &[RecordBatch],
    keys: &[String],
) -> Result<RecordBatch> {
    let all = arrow::compute::concat_batches(schema, batches)?;
    let columns = keys
        .iter()
        .map(|k| {
            all.column_by_name(k).cloned().ok_or_else(|| {
                RiffleError::Config(format!(
                    "Delta sink: the key column {k:?} is not in the output"
                ))
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let converter = RowConverter::new(
        columns
            .iter()
            .map(|c| SortField::new(c.data_type().clone()))
            .collect(),
    )?;
    let rows = converter.convert_columns(&columns)?;
    let mut last: hashbrown::HashMap<&[u8], u32> = hashbrown::HashMap::new();
    for i in 0..rows.num_rows() {
        last.insert(rows.row(i).data(), i as u32);
    }
    if last.len() == all.num_rows() {
        return Ok(all);
    }
    let mut keep: Vec<u32> = last.into_values().collect();
    keep.sort_unstable();
    Ok(arrow::compute::take_record_batch(
        &all,
        &arrow::array::UInt32Array::from(keep),
    )?)
}

fn quoted(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

#[async_trait::async_trait]
impl Sink for DeltaSink {
    fn set_udf_modules(&mut self, modules: Vec<(String, String)>) {
        self.udf_modules = modules;
    }

    async fn start(&mut self, query_id: &str) -> Result<()> {
        self.app_id = format!("riffle-{query_id}");
        let table = open(&self.url).await?;
        if table.version().is_some() {
            let state = table.snapshot().map_err(|e| delta_error(&self.url, e))?;
            self.done = state
                .transaction_version(table.log_store().as_ref(), &self.app_id)
                .await
                .map_err(|e| delta_error(&self.url, e))?
                .unwrap_or(-1);
        }
        self.table = Some(table);
        Ok(())
    }

    async fn write_epoch(
        &mut self,
        epoch: u64,
        schema: &SchemaRef,
        batches: &[RecordBatch],
    ) -> Result<()> {
        if epoch as i64 <= self.done {
            // The table holds this epoch already: a replay after a crash.
            return Ok(());
        }
        let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
        if rows == 0 && self.mode != OutputMode::Complete {
            return Ok(());
        }
        let table = match self.table.take() {
            Some(mut t) if t.version().is_some() => {
                t.update_incremental(None)
                    .await
                    .map_err(|e| delta_error(&self.url, e))?;
                t
            }
            // Not created yet when the sink started: someone (a backfill) may have since.
            _ => open(&self.url).await?,
        };
        // Fencing, as Kafka's transactional id gives: this query's epochs are committed by one
        // process at a time. An epoch this process did not write (it knows every epoch it
        // wrote, and at start every epoch written before) means another process took over (a
        // successor on the same checkpoint, this one being a zombie). A commit racing this
        // one fails as a concurrent transaction of the same id (`commit_error`).
        let held = if table.version().is_some() {
            table
                .snapshot()
                .map_err(|e| delta_error(&self.url, e))?
                .transaction_version(table.log_store().as_ref(), &self.app_id)
                .await
                .map_err(|e| delta_error(&self.url, e))?
                .unwrap_or(-1)
        } else {
            -1
        };
        if held != self.done {
            return Err(self.fenced(held));
        }
        let properties = self.commit_properties(epoch);
        let exists = table.version().is_some();
        let latest;
        let batches = if self.mode == OutputMode::Update {
            latest = [last_per_key(schema, batches, &self.keys)?];
            &latest[..]
        } else {
            batches
        };
        match self.mode {
            OutputMode::Update if exists => {
                let source = SessionContext::new().read_batches(batches.iter().cloned())?;
                // NULL-safe: a NULL key is one group like any other, updated in place.
                // Parenthesised: IS NOT DISTINCT FROM binds looser than AND in the parser.
                let predicate = self
                    .keys
                    .iter()
                    .map(|k| {
                        format!(
                            "(target.{q} IS NOT DISTINCT FROM source.{q})",
                            q = quoted(k)
                        )
                    })
                    .collect::<Vec<_>>()
                    .join(" AND ");
                let columns: Vec<String> =
                    schema.fields().iter().map(|f| f.name().clone()).collect();
                let set = columns.clone();
                let merged = table
                    .merge(source, predicate)
                    .with_source_alias("source")
                    .with_target_alias("target")
                    .with_commit_properties(properties)
                    .when_matched_update(move |mut u| {
                        for c in &columns {
                            u = u.update(quoted(c), format!("source.{}", quoted(c)));
                        }
                        u
                    })
                    .and_then(|m| {
                        m.when_not_matched_insert(move |mut i| {
                            for c in &set {
                                i = i.set(quoted(c), format!("source.{}", quoted(c)));
                            }
                            i
                        })
                    })
                    .map_err(|e| delta_error(&self.url, e))?
                    .await
                    .map_err(|e| self.commit_error(e))?;
                self.table = Some(merged.0);
            }
            mode => {
                let save = if mode == OutputMode::Complete {
                    SaveMode::Overwrite
                } else {
                    SaveMode::Append
                };
                let batches = if batches.is_empty() {
                    vec![RecordBatch::new_empty(schema.clone())]
                } else {
                    batches.to_vec()
                };
                let written = table
                    .write(batches)
                    .with_save_mode(save)
                    .with_commit_properties(properties)
                    .await
                    .map_err(|e| self.commit_error(e))?;
                self.table = Some(written);
            }
        }
        self.done = epoch as i64;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Blame;

    /// Storage that may come back is retried; a table that does not fit is the user's to fix;
    /// a refusal a retry cannot change (like a merge that failed to plan) ends the run.
    #[test]
    fn delta_errors_say_whether_a_retry_helps() {
        let url = Url::parse("file:///tmp/t/").unwrap();
        let storage = delta_error(
            &url,
            DeltaTableError::ObjectStore {
                source: deltalake::ObjectStoreError::Generic {
                    store: "s3",
                    source: "connection reset".into(),
                },
            },
        );
        assert!(storage.is_transient());
        assert_eq!(storage.blame(), Blame::External);
        let not_a_table = delta_error(&url, DeltaTableError::NotATable("no log".into()));
        assert!(!not_a_table.is_transient());
        assert_eq!(not_a_table.blame(), Blame::User);
        let plan = delta_error(
            &url,
            DeltaTableError::Generic("Error during planning: ...".into()),
        );
        assert!(!plan.is_transient());
        assert_eq!(plan.blame(), Blame::External);
        assert!(plan.to_string().contains("Error during planning"), "{plan}");
    }
}
