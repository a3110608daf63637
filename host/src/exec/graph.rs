//! The dataflow graph: operators with stable ids, wired to sources and to each other, run once
//! per epoch in topological order.

use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use datafusion::execution::SessionState;

use super::partition::{Delivery, run_instances, split_by_hash, split_by_key, split_contiguous};
use super::{Combiner, Operator, OperatorMetrics, Output, Partitioning};
use crate::common::Watermark;
use crate::error::{Result, RiffleError};
use crate::state::StateSize;

/// Where an operator input (or the graph's output) comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Edge {
    /// Rows of a streaming source (its index in the query's source list), optionally reduced to
    /// some of its columns.
    Source {
        /// The source.
        index: usize,
        /// Columns to keep, in order (`None`: all).
        projection: Option<Vec<usize>>,
    },
    /// The output of an earlier node.
    Node(usize),
}

/// One operator in the graph: one instance of it, or several that share its rows
/// ([`partition`](super::partition)).
pub struct Node {
    /// Stable id: `<position>-<kind>`. Names the operator's state in the checkpoint and its
    /// line in the progress.
    pub id: String,
    /// The operator's instances (at least one); more than one only if it can be partitioned.
    instances: Vec<Box<dyn Operator>>,
    partitioning: Partitioning,
    /// What folds shares of the rows before they are routed, when there are several instances
    /// ([`Operator::combiner`]).
    combiner: Option<Arc<dyn Combiner>>,
    /// Its inputs, in the order the operator numbers them.
    pub inputs: Vec<Edge>,
    /// Schema of what it emits.
    pub schema: SchemaRef,
    /// What it did.
    pub metrics: OperatorMetrics,
    watermark: Watermark,
}

impl Node {
    /// A node of one instance; its id is set when it is added to a graph.
    pub fn new(operator: Box<dyn Operator>, inputs: Vec<Edge>, schema: SchemaRef) -> Self {
        Node {
            id: String::new(),
            metrics: OperatorMetrics {
                kind: operator.kind(),
                partitions: 1,
                ..OperatorMetrics::default()
            },
            instances: vec![operator],
            partitioning: Partitioning::Single,
            combiner: None,
            inputs,
            schema,
            watermark: Watermark::NONE,
        }
    }

    /// A node whose `instances` (alike, built the same way) share its rows as the first says
    /// ([`Operator::partitioning`]).
    ///
    /// # Errors
    /// [`RiffleError::Internal`] for no instances, or several of an operator that cannot be
    /// partitioned.
    pub fn partitioned(
        instances: Vec<Box<dyn Operator>>,
        inputs: Vec<Edge>,
        schema: SchemaRef,
    ) -> Result<Self> {
        let mut rest = instances.into_iter();
        let first = rest
            .next()
            .ok_or_else(|| RiffleError::Internal("an operator node needs an instance".into()))?;
        let partitioning = first.partitioning();
        let mut node = Node::new(first, inputs, schema);
        node.instances.extend(rest);
        if node.instances.len() > 1 && matches!(partitioning, Partitioning::Single) {
            return Err(RiffleError::Internal(format!(
                "{} instances of a {} operator, which cannot be partitioned",
                node.instances.len(),
                node.metrics.kind
            )));
        }
        node.metrics.partitions = node.instances.len();
        if node.instances.len() > 1 && matches!(partitioning, Partitioning::ByKey(_)) {
            node.combiner = node.instances[0].combiner();
        }
        node.partitioning = partitioning;
        Ok(node)
    }

    /// The node's output watermark after the last epoch.
    pub fn watermark(&self) -> Watermark {
        self.watermark
    }

    /// The operator (its first instance, which speaks for all of them).
    pub fn operator(&self) -> &dyn Operator {
        self.instances[0].as_ref()
    }

    /// The operator's instances.
    pub fn instances_mut(&mut self) -> &mut [Box<dyn Operator>] {
        &mut self.instances
    }

    /// The names of the operator's state tables.
    pub fn table_names(&mut self) -> Vec<String> {
        self.instances[0]
            .tables()
            .iter()
            .map(|t| t.name().to_string())
            .collect()
    }

