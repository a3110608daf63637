//! The streaming compiler: a DataFusion logical plan in, a graph of operators out.

use std::sync::Arc;

use arrow::datatypes::{DataType, TimeUnit};
use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::common::{DFSchema, ScalarValue};
use datafusion::execution::SessionState;
use datafusion::logical_expr::{
    Aggregate, BinaryExpr, Distinct, Expr, Join, JoinType, LogicalPlan, Operator as BinOp, Window,
};
use datafusion::optimizer::OptimizerRule;
use datafusion::optimizer::replace_distinct_aggregate::ReplaceDistinctWithAggregate;

use super::fingerprint::{
    Fingerprint, OperatorPrint, STATE_FORMAT, SourcePrint, UdfPrint, describe_schema,
};
use super::{SourceSpec, StreamPlan};
use crate::common::OutputMode;
use crate::error::{Result, RiffleError};
use crate::exec::aggregate::{AggregateMode, WindowAggregate};
use crate::exec::dedup::Dedup;
use crate::exec::graph::{Edge, Graph, Node};
use crate::exec::join::{IntervalJoin, JoinBounds};
use crate::exec::over::OverWindow;
use crate::exec::session::SessionAggregate;
use crate::exec::stateless::{Slot, SlotNode, StatelessStage};
use crate::exec::{Operator, Partitioning};
use crate::udf::UdfModule;
use crate::window::{WINDOW, WindowKind, window_call};

/// What a column carries in event time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Time {
    /// Nothing the watermark speaks about.
    None,
    /// A source's event time (or a copy of it): the watermark covers it.
    Event,
    /// A window `{start, end}` over event time, emitted once the watermark passed its end.
    Window,
}

/// A stateless part of the plan that reads streams, not yet turned into an operator.
struct Region {
    /// The plan, with [`SlotNode`] leaves where it reads sources or operators.
    plan: LogicalPlan,
    /// The leaves' slots and what feeds them, in input order.
    inputs: Vec<(Slot, Edge)>,
    /// Event-time lineage of each output column.
    times: Vec<Time>,
    /// Rows below come from an operator that emits updates (not final rows).
    updating: bool,
    /// A root-most stateful operator is below (ORDER BY and LIMIT may follow it in complete mode).
    above_root: bool,
}

enum Lowered {
    /// Reads no stream: a plain DataFusion subtree (a static table).
    Static,
    Stream(Box<Region>),
}

enum Pending {
    /// The instances of an operator: one, or one per partition.
    Ready(Vec<Box<dyn Operator>>),
    Stateless(LogicalPlan, Vec<Slot>),
}

struct NodeSpec {
    operator: Pending,
    inputs: Vec<Edge>,
    schema: arrow::datatypes::SchemaRef,
}

struct Compiler<'a> {
    state: &'a SessionState,
    sources: &'a [SourceSpec],
    mode: OutputMode,
    nodes: Vec<NodeSpec>,
    /// The stateful nodes nearest the root: they emit in the query's output mode; every other
    /// stateful operator feeds one of them and must emit final rows.
    roots: Vec<*const LogicalPlan>,
    next_slot: usize,
    /// Instances of each operator that can be partitioned.
    partitions: usize,
}

fn unsupported(message: impl Into<String>) -> RiffleError {
    RiffleError::Unsupported(message.into())
}

