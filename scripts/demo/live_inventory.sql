-- Each product's stock and how fast it sells: the LiveInventory table.
-- Stock is the catalogue's opening stock plus every restock minus every sale so far; velocity is
-- the units sold in the hour up to the product's latest movement (a sliding hour, per product).
-- The same SQL runs in both modes: over the whole event log in batch mode, and incrementally
-- over the Kafka topic in stream mode, where it updates a product's row whenever it moves.
WITH moves AS (
    SELECT s.event_id, s.ts, s.product_id,
           CASE WHEN s.kind = 'sale' THEN s.qty ELSE 0 END AS sold,
           CASE WHEN s.kind = 'sale' THEN -s.qty ELSE s.qty END AS change
    FROM sales s
),
paced AS (
    SELECT m.*,
           sum(m.sold) OVER (PARTITION BY m.product_id ORDER BY m.ts
                             RANGE BETWEEN INTERVAL '1' HOUR PRECEDING AND CURRENT ROW)
               AS units_last_hour
    FROM moves m
)
SELECT v.product_id,
       p.name,
       p.category,
       p.opening_stock + sum(v.change) AS stock,
       p.reorder_point,
       sum(v.sold) AS units_sold,
       last_value(v.units_last_hour ORDER BY v.ts, v.event_id) AS units_last_hour,
       max(v.ts) AS updated_at
FROM paced v
JOIN products p ON v.product_id = p.product_id
GROUP BY v.product_id, p.name, p.category, p.opening_stock, p.reorder_point
