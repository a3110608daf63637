//! A direct evaluator for the most common exported model, a binary tree-ensemble classifier
//! (scikit-learn's gradient-boosted trees and forests through skl2onnx: one
//! `TreeEnsembleClassifier` node), used for a model that is exactly that.
//!
//! Why: tract 0.22/0.23 finds a reached leaf's weights by skipping through an iterator over all
//! the ensemble's leaves (`tract-onnx-opl` `ml/tree.rs`, `outer_iter().skip(start_id)`: ndarray's
//! axis iterator has no `nth`, so the skip is linear), which made a 300-tree model cost about
//! 60 µs per row in the sandbox. Here each tree is a flat array of nodes and a leaf holds its
//! summed weight. The semantics are the ONNX operator's as tract and onnxruntime read them:
//! a binary classifier whose weights are all for class 0 scores the positive class;
//! `base_values[0]` is added; LOGISTIC applies the sigmoid. Sums are in f64 over the trees'
//! f32 weights. Anything else is refused, or goes to tract in the `fraud_model_tract` build.

use crate::onnx::{AttributeProto, NodeProto};

/// How a branch compares the feature with its threshold (true goes to `yes`).
#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    Leq,
    Lt,
    Gte,
    Gt,
    Eq,
    Neq,
}

#[derive(Clone, Copy, Debug)]
enum Node {
    Branch {
        feature: u32,
        threshold: f32,
        mode: Mode,
        /// A NaN feature (a NULL) takes the `yes` branch.
        missing_yes: bool,
        yes: u32,
        no: u32,
    },
    Leaf(f64),
}

/// A binary tree-ensemble classifier: the probability of class 1 per row.
#[derive(Debug)]
pub struct Forest {
    /// Every tree's nodes, one tree after another; children are indices into this.
    nodes: Vec<Node>,
    /// The root of each tree.
    roots: Vec<u32>,
    base: f64,
    logistic: bool,
    features: usize,
}

fn attribute<'a>(node: &'a NodeProto, name: &str) -> Option<&'a AttributeProto> {
    node.attribute.iter().find(|a| a.name == name)
}

fn ints(node: &NodeProto, name: &str) -> Option<Vec<i64>> {
    attribute(node, name).map(|a| a.ints.clone())
}

fn floats(node: &NodeProto, name: &str) -> Option<Vec<f32>> {
    attribute(node, name).map(|a| a.floats.clone())
}

