//! The fraud model, served inside the sandbox: `fraud_model_score(amount, rule_score, ...)` is
//! the probability of fraud that a trained model gives a payment's features.
//!
//! The model is not in this code. It arrives as the module's init configuration, an ONNX file
//! (`[[udfs]] config = "fraud_model.onnx"`), so whatever the data scientist retrains is served
//! by the same module with no code change between training and serving. The features are this
//! function's arguments, in the order the model was trained on them: the columns
//! `scripts/demo/fraud_training.toml` computes and `scripts/demo/train_fraud.py` trains on.
//!
//! Two modules are built from this source:
//! - `riffle_udfs_fraud_model.wasm` (this crate) serves binary tree-ensemble classifiers, the
//!   commonest export (scikit-learn's gradient-boosted trees and forests through skl2onnx, the
//!   demo's model), with its own evaluator ([`trees`]) and its own reader of the few ONNX
//!   fields a tree ensemble needs ([`onnx`]). Any other model is refused when the pipeline
//!   starts, with the reason.
//! - `riffle_udfs_fraud_model_tract.wasm` (`udfs/fraud_model_tract`, the `tract` feature)
//!   serves any model: tree ensembles the same way, everything else (a logistic regression, a
//!   small network) with tract, a pure-Rust ONNX runtime. tract is ~150 crates and 8
//!   CPU-minutes of compiling, which a first run of the demo should not pay for a model it
//!   never runs.
//!
//! Scoring is one model run per Arrow batch (a `rows x 14` tensor), not per row. A NULL feature
//! is NaN, as scikit-learn saw it in training (its trees send NaN down a learned branch, and
//! ONNX's tree ensembles carry that branch).

mod onnx;
#[cfg(feature = "tract")]
mod tract_plan;
mod trees;

use std::sync::OnceLock;

use prost::Message;
use riffle_udf::{
    ArgInfo, CallError, CallOutput, Column, DataType, FunctionInfo, Values, export_udfs,
};

/// The model's inputs, in training order. Their names are the function's argument names, so
/// `riffle udf inspect` shows what the model expects.
pub const FEATURES: [&str; 14] = [
    "amount",
    "rule_score",
    "km_from_previous",
    "km_per_hour",
    "seconds_since_previous",
    "tx_10m",
    "tx_1h",
    "tx_24h",
    "amount_10m",
    "amount_1h",
    "amount_24h",
    "amount_vs_30d",
    "risky_category",
    "night",
];

/// A loaded model.
enum Scorer {
    /// A binary tree ensemble, evaluated directly (see [`trees`]).
    Forest(trees::Forest),
    /// Anything else: tract's plan.
    #[cfg(feature = "tract")]
    Tract(tract_plan::Plan),
}

static SCORER: OnceLock<Scorer> = OnceLock::new();

/// Loads the ONNX model from the init configuration; refuses anything it could not serve,
/// with the reason, so a bad model fails when the pipeline starts, not on the first batch.
pub fn configure(config: &[u8]) -> Result<(), String> {
    if config.is_empty() {
        return Err("configuration required: an ONNX model file \
                    (`[[udfs]] config = \"fraud_model.onnx\"`)"
            .into());
    }
    let scorer = load(config).map_err(|e| format!("the ONNX model cannot be served: {e}"))?;
    SCORER
        .set(scorer)
        .map_err(|_| "configured twice".to_string())
}

fn load(bytes: &[u8]) -> Result<Scorer, String> {
    let model =
        onnx::ModelProto::decode(bytes).map_err(|e| format!("it is not an ONNX file: {e}"))?;
    check_features(&model)?;
    if let Some(graph) = &model.graph
        && graph.input.len() == 1
        && let Some(forest) = trees::Forest::from_graph(&graph.node, FEATURES.len())
    {
        return Ok(Scorer::Forest(forest));
    }
    #[cfg(feature = "tract")]
    {
        tract_plan::Plan::load(bytes)
            .map(Scorer::Tract)
            .map_err(|e| format!("{e:#}"))
    }
    #[cfg(not(feature = "tract"))]
    {
        Err(NOT_A_FOREST.into())
    }
}

