//! The dataflow graph: operators with stable ids, wired to sources and to each other, run once
//! per epoch in topological order.

use std::time::Instant;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use datafusion::execution::SessionState;

use super::{Operator, OperatorMetrics, Output};
use crate::common::Watermark;
use crate::error::{Result, RiffleError};

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

/// One operator in the graph.
pub struct Node {
    /// Stable id: `<position>-<kind>`. Names the operator's state in the checkpoint and its
    /// line in the progress.
    pub id: String,
    /// The operator.
    pub operator: Box<dyn Operator>,
    /// Its inputs, in the order the operator numbers them.
    pub inputs: Vec<Edge>,
    /// Schema of what it emits.
    pub schema: SchemaRef,
    /// What it did.
    pub metrics: OperatorMetrics,
    watermark: Watermark,
}

impl Node {
    /// A node; its id is set when it is added to a graph.
    pub fn new(operator: Box<dyn Operator>, inputs: Vec<Edge>, schema: SchemaRef) -> Self {
        Node {
            id: String::new(),
            metrics: OperatorMetrics {
                kind: operator.kind(),
                ..OperatorMetrics::default()
            },
            operator,
            inputs,
            schema,
            watermark: Watermark::NONE,
        }
    }

    /// The node's output watermark after the last epoch.
    pub fn watermark(&self) -> Watermark {
        self.watermark
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
        node.id = format!("{index}-{}", node.operator.kind());
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
        self.nodes
            .iter_mut()
            .any(|n| !n.operator.tables().is_empty())
    }

    /// Sets every node's output watermark from the sources' watermarks, without running
    /// anything (after a restore: watermarks are derived, not stored).
    pub fn settle_watermarks(&mut self, sources: &[Watermark]) {
        for i in 0..self.nodes.len() {
            let w = self.input_watermark(i, sources);
            let hold = self.nodes[i].operator.watermark_hold_back();
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
            node.metrics.start_epoch();
            let mut out = Output::default();
            for (k, edge) in node.inputs.iter().enumerate() {
                let batches = batches_of(edge, inputs, &outputs)?;
                for batch in batches {
                    node.metrics.rows_in += batch.num_rows() as u64;
                    let started = Instant::now();
                    node.operator.process_batch(k, batch, &mut out).await?;
                    node.metrics.add_time(started.elapsed());
                }
            }
            let started = Instant::now();
            node.operator.on_watermark(watermark, &mut out).await?;
            node.metrics.add_time(started.elapsed());
            node.watermark = watermark.held_back(node.operator.watermark_hold_back());
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
            node.metrics.state = node.operator.state_size();
        }
    }

    /// Tells every operator that static tables changed.
    ///
    /// # Errors
    /// Re-planning errors (a reloaded table that no longer fits the query).
    pub async fn static_tables_changed(&mut self, state: &SessionState) -> Result<()> {
        for node in &mut self.nodes {
            node.operator.on_static_tables_changed(state).await?;
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
