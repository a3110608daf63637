-- Each product's usual pace over the history: units sold per day on average, and per hour (the
-- pricing query compares the last hour with it). Days count from the history's first event to
-- its last, so a product that sold nothing on a day still has that day in its average.
WITH span AS (
    SELECT (CAST(max(ts) AS BIGINT) - CAST(min(ts) AS BIGINT)) / 86400e6 AS days FROM sales
)
SELECT s.product_id,
       sum(CASE WHEN s.kind = 'sale' THEN s.qty ELSE 0 END) / max(span.days) AS daily_units,
       sum(CASE WHEN s.kind = 'sale' THEN s.qty ELSE 0 END) / max(span.days) / 24 AS hourly_units
FROM sales s CROSS JOIN span
GROUP BY s.product_id
ORDER BY s.product_id
