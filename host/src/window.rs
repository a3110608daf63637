//! Event-time windows with Spark's names and semantics, in batch and streaming mode.
//!
//! Shared by the batch rewrite (here), the streaming operators ([`crate::exec`]) and the planner
//! ([`crate::plan`]), so it depends on neither.
//!
//! - `window(ts, '1 minute')`: tumbling windows `[start, start + size)`, aligned to the epoch.
//! - `window(ts, '5 minutes', '1 minute')`: hopping windows; a row belongs to `size / slide` of
//!   them. An optional fourth argument shifts the alignment, as Spark's `startTime` does.
//! - `session_window(ts, '30 seconds')`: per group key, rows closer than the gap form one
//!   session `[first ts, last ts + gap)`.
//!
//! Each evaluates to a struct `{start, end}` of microsecond timestamps, like Spark's `window`
//! column. A tumbling `window()` is an ordinary scalar function, so it works anywhere. Hopping
//! windows multiply rows and sessions depend on their neighbours, so neither is a scalar: the
//! window-aggregate operators assign windows themselves, in streaming mode and (over rows sorted
//! by event time, [`crate::exec::bounded`]) in batch mode. [`reference_rewrite`] states the same
//! definitions as plain DataFusion plans (an unnest of the windows; lag/running-sum window
//! functions for sessions), which tests use as an oracle that shares no code with the operators.

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, ListArray, StructArray, TimestampMicrosecondArray};
use arrow::buffer::OffsetBuffer;
use arrow::datatypes::{DataType, Field, Fields, TimeUnit};
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::common::{Column, Result as DfResult, ScalarValue, exec_err, plan_err};
use datafusion::functions_aggregate::min_max::{max_udaf, min_udaf};
use datafusion::functions_aggregate::sum::sum_udaf;
use datafusion::functions_window::expr_fn::lag;

use crate::common::parse_duration;
use datafusion::logical_expr::expr::ScalarFunction;
use datafusion::logical_expr::expr::{
    WindowFunction as DfWindowFunction, WindowFunctionDefinition,
};
use datafusion::logical_expr::{
    Aggregate, ColumnarValue, Expr, ExprFunctionExt, LogicalPlan, LogicalPlanBuilder,
    ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility, WindowFrame, cast, col,
    lit, when,
};

/// Name of the window function (tumbling and hopping).
pub const WINDOW: &str = "window";
/// Name of the session window function.
pub const SESSION_WINDOW: &str = "session_window";
const HOP_WINDOWS: &str = "__riffle_hop_windows";
const WINDOW_COLUMN: &str = "__riffle_window";

/// The struct type of a window column.
pub fn window_type() -> DataType {
    DataType::Struct(window_fields())
}

fn window_fields() -> Fields {
    let ts = DataType::Timestamp(TimeUnit::Microsecond, None);
    Fields::from(vec![
        Field::new("start", ts.clone(), true),
        Field::new("end", ts, true),
    ])
}

/// Builds a window column from window starts and ends (microseconds).
pub fn window_array(starts: Vec<i64>, ends: Vec<i64>) -> ArrayRef {
    Arc::new(StructArray::new(
        window_fields(),
        vec![
            Arc::new(TimestampMicrosecondArray::from(starts)),
            Arc::new(TimestampMicrosecondArray::from(ends)),
        ],
        None,
    ))
}

/// Fixed-size event-time windows: tumbling when `slide == size`, hopping otherwise.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TimeWindows {
    /// Window length, microseconds.
    pub size: i64,
    /// Distance between window starts, microseconds.
    pub slide: i64,
    /// Alignment shift from the epoch, microseconds.
    pub offset: i64,
}

impl TimeWindows {
    /// Calls `each(start)` for every window holding `ts`, latest first.
    #[inline]
    pub fn for_each(&self, ts: i64, mut each: impl FnMut(i64)) {
        let mut start = ts - (ts - self.offset).rem_euclid(self.slide);
        while start > ts - self.size {
            each(start);
            start -= self.slide;
        }
    }
}

impl TimeWindows {
    /// Windows from `window()`'s duration arguments: size, optional slide, optional offset.
    ///
    /// # Errors
    /// A message for a wrong argument count or a slide longer than the window.
    pub fn from_durations(durations: &[i64]) -> Result<TimeWindows, String> {
        match durations {
            [size] => Ok(TimeWindows {
                size: *size,
                slide: *size,
                offset: 0,
            }),
            [size, slide, rest @ ..] if rest.len() <= 1 => {
                if slide > size {
                    return Err("window(): the slide must not be longer than the window".into());
                }
                Ok(TimeWindows {
                    size: *size,
                    slide: *slide,
                    offset: rest.first().copied().unwrap_or(0) % slide,
                })
            }
            _ => Err("window(ts, size [, slide [, start offset]]) takes 2 to 4 arguments".into()),
        }
    }
}

