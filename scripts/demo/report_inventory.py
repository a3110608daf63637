#!/usr/bin/env python3
"""Reports on the LiveInventory demo: the Delta table live_inventory.toml's stream keeps, read
back with the `deltalake` package (a reader Riffle did not write), checked against a
computation of our own in pandas, and the pricing query's flags scored against the surges
the generator planted.

    python3 scripts/demo/report_inventory.py LIVE_INVENTORY EVENTS PRODUCTS.parquet \\
        VELOCITY.parquet PRICING.parquet WATERMARK OUT_DIR

- EVENTS: the event files the topic was filled from (a Parquet file or a directory of them).
- WATERMARK: the stream's watermark at its last commit (RFC 3339). An OVER window releases
  a row once the watermark passes it, so the table covers the events before it; the oracle
  takes the same events.
- The oracle: per product, the opening stock plus restocks minus sales, units sold, the units
  sold in the hour up to (and including) the product's latest movement, and that movement's
  time, computed here with pandas from the event files, must equal the table exactly.
- VELOCITY.parquet: what `riffle sql --file daily_velocity.sql` wrote over the history.
- The flags: PRICING.parquet is what `riffle sql --file pricing.sql` wrote. A planted surge
  is a product with surge sales in the last hour before the watermark; every flagged product
  must be one, and at least one must be flagged.
- pricing.png: each product's pace (last hour against its usual hour) against its stock
  (against its reorder point), the pricing rule's thresholds dashed.

Writes OUT_DIR/inventory_report.json and prints the report. Exits 1 when a check fails.
"""

import json
import os
import sys

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from deltalake import DeltaTable

COLUMNS = ["stock", "units_sold", "units_last_hour", "updated_at"]


def oracle(events, products):
    """The LiveInventory table, computed from the events with pandas."""
    e = events.sort_values(["product_id", "ts", "event_id"]).copy()
    sale = e["kind"] == "sale"
    e["sold"] = np.where(sale, e["qty"], 0)
    e["change"] = np.where(sale, -e["qty"], e["qty"])
    rows = []
    for product, g in e.groupby("product_id", sort=True):
        last = g["ts"].max()
        window = g[g["ts"] >= last - pd.Timedelta(hours=1)]
        rows.append(
            {
                "product_id": product,
                "change": int(g["change"].sum()),
                "units_sold": int(g["sold"].sum()),
                "units_last_hour": int(window["sold"].sum()),
                "updated_at": last,
            }
        )
    out = pd.DataFrame(rows).merge(products, on="product_id")
    out["stock"] = out["opening_stock"] + out["change"]
    return out.set_index("product_id")


def main():
    if len(sys.argv) != 8:
        sys.exit(__doc__)
    table_path, events_path, products_path, velocity_path, pricing_path, watermark, out_dir = (
        sys.argv[1:]
    )
    os.makedirs(out_dir, exist_ok=True)
    # Riffle's timestamps are UTC without a zone; so is the cut.
    cut = pd.Timestamp(watermark)
    cut = cut.tz_convert(None) if cut.tzinfo else cut

    table = DeltaTable(table_path).to_pandas()
    table["updated_at"] = pd.to_datetime(table["updated_at"]).dt.tz_localize(None)
    table = table.set_index("product_id").sort_index()
    events = pq.read_table(events_path).to_pandas()
    events["ts"] = pd.to_datetime(events["ts"]).dt.tz_localize(None)
    events = events[events["ts"] < cut]
    products = pq.read_table(products_path).to_pandas()
    expected = oracle(events, products).sort_index()

    failures = []
    if list(table.index) != list(expected.index):
        failures.append(
            f"the table has {len(table)} products, the events {len(expected)}: "
            f"{sorted(set(table.index) ^ set(expected.index))[:10]} differ"
        )
    differing = {}
    for c in COLUMNS:
        a, b = table[c].reindex(expected.index), expected[c]
        bad = a != b
        differing[c] = int(bad.sum())
        if bad.any():
            p = bad.idxmax()
            failures.append(f"{c}: {bad.sum()} products differ, e.g. {p}: table {a[p]}, pandas {b[p]}")

    pricing = pq.read_table(pricing_path).to_pandas() if os.path.getsize(pricing_path) else None
    flagged = set(pricing["product_id"]) if pricing is not None else set()
    recent = events[events["surge"] & (events["ts"] >= cut - pd.Timedelta(hours=1))]
    planted = set(recent["product_id"])
    wrong = sorted(flagged - planted)
    if not flagged:
        failures.append("the pricing query flagged no product")
    if wrong:
        failures.append(f"flagged products {wrong} had no planted surge in the last hour")

    usual = pq.read_table(velocity_path).to_pandas().set_index("product_id")["hourly_units"]
    plot(table, usual, flagged, planted, os.path.join(out_dir, "pricing.png"))

    report = {
        "products": len(table),
        "events_before_watermark": len(events),
        "differing_products_per_column": differing,
        "flagged": sorted(int(p) for p in flagged),
        "planted_surges_last_hour": sorted(int(p) for p in planted),
        "flagged_planted": len(flagged & planted),
        "low_stock_products": int((table["stock"] < table["reorder_point"]).sum()),
    }
    with open(os.path.join(out_dir, "inventory_report.json"), "w") as f:
        json.dump(report, f, indent=1)

    print(f"LiveInventory ({table_path}), read with the deltalake package:")
    print(f"  {len(table)} products from {len(events)} events before {watermark}")
    print("  against pandas over the same events: "
          + ", ".join(f"{c} {n} differ" for c, n in differing.items()))
    print(f"  products below their reorder point: {report['low_stock_products']}")
    print(f"pricing query: {len(flagged)} flagged; planted surges in the last hour: "
          f"{sorted(int(p) for p in planted)}; flagged that are planted: "
          f"{len(flagged & planted)} of {len(flagged)}")
    if pricing is not None and len(pricing):
        print(pricing.to_string(index=False))
    print(f"plot: {os.path.join(out_dir, 'pricing.png')}")
    if failures:
        for f in failures:
            print(f"FAILED: {f}", file=sys.stderr)
        sys.exit(1)


def plot(table, usual, flagged, planted, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pace = (table["units_last_hour"] / usual.reindex(table.index).clip(lower=1e-9)).clip(lower=0.05)
    cover = table["stock"] / table["reorder_point"]
    fig, ax = plt.subplots(figsize=(7, 5))
    colors = ["tab:red" if p in planted else "tab:blue" for p in table.index]
    ax.scatter(pace, cover, c=colors, s=18)
    for p in flagged:
        ax.annotate(str(p), (pace[p], cover[p]), textcoords="offset points", xytext=(4, 4))
    ax.axvline(3, color="grey", linestyle="--")
    ax.axhline(1, color="grey", linestyle="--")
    ax.set_xscale("log")
    ax.set_xlabel("units in the last hour / usual units per hour")
    ax.set_ylabel("stock / reorder point")
    ax.set_title("LiveInventory: red = planted surge in the last hour; labels = flagged")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
