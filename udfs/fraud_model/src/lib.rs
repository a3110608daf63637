//! The fraud model, served inside the sandbox: `fraud_model_score(amount, rule_score, ...)` is
//! the probability of fraud that a trained model gives a payment's features.
//!
//! The model is not in this code. It arrives as the module's init configuration, an ONNX file
//! (`[[udfs]] config = "fraud_model.onnx"`), and is evaluated by tract, a pure-Rust ONNX
//! runtime, so whatever the data scientist exported (scikit-learn's gradient-boosted trees
//! through skl2onnx in our demo, a logistic regression, a small network) is served by the same
//! module with no code change between training and serving. The features are this function's
//! arguments, in the order the model was trained on them: the columns
//! `scripts/demo/fraud_training.toml` computes and `scripts/demo/train_fraud.py` trains on.
//!
//! Scoring is one model run per Arrow batch (a `rows x 14` tensor), not per row: running a
//! tract plan has a fixed cost that would otherwise dominate. A binary tree ensemble, the
//! commonest export and the demo's, is evaluated directly instead ([`trees`]: tract looks up
//! leaf weights in linear time); every other model is tract's. A NULL feature is NaN, as
//! scikit-learn saw it in training (its trees send NaN down a learned branch, and ONNX's tree
//! ensembles carry that branch).

mod trees;

use std::sync::OnceLock;

use riffle_udf::{
    ArgInfo, CallError, CallOutput, Column, DataType, FunctionInfo, Values, export_udfs,
};
use tract_onnx::prelude::tract_data::internal::{DimLike, bail, format_err};
use tract_onnx::prelude::*;

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
    /// Anything else: tract's optimised plan and which of its outputs is the fraud score.
    Tract {
        plan: TypedRunnableModel<TypedModel>,
        output: ScoreOutput,
    },
}

/// Where the score is among a model's outputs.
#[derive(Clone, Copy, Debug)]
enum ScoreOutput {
    /// A classifier's probabilities, `rows x classes`: the score is this output's last column
    /// (class 1, fraud, of a binary classifier).
    Probabilities(usize),
    /// One value per row (`rows` or `rows x 1`): a regressor or a raw score.
    Values(usize),
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
    let scorer = load(config).map_err(|e| format!("the ONNX model cannot be served: {e:#}"))?;
    SCORER
        .set(scorer)
        .map_err(|_| "configured twice".to_string())
}

fn load(onnx: &[u8]) -> TractResult<Scorer> {
    let framework = tract_onnx::onnx();
    let mut proto = framework.proto_model_for_read(&mut &onnx[..])?;
    check_features(&proto)?;
    if let Some(graph) = &proto.graph
        && graph.input.len() == 1
        && let Some(forest) = trees::Forest::from_graph(&graph.node, FEATURES.len())
    {
        return Ok(Scorer::Forest(forest));
    }
    one_base_value_per_class(&mut proto);
    let mut model = framework.model_for_proto_model(&proto)?;
    if model.inputs.len() != 1 {
        bail!(
            "it has {} inputs; this module feeds one, a float tensor of {} features per row",
            model.inputs.len(),
            FEATURES.len()
        );
    }
    // Any number of rows per run: the batch size is a symbol, fixed per call.
    let rows = model.sym("rows");
    model.set_input_fact(
        0,
        f32::fact([rows.to_dim(), FEATURES.len().to_dim()]).into(),
    )?;
    let model = model.into_optimized()?;
    let output = score_output(&model)?;
    Ok(Scorer::Tract {
        plan: model.into_runnable()?,
        output,
    })
}