/// Why this build refuses a model that is not one binary tree ensemble, and what serves it.
#[cfg(not(feature = "tract"))]
pub const NOT_A_FOREST: &str = "it is not a binary tree-ensemble classifier (one \
    `TreeEnsembleClassifier` node over one input, as skl2onnx exports scikit-learn's trees and \
    forests), the one kind of model this module serves; riffle_udfs_fraud_model_tract.wasm \
    (udfs/fraud_model_tract) serves any ONNX model";

/// The features a model was trained on, in order, when its exporter recorded them
/// (`train_fraud.py` writes them as the model's `riffle.features` metadata): they must be this
/// function's arguments, or every score would be computed from the wrong columns without a
/// word. A model without the entry is served as it is.
fn check_features(model: &onnx::ModelProto) -> Result<(), String> {
    let Some(entry) = model
        .metadata_props
        .iter()
        .find(|e| e.key == "riffle.features")
    else {
        return Ok(());
    };
    let trained: Vec<&str> = entry.value.split(',').map(str::trim).collect();
    if trained != FEATURES {
        return Err(format!(
            "it was trained on the features {}, but this module passes {} (in this order)",
            trained.join(", "),
            FEATURES.join(", ")
        ));
    }
    Ok(())
}

/// The probability of fraud the configured model gives these features.
fn fraud_model_score_info() -> FunctionInfo {
    FunctionInfo {
        name: "fraud_model_score".into(),
        args: FEATURES
            .iter()
            .map(|name| ArgInfo {
                name: (*name).into(),
                data_type: DataType::Float64,
                nullable: true,
            })
            .collect(),
        returns: DataType::Float64,
        returns_null: false,
        fallible: false,
        deterministic: true,
        doc: "The probability of fraud that the configured ONNX model gives a payment's \
              features (NULL features are NaN, as in training)."
            .into(),
    }
}

/// One batch: the feature columns into one `rows x 14` tensor, one run of the model.
fn fraud_model_score_call(rows: usize, args: &[Column]) -> Result<CallOutput, CallError> {
    let scorer = SCORER
        .get()
        .ok_or_else(|| CallError::Failed("no model: init did not succeed".into()))?;
    if args.len() != FEATURES.len() {
        return Err(CallError::BadArguments(format!(
            "expected {} feature columns, got {}",
            FEATURES.len(),
            args.len()
        )));
    }
    let mut input = vec![0f32; rows * FEATURES.len()];
    for (j, column) in args.iter().enumerate() {
        let Values::Float64(values) = &column.values else {
            return Err(CallError::BadArguments(format!(
                "feature {} is not float64",
                FEATURES[j]
            )));
        };
        if values.len() < rows {
            return Err(CallError::BadArguments(format!(
                "feature {} has {} values for {rows} rows",
                FEATURES[j],
                values.len()
            )));
        }
        let valid = |i: usize| {
            column
                .validity
                .as_ref()
                .is_none_or(|bits| bits.get(i / 8).is_some_and(|b| b & (1 << (i % 8)) != 0))
        };
        for (i, value) in values[..rows].iter().enumerate() {
            input[i * FEATURES.len() + j] = if valid(i) { *value as f32 } else { f32::NAN };
        }
    }
    let scores = run(scorer, rows, input).map_err(CallError::Failed)?;
    Ok(CallOutput {
        column: Column {
            len: rows as u32,
            validity: None,
            values: Values::Float64(scores),
        },
        row_errors: Vec::new(),
    })
}

fn run(scorer: &Scorer, rows: usize, input: Vec<f32>) -> Result<Vec<f64>, String> {
    if rows == 0 {
        return Ok(Vec::new());
    }
    match scorer {
        Scorer::Forest(forest) => Ok(forest.score(&input)),
        #[cfg(feature = "tract")]
        Scorer::Tract(plan) => plan.run(rows, input).map_err(|e| format!("{e:#}")),
    }
}

/// Registers `fraud_model_score` by hand rather than with `#[scalar]`: the macro calls a
/// function once per row, and this one runs the model once per batch.
#[allow(non_snake_case)]
mod fraud_model_score {
    pub fn __riffle_register(registry: &mut riffle_udf::__private::Registry) {
        registry.scalar(super::fraud_model_score_info, super::fraud_model_score_call);
    }
}

export_udfs!(fraud_model_score; init = configure);

#[cfg(test)]
mod tests {
    use super::*;
    use onnx::{AttributeProto, GraphProto, ModelProto, NodeProto, ValueInfoProto};

