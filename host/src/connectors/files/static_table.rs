//! Static (dimension) tables for stream–static joins: an in-memory snapshot of a file that is
//! reloaded when the file changes.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use arrow::datatypes::SchemaRef;
use async_trait::async_trait;
use datafusion::catalog::{MemTable, Session, TableProvider};
use datafusion::common::Result as DfResult;
use datafusion::logical_expr::{Expr, TableType};
use datafusion::physical_plan::ExecutionPlan;

use super::read_file;
use crate::common::FileFormat;
use crate::error::{Result, RiffleError};

/// A table whose rows are a snapshot of a file, swapped when the file's modification time
/// changes. Queries planned against it see the new rows once re-planned.
#[derive(Debug)]
pub struct StaticTable {
    path: PathBuf,
    schema: SchemaRef,
    current: RwLock<(Option<SystemTime>, Arc<MemTable>)>,
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

impl StaticTable {
    /// Loads `path` (Parquet, CSV with header, or NDJSON).
    ///
    /// # Errors
    /// Unreadable files.
    pub fn load(path: &Path) -> Result<Self> {
        let (schema, table) = Self::read(path, None)?;
        Ok(StaticTable {
            path: path.to_path_buf(),
            schema,
            current: RwLock::new((modified(path), table)),
        })
    }

    fn read(path: &Path, schema: Option<SchemaRef>) -> Result<(SchemaRef, Arc<MemTable>)> {
        let batches = read_file(path, FileFormat::of(path)?, schema.clone())?;
        let schema = match (schema, batches.first()) {
            (Some(s), _) => s,
            (None, Some(b)) => b.schema(),
            (None, None) => {
                return Err(RiffleError::Config(format!(
                    "{}: empty table",
                    path.display()
                )));
            }
        };
        Ok((
            schema.clone(),
            Arc::new(MemTable::try_new(schema, vec![batches])?),
        ))
    }

    /// Reloads the file if it changed since the last load. Returns whether it did.
    ///
    /// # Errors
    /// A changed file that cannot be read or whose schema changed; the old rows stay in use.
    pub fn reload_if_changed(&self) -> Result<bool> {
        let now = modified(&self.path);
        if now == self.current.read().expect("table lock").0 {
            return Ok(false);
        }
        let (_, table) = Self::read(&self.path, Some(self.schema.clone()))?;
        *self.current.write().expect("table lock") = (now, table);
        Ok(true)
    }
}

#[async_trait]
impl TableProvider for StaticTable {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        let table = self.current.read().expect("table lock").1.clone();
        table.scan(state, projection, filters, limit).await
    }
}
