//! Encoding group, partition and join keys as bytes (Arrow's row format), including the empty
//! key of an aggregation with no `GROUP BY` columns; and the partition keys built from them,
//! which send rows and state entries of one key to one instance of an operator
//! ([`super::partition`]).

use std::sync::Arc;

use arrow::array::{ArrayRef, AsArray, Int64Array, RecordBatch};
use arrow::datatypes::{DataType, Int64Type};
use arrow::row::{RowConverter, Rows, SortField};
use datafusion::common::DFSchema;
use datafusion::execution::SessionState;
use datafusion::logical_expr::{Expr, ExprSchemable};
use datafusion::physical_expr_common::physical_expr::is_volatile;
use datafusion::physical_plan::PhysicalExpr;

use super::PartitionKey;
use super::partition::hash_columns;
use crate::common::to_micros;
use crate::error::{Result, RiffleError};
use crate::state::entry_keys;
use crate::window::TimeWindows;

/// Key expressions and their byte encoding.
///
/// Arrow's row format compares and hashes like the values (NULL included), so the bytes work
/// as map keys; they decode back into columns for output. With no expressions every row has
/// the same, empty key.
pub struct KeyEncoder {
    exprs: Vec<Arc<dyn PhysicalExpr>>,
    converter: Option<RowConverter>,
    types: Vec<DataType>,
}

/// One batch's keys.
pub enum Keys {
    /// Row-format keys.
    Rows(Rows),
    /// No key columns: every row's key is empty.
    Empty,
}

impl Keys {
    /// Row `i`'s key.
    pub fn get(&self, i: usize) -> &[u8] {
        match self {
            Keys::Rows(rows) => rows.row(i).data(),
            Keys::Empty => &[],
        }
    }
}

impl KeyEncoder {
    /// Plans `exprs` over `schema`.
    ///
    /// # Errors
    /// Planning errors.
    pub fn plan(exprs: &[Expr], schema: &DFSchema, state: &SessionState) -> Result<Self> {
        let types = exprs
            .iter()
            .map(|e| e.get_type(schema))
            .collect::<datafusion::common::Result<Vec<_>>>()?;
        let physical = exprs
            .iter()
            .map(|e| state.create_physical_expr(e.clone(), schema))
            .collect::<datafusion::common::Result<Vec<_>>>()?;
        Self::new(physical, types)
    }

    /// Keys from already planned expressions of the given types.
    ///
    /// # Errors
    /// Types the row format cannot encode.
    pub fn new(exprs: Vec<Arc<dyn PhysicalExpr>>, types: Vec<DataType>) -> Result<Self> {
        let converter = if types.is_empty() {
            None
        } else {
            Some(RowConverter::new(
                types.iter().cloned().map(SortField::new).collect(),
            )?)
        };
        Ok(KeyEncoder {
            exprs,
            converter,
            types,
        })
    }

    /// Number of key columns.
    pub fn len(&self) -> usize {
        self.types.len()
    }

    /// Whether there are no key columns.
    pub fn is_empty(&self) -> bool {
        self.types.is_empty()
    }

    /// Evaluates the key expressions over `batch`.
    ///
    /// # Errors
    /// Evaluation errors (including UDF failures inside key expressions).
    pub fn evaluate(&self, batch: &RecordBatch) -> Result<Vec<ArrayRef>> {
        Ok(self
            .exprs
            .iter()
            .map(|e| e.evaluate(batch)?.into_array(batch.num_rows()))
            .collect::<datafusion::common::Result<Vec<_>>>()?)
    }

    /// Encodes key columns (as [`evaluate`](Self::evaluate) returns them).
    ///
    /// # Errors
    /// Encoding errors.
    pub fn encode(&self, columns: &[ArrayRef]) -> Result<Keys> {
        Ok(match &self.converter {
            Some(c) => Keys::Rows(c.convert_columns(columns)?),
            None => Keys::Empty,
        })
    }

    /// The partition key of an operator whose keyed tables use these keys: the columns the
    /// expressions compute, which follow the columns no expression computes (a window start)
    /// in the encoded key. Rows and entries whose expressions' values are equal land in one
    /// partition, whatever else their keys hold. `None` without expressions (all rows would
    /// share one partition) or with a volatile one.
    ///
    /// # Errors
    /// Types the row format cannot encode.
    pub fn route(&self) -> Result<Option<Arc<KeyRoute>>> {
        self.route_with_rows(&[])
    }

    /// [`route`](Self::route) for an operator whose tables `row_tables` hold input rows
    /// themselves (a [`RowBuffer`](crate::state::RowBuffer)), which route as input rows do.
    ///
    /// # Errors
    /// Types the row format cannot encode.
    pub fn route_with_rows(&self, row_tables: &[&str]) -> Result<Option<Arc<KeyRoute>>> {
        // Routing evaluates the expressions a second time: a volatile one (`random()`) could
        // send a row where its key is not.
        if self.exprs.is_empty() || self.exprs.iter().any(is_volatile) {
            return Ok(None);
        }
        Ok(Some(Arc::new(KeyRoute {
            keys: KeyEncoder::new(self.exprs.clone(), self.types.clone())?,
            leading: self.types.len() - self.exprs.len(),
            row_tables: row_tables.iter().map(|t| t.to_string()).collect(),
            window: None,
        })))
    }

