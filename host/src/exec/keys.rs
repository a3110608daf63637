//! Encoding group, partition and join keys as bytes (Arrow's row format), including the empty
//! key of an aggregation with no `GROUP BY` columns.

use std::sync::Arc;

use arrow::array::{ArrayRef, RecordBatch};
use arrow::datatypes::DataType;
use arrow::row::{RowConverter, Rows, SortField};
use datafusion::common::DFSchema;
use datafusion::execution::SessionState;
use datafusion::logical_expr::{Expr, ExprSchemable};
use datafusion::physical_plan::PhysicalExpr;

use crate::error::Result;

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