    /// State table `table` (by position, as [`table_names`](Self::table_names) lists them):
    /// its snapshot, or its changes since the last call, as the union of every instance's.
    ///
    /// # Errors
    /// Encoding errors.
    pub fn take_state(&mut self, table: usize, snapshot: bool) -> Result<Vec<RecordBatch>> {
        let id = &self.id;
        let take = |instance: &mut Box<dyn Operator>| -> Result<Vec<RecordBatch>> {
            let mut tables = instance.tables();
            let t = tables.get_mut(table).ok_or_else(|| {
                RiffleError::Internal(format!("instances of {id} differ in tables"))
            })?;
            if snapshot {
                t.snapshot()
            } else {
                t.take_delta()
            }
        };
        // Each instance encodes its own table on a thread of its own: encoding is most of the
        // checkpoint's time, and it runs between epochs, when nothing else does.
        let taken: Vec<Result<Vec<RecordBatch>>> = if self.instances.len() == 1 {
            vec![take(&mut self.instances[0])]
        } else {
            std::thread::scope(|scope| {
                let threads: Vec<_> = self
                    .instances
                    .iter_mut()
                    .map(|instance| scope.spawn(|| take(instance)))
                    .collect();
                threads
                    .into_iter()
                    .map(|t| t.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
                    .collect()
            })
        };
        let mut batches: Vec<RecordBatch> = Vec::new();
        for part in taken {
            batches.extend(part?);
        }
        // A state file keeps one schema's metadata (what a row buffer's delta says beyond its
        // rows): the instances' batches must agree on it.
        if let Some(first) = batches.first() {
            let metadata = first.schema().metadata().clone();
            if batches.iter().any(|b| b.schema().metadata() != &metadata) {
                return Err(RiffleError::Internal(format!(
                    "the partitions of {} disagree on their state's metadata",
                    self.id
                )));
            }
        }
        Ok(batches)
    }

    /// Applies a snapshot or delta of table `name` (as [`take_state`](Self::take_state)
    /// made it, with any number of instances), each entry to the instance its key belongs to
    /// now. Returns whether the operator has such a table.
    ///
    /// # Errors
    /// The table's restore errors; [`RiffleError::Internal`] for state of a partitioned
    /// operator that is not keyed.
    pub fn restore_state(
        &mut self,
        name: &str,
        batches: &[RecordBatch],
        snapshot: bool,
    ) -> Result<bool> {
        let n = self.instances.len();
        let shares = if n == 1 {
            vec![batches.to_vec()]
        } else {
            let Partitioning::ByKey(key) = &self.partitioning else {
                return Err(RiffleError::Internal(format!(
                    "operator {} keeps state but its {n} instances are not keyed",
                    self.id
                )));
            };
            // Every instance gets its part of every batch, empty or not: a batch may say
            // more than its rows (a row buffer's delta, how far it released rows).
            let mut shares = vec![Vec::new(); n];
            for batch in batches {
                let hashes = key.state_hashes(name, batch)?;
                for (share, part) in shares.iter_mut().zip(split_by_hash(batch, &hashes, n)?) {
                    share.push(part);
                }
            }
            shares
        };
        for (instance, share) in self.instances.iter_mut().zip(shares) {
            let mut tables = instance.tables();
            let Some(table) = tables.iter_mut().find(|t| t.name() == name) else {
                return Ok(false);
            };
            table.restore(&share, snapshot)?;
        }
        Ok(true)
    }

    /// Tells every instance its state is restored.
    ///
    /// # Errors
    /// The operator's.
    pub fn on_restored(&mut self) -> Result<()> {
        for instance in &mut self.instances {
            instance.on_restored()?;
        }
        Ok(())
    }

    /// The state of all instances together.
    pub fn state_size(&mut self) -> StateSize {
        self.instances
            .iter_mut()
            .map(|i| i.state_size())
            .fold(StateSize::default(), |a, b| a + b)
    }

    /// Runs the node for one epoch: `inputs[k]` are input `k`'s rows, `watermark` the
    /// minimum of the inputs' watermarks.
    async fn run(&mut self, inputs: Vec<Vec<RecordBatch>>, watermark: Watermark) -> Result<Output> {
        self.metrics.start_epoch();
        for batches in &inputs {
            self.metrics.rows_in += batches.iter().map(|b| b.num_rows() as u64).sum::<u64>();
        }
        let n = self.instances.len();
        let shares = if n == 1 {
            vec![
                inputs
                    .into_iter()
                    .enumerate()
                    .flat_map(|(k, batches)| batches.into_iter().map(move |b| Delivery::rows(k, b)))
                    .collect(),
            ]
        } else {
            match &self.partitioning {
                Partitioning::ByKey(key) => {
                    let (shares, busy) =
                        split_by_key(key, self.combiner.as_ref(), inputs, n).await?;
                    self.metrics.add_time(busy);
                    shares
                }
                Partitioning::RowWise | Partitioning::Single => {
                    let mut shares: Vec<Vec<Delivery>> = vec![Vec::new(); n];
                    for (k, batches) in inputs.into_iter().enumerate() {
                        for (share, part) in shares.iter_mut().zip(split_contiguous(batches, n)) {
                            share.extend(part.into_iter().map(|b| Delivery::rows(k, b)));
                        }
                    }
                    shares
                }
            }
        };
        let (outputs, busy) = run_instances(&mut self.instances, shares, watermark).await?;
        self.metrics.add_time(busy);
        let mut out = Output::default();
        for output in outputs {
            out.batches.extend(output.batches);
            out.late_rows += output.late_rows;
        }
        Ok(out)
    }
}

/// A streaming query's operators, in topological order, and which edge is its result.
pub struct Graph {
    nodes: Vec<Node>,
    output: Edge,
}

impl Graph {
    /// An empty graph whose result is `output` (until [`set_output`](Self::set_output)).
    pub fn new() -> Self {
        Graph {
            nodes: Vec::new(),
            output: Edge::Node(0),
        }
    }

