//! Any other ONNX model, run by tract (a pure-Rust ONNX runtime) inside the sandbox: only in
//! the `fraud_model_tract` build of this source (the `tract` feature), since tract is ~150
//! crates and most of this module's build time, and the tree ensembles most exports are
//! (the demo's among them) never run on it.

use tract_onnx::prelude::tract_data::internal::{DimLike, bail, format_err};
use tract_onnx::prelude::*;

use crate::FEATURES;

/// tract's optimised plan of a model and which of its outputs is the fraud score.
pub struct Plan {
    plan: TypedRunnableModel<TypedModel>,
    output: ScoreOutput,
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

impl Plan {
    /// Plans the model for one input of `rows x FEATURES.len()` float features, any number of
    /// rows.
    pub fn load(onnx: &[u8]) -> TractResult<Plan> {
        let framework = tract_onnx::onnx();
        let mut proto = framework.proto_model_for_read(&mut &onnx[..])?;
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
        Ok(Plan {
            plan: model.into_runnable()?,
            output,
        })
    }

    /// The score of each of `rows` rows of `input` (row-major, `FEATURES.len()` per row).
    pub fn run(&self, rows: usize, input: Vec<f32>) -> TractResult<Vec<f64>> {
        let input = tract_ndarray::Array2::from_shape_vec((rows, FEATURES.len()), input)?;
        let outputs = self.plan.run(tvec!(Tensor::from(input).into()))?;
        let (index, probabilities) = match self.output {
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