    /// The partition key of a tumbling-window aggregation whose keys begin with the window
    /// start (of event time `ts`): the start with the other keys. Each row is in one window,
    /// so a key's windows may go to different partitions, and an aggregation by a handful of
    /// keys (countries) still spreads over every core. `None` with a volatile expression.
    ///
    /// # Errors
    /// Types the row format cannot encode.
    pub fn route_tumbling(
        &self,
        ts: Arc<dyn PhysicalExpr>,
        windows: TimeWindows,
    ) -> Result<Option<Arc<KeyRoute>>> {
        if windows.size != windows.slide
            || self.types.len() != self.exprs.len() + 1
            || is_volatile(&ts)
            || self.exprs.iter().any(is_volatile)
        {
            return Ok(None);
        }
        Ok(Some(Arc::new(KeyRoute {
            keys: KeyEncoder::new(self.exprs.clone(), self.types.clone())?,
            leading: 0,
            row_tables: Vec::new(),
            window: Some((ts, windows)),
        })))
    }

    /// The key columns' types.
    pub fn types(&self) -> &[DataType] {
        &self.types
    }

    /// Decodes keys back into key columns.
    ///
    /// # Errors
    /// Bytes that are not keys of this encoder.
    pub fn decode<'a>(&self, keys: impl IntoIterator<Item = &'a [u8]>) -> Result<Vec<ArrayRef>> {
        let Some(converter) = &self.converter else {
            return Ok(Vec::new());
        };
        let parser = converter.parser();
        Ok(converter.convert_rows(keys.into_iter().map(|k| parser.parse(k)))?)
    }
}

/// The partition key of a keyed operator ([`KeyEncoder::route`]): evaluated over input rows,
/// decoded from the keys of its keyed tables' entries.
pub struct KeyRoute {
    /// The key expressions, and the types of the whole encoded key.
    keys: KeyEncoder,
    /// Decoded key columns before those the expressions compute.
    leading: usize,
    /// Tables whose entries are input rows.
    row_tables: Vec<String>,
    /// A tumbling window whose start leads the key (of this event time).
    window: Option<(Arc<dyn PhysicalExpr>, TimeWindows)>,
}

impl PartitionKey for KeyRoute {
    fn input_hashes(&self, _input: usize, batch: &RecordBatch) -> Result<Vec<u64>> {
        let rows = batch.num_rows();
        let mut columns = self.keys.evaluate(batch)?;
        if let Some((ts, windows)) = &self.window {
            let ts = to_micros(&ts.evaluate(batch)?.into_array(rows)?)?;
            let starts: Int64Array = ts
                .as_primitive::<Int64Type>()
                .iter()
                .map(|t| {
                    let mut start = None;
                    if let Some(t) = t {
                        windows.for_each(t, |s| start = Some(s));
                    }
                    start
                })
                .collect();
            columns.insert(0, Arc::new(starts));
        }
        hash_columns(&columns, rows)
    }

    fn state_hashes(&self, table: &str, batch: &RecordBatch) -> Result<Vec<u64>> {
        if self.row_tables.iter().any(|t| t == table) {
            return self.input_hashes(0, batch);
        }
        let keys = entry_keys(batch)?;
        let mut columns = self
            .keys
            .decode(keys.iter().map(|k| k.unwrap_or_default()))?;
        columns.drain(..self.leading.min(columns.len()));
        hash_columns(&columns, batch.num_rows())
    }
}

/// The partition key of an operator whose inputs are keyed each their own way (a join's two
/// sides, keys of one type): input `k` routes by `routes[k]`, and so does the table it fills.
pub struct InputRoutes {
    routes: Vec<(String, Arc<KeyRoute>)>,
}

impl InputRoutes {
    /// Routes for inputs in order, each with the name of its table.
    pub fn new(routes: Vec<(String, Arc<KeyRoute>)>) -> Self {
        InputRoutes { routes }
    }
}

impl PartitionKey for InputRoutes {
    fn input_hashes(&self, input: usize, batch: &RecordBatch) -> Result<Vec<u64>> {
        let (_, route) = self
            .routes
            .get(input)
            .ok_or_else(|| RiffleError::Internal(format!("no partition key for input {input}")))?;
        route.input_hashes(0, batch)
    }

    fn state_hashes(&self, table: &str, batch: &RecordBatch) -> Result<Vec<u64>> {
        let (_, route) = self
            .routes
            .iter()
            .find(|(t, _)| t == table)
            .ok_or_else(|| RiffleError::Internal(format!("no partition key for table {table}")))?;
        route.state_hashes(table, batch)
    }
}