impl Forest {
    /// The forest of a graph that is one binary `TreeEnsembleClassifier` this evaluator reads
    /// exactly as the operator's spec says, over `features` inputs; `None` for anything else
    /// (refused, or served by tract in the `fraud_model_tract` build).
    pub fn from_graph(nodes: &[NodeProto], features: usize) -> Option<Forest> {
        let [node] = nodes else { return None };
        if node.op_type != "TreeEnsembleClassifier" || node.domain != "ai.onnx.ml" {
            return None;
        }
        let classes = attribute(node, "classlabels_int64s")
            .map(|a| a.ints.len())
            .or_else(|| attribute(node, "classlabels_strings").map(|a| a.strings.len()))?;
        if classes != 2 {
            return None;
        }
        let logistic = match attribute(node, "post_transform").map(|a| a.s.as_slice()) {
            None | Some(b"NONE") => false,
            Some(b"LOGISTIC") => true,
            _ => return None,
        };
        // Weights as tensors (`*_as_tensor`, opset 3) or aggregate functions other than SUM
        // are not read here.
        if node
            .attribute
            .iter()
            .any(|a| a.name.ends_with("_as_tensor") || a.name == "aggregate_function")
        {
            return None;
        }
        let tree_ids = ints(node, "nodes_treeids")?;
        let node_ids = ints(node, "nodes_nodeids")?;
        let feature_ids = ints(node, "nodes_featureids")?;
        let values = floats(node, "nodes_values")?;
        let modes = &attribute(node, "nodes_modes")?.strings;
        let yes_ids = ints(node, "nodes_truenodeids")?;
        let no_ids = ints(node, "nodes_falsenodeids")?;
        let n = tree_ids.len();
        if [
            node_ids.len(),
            feature_ids.len(),
            values.len(),
            modes.len(),
            yes_ids.len(),
            no_ids.len(),
        ]
        .iter()
        .any(|&l| l != n)
        {
            return None;
        }
        let missing = ints(node, "nodes_missing_value_tracks_true").unwrap_or(vec![0; n]);
        if missing.len() != n {
            return None;
        }
        let class_trees = ints(node, "class_treeids")?;
        let class_nodes = ints(node, "class_nodeids")?;
        let class_ids = ints(node, "class_ids")?;
        let weights = floats(node, "class_weights")?;
        // All weights for class 0: the binary layout, a score for the positive class.
        if class_ids.iter().any(|&c| c != 0)
            || [class_nodes.len(), class_ids.len(), weights.len()]
                .iter()
                .any(|&l| l != class_trees.len())
        {
            return None;
        }
        let base = match floats(node, "base_values").as_deref() {
            None | Some([]) => 0.0,
            Some([b, ..]) => f64::from(*b),
        };

        // (tree, node id) -> index in `nodes`, trees in order of first appearance.
        let mut index = std::collections::HashMap::new();
        let mut roots = Vec::new();
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by_key(|&i| (tree_ids[i], node_ids[i]));
        for (at, &i) in order.iter().enumerate() {
            index.insert((tree_ids[i], node_ids[i]), at as u32);
        }
        let mut leaf_weight = std::collections::HashMap::<(i64, i64), f64>::new();
        for i in 0..class_trees.len() {
            *leaf_weight
                .entry((class_trees[i], class_nodes[i]))
                .or_default() += f64::from(weights[i]);
        }
        let mut flat = Vec::with_capacity(n);
        let mut previous_tree = None;
        for &i in &order {
            let tree = tree_ids[i];
            if previous_tree != Some(tree) {
                // A tree's root is its node 0 (the spec numbers nodes from the root).
                if node_ids[i] != 0 {
                    return None;
                }
                roots.push(flat.len() as u32);
                previous_tree = Some(tree);
            }
            let mode = match modes[i].as_slice() {
                b"LEAF" => None,
                b"BRANCH_LEQ" => Some(Mode::Leq),
                b"BRANCH_LT" => Some(Mode::Lt),
                b"BRANCH_GTE" => Some(Mode::Gte),
                b"BRANCH_GT" => Some(Mode::Gt),
                b"BRANCH_EQ" => Some(Mode::Eq),
                b"BRANCH_NEQ" => Some(Mode::Neq),
                _ => return None,
            };
            flat.push(match mode {
                None => Node::Leaf(
                    leaf_weight
                        .get(&(tree, node_ids[i]))
                        .copied()
                        .unwrap_or(0.0),
                ),
                Some(mode) => {
                    let child = |id: i64| index.get(&(tree, id)).copied();
                    let feature = usize::try_from(feature_ids[i]).ok()?;
                    if feature >= features {
                        return None;
                    }
                    Node::Branch {
                        feature: feature as u32,
                        threshold: values[i],
                        mode,
                        missing_yes: missing[i] != 0,
                        yes: child(yes_ids[i])?,
                        no: child(no_ids[i])?,
                    }
                }
            });
        }
        if roots.is_empty() {
            return None;
        }
        Some(Forest {
            nodes: flat,
            roots,
            base,
            logistic,
            features,
        })
    }

    /// The probability of class 1 (or the raw score without LOGISTIC) of each row of `input`,
    /// `features` values per row.
    pub fn score(&self, input: &[f32]) -> Vec<f64> {
        input
            .chunks_exact(self.features)
            .map(|row| {
                let mut sum = self.base;
                for &root in &self.roots {
                    sum += self.leaf(root, row);
                }
                if self.logistic {
                    1.0 / (1.0 + (-sum).exp())
                } else {
                    sum
                }
            })
            .collect()
    }

    fn leaf(&self, root: u32, row: &[f32]) -> f64 {
        let mut at = root as usize;
        loop {
            match self.nodes[at] {
                Node::Leaf(weight) => return weight,
                Node::Branch {
                    feature,
                    threshold,
                    mode,
                    missing_yes,
                    yes,
                    no,
                } => {
                    let x = row[feature as usize];
                    let go_yes = if x.is_nan() {
                        missing_yes
                    } else {
                        match mode {
                            Mode::Leq => x <= threshold,
                            Mode::Lt => x < threshold,
                            Mode::Gte => x >= threshold,
                            Mode::Gt => x > threshold,
                            Mode::Eq => x == threshold,
                            Mode::Neq => x != threshold,
                        }
                    };
                    at = if go_yes { yes } else { no } as usize;
                }
            }
        }
    }
}