/// Compiles `plan` (from SQL or a DataFrame, over tables of which `sources` stream) into a
/// graph of operators, in `mode`, with `udfs` pinned in the fingerprint. Operators that can be
/// partitioned ([`Operator::partitioning`]) get `partitions` instances each, which share their
/// rows on as many cores; the number is not part of the fingerprint, as the checkpoint's state
/// does not depend on it.
///
/// `state` must come from [`super::streaming_state`].
///
/// # Errors
/// [`RiffleError::Unsupported`] naming the rule for queries or output modes a stream cannot
/// run; planning errors from DataFusion.
pub async fn compile(
    plan: &LogicalPlan,
    sources: &[SourceSpec],
    mode: OutputMode,
    state: &SessionState,
    udfs: &[Arc<UdfModule>],
    partitions: usize,
) -> Result<StreamPlan> {
    reject_stream_subqueries(plan, sources)?;
    let optimized = state.optimize(plan)?;
    let mut compiler = Compiler {
        state,
        sources,
        mode,
        nodes: Vec::new(),
        roots: Vec::new(),
        next_slot: 0,
        partitions: partitions.max(1),
    };
    compiler.mark_roots(&optimized);
    let region = match compiler.lower(&optimized)? {
        Lowered::Static => {
            return Err(unsupported(format!(
                "the query reads none of the streaming sources ({})",
                sources
                    .iter()
                    .map(|s| s.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        Lowered::Stream(region) => *region,
    };
    if compiler.roots.is_empty() && mode == OutputMode::Complete {
        return Err(unsupported(
            "output mode complete needs an aggregation: without one the result table is every \
             row ever seen (use append)",
        ));
    }
    let output = compiler.materialize(region);
    let output_schema = Arc::new(optimized.schema().as_arrow().clone());

    let mut graph = Graph::new();
    for spec in compiler.nodes {
        let instances: Vec<Box<dyn Operator>> = match spec.operator {
            Pending::Ready(instances) => instances,
            Pending::Stateless(logical, slots) => {
                let first = StatelessStage::new(logical, slots, state).await?;
                let mut instances: Vec<Box<dyn Operator>> = Vec::new();
                if !matches!(first.partitioning(), Partitioning::Single) {
                    for _ in 1..compiler.partitions {
                        instances.push(Box::new(first.replicate(state).await?));
                    }
                }
                instances.insert(0, Box::new(first));
                instances
            }
        };
        graph.add(Node::partitioned(instances, spec.inputs, spec.schema)?)?;
    }
    graph.set_output(output);
    let fingerprint = fingerprint(&graph, sources, mode, udfs);
    Ok(StreamPlan {
        graph,
        output_schema,
        fingerprint,
        output_mode: mode,
    })
}

fn fingerprint(
    graph: &Graph,
    sources: &[SourceSpec],
    mode: OutputMode,
    udfs: &[Arc<UdfModule>],
) -> Fingerprint {
    let edge_name = |e: &Edge| match e {
        Edge::Source { index, projection } => match projection {
            None => sources[*index].name.clone(),
            Some(p) => format!("{}{p:?}", sources[*index].name),
        },
        Edge::Node(n) => graph.nodes()[*n].id.clone(),
    };
    Fingerprint {
        state_format: STATE_FORMAT,
        output_mode: mode.to_string(),
        sources: sources
            .iter()
            .map(|s| SourcePrint {
                name: s.name.clone(),
                kind: s.kind.clone(),
                schema: describe_schema(&s.schema),
                event_time: s.event_time.clone(),
                watermark_delay_us: s.watermark_delay,
            })
            .collect(),
        operators: graph
            .nodes()
            .iter()
            .map(|n| OperatorPrint {
                id: n.id.clone(),
                inputs: n.inputs.iter().map(edge_name).collect(),
                schema: describe_schema(&n.schema),
            })
            .collect(),
        udfs: udfs.iter().map(|m| UdfPrint::of(m)).collect(),
    }
}

fn is_source(sources: &[SourceSpec], plan: &LogicalPlan) -> Option<usize> {
    match plan {
        LogicalPlan::TableScan(scan) => sources
            .iter()
            .position(|s| s.name == scan.table_name.table()),
        _ => None,
    }
}

fn reads_stream(sources: &[SourceSpec], plan: &LogicalPlan) -> bool {
    plan.exists(|n| Ok(is_source(sources, n).is_some()))
        .unwrap_or(false)
}

/// A subquery inside an expression (`WHERE x IN (SELECT ...)`, a scalar subquery) that reads
/// a stream would need the whole stream before any row could be answered: refuse it, rather
/// than answer from one epoch's rows.
fn reject_stream_subqueries(plan: &LogicalPlan, sources: &[SourceSpec]) -> Result<()> {
    let mut found = None;
    plan.apply_with_subqueries(|node| {
        if let LogicalPlan::Subquery(sq) = node
            && reads_stream(sources, &sq.subquery)
        {
            found = Some(sq.subquery.display_indent().to_string());
            return Ok(TreeNodeRecursion::Stop);
        }
        Ok(TreeNodeRecursion::Continue)
    })?;
    match found {
        None => Ok(()),
        Some(_) => Err(unsupported(
            "a subquery (IN, EXISTS or a scalar subquery) that reads a streaming source: its \
             answer would need the whole stream, which never ends. Join the stream with itself \
             over an event-time range, or aggregate in a window, instead",
        )),
    }
}

/// The event-time lineage of `expr` over an input with column lineage `times`.
fn expr_time(expr: &Expr, schema: &DFSchema, times: &[Time]) -> Time {
    match expr {
        Expr::Alias(a) => expr_time(&a.expr, schema, times),
        Expr::Column(c) => schema
            .index_of_column(c)
            .ok()
            .and_then(|i| times.get(i).copied())
            .unwrap_or(Time::None),
        Expr::Cast(c) if c.field.data_type().is_temporal() => {
            match expr_time(&c.expr, schema, times) {
                Time::Event => Time::Event,
                _ => Time::None,
            }
        }
        Expr::ScalarFunction(f) if f.name() == "get_field" => {
            let end = matches!(
                f.args.get(1),
                Some(Expr::Literal(ScalarValue::Utf8(Some(s)), _)) if s == "end"
            );
            match f.args.first() {
                Some(w) if end && expr_time(w, schema, times) == Time::Window => Time::Event,
                _ => Time::None,
            }
        }
        Expr::ScalarFunction(f) if f.name() == WINDOW => match f.args.first() {
            Some(ts) if expr_time(ts, schema, times) == Time::Event => Time::Window,
            _ => Time::None,
        },
        _ => Time::None,
    }
}

/// The column a time expression reads, if it is a plain (possibly cast) column.
fn time_column(expr: &Expr, schema: &DFSchema) -> Option<usize> {
    match expr {
        Expr::Alias(a) => time_column(&a.expr, schema),
        Expr::Column(c) => schema.index_of_column(c).ok(),
        Expr::Cast(c) if c.field.data_type().is_temporal() => time_column(&c.expr, schema),
        _ => None,
    }
}

/// Microseconds of an interval literal with no months (`INTERVAL '5' MINUTE`).
fn interval_micros(value: &ScalarValue) -> Option<i64> {
    match value {
        ScalarValue::IntervalMonthDayNano(Some(i))
            if i.months == 0 && i.nanoseconds % 1000 == 0 =>
        {
            Some(i.days as i64 * 86_400_000_000 + i.nanoseconds / 1000)
        }
        ScalarValue::IntervalDayTime(Some(i)) => {
            Some(i.days as i64 * 86_400_000_000 + i.milliseconds as i64 * 1000)
        }
        ScalarValue::DurationMicrosecond(Some(d)) => Some(*d),
        ScalarValue::DurationMillisecond(Some(d)) => Some(d * 1000),
        ScalarValue::DurationSecond(Some(d)) => Some(d * 1_000_000),
        _ => None,
    }
}

/// `column ± interval` as (column expression, offset in microseconds).
fn shifted(expr: &Expr) -> (&Expr, Option<i64>) {
    if let Expr::BinaryExpr(BinaryExpr { left, op, right }) = expr
        && let Expr::Literal(value, _) = right.as_ref()
        && let Some(micros) = interval_micros(value)
    {
        match op {
            BinOp::Plus => return (left, Some(micros)),
            BinOp::Minus => return (left, Some(-micros)),
            _ => {}
        }
    }
    (expr, Some(0))
}

/// Whether DataFusion computes `expr` (a time column `column` of type `data_type`, or it
/// plus or minus an interval) as the integer microseconds [`shifted`] says: for microsecond
/// timestamps with a fixed offset. A day added to a zoned timestamp is a calendar day (23 or
/// 25 hours across a clock change), and other units round.
fn exact_shift(expr: &Expr, column: &Expr, data_type: &DataType) -> bool {
    let DataType::Timestamp(TimeUnit::Microsecond, zone) = data_type else {
        return false;
    };
    if !matches!(column, Expr::Column(_)) {
        return false;
    }
    let calendar_days = match expr {
        Expr::BinaryExpr(BinaryExpr { right, .. }) => match right.as_ref() {
            Expr::Literal(ScalarValue::IntervalMonthDayNano(Some(i)), _) => i.days != 0,
            Expr::Literal(ScalarValue::IntervalDayTime(Some(i)), _) => i.days != 0,
            _ => false,
        },
        _ => false,
    };
    zone.is_none() || !calendar_days
}

impl Compiler<'_> {
    fn reads_stream(&self, plan: &LogicalPlan) -> bool {
        reads_stream(self.sources, plan)
    }

    fn is_stateful(&self, plan: &LogicalPlan) -> bool {
        match plan {
            LogicalPlan::Aggregate(a) => self.reads_stream(&a.input),
            LogicalPlan::Distinct(d) => self.reads_stream(d.input()),
            LogicalPlan::Window(w) => self.reads_stream(&w.input),
            LogicalPlan::Join(j) => self.reads_stream(&j.left) && self.reads_stream(&j.right),
            _ => false,
        }
    }

    fn mark_roots(&mut self, plan: &LogicalPlan) {
        if self.is_stateful(plan) {
            self.roots.push(plan as *const LogicalPlan);
            return;
        }
        for child in plan.inputs() {
            self.mark_roots(child);
        }
    }

    fn is_root(&self, plan: &LogicalPlan) -> bool {
        self.roots.iter().any(|p| std::ptr::eq(*p, plan))
    }

    /// The instances of an operator `make` builds: one per partition if it can be
    /// partitioned ([`Operator::partitioning`]), else one.
    fn instances<O: Operator + 'static>(
        &self,
        make: impl Fn() -> Result<O>,
    ) -> Result<Vec<Box<dyn Operator>>> {
        let first = make()?;
        let n = match first.partitioning() {
            Partitioning::Single => 1,
            _ => self.partitions,
        };
        let mut instances: Vec<Box<dyn Operator>> = vec![Box::new(first)];
        for _ in 1..n {
            instances.push(Box::new(make()?));
        }
        Ok(instances)
    }

    fn add(&mut self, operator: Pending, inputs: Vec<Edge>, schema: &DFSchema) -> Edge {
        self.nodes.push(NodeSpec {
            operator,
            inputs,
            schema: Arc::new(schema.as_arrow().clone()),
        });
        Edge::Node(self.nodes.len() - 1)
    }

    /// The edge that delivers `region`'s rows: its only input directly when the region is just
    /// a leaf, otherwise a stateless stage running the region's plan.
    fn materialize(&mut self, region: Region) -> Edge {
        if SlotNode::of(&region.plan).is_some() && region.inputs.len() == 1 {
            return region.inputs.into_iter().next().expect("one input").1;
        }
        let (slots, edges): (Vec<Slot>, Vec<Edge>) = region.inputs.into_iter().unzip();
        let schema = region.plan.schema().clone();
        self.add(Pending::Stateless(region.plan, slots), edges, &schema)
    }

    /// A leaf standing for the output of operator `edge`, with schema `schema`.
    fn leaf(
        &mut self,
        schema: &Arc<DFSchema>,
        edge: Edge,
        times: Vec<Time>,
        updating: bool,
        above_root: bool,
    ) -> Region {
        let node = SlotNode::new(self.next_slot, Arc::clone(schema));
        self.next_slot += 1;
        let slot = node.slot().clone();
        Region {
            plan: node.into_plan(),
            inputs: vec![(slot, edge)],
            times,
            updating,
            above_root,
        }
    }

    fn lower(&mut self, plan: &LogicalPlan) -> Result<Lowered> {
        if !self.reads_stream(plan) {
            return Ok(Lowered::Static);
        }
        let root = self.is_root(plan);
        match plan {
            LogicalPlan::TableScan(scan) => {
                let index = is_source(self.sources, plan).expect("reads_stream found it");
                if !scan.filters.is_empty() || scan.fetch.is_some() {
                    return Err(RiffleError::Internal(
                        "a filter or limit was pushed into a streaming scan".into(),
                    ));
                }
                let source = &self.sources[index];
                let times = scan
                    .projected_schema
                    .fields()
                    .iter()
                    .map(|f| {
                        if source.event_time.as_deref() == Some(f.name().as_str()) {
                            Time::Event
                        } else {
                            Time::None
                        }
                    })
                    .collect();
                let edge = Edge::Source {
                    index,
                    projection: scan.projection.clone(),
                };
                let schema = Arc::clone(&scan.projected_schema);
                Ok(Lowered::Stream(Box::new(
                    self.leaf(&schema, edge, times, false, false),
                )))
            }
            LogicalPlan::Aggregate(agg) => self
                .aggregate(agg, root)
                .map(|r| Lowered::Stream(Box::new(r))),
            LogicalPlan::Distinct(d) => self.distinct(d, plan, root),
            LogicalPlan::Window(w) => self.over(w, root).map(|r| Lowered::Stream(Box::new(r))),
            LogicalPlan::Join(j) if self.reads_stream(&j.left) && self.reads_stream(&j.right) => {
                self.stream_join(j, root)
                    .map(|r| Lowered::Stream(Box::new(r)))
            }
            LogicalPlan::Projection(_)
            | LogicalPlan::Filter(_)
            | LogicalPlan::SubqueryAlias(_)
            | LogicalPlan::Sort(_)
            | LogicalPlan::Limit(_)
            | LogicalPlan::Join(_)
            | LogicalPlan::Union(_)
            | LogicalPlan::Unnest(_) => self.stateless(plan).map(|r| Lowered::Stream(Box::new(r))),
            other => Err(unsupported(format!(
                "streaming mode does not support {} over a stream",
                other.display()
            ))),
        }
    }

    /// The input region of a stateful node, which must read a stream and must not follow an
    /// operator that emits updates.
    fn stateful_input(&mut self, input: &LogicalPlan, what: &str) -> Result<Region> {
        match self.lower(input)? {
            Lowered::Static => Err(RiffleError::Internal(format!("{what} over no stream"))),
            Lowered::Stream(region) if region.updating => Err(unsupported(format!(
                "{what} after an aggregation that emits updates (output mode update or \
                 complete, or a GROUP BY without a window on the event-time column): a \
                 stateful operator needs final rows as input. Group the first aggregation by \
                 window() on the event-time column"
            ))),
            Lowered::Stream(region) => Ok(*region),
        }
    }

    fn stateless(&mut self, plan: &LogicalPlan) -> Result<Region> {
        let mut children: Vec<Option<Region>> = Vec::new();
        let mut new_inputs: Vec<LogicalPlan> = Vec::new();
        for child in plan.inputs() {
            match self.lower(child)? {
                Lowered::Static => {
                    new_inputs.push(child.clone());
                    children.push(None);
                }
                Lowered::Stream(region) => {
                    new_inputs.push(region.plan.clone());
                    children.push(Some(*region));
                }
            }
        }
        let child_times = |i: usize, children: &[Option<Region>]| -> Vec<Time> {
            match &children[i] {
                Some(r) => r.times.clone(),
                None => vec![Time::None; plan.inputs()[i].schema().fields().len()],
            }
        };
        let times = match plan {
            LogicalPlan::Projection(p) => {
                let input_times = child_times(0, &children);
                p.expr
                    .iter()
                    .map(|e| expr_time(e, p.input.schema(), &input_times))
                    .collect()
            }
            LogicalPlan::Filter(_) | LogicalPlan::SubqueryAlias(_) => child_times(0, &children),
            LogicalPlan::Sort(_) | LogicalPlan::Limit(_) => {
                let region = children[0].as_ref().expect("reads a stream");
                if !(self.mode == OutputMode::Complete && region.above_root) {
                    return Err(unsupported(format!(
                        "ORDER BY and LIMIT need output mode complete and an aggregation below \
                         them in streaming mode (found {} with output mode {}); in append or \
                         update mode a trigger writes only some rows, which cannot be sorted \
                         or limited as a whole",
                        plan.display(),
                        self.mode
                    )));
                }
                child_times(0, &children)
            }
            LogicalPlan::Join(join) => {
                let left = children[0].is_some();
                let ok = match join.join_type {
                    JoinType::Inner => true,
                    JoinType::Left
                    | JoinType::LeftSemi
                    | JoinType::LeftAnti
                    | JoinType::LeftMark => left,
                    JoinType::Right
                    | JoinType::RightSemi
                    | JoinType::RightAnti
                    | JoinType::RightMark => !left,
                    JoinType::Full => false,
                };
                if !ok {
                    return Err(unsupported(format!(
                        "a {} join with the stream on that side: a static table's unmatched rows \
                         are never final (put the stream on the preserved side)",
                        join.join_type
                    )));
                }
                let (l, r) = (child_times(0, &children), child_times(1, &children));
                join_times(join.join_type, l, r, join.schema.fields().len())
            }
            LogicalPlan::Union(_) => {
                if children.iter().any(Option::is_none) {
                    return Err(unsupported(
                        "UNION of a stream and a static table: the static rows would be \
                         repeated every epoch",
                    ));
                }
                let all: Vec<Vec<Time>> = (0..children.len())
                    .map(|i| child_times(i, &children))
                    .collect();
                (0..plan.schema().fields().len())
                    .map(|c| {
                        let first = all[0][c];
                        if all.iter().all(|t| t[c] == first) {
                            first
                        } else {
                            Time::None
                        }
                    })
                    .collect()
            }
            _ => vec![Time::None; plan.schema().fields().len()],
        };
        let mut inputs = new_inputs.into_iter();
        let plan = plan
            .clone()
            .map_children(|_| Ok(Transformed::yes(inputs.next().expect("one per child"))))?
            .data;
        let mut region = Region {
            plan,
            inputs: Vec::new(),
            times,
            updating: false,
            above_root: false,
        };
        for child in children.into_iter().flatten() {
            region.inputs.extend(child.inputs);
            region.updating |= child.updating;
            region.above_root |= child.above_root;
        }
        Ok(region)
    }

    fn aggregate(&mut self, agg: &Aggregate, root: bool) -> Result<Region> {
        let input = self.stateful_input(&agg.input, "an aggregation")?;
        let schema = agg.input.schema();
        let mut window = None;
        for (i, e) in agg.group_expr.iter().enumerate() {
            if let Some(call) = window_call(e)? {
                window = Some((i, call));
            }
        }
        let on_event_time = window.as_ref().is_some_and(|(_, call)| {
            time_column(&call.ts, schema).is_some_and(|c| input.times[c] == Time::Event)
        });
        let mode = if root { self.mode } else { OutputMode::Append };
        let session = matches!(&window, Some((_, c)) if matches!(c.kind, WindowKind::Session(_)));
        if session && mode != OutputMode::Append {
            return Err(unsupported(format!(
                "session_window() supports output mode append only (got {mode}): a session's \
                 bounds change until it closes"
            )));
        }
        if mode == OutputMode::Append && !on_event_time {
            let event_times: Vec<&str> = self
                .sources
                .iter()
                .filter_map(|s| s.event_time.as_deref())
                .collect();
            return Err(unsupported(match (&window, root) {
                (None, true) => "output mode append needs the aggregation grouped by window() \
                                 or session_window() on the event-time column, with a \
                                 watermark: without one an aggregate row is never final. Use \
                                 update or complete for a global keyed aggregation"
                    .to_string(),
                (None, false) => "an aggregation that feeds another stateful operator must be \
                                  grouped by window() or session_window() on the event-time \
                                  column, so that its rows are final"
                    .to_string(),
                (Some(_), _) if event_times.is_empty() => "output mode append with window() \
                     needs a watermark: set event_time and watermark on the streaming source"
                    .to_string(),
                (Some((_, call)), _) => format!(
                    "output mode append needs the window on a watermarked event-time column \
                     ({}), not on {}",
                    event_times.join(", "),
                    call.ts
                ),
            }));
        }
        let instances = if session {
            self.instances(|| SessionAggregate::new(agg, self.state))?
        } else {
            let mode = AggregateMode {
                output: mode,
                window_on_event_time: on_event_time,
            };
            self.instances(|| WindowAggregate::new(agg, self.state, mode))?
        };
        let edge = self.materialize(input);
        let out = self.add(Pending::Ready(instances), vec![edge], &agg.schema);
        let times = (0..agg.schema.fields().len())
            .map(|i| match &window {
                Some((w, _)) if *w == i && mode == OutputMode::Append => Time::Window,
                _ => Time::None,
            })
            .collect();
        Ok(self.leaf(&agg.schema, out, times, mode != OutputMode::Append, root))
    }

    fn distinct(&mut self, distinct: &Distinct, plan: &LogicalPlan, root: bool) -> Result<Lowered> {
        if let Distinct::On(on) = distinct
            && on.sort_expr.is_some()
        {
            // Which row a key keeps depends on rows that may still arrive: this is an
            // aggregation (`first_value(... ORDER BY ...)`), final only in update/complete mode.
            if !root || self.mode == OutputMode::Append {
                return Err(unsupported(
                    "DISTINCT ON with ORDER BY keeps, per key, the row that sorts first, which \
                     can change until the stream ends: use output mode update or complete (or \
                     DISTINCT ON without ORDER BY, which keeps the first row to arrive)",
                ));
            }
            let rewritten = ReplaceDistinctWithAggregate::new()
                .rewrite(plan.clone(), self.state)?
                .data;
            // The rewrite sorts its result by the DISTINCT ON keys; a stream's updates have no
            // order to keep.
            let rewritten = match rewritten {
                LogicalPlan::Projection(mut p) => {
                    if let LogicalPlan::Sort(s) = p.input.as_ref() {
                        p.input = Arc::clone(&s.input);
                    }
                    LogicalPlan::Projection(p)
                }
                other => other,
            };
            // The root marks set here point into `rewritten`, which lives until lowering is
            // done; they are dropped right after.
            let marked = self.roots.len();
            self.mark_roots(&rewritten);
            let lowered = self.lower(&rewritten);
            self.roots.truncate(marked);
            return lowered;
        }
        if root && self.mode == OutputMode::Complete {
            return Err(unsupported(
                "output mode complete is not supported for DISTINCT (de-duplication); use append",
            ));
        }
        let input = self.stateful_input(distinct.input(), "DISTINCT")?;
        let event_time = input.times.iter().position(|t| *t == Time::Event);
        let instances = self.instances(|| Dedup::new(distinct, self.state, event_time))?;
        let times = match distinct {
            Distinct::All(_) => input.times.clone(),
            Distinct::On(on) => on
                .select_expr
                .iter()
                .map(|e| expr_time(e, on.input.schema(), &input.times))
                .collect(),
        };
        let edge = self.materialize(input);
        let schema = plan.schema().clone();
        let out = self.add(Pending::Ready(instances), vec![edge], &schema);
        Ok(Lowered::Stream(Box::new(
            self.leaf(&schema, out, times, false, root),
        )))
    }

    fn over(&mut self, window: &Window, root: bool) -> Result<Region> {
        if root && self.mode == OutputMode::Complete {
            return Err(unsupported(
                "output mode complete needs an aggregation; OVER windows emit each row once \
                 (use append)",
            ));
        }
        let input = self.stateful_input(&window.input, "an OVER window")?;
        let schema = window.input.schema();
        let order = match window.window_expr.first() {
            Some(Expr::WindowFunction(f)) => f.params.order_by.first().cloned(),
            Some(Expr::Alias(a)) => match a.expr.as_ref() {
                Expr::WindowFunction(f) => f.params.order_by.first().cloned(),
                _ => None,
            },
            _ => None,
        };
        let event_times: Vec<&str> = self
            .sources
            .iter()
            .filter_map(|s| s.event_time.as_deref())
            .collect();
        let ts = order
            .as_ref()
            .and_then(|o| time_column(&o.expr, schema).filter(|_| o.asc))
            .filter(|c| input.times[*c] == Time::Event)
            .ok_or_else(|| {
                unsupported(format!(
                    "an OVER window on a stream must be ORDER BY a watermarked event-time column \
                     ({}) ascending: a row's value is final once the watermark passes its event \
                     time{}",
                    if event_times.is_empty() {
                        "the stream has none: set event_time and watermark on the source".into()
                    } else {
                        event_times.join(", ")
                    },
                    match &order {
                        Some(o) => format!(" (found ORDER BY {o})"),
                        None => " (found no ORDER BY)".into(),
                    }
                ))
            })?;
        let instances = self.instances(|| OverWindow::new(window, self.state, ts))?;
        let mut times = input.times.clone();
        times.resize(window.schema.fields().len(), Time::None);
        let edge = self.materialize(input);
        let out = self.add(Pending::Ready(instances), vec![edge], &window.schema);
        Ok(self.leaf(&window.schema, out, times, false, root))
    }

    fn stream_join(&mut self, join: &Join, root: bool) -> Result<Region> {
        if root && self.mode == OutputMode::Complete {
            return Err(unsupported(
                "output mode complete needs an aggregation; a join of two streams emits each \
                 joined row once (use append)",
            ));
        }
        if !matches!(
            join.join_type,
            JoinType::Inner | JoinType::Left | JoinType::Right | JoinType::Full
        ) {
            return Err(unsupported(format!(
                "{} joins of two streams (inner, left, right and full outer joins are supported)",
                join.join_type
            )));
        }
        let left = self.stateful_input(&join.left, "a join")?;
        let right = self.stateful_input(&join.right, "a join")?;
        let (bounds, residual) = join_bounds(join, &left.times, &right.times)?;
        let instances =
            self.instances(|| IntervalJoin::new(join, self.state, bounds, residual.as_ref()))?;
        let times = join_times(
            join.join_type,
            left.times.clone(),
            right.times.clone(),
            join.schema.fields().len(),
        );
        let l = self.materialize(left);
        let r = self.materialize(right);
        let out = self.add(Pending::Ready(instances), vec![l, r], &join.schema);
        Ok(self.leaf(&join.schema, out, times, false, root))
    }
}

fn join_times(join_type: JoinType, left: Vec<Time>, right: Vec<Time>, width: usize) -> Vec<Time> {
    let mut times = match join_type {
        JoinType::Inner | JoinType::Left | JoinType::Right | JoinType::Full => {
            let mut t = left;
            t.extend(right);
            t
        }
        JoinType::LeftSemi | JoinType::LeftAnti | JoinType::LeftMark => left,
        JoinType::RightSemi | JoinType::RightAnti | JoinType::RightMark => right,
    };
    times.resize(width, Time::None);
    times
}

/// The event-time range of a join of two streams: the bounds on `right.ts - left.ts` that its
/// condition implies, from conjuncts like `l.ts BETWEEN r.ts - INTERVAL '5' MINUTE AND r.ts +
/// INTERVAL '10' MINUTE`. Both bounds are needed, or one side's rows could never be forgotten.
///
/// Also returns the rest of the condition: the conjuncts the range does not decide exactly.
/// The join checks the range itself on integer microseconds, so a conjunct it came from needs
/// no second evaluation by DataFusion when integer arithmetic is what DataFusion would do too
/// (see [`exact_shift`]).
fn join_bounds(
    join: &Join,
    left_times: &[Time],
    right_times: &[Time],
) -> Result<(JoinBounds, Option<Expr>)> {
    let left_schema = join.left.schema();
    let right_schema = join.right.schema();
    let mut lower: Option<i64> = None;
    let mut upper: Option<i64> = None;
    let mut columns: Option<(usize, usize)> = None;
    let mut residual = Vec::new();
    // (left side?, column, offset, exact, column type).
    let side = |e: &Expr| -> Option<(bool, usize, i64, bool, &DataType)> {
        let (column, offset) = shifted(e);
        let offset = offset?;
        for (left, schema, times) in [
            (true, left_schema, left_times),
            (false, right_schema, right_times),
        ] {
            if let Some(c) = time_column(column, schema)
                && times[c] == Time::Event
            {
                let data_type = schema.field(c).data_type();
                let exact = exact_shift(e, column, data_type);
                return Some((left, c, offset, exact, data_type));
            }
        }
        None
    };
    if let Some(filter) = &join.filter {
        for conjunct in datafusion::logical_expr::utils::split_conjunction(filter) {
            let Expr::BinaryExpr(BinaryExpr { left, op, right }) = conjunct else {
                residual.push(conjunct.clone());
                continue;
            };
            let (Some(a), Some(b)) = (side(left), side(right)) else {
                residual.push(conjunct.clone());
                continue;
            };
            if a.0 == b.0 {
                residual.push(conjunct.clone());
                continue;
            }
            // Normalise to `L + x  op  R + y`.
            let (l, r, op) = if a.0 {
                (a, b, *op)
            } else {
                let flipped = match op {
                    BinOp::Lt => BinOp::Gt,
                    BinOp::LtEq => BinOp::GtEq,
                    BinOp::Gt => BinOp::Lt,
                    BinOp::GtEq => BinOp::LtEq,
                    other => *other,
                };
                (b, a, flipped)
            };
            match columns {
                None => columns = Some((l.1, r.1)),
                Some(c) if c == (l.1, r.1) => {}
                Some(_) => {
                    residual.push(conjunct.clone());
                    continue;
                }
            }
            // Both sides of one type (a zone-less time compared with a zoned one is converted
            // first), each exact, in a comparison the bounds capture.
            if !(l.3
                && r.3
                && l.4 == r.4
                && matches!(
                    op,
                    BinOp::GtEq | BinOp::Gt | BinOp::LtEq | BinOp::Lt | BinOp::Eq
                ))
            {
                residual.push(conjunct.clone());
            }
            // d = R - L;  L + x >= R + y  <=>  d <= x - y.
            let k = l.2 - r.2;
            match op {
                BinOp::GtEq => upper = Some(upper.map_or(k, |u| u.min(k))),
                BinOp::Gt => upper = Some(upper.map_or(k - 1, |u| u.min(k - 1))),
                BinOp::LtEq => lower = Some(lower.map_or(k, |v| v.max(k))),
                BinOp::Lt => lower = Some(lower.map_or(k + 1, |v| v.max(k + 1))),
                BinOp::Eq => {
                    upper = Some(upper.map_or(k, |u| u.min(k)));
                    lower = Some(lower.map_or(k, |v| v.max(k)));
                }
                _ => {}
            }
        }
    }
    match (columns, lower, upper) {
        (Some((left_ts, right_ts)), Some(lower), Some(upper)) => Ok((
            JoinBounds {
                left_ts,
                right_ts,
                lower,
                upper,
            },
            datafusion::logical_expr::utils::conjunction(residual),
        )),
        _ => Err(unsupported(
            "a join of two streams needs an event-time range on both sides' watermarked \
             event-time columns, bounded in both directions (for example `ON l.k = r.k AND \
             l.ts BETWEEN r.ts - INTERVAL '5' MINUTE AND r.ts + INTERVAL '10' MINUTE`): without \
             it either side's rows would have to be kept forever",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exec::testing::{find, optimized};
    use arrow::array::RecordBatch;
    use arrow::datatypes::{Field, Schema};

    /// An empty table `name(k, ts, v)` with `ts` of type `ts`.
    fn table(ts: DataType) -> RecordBatch {
        RecordBatch::new_empty(Arc::new(Schema::new(vec![
            Field::new("k", DataType::Int64, true),
            Field::new("ts", ts, false),
            Field::new("v", DataType::Int64, true),
        ])))
    }

    /// The bounds and the residual condition (as text) of the join in `on`.
    async fn bounds(ts: DataType, on: &str) -> (JoinBounds, Option<String>) {
        let sql = format!("SELECT * FROM l JOIN r ON {on}");
        let (plan, _) = optimized(&sql, &[("l", table(ts.clone())), ("r", table(ts))]).await;
        let LogicalPlan::Join(join) = find(&plan, &|p| matches!(p, LogicalPlan::Join(_))) else {
            unreachable!()
        };
        let times = [Time::None, Time::Event, Time::None];
        let (bounds, residual) = join_bounds(&join, &times, &times).unwrap();
        (bounds, residual.map(|e| e.to_string()))
    }

    #[tokio::test]
    async fn a_range_on_microsecond_times_needs_no_second_evaluation() {
        const MIN: i64 = 60_000_000;
        let us = DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()));
        let on =
            "l.k = r.k AND r.ts BETWEEN l.ts - INTERVAL '2' MINUTE AND l.ts + INTERVAL '1' MINUTE";
        let (b, residual) = bounds(us.clone(), on).await;
        assert_eq!((b.lower, b.upper), (-2 * MIN, MIN));
        assert_eq!(residual, None);

        // Other conjuncts stay; strict comparisons become inclusive bounds a microsecond in.
        let on = "l.k = r.k AND r.ts > l.ts AND r.ts < l.ts + INTERVAL '1' MINUTE AND l.v < r.v";
        let (b, residual) = bounds(us.clone(), on).await;
        assert_eq!((b.lower, b.upper), (1, MIN - 1));
        assert_eq!(residual.as_deref(), Some("l.v < r.v"));

        // A day is a calendar day in a time zone: DataFusion decides.
        let on = "l.k = r.k AND r.ts BETWEEN l.ts AND l.ts + INTERVAL '1' DAY";
        let (b, residual) = bounds(us, on).await;
        assert_eq!((b.lower, b.upper), (0, 1440 * MIN));
        assert_eq!(
            residual.as_deref(),
            Some(
                "r.ts <= l.ts + IntervalMonthDayNano(\"IntervalMonthDayNano { months: 0, days: 1, nanoseconds: 0 }\")"
            )
        );

        // Milliseconds round differently from microseconds: DataFusion decides.
        let ms = DataType::Timestamp(TimeUnit::Millisecond, None);
        let on = "l.k = r.k AND r.ts BETWEEN l.ts AND l.ts + INTERVAL '1' MINUTE";
        let (_, residual) = bounds(ms, on).await;
        assert!(residual.is_some_and(|r| r.contains(" >= ") && r.contains(" <= ")));
    }
}
