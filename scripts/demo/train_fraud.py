#!/usr/bin/env python3
"""Trains a fraud model on the training table Riffle's batch run wrote, and reports how it does
on held-out time against the rule-based score the team uses today.

    python3 scripts/demo/train_fraud.py TRAINING.parquet OUT_DIR

The table is `scripts/demo/fraud_training.toml` in batch mode: per-card features over each
card's recent history, the generator's labels (`is_fraud`, `fraud_pattern`) and `rule_score`,
the fraud UDF's score from amount and country. The model is scikit-learn's gradient-boosted
trees; the first 70 % of the table by event time trains it and the last 30 % tests it, as a
model trained on history is then used on what comes after.

Writes OUT_DIR/fraud_model.onnx (the model, for the scoring UDF udfs/fraud_model: its init
configuration), OUT_DIR/fraud_model_report.json (the numbers below, for scripts and tests) and
OUT_DIR/roc.png, and prints the report. The exported model is checked against scikit-learn's own
predictions with onnxruntime, an ONNX runtime independent of the module that serves it.
"""

import json
import os
import sys

import numpy as np
import pyarrow.parquet as pq
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.metrics import roc_auc_score, roc_curve

# What the model sees: every feature of the training table except the labels and keys.
FEATURES = [
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
]
# The share of transactions the fraud team can review: precision is measured at this rate.
ALERT_RATE = 0.005
TRAIN_SHARE = 0.7


def column(table, name):
    """A column as float64 with NaN for NULL."""
    return np.array(table.column(name).to_pylist(), dtype=np.float64)


def precision_at(scores, labels, rate):
    """The share of fraud among the top `rate` of scores."""
    k = max(1, int(round(len(scores) * rate)))
    top = np.argsort(-scores, kind="stable")[:k]
    return float(labels[top].mean())