    fn ints(name: &str, ints: &[i64]) -> AttributeProto {
        AttributeProto {
            name: name.into(),
            ints: ints.to_vec(),
            ..Default::default()
        }
    }

    fn floats(name: &str, floats: &[f32]) -> AttributeProto {
        AttributeProto {
            name: name.into(),
            floats: floats.to_vec(),
            ..Default::default()
        }
    }

    fn strings(name: &str, strings: &[&str]) -> AttributeProto {
        AttributeProto {
            name: name.into(),
            strings: strings.iter().map(|s| s.as_bytes().to_vec()).collect(),
            ..Default::default()
        }
    }

    fn model(node: NodeProto, features: Option<&str>) -> Vec<u8> {
        ModelProto {
            graph: Some(GraphProto {
                node: vec![node],
                input: vec![ValueInfoProto {
                    name: "features".into(),
                }],
            }),
            metadata_props: features
                .map(|f| onnx::StringStringEntryProto {
                    key: "riffle.features".into(),
                    value: f.into(),
                })
                .into_iter()
                .collect(),
        }
        .encode_to_vec()
    }

    /// One tree as skl2onnx writes a binary classifier: `amount <= 100` (NaN goes that way
    /// too) leads to a leaf of weight -2, otherwise +2; LOGISTIC, base 0.5.
    fn one_tree() -> NodeProto {
        NodeProto {
            op_type: "TreeEnsembleClassifier".into(),
            domain: "ai.onnx.ml".into(),
            attribute: vec![
                ints("classlabels_int64s", &[0, 1]),
                AttributeProto {
                    name: "post_transform".into(),
                    s: b"LOGISTIC".to_vec(),
                    ..Default::default()
                },
                ints("nodes_treeids", &[0, 0, 0]),
                ints("nodes_nodeids", &[0, 1, 2]),
                ints("nodes_featureids", &[0, 0, 0]),
                floats("nodes_values", &[100.0, 0.0, 0.0]),
                strings("nodes_modes", &["BRANCH_LEQ", "LEAF", "LEAF"]),
                ints("nodes_truenodeids", &[1, 0, 0]),
                ints("nodes_falsenodeids", &[2, 0, 0]),
                ints("nodes_missing_value_tracks_true", &[1, 0, 0]),
                ints("class_treeids", &[0, 0]),
                ints("class_nodeids", &[1, 2]),
                ints("class_ids", &[0, 0]),
                floats("class_weights", &[-2.0, 2.0]),
                floats("base_values", &[0.5]),
            ],
        }
    }

    fn sigmoid(x: f64) -> f64 {
        1.0 / (1.0 + (-x).exp())
    }

    #[test]
    fn a_tree_ensemble_read_from_its_onnx_bytes_scores_rows() {
        let Ok(Scorer::Forest(forest)) = load(&model(one_tree(), Some(&FEATURES.join(",")))) else {
            panic!("the tree ensemble was not read as one");
        };
        let mut rows = vec![0f32; 3 * FEATURES.len()];
        rows[0] = 50.0;
        rows[FEATURES.len()] = 500.0;
        rows[2 * FEATURES.len()] = f32::NAN;
        let scores = forest.score(&rows);
        let expected = [sigmoid(0.5 - 2.0), sigmoid(0.5 + 2.0), sigmoid(0.5 - 2.0)];
        for (score, expected) in scores.iter().zip(expected) {
            assert!((score - expected).abs() < 1e-12, "{scores:?}");
        }
    }

    #[test]
    #[cfg(not(feature = "tract"))]
    fn what_this_build_cannot_serve_is_refused_with_the_reason() {
        let reason = |bytes: &[u8]| match load(bytes) {
            Ok(_) => panic!("served"),
            Err(reason) => reason,
        };
        assert!(reason(&[0xff, 0xff, 0xff]).starts_with("it is not an ONNX file"));
        let mut swapped = FEATURES;
        swapped.swap(0, 1);
        assert!(
            reason(&model(one_tree(), Some(&swapped.join(","))))
                .starts_with("it was trained on the features rule_score, amount,")
        );
        // A logistic regression's first node: not a tree ensemble, so tract's build serves it.
        let matmul = NodeProto {
            op_type: "MatMul".into(),
            ..Default::default()
        };
        assert_eq!(reason(&model(matmul, None)), NOT_A_FOREST);
    }
}
