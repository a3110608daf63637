-- Features over each card's recent history, with the generator's labels and the rule score:
-- what fraud_training.toml writes as the training table, and what fraud_scores.toml and
-- fraud_alerts.toml score live (as the view `card_features`). One file, so the model is
-- served exactly the features it was trained on.
--
-- Every feature looks back only (frames end at the current row), so a live row's features are
-- known when it arrives.
SELECT tx_id, card_id, ts, amount, country, merchant_category, channel,
       -- the labels, for training and evaluation (a live feed has none)
       is_fraud, fraud_pattern,
       -- the rule-based score the team uses today: the baseline a model must beat
       risk_score(amount, country) AS rule_score,
       -- distance and speed since the card's previous transaction
       km_from_previous,
       km_from_previous / greatest(seconds_since_previous, 60.0) * 3600.0 AS km_per_hour,
       seconds_since_previous,
       -- how busy the card is
       tx_10m, tx_1h, tx_24h, amount_10m, amount_1h, amount_24h,
       -- the amount against the card's own 30-day average (NULL without history)
       amount / avg_30d AS amount_vs_30d,
       CASE WHEN merchant_category IN ('gift_cards', 'crypto') THEN 1.0 ELSE 0.0 END
         AS risky_category,
       CASE WHEN is_night(ts) THEN 1.0 ELSE 0.0 END AS night
FROM (
  SELECT *,
         coalesce(haversine_km(lat, lon, lag(lat) OVER card, lag(lon) OVER card), 0.0)
           AS km_from_previous,
         coalesce((CAST(ts AS BIGINT) - CAST(lag(ts) OVER card AS BIGINT)) / 1000000.0,
                  2592000.0) AS seconds_since_previous,
         count(*) OVER (PARTITION BY card_id ORDER BY ts
                        RANGE BETWEEN INTERVAL '10' MINUTE PRECEDING AND CURRENT ROW) AS tx_10m,
         count(*) OVER (PARTITION BY card_id ORDER BY ts
                        RANGE BETWEEN INTERVAL '1' HOUR PRECEDING AND CURRENT ROW) AS tx_1h,
         count(*) OVER (PARTITION BY card_id ORDER BY ts
                        RANGE BETWEEN INTERVAL '24' HOUR PRECEDING AND CURRENT ROW) AS tx_24h,
         coalesce(sum(amount) OVER (PARTITION BY card_id ORDER BY ts
                  RANGE BETWEEN INTERVAL '10' MINUTE PRECEDING AND CURRENT ROW), 0.0) AS amount_10m,
         coalesce(sum(amount) OVER (PARTITION BY card_id ORDER BY ts
                  RANGE BETWEEN INTERVAL '1' HOUR PRECEDING AND CURRENT ROW), 0.0) AS amount_1h,
         coalesce(sum(amount) OVER (PARTITION BY card_id ORDER BY ts
                  RANGE BETWEEN INTERVAL '24' HOUR PRECEDING AND CURRENT ROW), 0.0) AS amount_24h,
         avg(amount) OVER (PARTITION BY card_id ORDER BY ts
                  RANGE BETWEEN INTERVAL '30' DAY PRECEDING AND INTERVAL '1' MICROSECOND PRECEDING)
           AS avg_30d
  FROM transactions
  WINDOW card AS (PARTITION BY card_id ORDER BY ts, tx_id)
) t
