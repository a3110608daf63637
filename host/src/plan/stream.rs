//! Compiling a query's logical plan into a streaming plan, with Spark's rules for which
//! queries and output modes a stream supports.
//!
//! The logical plan is the one batch mode runs (same SQL, same DataFusion planner); compiling
//! only decides where the state lives. See [`crate::exec`] for the three parts.

use datafusion::logical_expr::{Aggregate, Distinct, Expr, JoinType, LogicalPlan};

use crate::error::{Result, RiffleError};
use crate::exec::OutputMode;
use crate::plan::window::{WindowKind, window_call};

/// The stateful node of a streaming query.
#[derive(Clone, Debug)]
pub enum StatefulNode {
    /// `GROUP BY`, with or without a window.
    Aggregate(Aggregate),
    /// `DISTINCT` / `DISTINCT ON`.
    Distinct(Distinct),
}

/// A query split into stateless stage, stateful node and post stage.
#[derive(Clone, Debug)]
pub struct StreamPlan {
    /// Everything below the stateful node (or the whole query).
    pub stateless: LogicalPlan,
    /// The aggregation or de-duplication, if any.
    pub stateful: Option<StatefulNode>,
    /// Nodes above the stateful node, bottom-up.
    pub post: Vec<LogicalPlan>,
}

fn unsupported(what: &str) -> RiffleError {
    RiffleError::Config(format!("streaming mode does not support {what}"))
}

/// Splits an analysed logical plan for streaming over source table `source`.
///
/// `event_time` is the source's event-time column when it has a watermark.
///
/// # Errors
/// [`RiffleError::Config`] naming the rule when the query or output mode cannot stream.
pub fn compile(
    plan: &LogicalPlan,
    source: &str,
    event_time: Option<&str>,
    mode: OutputMode,
) -> Result<StreamPlan> {
    // Walk down the single-input chain at the top of the plan to the stateful node.
    let mut chain: Vec<LogicalPlan> = Vec::new();
    let mut node = plan.clone();
    let stateful = loop {
        match &node {
            LogicalPlan::Aggregate(a) => break Some(StatefulNode::Aggregate(a.clone())),
            LogicalPlan::Distinct(d) => break Some(StatefulNode::Distinct(d.clone())),
            LogicalPlan::Projection(_)
            | LogicalPlan::Filter(_)
            | LogicalPlan::SubqueryAlias(_)
            | LogicalPlan::Sort(_)
            | LogicalPlan::Limit(_) => {
                let child = node.inputs()[0].clone();
                chain.push(node);
                node = child;
            }
            _ => break None,
        }
    };
    let Some(stateful) = stateful else {
        if mode == OutputMode::Complete {
            return Err(RiffleError::Config(
                "output mode complete needs an aggregation: without one the result table is \
                 every row ever seen (use append)"
                    .into(),
            ));
        }
        check_stateless(plan, source)?;
        return Ok(StreamPlan {
            stateless: plan.clone(),
            stateful: None,
            post: Vec::new(),
        });
    };
    for n in &chain {
        if matches!(n, LogicalPlan::Sort(_) | LogicalPlan::Limit(_)) && mode != OutputMode::Complete
        {
            return Err(RiffleError::Config(format!(
                "ORDER BY and LIMIT need output mode complete in streaming mode (found {} with \
                 output mode {mode:?}); in append or update mode a trigger writes only some \
                 rows, which cannot be sorted or limited as a whole",
                n.display()
            )));
        }
    }
    let input = match &stateful {
        StatefulNode::Aggregate(a) => a.input.as_ref().clone(),
        StatefulNode::Distinct(d) => d.input().as_ref().clone(),
    };
    check_stateless(&input, source)?;
    match &stateful {
        StatefulNode::Aggregate(agg) => check_aggregate(agg, event_time, mode)?,
        StatefulNode::Distinct(_) => {
            if mode == OutputMode::Complete {
                return Err(RiffleError::Config(
                    "output mode complete is not supported for DISTINCT (de-duplication); use \
                     append"
                        .into(),
                ));
            }
        }
    }
    chain.reverse();
    Ok(StreamPlan {
        stateless: input,
        stateful: Some(stateful),
        post: chain,
    })
}