/// What a `window`/`session_window` call in `GROUP BY` asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WindowKind {
    /// Tumbling or hopping windows.
    Time(TimeWindows),
    /// Session windows with this gap, microseconds.
    Session(i64),
}

/// A window call found in an expression: the event-time argument and the kind.
#[derive(Clone, Debug)]
pub struct WindowCall {
    /// The timestamp argument.
    pub ts: Expr,
    /// Window kind and sizes.
    pub kind: WindowKind,
}

fn literal_text(expr: &Expr) -> Option<String> {
    match expr {
        Expr::Literal(value, _) => value.try_as_str().flatten().map(str::to_string),
        Expr::Cast(c) => literal_text(&c.expr),
        Expr::TryCast(c) => literal_text(&c.expr),
        _ => None,
    }
}

/// Recognises `window(...)`/`session_window(...)` (possibly under an alias).
///
/// # Errors
/// A planning error for wrong arguments (non-literal or bad durations, slide longer than size).
pub fn window_call(expr: &Expr) -> DfResult<Option<WindowCall>> {
    let expr = match expr {
        Expr::Alias(a) => a.expr.as_ref(),
        e => e,
    };
    let Expr::ScalarFunction(ScalarFunction { func, args }) = expr else {
        return Ok(None);
    };
    let name = func.name();
    if name != WINDOW && name != SESSION_WINDOW {
        return Ok(None);
    }
    let mut durations = Vec::new();
    for (i, arg) in args.iter().enumerate().skip(1) {
        let Some(text) = literal_text(arg) else {
            return plan_err!("{name}(): argument {} must be a duration literal", i + 1);
        };
        durations.push(
            parse_duration(&text)
                .map_err(|e| datafusion::error::DataFusionError::Plan(format!("{name}(): {e}")))?,
        );
    }
    let kind = match (name, durations.as_slice()) {
        (SESSION_WINDOW, [gap]) => WindowKind::Session(*gap),
        (SESSION_WINDOW, _) => {
            return plan_err!("session_window(ts, gap) takes 2 arguments");
        }
        _ => WindowKind::Time(
            TimeWindows::from_durations(&durations)
                .map_err(datafusion::error::DataFusionError::Plan)?,
        ),
    };
    Ok(Some(WindowCall {
        ts: args[0].clone(),
        kind,
    }))
}

/// The scalar UDFs behind `window`, `session_window` and the batch rewrite's helper.
pub fn functions() -> Vec<ScalarUDF> {
    vec![
        ScalarUDF::new_from_impl(WindowFunction::new(WINDOW)),
        ScalarUDF::new_from_impl(WindowFunction::new(SESSION_WINDOW)),
        ScalarUDF::new_from_impl(WindowFunction::new(HOP_WINDOWS)),
    ]
}

#[derive(Debug, PartialEq, Eq, Hash)]
struct WindowFunction {
    name: &'static str,
    signature: Signature,
}

impl WindowFunction {
    fn new(name: &'static str) -> Self {
        WindowFunction {
            name,
            signature: Signature::user_defined(Volatility::Immutable),
        }
    }
}

impl ScalarUDFImpl for WindowFunction {
    fn name(&self) -> &str {
        self.name
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _arg_types: &[DataType]) -> DfResult<DataType> {
        if self.name == HOP_WINDOWS {
            return Ok(DataType::List(Arc::new(Field::new(
                "item",
                window_type(),
                true,
            ))));
        }
        Ok(window_type())
    }

