#!/usr/bin/env python3
"""Measures how long a payment takes to become a visible fraud alert, and the broker's floor.

    python3 scripts/demo/alert_latency.py BOOTSTRAP PAYMENTS_TOPIC ALERTS_TOPIC PAYMENTS OUT_DIR

Run it while `riffle produce --start now` sends PAYMENTS payments in real time (each payment's
`ts` is the moment the producer means to send it) and a stream scores them into ALERTS_TOPIC.
One `read_committed` consumer reads both topics and, per record, takes the time it could read
it minus the record's `ts`:
- on PAYMENTS_TOPIC that is the broker's floor (produce to visible, nothing in between, plus
  any lag of the producer behind its schedule);
- on ALERTS_TOPIC it is the whole path: produce, the query's read, features, the model in the
  sandbox, the exactly-once commit of the alert.
Payments of the first 2 s (and their alerts) are not counted: the query may still be starting
(loading its modules, connecting), which is start-up time, not latency. It stops once every
payment was seen and no alert came for 10 s (or after 5 minutes), prints
p50/p99/max of both, and writes OUT_DIR/latency_report.json and OUT_DIR/latency.png.
"""

import datetime
import json
import os
import sys
import time

import numpy as np
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

QUIET_SECONDS = 10
WARMUP_MS = 2000
TIMEOUT_SECONDS = 300


def event_time_ms(value):
    """The `ts` field of a JSON record (Arrow's JSON writer: naive UTC, maybe fractional)."""
    ts = json.loads(value)["ts"]
    if isinstance(ts, (int, float)):
        return ts / 1000.0  # microseconds
    t = datetime.datetime.fromisoformat(ts.replace("Z", ""))
    return t.replace(tzinfo=datetime.timezone.utc).timestamp() * 1000.0


def summary(latencies):
    if not latencies:
        return None
    a = np.array(latencies)
    return {
        "records": int(len(a)),
        "p50_ms": round(float(np.percentile(a, 50)), 1),
        "p99_ms": round(float(np.percentile(a, 99)), 1),
        "max_ms": round(float(a.max()), 1),
    }


def main():
    if len(sys.argv) != 6:
        sys.exit(__doc__)
    bootstrap, payments_topic, alerts_topic, payments, out_dir = sys.argv[1:]
    payments = int(payments)
    consumer = Consumer({
        "bootstrap.servers": bootstrap,
        "group.id": f"riffle-latency-{os.getpid()}",
        "isolation.level": "read_committed",
        "auto.offset.reset": "earliest",
        "enable.auto.commit": False,
        "fetch.wait.max.ms": 10,
    })
    # Both topics exist already (the demo creates them): read every partition from the start,
    # without a consumer group's rebalance in the way.
    metadata = consumer.list_topics(timeout=30)
    assignment = []
    for topic in [payments_topic, alerts_topic]:
        if topic not in metadata.topics or metadata.topics[topic].error is not None:
            sys.exit(f"alert_latency: no topic {topic}")
        assignment += [TopicPartition(topic, p, OFFSET_BEGINNING)
                       for p in metadata.topics[topic].partitions]
    consumer.assign(assignment)
    floor, alerts = [], []
    seen, first_ms = 0, None
    started = time.monotonic()
    last_alert = started
    while True:
        now = time.monotonic()
        if now - started > TIMEOUT_SECONDS:
            print(f"alert_latency: stopped after {TIMEOUT_SECONDS} s with {seen} of "
                  f"{payments} payments seen", file=sys.stderr)
            break
        if seen >= payments and now - last_alert > QUIET_SECONDS:
            break
        message = consumer.poll(0.1)
        if message is None:
            continue
        if message.error():
            if message.error().code() != KafkaError._PARTITION_EOF:
                print(f"alert_latency: {message.error()}", file=sys.stderr)
            continue
        read_ms = time.time() * 1000.0
        ts_ms = event_time_ms(message.value())
        if message.topic() == payments_topic:
            seen += 1
            if first_ms is None:
                first_ms = ts_ms
        else:
            last_alert = time.monotonic()
        if first_ms is None or ts_ms < first_ms + WARMUP_MS:
            continue
        (alerts if message.topic() == alerts_topic else floor).append(read_ms - ts_ms)
    consumer.close()

    report = {
        "payments": payments,
        "warmup_ms": WARMUP_MS,
        "broker_floor": summary(floor),
        "alerts": summary(alerts),
    }
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "latency_report.json"), "w") as f:
        json.dump(report, f, indent=2)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    top = max([1.0] + floor + alerts)
    bins = np.logspace(0, np.log10(top * 1.1), 60)
    if floor:
        ax.hist(floor, bins=bins, alpha=0.6, label=f"payments visible (broker floor), {len(floor)}")
    if alerts:
        ax.hist(alerts, bins=bins, alpha=0.6, label=f"alerts visible, {len(alerts)}")
    ax.set_xscale("log")
    ax.set_xlabel("milliseconds from the payment's time to visible (read_committed)")
    ax.set_ylabel("records")
    ax.set_title("Produce to visible: payments and fraud alerts")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "latency.png"), dpi=100)

    print(f"latency, produce to visible ({len(floor)} payments, {len(alerts)} alerts, after "
          f"the first {WARMUP_MS / 1000:.0f} s):")
    for name, s in [("broker floor", report["broker_floor"]), ("alerts", report["alerts"])]:
        if s:
            print(f"  {name:<13} p50 {s['p50_ms']:.0f} ms   p99 {s['p99_ms']:.0f} ms   "
                  f"max {s['max_ms']:.0f} ms")
    print(f"  report: {os.path.join(out_dir, 'latency_report.json')}, "
          f"histogram: {os.path.join(out_dir, 'latency.png')}")


if __name__ == "__main__":
    main()
