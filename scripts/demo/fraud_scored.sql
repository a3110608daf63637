-- Each payment's features (the view `card_features`, card_features.sql) with the trained
-- model's score: `fraud_model_score` runs the ONNX model that train_fraud.py exported, given to
-- the udfs/fraud_model module as its configuration. Its arguments are the model's inputs, in
-- the order it was trained on them.
SELECT *,
       fraud_model_score(amount, rule_score, km_from_previous, km_per_hour,
                         seconds_since_previous, tx_10m, tx_1h, tx_24h, amount_10m, amount_1h,
                         amount_24h, amount_vs_30d, risky_category, night) AS score
FROM card_features