/// The features a model was trained on, in order, when its exporter recorded them
/// (`train_fraud.py` writes them as the model's `riffle.features` metadata): they must be this
/// function's arguments, or every score would be computed from the wrong columns without a
/// word. A model without the entry is served as it is.
fn check_features(proto: &tract_onnx::pb::ModelProto) -> TractResult<()> {
    let Some(entry) = proto
        .metadata_props
        .iter()
        .find(|e| e.key == "riffle.features")
    else {
        return Ok(());
    };
    let trained: Vec<&str> = entry.value.split(',').map(str::trim).collect();
    if trained != FEATURES {
        bail!(
            "it was trained on the features {}, but this module passes {} (in this order)",
            trained.join(", "),
            FEATURES.join(", ")
        );
    }
    Ok(())
}

/// A binary tree-ensemble classifier may give one base value (the ONNX operator's spec allows
/// it, and skl2onnx writes scikit-learn's gradient-boosted trees that way), but tract reads
/// one per class. Its binary layout only uses the first, so repeating it changes nothing.
fn one_base_value_per_class(proto: &mut tract_onnx::pb::ModelProto) {
    let Some(graph) = proto.graph.as_mut() else {
        return;
    };
    for node in graph
        .node
        .iter_mut()
        .filter(|n| n.op_type == "TreeEnsembleClassifier")
    {
        let classes = node
            .attribute
            .iter()
            .find(|a| a.name == "classlabels_int64s" || a.name == "classlabels_strings")
            .map(|a| a.ints.len().max(a.strings.len()));
        if let (Some(2), Some(base)) = (
            classes,
            node.attribute.iter_mut().find(|a| a.name == "base_values"),
        ) && base.floats.len() == 1
        {
            base.floats.push(base.floats[0]);
        }
    }
}

/// Finds the score among the model's outputs: a float output of two or more columns is a
/// classifier's probabilities; otherwise a float output with one value per row.
fn score_output(model: &TypedModel) -> TractResult<ScoreOutput> {
    let mut values = None;
    for (i, outlet) in model.output_outlets()?.iter().enumerate() {
        let fact = model.outlet_fact(*outlet)?;
        if !fact.datum_type.is_float() {
            continue; // a classifier's labels
        }
        let shape = fact.shape.to_tvec();
        match shape.len() {
            2 if shape[1].to_usize().is_ok_and(|c| c >= 2) => {
                return Ok(ScoreOutput::Probabilities(i));
            }
            2 if shape[1].to_usize().is_ok_and(|c| c == 1) => values = Some(i),
            1 => values = Some(i),
            _ => {}
        }
    }
    values
        .map(ScoreOutput::Values)
        .ok_or_else(|| format_err!("no output gives one float score per row"))
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
    let scores = run(scorer, rows, input).map_err(|e| CallError::Failed(format!("{e:#}")))?;
    Ok(CallOutput {
        column: Column {
            len: rows as u32,
            validity: None,
            values: Values::Float64(scores),
        },
        row_errors: Vec::new(),
    })
}

fn run(scorer: &Scorer, rows: usize, input: Vec<f32>) -> TractResult<Vec<f64>> {
    if rows == 0 {
        return Ok(Vec::new());
    }
    let (plan, output) = match scorer {
        Scorer::Forest(forest) => return Ok(forest.score(&input)),
        Scorer::Tract { plan, output } => (plan, *output),
    };
    let input = tract_ndarray::Array2::from_shape_vec((rows, FEATURES.len()), input)?;
    let outputs = plan.run(tvec!(Tensor::from(input).into()))?;
    let (index, probabilities) = match output {
        ScoreOutput::Probabilities(i) => (i, true),
        ScoreOutput::Values(i) => (i, false),
    };
    let output = outputs[index].cast_to::<f64>()?;
    let view = output.to_array_view::<f64>()?;
    let columns = if probabilities { view.shape()[1] } else { 1 };
    let values = view
        .as_slice()
        .ok_or_else(|| format_err!("the model's output is not contiguous"))?;
    if values.len() != rows * columns {
        bail!("the model gave {} values for {rows} rows", values.len());
    }
    // Class 1 (fraud) is the last column of a binary classifier's probabilities.
    Ok(values
        .chunks_exact(columns)
        .map(|row| row[columns - 1])
        .collect())
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