    /// Adds a node after every node it reads from; returns its index.
    ///
    /// # Errors
    /// [`RiffleError::Internal`] for an input edge to a node that does not exist yet.
    pub fn add(&mut self, mut node: Node) -> Result<usize> {
        let index = self.nodes.len();
        for edge in &node.inputs {
            if let Edge::Node(n) = edge
                && *n >= index
            {
                return Err(RiffleError::Internal(format!(
                    "operator {index} reads operator {n}, which is not before it"
                )));
            }
        }
        node.id = format!("{index}-{}", node.operator().kind());
        node.metrics.id = node.id.clone();
        self.nodes.push(node);
        Ok(index)
    }

    /// Sets the edge whose rows are the query's result.
    pub fn set_output(&mut self, output: Edge) {
        self.output = output;
    }

    /// The result edge.
    pub fn output(&self) -> &Edge {
        &self.output
    }

    /// The nodes, in the order they run.
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// The nodes, mutably (the checkpoint reads and restores their state).
    pub fn nodes_mut(&mut self) -> &mut [Node] {
        &mut self.nodes
    }

    /// Whether any operator keeps state (then late rows matter).
    pub fn is_stateful(&mut self) -> bool {
        self.nodes.iter_mut().any(|n| !n.table_names().is_empty())
    }

    /// Sets every node's output watermark from the sources' watermarks, without running
    /// anything (after a restore: watermarks are derived, not stored).
    pub fn settle_watermarks(&mut self, sources: &[Watermark]) {
        for i in 0..self.nodes.len() {
            let w = self.input_watermark(i, sources);
            let hold = self.nodes[i].operator().watermark_hold_back();
            self.nodes[i].watermark = w.held_back(hold);
        }
    }

    fn input_watermark(&self, node: usize, sources: &[Watermark]) -> Watermark {
        self.nodes[node]
            .inputs
            .iter()
            .map(|e| match e {
                Edge::Source { index, .. } => sources[*index],
                Edge::Node(n) => self.nodes[*n].watermark,
            })
            .min()
            .unwrap_or(Watermark::NONE)
    }

    /// Runs one epoch: `inputs[s]` are source `s`'s rows, `watermarks[s]` its watermark after
    /// the epoch. Returns the query's result rows for the epoch.
    ///
    /// # Errors
    /// Any operator's error.
    pub async fn run_epoch(
        &mut self,
        inputs: &[Vec<RecordBatch>],
        watermarks: &[Watermark],
    ) -> Result<Vec<RecordBatch>> {
        let mut outputs: Vec<Vec<RecordBatch>> = Vec::with_capacity(self.nodes.len());
        for i in 0..self.nodes.len() {
            let watermark = self.input_watermark(i, watermarks);
            let node = &mut self.nodes[i];
            let node_inputs = node
                .inputs
                .iter()
                .map(|edge| batches_of(edge, inputs, &outputs))
                .collect::<Result<Vec<_>>>()?;
            let out = node.run(node_inputs, watermark).await?;
            node.watermark = watermark.held_back(node.operator().watermark_hold_back());
            node.metrics.rows_out = out.rows();
            node.metrics.late_rows = out.late_rows;
            node.metrics.total_rows_in += node.metrics.rows_in;
            node.metrics.total_rows_out += node.metrics.rows_out;
            node.metrics.watermark = node.watermark.rfc3339();
            outputs.push(out.batches);
        }
        batches_of(&self.output, inputs, &outputs)
    }