    fn coerce_types(&self, arg_types: &[DataType]) -> DfResult<Vec<DataType>> {
        let Some(first) = arg_types.first() else {
            return plan_err!("{}() needs a timestamp argument", self.name);
        };
        if !matches!(
            first,
            DataType::Timestamp(..) | DataType::Date32 | DataType::Date64
        ) {
            return plan_err!(
                "{}(): the first argument must be a timestamp, not {first}",
                self.name
            );
        }
        let mut types = vec![DataType::Timestamp(TimeUnit::Microsecond, None)];
        types.extend(arg_types[1..].iter().map(|_| DataType::Utf8));
        Ok(types)
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> DfResult<ColumnarValue> {
        let durations = args.args[1..]
            .iter()
            .map(|a| match a {
                ColumnarValue::Scalar(s) => match s.try_as_str().flatten() {
                    Some(text) => {
                        parse_duration(text).map_err(datafusion::error::DataFusionError::Execution)
                    }
                    None => exec_err!("{}(): durations must be literals", self.name),
                },
                ColumnarValue::Array(_) => {
                    exec_err!("{}(): durations must be literals", self.name)
                }
            })
            .collect::<DfResult<Vec<i64>>>()?;
        let windows = match (self.name, durations.as_slice()) {
            (SESSION_WINDOW, _) => {
                return exec_err!(
                    "session_window() groups rows, so it can only appear in GROUP BY"
                );
            }
            _ => TimeWindows::from_durations(&durations)
                .map_err(datafusion::error::DataFusionError::Execution)?,
        };
        if self.name == WINDOW && windows.slide != windows.size {
            return exec_err!(
                "a hopping window() puts each row in several windows, so it can only appear \
                 in GROUP BY"
            );
        }
        let ts = args.args[0].to_array(args.number_rows)?;
        let ts = ts
            .as_any()
            .downcast_ref::<TimestampMicrosecondArray>()
            .expect("coerced to microsecond timestamps");
        let valid = arrow::buffer::NullBuffer::new(arrow::buffer::BooleanBuffer::collect_bool(
            ts.len(),
            |i| ts.is_valid(i),
        ));
        if self.name == WINDOW {
            // Tumbling: exactly one window per row (a placeholder under NULL rows).
            let starts: Vec<i64> = (0..ts.len())
                .map(|i| {
                    let mut start = 0;
                    if ts.is_valid(i) {
                        windows.for_each(ts.value(i), |s| start = s);
                    }
                    start
                })
                .collect();
            let ends: Vec<i64> = starts.iter().map(|s| s + windows.size).collect();
            let structs = StructArray::new(
                window_fields(),
                vec![
                    Arc::new(TimestampMicrosecondArray::from(starts)),
                    Arc::new(TimestampMicrosecondArray::from(ends)),
                ],
                Some(valid),
            );
            return Ok(ColumnarValue::Array(Arc::new(structs)));
        }
        let mut starts = Vec::with_capacity(ts.len());
        let mut ends = Vec::with_capacity(ts.len());
        let mut offsets = Vec::with_capacity(ts.len() + 1);
        offsets.push(0i32);
        for i in 0..ts.len() {
            if ts.is_valid(i) {
                windows.for_each(ts.value(i), |s| {
                    starts.push(s);
                    ends.push(s + windows.size);
                });
            }
            offsets.push(starts.len() as i32);
        }
        let list = ListArray::new(
            Arc::new(Field::new("item", window_type(), true)),
            OffsetBuffer::new(offsets.into()),
            window_array(starts, ends),
            Some(valid),
        );
        Ok(ColumnarValue::Array(Arc::new(list)))
    }
}

/// Rewrites hopping `window()` and `session_window()` in `GROUP BY` into plain DataFusion plans:
/// each row repeated once per window it is in, sessions numbered by running window functions.
/// Tumbling windows need no rewrite. Batch mode runs the streaming operators instead (the
/// repeated rows cost memory and time); this is the independent formulation tests compare
/// both modes with.
///
/// # Errors
/// Planning errors for windows DataFusion cannot run (e.g. two window calls in one GROUP BY).
pub fn reference_rewrite(plan: LogicalPlan) -> DfResult<LogicalPlan> {
    plan.transform_up(|node| {
        let LogicalPlan::Aggregate(agg) = &node else {
            return Ok(Transformed::no(node));
        };
        let mut found = None;
        for (i, e) in agg.group_expr.iter().enumerate() {
            if let Some(call) = window_call(e)? {
                if found.is_some() {
                    return plan_err!("only one window()/session_window() per GROUP BY");
                }
                found = Some((i, call));
            }
        }
        let Some((index, call)) = found else {
            return Ok(Transformed::no(node));
        };
        let original_name = agg.group_expr[index].schema_name().to_string();
        // A row without an event time belongs to no window, in batch as in streaming mode (and
        // as in Spark, whose window rewrite filters such rows out).
        let input = LogicalPlanBuilder::from(agg.input.as_ref().clone())
            .filter(call.ts.clone().is_not_null())?
            .build()?;
        let keys: Vec<Expr> = agg
            .group_expr
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != index)
            .map(|(_, e)| e.clone())
            .collect();
        let input_columns: Vec<Expr> = input
            .schema()
            .columns()
            .into_iter()
            .map(Expr::Column)
            .collect();
        let new_input = match call.kind {
            WindowKind::Time(w) if w.slide == w.size => {
                let rewritten = Aggregate::try_new(
                    Arc::new(input),
                    agg.group_expr.clone(),
                    agg.aggr_expr.clone(),
                )?;
                return Ok(Transformed::yes(LogicalPlan::Aggregate(rewritten)));
            }
            WindowKind::Time(_) => {
                let hop = match &agg.group_expr[index] {
                    Expr::Alias(a) => a.expr.as_ref().clone(),
                    e => e.clone(),
                };
                let Expr::ScalarFunction(ScalarFunction { args, .. }) = hop else {
                    unreachable!("window_call matched a scalar function")
                };
                let hop = Expr::ScalarFunction(ScalarFunction {
                    func: Arc::new(ScalarUDF::new_from_impl(WindowFunction::new(HOP_WINDOWS))),
                    args,
                })
                .alias(WINDOW_COLUMN);
                let mut exprs = input_columns.clone();
                exprs.push(hop);
                LogicalPlanBuilder::from(input)
                    .project(exprs)?
                    .unnest_column(WINDOW_COLUMN)?
                    .build()?
            }
            WindowKind::Session(gap) => sessionize(input, input_columns, &keys, call.ts, gap)?,
        };
        let mut group_expr = agg.group_expr.clone();
        group_expr[index] = col(Column::from_name(WINDOW_COLUMN)).alias(original_name);
        let rewritten = Aggregate::try_new(Arc::new(new_input), group_expr, agg.aggr_expr.clone())?;
        Ok(Transformed::yes(LogicalPlan::Aggregate(rewritten)))
    })
    .map(|t| t.data)
}