fn check_aggregate(agg: &Aggregate, event_time: Option<&str>, mode: OutputMode) -> Result<()> {
    let mut window = None;
    for e in &agg.group_expr {
        if let Some(call) = window_call(e)? {
            window = Some(call);
        }
    }
    let Some(call) = window else {
        if mode == OutputMode::Append {
            return Err(RiffleError::Config(
                "output mode append needs the aggregation grouped by window() or \
                 session_window() on the event-time column, with a watermark: without one an \
                 aggregate row is never final. Use update or complete for a global keyed \
                 aggregation"
                    .into(),
            ));
        }
        return Ok(());
    };
    let ts_column = match &call.ts {
        Expr::Column(c) => Some(c.name.clone()),
        Expr::Cast(c) => match c.expr.as_ref() {
            Expr::Column(c) => Some(c.name.clone()),
            _ => None,
        },
        _ => None,
    };
    let on_event_time = event_time.is_some() && ts_column.as_deref() == event_time;
    if let WindowKind::Session(_) = call.kind
        && mode != OutputMode::Append
    {
        return Err(RiffleError::Config(format!(
            "session_window() supports output mode append only (got {mode:?}): a session's \
             bounds change until it closes"
        )));
    }
    if mode == OutputMode::Append && !on_event_time {
        return Err(RiffleError::Config(match event_time {
            None => "output mode append with window() needs a watermark: set event_time and \
                     watermark on the streaming source"
                .to_string(),
            Some(col) => format!(
                "output mode append needs the window on the watermarked event-time column \
                 `{col}`, not on {}",
                call.ts
            ),
        }));
    }
    Ok(())
}

fn streaming_scans(plan: &LogicalPlan, source: &str) -> usize {
    let own = match plan {
        LogicalPlan::TableScan(scan) if scan.table_name.table() == source => 1,
        _ => 0,
    };
    own + plan
        .inputs()
        .iter()
        .map(|p| streaming_scans(p, source))
        .sum::<usize>()
}

fn check_stateless(plan: &LogicalPlan, source: &str) -> Result<()> {
    match streaming_scans(plan, source) {
        0 => {
            return Err(RiffleError::Config(format!(
                "the query does not read the streaming source `{source}` (below its \
                 aggregation)"
            )));
        }
        1 => {}
        _ => {
            return Err(unsupported(
                "reading the streaming source twice (self-joins, unions)",
            ));
        }
    }
    check_node(plan, source)
}

fn check_node(plan: &LogicalPlan, source: &str) -> Result<()> {
    match plan {
        LogicalPlan::Projection(_)
        | LogicalPlan::Filter(_)
        | LogicalPlan::SubqueryAlias(_)
        | LogicalPlan::TableScan(_)
        | LogicalPlan::Unnest(_)
        | LogicalPlan::EmptyRelation(_)
        | LogicalPlan::Values(_) => {}
        LogicalPlan::Join(join) => {
            let left = streaming_scans(&join.left, source) > 0;
            let right = streaming_scans(&join.right, source) > 0;
            let ok = match join.join_type {
                JoinType::Inner => true,
                JoinType::Left | JoinType::LeftSemi | JoinType::LeftAnti => left,
                JoinType::Right | JoinType::RightSemi | JoinType::RightAnti => right,
                _ => false,
            };
            if !ok {
                return Err(unsupported(&format!(
                    "a {} join with the stream on that side: a static table's unmatched rows \
                     are never final (put the stream on the preserved side)",
                    join.join_type
                )));
            }
            // Only the stream's side may hold the stream; the static side is checked like a
            // batch plan by DataFusion.
            let streamed = if left { &join.left } else { &join.right };
            return check_node(streamed, source);
        }
        LogicalPlan::Aggregate(_) | LogicalPlan::Distinct(_) => {
            return Err(unsupported(
                "more than one aggregation or DISTINCT per query (only the top one can be \
                 stateful)",
            ));
        }
        LogicalPlan::Window(_) => {
            return Err(unsupported(
                "window functions (OVER ...); group by window()/session_window() instead",
            ));
        }
        LogicalPlan::Sort(_) | LogicalPlan::Limit(_) => {
            return Err(unsupported("ORDER BY/LIMIT below an aggregation"));
        }
        other => return Err(unsupported(&other.display().to_string())),
    }
    for input in plan.inputs() {
        check_node(input, source)?;
    }
    Ok(())
}