    /// Refreshes each operator's state size in its metrics.
    pub fn measure_state(&mut self) {
        for node in &mut self.nodes {
            node.metrics.state = node.state_size();
        }
    }

    /// Tells every operator that static tables changed.
    ///
    /// # Errors
    /// Re-planning errors (a reloaded table that no longer fits the query).
    pub async fn static_tables_changed(&mut self, state: &SessionState) -> Result<()> {
        for node in &mut self.nodes {
            for instance in &mut node.instances {
                instance.on_static_tables_changed(state).await?;
            }
        }
        Ok(())
    }

    /// Rows dropped as late inside operators in the last epoch.
    pub fn late_rows(&self) -> u64 {
        self.nodes.iter().map(|n| n.metrics.late_rows).sum()
    }
}

impl Default for Graph {
    fn default() -> Self {
        Self::new()
    }
}

fn batches_of(
    edge: &Edge,
    inputs: &[Vec<RecordBatch>],
    outputs: &[Vec<RecordBatch>],
) -> Result<Vec<RecordBatch>> {
    Ok(match edge {
        Edge::Source { index, projection } => match projection {
            None => inputs[*index].clone(),
            Some(columns) => inputs[*index]
                .iter()
                .map(|b| b.project(columns))
                .collect::<std::result::Result<_, _>>()?,
        },
        Edge::Node(n) => outputs[*n].clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{AsArray, Int64Array};
    use arrow::datatypes::{DataType, Field, Int64Type, Schema};
    use std::sync::Arc;

    /// Emits rows only when the watermark passes them, holding back 5.
    struct Delay {
        held: Vec<RecordBatch>,
    }

    #[async_trait::async_trait]
    impl Operator for Delay {
        fn kind(&self) -> &'static str {
            "delay"
        }
        async fn process_batch(&mut self, _: usize, b: RecordBatch, _: &mut Output) -> Result<()> {
            self.held.push(b);
            Ok(())
        }
        async fn on_watermark(&mut self, w: Watermark, out: &mut Output) -> Result<()> {
            for b in std::mem::take(&mut self.held) {
                let ts = b.column(0).as_primitive::<Int64Type>();
                if w.is_late(ts.value(0)) {
                    out.push(b);
                } else {
                    self.held.push(b);
                }
            }
            Ok(())
        }
        fn watermark_hold_back(&self) -> i64 {
            5
        }
    }

    fn batch(t: i64) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![Field::new("t", DataType::Int64, false)]));
        RecordBatch::try_new(schema, vec![Arc::new(Int64Array::from(vec![t]))]).unwrap()
    }

    #[tokio::test]
    async fn watermarks_flow_as_the_minimum_of_inputs_held_back() {
        let schema = batch(0).schema();
        let mut g = Graph::new();
        let src = |index| Edge::Source {
            index,
            projection: None,
        };
        let a = g
            .add(Node::new(
                Box::new(Delay { held: vec![] }),
                vec![src(0), src(1)],
                schema.clone(),
            ))
            .unwrap();
        let b = g
            .add(Node::new(
                Box::new(Delay { held: vec![] }),
                vec![Edge::Node(a)],
                schema,
            ))
            .unwrap();
        g.set_output(Edge::Node(b));
        assert_eq!(g.nodes()[1].id, "1-delay");
        let out = g
            .run_epoch(
                &[vec![batch(10)], vec![batch(20)]],
                &[Watermark(30), Watermark(15)],
            )
            .await
            .unwrap();
        // Node a sees min(30, 15) = 15: releases 10, holds 20; its output watermark is 10, so
        // node b (which got row 10) may not release it yet.
        assert!(out.is_empty());
        assert_eq!(g.nodes()[0].watermark(), Watermark(10));
        assert_eq!(g.nodes()[1].watermark(), Watermark(5));
        let out = g
            .run_epoch(&[vec![], vec![]], &[Watermark::END, Watermark::END])
            .await
            .unwrap();
        assert_eq!(out.len(), 2, "everything is released at the end");
        assert_eq!(g.nodes()[0].metrics.total_rows_in, 2);
    }

    #[test]
    fn a_node_cannot_read_a_later_node() {
        let mut g = Graph::new();
        let error = g
            .add(Node::new(
                Box::new(Delay { held: vec![] }),
                vec![Edge::Node(0)],
                batch(0).schema(),
            ))
            .unwrap_err();
        assert!(error.to_string().contains("not before it"));
    }
}