def export_onnx(model, x_test, scores, path):
    """Writes the model as ONNX (a TreeEnsembleClassifier over a float tensor of the features in
    FEATURES order; NaN for NULL) and returns how far onnxruntime's scores on the held-out rows
    are from scikit-learn's. ONNX trees compare float32 features against float32 thresholds,
    so a row whose feature lies within float32 rounding of a threshold may take the other
    branch: the report gives the largest difference and how many rows differ by more than 1e-4.
    """
    import onnxruntime
    import skl2onnx.common.tree_ensemble as tree_ensemble
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType

    # skl2onnx 1.20 passes scikit-learn's numpy booleans for `nodes_missing_value_tracks_true`,
    # which protobuf 6+ refuses in an integer list; give it integers.
    add_node = tree_ensemble.add_node

    def add_node_with_int_flags(*args, nodes_missing_value_tracks_true=0, **kwargs):
        return add_node(
            *args, nodes_missing_value_tracks_true=int(nodes_missing_value_tracks_true), **kwargs
        )

    tree_ensemble.add_node = add_node_with_int_flags
    try:
        onx = to_onnx(
            model,
            initial_types=[("features", FloatTensorType([None, len(FEATURES)]))],
            options={id(model): {"zipmap": False}},
            target_opset={"": 17, "ai.onnx.ml": 3},
        )
    finally:
        tree_ensemble.add_node = add_node
    # The serving module checks its arguments against these (udfs/fraud_model).
    entry = onx.metadata_props.add()
    entry.key, entry.value = "riffle.features", ",".join(FEATURES)
    with open(path, "wb") as f:
        f.write(onx.SerializeToString())
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    (probabilities,) = session.run(["probabilities"], {"features": x_test.astype(np.float32)})
    difference = np.abs(probabilities[:, 1].astype(np.float64) - scores)
    return {
        "path": path,
        "bytes": os.path.getsize(path),
        "max_abs_diff_vs_sklearn": float(difference.max()),
        "rows_diff_over_1e-4": int((difference > 1e-4).sum()),
    }


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    path, out_dir = sys.argv[1], sys.argv[2]
    table = pq.read_table(path).sort_by([("ts", "ascending"), ("tx_id", "ascending")])
    missing = [c for c in FEATURES + ["is_fraud", "fraud_pattern"] if c not in table.column_names]
    if missing:
        sys.exit(f"{path}: no column(s) {', '.join(missing)}: is it fraud_training.toml's output?")
    x = np.column_stack([column(table, c) for c in FEATURES])
    y = np.array(table.column("is_fraud").to_pylist(), dtype=bool)
    patterns = np.array(table.column("fraud_pattern").to_pylist(), dtype=object)
    split = int(len(y) * TRAIN_SHARE)
    if y[:split].sum() < 20 or y[split:].sum() < 20:
        sys.exit(f"{path}: too few labelled frauds to train and test ({int(y.sum())} in all)")

    # Small trees, slow learning and some L2: with a few hundred frauds, the defaults
    # (learning rate 0.1, 31 leaves) learn the training rows by heart (held-out AUC 0.82
    # against 0.999 here).
    model = HistGradientBoostingClassifier(
        max_iter=300, learning_rate=0.05, max_leaf_nodes=15, l2_regularization=1.0, random_state=0
    )
    model.fit(x[:split], y[:split])
    scores = model.predict_proba(x[split:])[:, 1]
    rule = np.nan_to_num(column(table, "rule_score")[split:], nan=0.0)
    truth = y[split:]

    # Recall per pattern at the alert rate: which patterns each score catches.
    k = max(1, int(round(len(truth) * ALERT_RATE)))
    def caught(s):
        top = np.zeros(len(s), dtype=bool)
        top[np.argsort(-s, kind="stable")[:k]] = True
        held = patterns[split:]
        return {
            p: round(float(top[held == p].mean()), 3)
            for p in sorted({p for p in held if p is not None})
        }

    report = {
        "rows": int(len(y)),
        "train_rows": int(split),
        "test_rows": int(len(truth)),
        "fraud_rate": round(float(y.mean()), 5),
        "test_frauds": int(truth.sum()),
        "alert_rate": ALERT_RATE,
        "model": {
            "roc_auc": round(float(roc_auc_score(truth, scores)), 4),
            "precision_at_alert_rate": round(precision_at(scores, truth, ALERT_RATE), 4),
            "recall_by_pattern": caught(scores),
        },
        "rule": {
            "roc_auc": round(float(roc_auc_score(truth, rule)), 4),
            "precision_at_alert_rate": round(precision_at(rule, truth, ALERT_RATE), 4),
            "recall_by_pattern": caught(rule),
        },
    }
    os.makedirs(out_dir, exist_ok=True)
    onnx_path = os.path.join(out_dir, "fraud_model.onnx")
    report["onnx"] = export_onnx(model, x[split:], scores, onnx_path)
    with open(os.path.join(out_dir, "fraud_model_report.json"), "w") as f:
        json.dump(report, f, indent=2)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5))
    for name, s in [("model", scores), ("rule (risk_score)", rule)]:
        fpr, tpr, _ = roc_curve(truth, s)
        ax.plot(fpr, tpr, label=f"{name}: AUC {roc_auc_score(truth, s):.3f}")
    ax.plot([0, 1], [0, 1], color="grey", linewidth=0.5)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(f"Fraud, held-out {100 - int(TRAIN_SHARE * 100)} % by time")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "roc.png"), dpi=100)

    m, r = report["model"], report["rule"]
    print(f"fraud model: trained on {split} rows, tested on the next {len(truth)} "
          f"({report['test_frauds']} frauds, {100 * report['fraud_rate']:.2f} % of all rows)")
    print(f"  ROC AUC                 model {m['roc_auc']:.3f}   rule {r['roc_auc']:.3f}")
    print(f"  precision at {100 * ALERT_RATE:.1f} % alerts  model {m['precision_at_alert_rate']:.3f}"
          f"   rule {r['precision_at_alert_rate']:.3f}")
    for p in m["recall_by_pattern"]:
        print(f"  caught {p:<24} model {m['recall_by_pattern'][p]:.2f}"
              f"   rule {r['recall_by_pattern'][p]:.2f}")
    o = report["onnx"]
    print(f"  ONNX model: {o['path']} ({o['bytes']} bytes); onnxruntime against scikit-learn: "
          f"largest difference {o['max_abs_diff_vs_sklearn']:.2g}, "
          f"{o['rows_diff_over_1e-4']} rows over 1e-4")
    print(f"  report: {os.path.join(out_dir, 'fraud_model_report.json')}, "
          f"ROC curve: {os.path.join(out_dir, 'roc.png')}")


if __name__ == "__main__":
    main()
