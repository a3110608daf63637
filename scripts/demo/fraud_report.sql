-- The fraud demo's first job: score every transaction with the Wasm fraud UDFs and summarise
-- the riskiest merchant countries and card holders. Runs unchanged in batch mode today and in
-- streaming mode once the streaming engine lands.
SELECT country,
       count(*)                                                    AS transactions,
       round(avg(risk_score(amount, country)), 4)                  AS avg_risk,
       sum(CASE WHEN risk_score(amount, country) > 0.5 THEN 1 ELSE 0 END) AS flagged,
       sum(CASE WHEN is_fraud THEN 1 ELSE 0 END)                   AS labelled_fraud,
       round(avg(haversine_km(lat, lon, home_lat, home_lon)), 1)   AS avg_km_from_home,
       count(DISTINCT normalize_email(email))                      AS distinct_customers,
       sum(CASE WHEN is_night(ts) THEN 1 ELSE 0 END)               AS night_transactions
FROM transactions
WHERE country IS NOT NULL
GROUP BY country
ORDER BY avg_risk DESC;
