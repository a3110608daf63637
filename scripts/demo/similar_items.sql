-- The 10 items most often co-viewed with each item, best first (ties by item id), as one row
-- per item: what the recommendation stream joins each view with.
WITH ranked AS (
    SELECT item, other, coviews,
           row_number() OVER (PARTITION BY item ORDER BY coviews DESC, other) AS rank
    FROM coviews
)
SELECT item,
       array_to_string(array_agg(other ORDER BY rank), ',') AS recommended,
       sum(coviews) AS coviews
FROM ranked
WHERE rank <= 10
GROUP BY item
ORDER BY item
