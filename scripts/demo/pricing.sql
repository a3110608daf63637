-- Products to reprice now: selling more than 3 times their usual pace in the last hour while
-- their stock is below the reorder point. Only products that moved in the last hour of the
-- stream count (a product's units_last_hour is the hour up to its latest movement).
SELECT i.product_id, i.name, i.stock, i.reorder_point, i.units_last_hour,
       round(v.hourly_units, 1) AS usual_hourly_units,
       round(i.units_last_hour / v.hourly_units, 1) AS pace
FROM inventory i
JOIN velocity v ON i.product_id = v.product_id
WHERE i.updated_at > (SELECT max(updated_at) FROM inventory) - INTERVAL '1' HOUR
  AND i.units_last_hour > 3 * v.hourly_units
  AND i.stock < i.reorder_point
ORDER BY pace DESC