/// Adds a session column to `input`: per key, ordered by time, a row starts a new session when
/// it is at least `gap` after the previous row; a session spans `[first, last + gap)`.
fn sessionize(
    input: LogicalPlan,
    input_columns: Vec<Expr>,
    keys: &[Expr],
    ts: Expr,
    gap: i64,
) -> DfResult<LogicalPlan> {
    let micros = cast(
        cast(ts, DataType::Timestamp(TimeUnit::Microsecond, None)),
        DataType::Int64,
    );
    let order = vec![micros.clone().sort(true, false)];
    let prev = lag(micros.clone(), Some(1), None)
        .partition_by(keys.to_vec())
        .order_by(order.clone())
        .build()?
        .alias("__riffle_prev");
    let new_session = when(
        col("__riffle_prev")
            .is_null()
            .or((micros.clone() - col("__riffle_prev")).gt_eq(lit(gap))),
        lit(1i64),
    )
    .otherwise(lit(0i64))?
    .alias("__riffle_new");
    let over = |f: Arc<datafusion::logical_expr::AggregateUDF>, arg: Expr| {
        Expr::from(DfWindowFunction::new(
            WindowFunctionDefinition::AggregateUDF(f),
            vec![arg],
        ))
    };
    let session_id = over(sum_udaf(), col("__riffle_new"))
        .partition_by(keys.to_vec())
        .order_by(order)
        .window_frame(WindowFrame::new(Some(true)))
        .build()?
        .alias("__riffle_sid");
    let mut session_keys = keys.to_vec();
    session_keys.push(col("__riffle_sid"));
    let first = over(min_udaf(), micros.clone())
        .partition_by(session_keys.clone())
        .build()?
        .alias("__riffle_first");
    let last = over(max_udaf(), micros.clone())
        .partition_by(session_keys)
        .build()?
        .alias("__riffle_last");
    let as_ts = |e: Expr| cast(e, DataType::Timestamp(TimeUnit::Microsecond, None));
    let session = datafusion::functions::core::expr_fn::named_struct(vec![
        lit("start"),
        as_ts(col("__riffle_first")),
        lit("end"),
        as_ts(col("__riffle_last") + lit(gap)),
    ])
    .alias(WINDOW_COLUMN);
    let mut with_session = input_columns.clone();
    with_session.push(session);
    let mut with_new = input_columns.clone();
    with_new.push(col("__riffle_prev"));
    with_new.push(new_session);
    LogicalPlanBuilder::from(input)
        .window(vec![prev])?
        .project(with_new)?
        .window(vec![session_id])?
        .window(vec![first, last])?
        .project(with_session)?
        .build()
}

/// The scalar value of a window's start, for tests and sinks.
pub fn window_start(window: &ScalarValue) -> Option<i64> {
    match window {
        ScalarValue::Struct(s) => s
            .column(0)
            .as_any()
            .downcast_ref::<TimestampMicrosecondArray>()
            .map(|a| a.value(0)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn every_window_holds_the_row_and_no_other_does(
            ts in -10_000_000_000i64..10_000_000_000,
            slide in 1i64..1_000_000,
            factor in 1i64..6,
            offset in 0i64..1_000_000,
        ) {
            let w = TimeWindows { size: slide * factor, slide, offset: offset % slide };
            let mut starts = Vec::new();
            w.for_each(ts, |s| starts.push(s));
            prop_assert_eq!(starts.len() as i64, factor);
            for s in &starts {
                prop_assert!(*s <= ts && ts < s + w.size);
                prop_assert_eq!((s - w.offset).rem_euclid(slide), 0);
            }
            // The next earlier and later aligned starts do not hold it.
            let earliest = *starts.last().unwrap() - slide;
            prop_assert!(ts >= earliest + w.size);
            prop_assert!(starts[0] + slide > ts);
        }
    }
}
