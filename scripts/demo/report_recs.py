#!/usr/bin/env python3
"""Reports on the recommendation demo: co-view counts the stream kept in a Delta table, read
back with the `deltalake` package and checked against pandas; the recommendations the stream
sent to Kafka, read back `read_committed` and scored on the purchases of the live hours
against recommending the best sellers; and the similarity served (from the history) against
the one the live co-views give.

    python3 scripts/demo/report_recs.py CLICKS LIVE COVIEWS_TABLE SIMILAR.parquet \\
        SIMILAR_LIVE.parquet BOOTSTRAP TOPIC OUT_DIR

- CLICKS: the event files the topic was filled from (history and live); LIVE: the live hours'
  events, a file or a directory of them (their purchases are held out: co-views count views
  only).
- Co-views: pandas pairs the views of each session within 30 minutes, as coviews.sql does,
  and counts each (item, other); the table must equal that exactly.
- Hit rate at 10: for each live purchase, the recommendations sent for the buyer's latest
  view before it in its session; a hit when the purchased item is among them. The baseline
  recommends the history's 10 most viewed items to everyone.
- Similarity: per item, the overlap of the 10 items the history gives (SIMILAR.parquet,
  served first) with the 10 the co-views up to the end of the live hours give.
- recs.png: hit rates, and the overlap per item.

Writes OUT_DIR/recs_report.json and prints the report. Exits 1 when a check fails: the
co-views against pandas, one recommendation per view, at least 200 purchases to score, and the
co-view recommendations beating the best sellers by at least Z_MIN standard errors (McNemar's
paired statistic over the same purchases).
"""

import json
import os
import sys

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from deltalake import DeltaTable

K = 10
Z_MIN = 5.0


def coviews_oracle(clicks):
    """coviews.sql in pandas: ordered pairs of different items viewed in one session within
    30 minutes of each other, counted."""
    views = clicks[clicks["action"] == "view"][["session_id", "item_id", "ts"]]
    pairs = views.merge(views, on="session_id", suffixes=("_a", "_b"))
    near = (pairs["ts_b"] - pairs["ts_a"]).abs() <= pd.Timedelta(minutes=30)
    pairs = pairs[near & (pairs["item_id_a"] != pairs["item_id_b"])]
    counts = pairs.groupby(["item_id_a", "item_id_b"]).size()
    counts.index.names = ["item", "other"]
    return counts.rename("coviews")


def recommendations(bootstrap, topic):
    """Every record of the topic, committed ones only."""
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": "report-recs",
            "isolation.level": "read_committed",
            "enable.auto.commit": False,
        }
    )
    metadata = consumer.list_topics(topic, timeout=10)
    rows = []
    for p in metadata.topics[topic].partitions:
        low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
        if high <= low:
            continue
        consumer.assign([TopicPartition(topic, p, low)])
        while True:
            m = consumer.poll(5)
            if m is None:
                break
            if m.error():
                continue
            rows.append(json.loads(m.value()))
            if m.offset() >= high - 1:
                break
    consumer.close()
    recs = pd.DataFrame(rows)
    recs["ts"] = pd.to_datetime(recs["ts"], utc=True, format="ISO8601").dt.tz_convert(None)
    return recs


def top_lists(path):
    s = pq.read_table(path).to_pandas().set_index("item")["recommended"]
    return s.map(lambda r: [int(x) for x in r.split(",")])


