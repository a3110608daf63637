#!/usr/bin/env python3
"""Reports on the fraud scores Riffle served: the Delta table fraud_scores.toml writes (a
backfill over the history plus the live payments from Kafka), read back with the `deltalake`
package, a reader Riffle did not write.

    python3 scripts/demo/report_scores.py SCORES_TABLE MODEL.onnx LIVE.parquet OUT_DIR

- The served scores against onnxruntime: the model's scores recomputed from the table's own
  feature columns by an ONNX runtime independent of the Wasm module that served them (its own
  tree evaluator; fraud_model_tract runs other models with tract). Both compare float32 features with float32
  thresholds; the largest difference is reported (and must be tiny).
- Live quality: on the live payments (the rows of LIVE.parquet, the ones produced to Kafka),
  ROC AUC and precision at the alert rate, model against the rule score.
- score_distributions.png: the backfill's and the live scores side by side.

Writes OUT_DIR/scores_report.json and prints the report.
"""

import json
import os
import sys

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
from deltalake import DeltaTable
from sklearn.metrics import roc_auc_score

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_fraud import ALERT_RATE, FEATURES, column, precision_at  # noqa: E402

# fraud_alerts.toml alerts at this score.
ALERT_SCORE = 0.5


def main():
    if len(sys.argv) != 5:
        sys.exit(__doc__)
    table_path, model_path, live_path, out_dir = sys.argv[1:]
    import onnxruntime

    table = DeltaTable(table_path).to_pyarrow_table()
    missing = [c for c in FEATURES + ["tx_id", "score", "is_fraud"] if c not in table.column_names]
    if missing:
        sys.exit(f"{table_path}: no column(s) {', '.join(missing)}: is it fraud_scores.toml's?")
    live_ids = pq.read_table(live_path, columns=["tx_id"]).column("tx_id")
    is_live = pc.is_in(table.column("tx_id"), value_set=live_ids).to_numpy(zero_copy_only=False)
    if is_live.sum() == 0:
        sys.exit(f"{table_path}: none of the payments of {live_path}: has the stream run?")
    ids = table.column("tx_id").to_numpy()
    if len(np.unique(ids)) != len(ids):
        sys.exit(f"{table_path}: a payment is scored more than once")

    served = column(table, "score")
    x = np.column_stack([column(table, c) for c in FEATURES]).astype(np.float32)
    session = onnxruntime.InferenceSession(model_path, providers=["CPUExecutionProvider"])
    (probabilities,) = session.run(["probabilities"], {"features": x})
    difference = np.abs(probabilities[:, 1].astype(np.float64) - served)

    labels = np.array(table.column("is_fraud").to_pylist(), dtype=bool)
    rule = np.nan_to_num(column(table, "rule_score"), nan=0.0)

    def quality(rows):
        truth = labels[rows]
        if truth.sum() == 0 or truth.all():
            return None
        return {
            "rows": int(rows.sum()),
            "frauds": int(truth.sum()),
            "alerts": int((served[rows] >= ALERT_SCORE).sum()),
            "model_roc_auc": round(float(roc_auc_score(truth, served[rows])), 4),
            "rule_roc_auc": round(float(roc_auc_score(truth, rule[rows])), 4),
            "model_precision_at_alert_rate": round(precision_at(served[rows], truth, ALERT_RATE), 4),
            "rule_precision_at_alert_rate": round(precision_at(rule[rows], truth, ALERT_RATE), 4),
        }

    report = {
        "rows": int(len(served)),
        "backfill_rows": int((~is_live).sum()),
        "live_rows": int(is_live.sum()),
        "served_vs_onnxruntime": {
            "max_abs_diff": float(difference.max()),
            "rows_over_1e-5": int((difference > 1e-5).sum()),
        },
        "backfill": quality(~is_live),
        "live": quality(is_live),
    }
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "scores_report.json"), "w") as f:
        json.dump(report, f, indent=2)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    bins = np.linspace(-6, 0, 61)
    for ax, rows, name in [(axes[0], ~is_live, "backfill (batch)"), (axes[1], is_live, "live (stream)")]:
        for fraud, colour in [(False, "tab:blue"), (True, "tab:red")]:
            picked = rows & (labels == fraud)
            ax.hist(np.log10(np.clip(served[picked], 1e-6, 1)), bins=bins, color=colour, alpha=0.6,
                    density=True, label="fraud" if fraud else "legitimate")
        ax.axvline(np.log10(ALERT_SCORE), color="black", linewidth=0.8, linestyle="--")
        ax.set_title(f"{name}: {int(rows.sum())} payments")
        ax.set_xlabel("log10(score)")
        ax.legend(loc="upper center")
    axes[0].set_ylabel("density")
    fig.suptitle("Fraud scores served by the Wasm module, batch and live (dashed: alert at 0.5)")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "score_distributions.png"), dpi=100)

    d = report["served_vs_onnxruntime"]
    print(f"scores: {report['rows']} payments ({report['backfill_rows']} backfilled, "
          f"{report['live_rows']} live), each scored once")
    print(f"  served (the Wasm module) against onnxruntime: largest difference {d['max_abs_diff']:.2g}, "
          f"{d['rows_over_1e-5']} rows over 1e-5")
    for name in ["backfill", "live"]:
        q = report[name]
        if q is None:
            continue
        print(f"  {name:<8} ROC AUC model {q['model_roc_auc']:.3f} rule {q['rule_roc_auc']:.3f}; "
              f"precision at {100 * ALERT_RATE:.1f} % model {q['model_precision_at_alert_rate']:.3f} "
              f"rule {q['rule_precision_at_alert_rate']:.3f}; {q['alerts']} alerts, {q['frauds']} frauds")
    print(f"  report: {os.path.join(out_dir, 'scores_report.json')}, "
          f"plot: {os.path.join(out_dir, 'score_distributions.png')}")


if __name__ == "__main__":
    main()
