-- Item-to-item co-views: two different items viewed in the same session within 30 minutes of
-- each other, counted per ordered pair (item, other). A join of the click stream with itself:
-- batch mode over the event files, stream mode incrementally (each pair counted when its
-- second view arrives), so the counts are the same in both.
SELECT a.item_id AS item,
       b.item_id AS other,
       count(*) AS coviews
FROM clicks a
JOIN clicks b
  ON a.session_id = b.session_id
 AND a.item_id <> b.item_id
 AND b.ts BETWEEN a.ts - INTERVAL '30' MINUTE AND a.ts + INTERVAL '30' MINUTE
WHERE a.action = 'view' AND b.action = 'view'
GROUP BY a.item_id, b.item_id