def main():
    if len(sys.argv) != 9:
        sys.exit(__doc__)
    clicks_path, live_path, coviews_path, similar_path, similar_live_path, bootstrap, topic, out = (
        sys.argv[1:]
    )
    os.makedirs(out, exist_ok=True)
    failures = []

    clicks = pq.read_table(clicks_path).to_pandas()
    clicks["ts"] = pd.to_datetime(clicks["ts"]).dt.tz_localize(None)
    live = pq.read_table(live_path, columns=["event_id"]).to_pandas()
    is_live = clicks["event_id"].isin(live["event_id"])

    table = DeltaTable(coviews_path).to_pandas().set_index(["item", "other"])["coviews"]
    expected = coviews_oracle(clicks)
    joined = pd.concat([table.rename("table"), expected.rename("pandas")], axis=1)
    differ = int((joined["table"] != joined["pandas"]).sum())
    if differ:
        failures.append(f"co-views: {differ} of {len(joined)} pairs differ from pandas")

    recs = recommendations(bootstrap, topic)
    views = clicks[clicks["action"] == "view"]
    served = top_lists(similar_path)
    missing = views[~views["item_id"].isin(served.index)]
    if len(recs) != len(views) - len(missing):
        failures.append(
            f"{len(recs)} recommendations on the topic for {len(views) - len(missing)} views "
            f"of items with similar items"
        )

    # Each live purchase against the recommendations of the buyer's latest view before it in
    # the same session (a view in an earlier session says little about this one's taste).
    purchases = clicks[is_live & (clicks["action"] == "purchase")].sort_values("ts")
    sessions = clicks[["event_id", "session_id"]]
    recs = recs.merge(sessions, on="event_id").sort_values("ts")
    paired = pd.merge_asof(
        purchases[["ts", "user_id", "session_id", "item_id"]],
        recs[["ts", "user_id", "session_id", "recommended"]],
        on="ts",
        by=["user_id", "session_id"],
        allow_exact_matches=False,
    ).dropna(subset=["recommended"])
    history_views = views[~views["event_id"].isin(live["event_id"])]
    popular = list(history_views["item_id"].value_counts().sort_index().sort_values(
        ascending=False, kind="stable").index[:K])
    hits = pd.Series(
        [
            int(item) in [int(x) for x in recommended.split(",")][:K]
            for item, recommended in zip(paired["item_id"], paired["recommended"])
        ],
        index=paired.index,
        dtype=bool,
    )
    pop_hits = paired["item_id"].isin(popular)
    hit_rate, pop_rate = float(hits.mean()), float(pop_hits.mean())
    z = z_statistic(hits, pop_hits)
    if len(paired) < 200:
        failures.append(f"only {len(paired)} live purchases follow a view in their session")
    elif z < Z_MIN:
        failures.append(
            f"co-views do not beat the best sellers: hit rate {hit_rate:.3f} against "
            f"{pop_rate:.3f}, z = {z:.1f} (at least {Z_MIN} needed)"
        )

    refreshed = top_lists(similar_live_path)
    items = served.index.intersection(refreshed.index)
    overlap = np.array([len(set(served[i]) & set(refreshed[i])) / K for i in items])

    plot(hit_rate, pop_rate, overlap, os.path.join(out, "recs.png"))
    report = {
        "coviews_pairs": int(len(table)),
        "coviews_differing_from_pandas": differ,
        "recommendations": int(len(recs)),
        "live_purchases": int(len(purchases)),
        "purchases_after_a_view": int(len(paired)),
        "hit_rate_at_10": hit_rate,
        "popularity_hit_rate_at_10": pop_rate,
        "z_coviews_over_popularity": z,
        "items_compared": int(len(items)),
        "mean_top10_overlap_history_vs_live": float(overlap.mean()) if len(items) else None,
        "identical_top10_lists": int((overlap == 1.0).sum()),
    }
    with open(os.path.join(out, "recs_report.json"), "w") as f:
        json.dump(report, f, indent=1)
    print(f"co-views ({coviews_path}), read with the deltalake package: {len(table)} pairs, "
          f"{differ} differ from pandas over the same events")
    print(f"recommendations on {topic}: {len(recs)} (one per view of an item with similar items)")
    print(f"hit rate at {K} on {len(paired)} live purchases after a view in their session "
          f"(of {len(purchases)}):")
    print(f"  co-views  {hit_rate:.3f}")
    print(f"  best sellers  {pop_rate:.3f}")
    print(f"  difference {hit_rate - pop_rate:+.3f}, z = {z:.1f}")
    print(f"similarity served (history) vs after the live hours: mean top-{K} overlap "
          f"{report['mean_top10_overlap_history_vs_live']:.3f}, identical lists "
          f"{report['identical_top10_lists']} of {len(items)} items")
    print(f"plot: {os.path.join(out, 'recs.png')}")
    if failures:
        for f in failures:
            print(f"FAILED: {f}", file=sys.stderr)
        sys.exit(1)


def z_statistic(hits, other_hits):
    """How many standard errors the first recommender's hits exceed the second's on the same
    purchases: McNemar's paired statistic (b - c) / sqrt(b + c), where b counts the purchases
    only the first got right and c those only the second got right."""
    b = int((hits & ~other_hits).sum())
    c = int((~hits & other_hits).sum())
    return float((b - c) / (b + c) ** 0.5) if b + c else 0.0


def plot(hit_rate, pop_rate, overlap, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.bar(["co-views", "best sellers"], [hit_rate, pop_rate], color=["tab:green", "tab:grey"])
    left.set_ylabel(f"hit rate at {K}")
    left.set_title("held-out live purchases")
    right.hist(overlap, bins=np.linspace(0, 1, K + 2), color="tab:blue")
    right.set_xlabel(f"top-{K} overlap: served (history) vs after the live hours")
    right.set_ylabel("items")
    right.set_title("similarity drift")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
