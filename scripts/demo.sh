#!/usr/bin/env bash
# Installs what Riffle needs, builds the UDFs and the host, and runs a demo. Needs no external
# services: it starts (and stops) a local Kafka-protocol broker itself.
#
#   scripts/demo.sh [fraud] [ROWS]   the fraud demo (the default; ROWS: 200000): its SQL with
#                                    the Wasm UDFs, pipelines in stream and batch mode checked
#                                    against each other, a fraud model trained on the batch
#                                    features and served live from Kafka
#   scripts/demo.sh inventory        LiveInventory: a shop's sales and restocks from Kafka,
#                                    joined with its catalogue, each product's stock and
#                                    last-hour pace kept in a Delta table, checked against
#                                    batch mode and pandas, and a pricing query over it
#   scripts/demo.sh recs             recommendations: item co-views within sessions (a join of
#                                    the click stream with itself) kept in a Delta table, each
#                                    live view's recommendations to Kafka, scored on held-out
#                                    purchases against the best sellers
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
demo=fraud
case "${1:-}" in
fraud | inventory | recs) demo=$1 && shift ;;
"" | [0-9]*) ;;
*)
    echo "usage: scripts/demo.sh [fraud [ROWS] | inventory | recs]" >&2
    exit 2
    ;;
esac
if [ "$demo" != fraud ] && [ $# -gt 0 ]; then
    echo "usage: scripts/demo.sh [fraud [ROWS] | inventory | recs]" >&2
    exit 2
fi
rows=${1:-200000}
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$root/target}"
demo_dir="${RIFFLE_DEMO_DIR:-$CARGO_TARGET_DIR/demo}"

echo "==> build dependencies and guest toolchain" >&2
scripts/install-build-deps.sh
scripts/install-guest-toolchain.sh
python_packages() {
    if ! python3 -c "import pyarrow, pandas, sklearn, matplotlib, skl2onnx, onnxruntime, deltalake, confluent_kafka" 2>/dev/null; then
        echo "    pip install pyarrow pandas scikit-learn matplotlib skl2onnx onnxruntime deltalake confluent-kafka" >&2
        python3 -m pip install --quiet pyarrow pandas scikit-learn matplotlib skl2onnx onnxruntime \
            deltalake confluent-kafka >&2
    fi
}

# On a fresh machine building is most of the demo's time. The host build ends on long steps that
# use one core (the riffle crate, the link); one after the other with the guests' build, the
# second core idled for minutes. So the UDFs, the broker and the Python packages are built and
# installed in the background while riffle builds, each with its output in a log that is shown
# if it fails. The demo's model is a tree ensemble, which udfs/fraud_model serves without an
# ONNX runtime, so fraud_model_tract (tract, ~150 crates: 11 minutes of the guests' 13 on a
# fresh machine, competing with riffle's build for the cores) is not built here.
build_logs="$demo_dir/build-logs"
mkdir -p "$build_logs"
declare -A background=() # name -> pid
in_background() { # NAME COMMAND...
    local name=$1
    shift
    "$@" > "$build_logs/$name.out" 2> "$build_logs/$name.log" &
    background[$name]=$!
}
echo "==> building riffle (the first build compiles DataFusion, wasmtime and deltalake: about 30 minutes on 2 cores);" >&2
echo "    meanwhile the UDFs (udfs/*) into Wasm components, the Kafka broker and the Python packages" >&2
echo "    (their logs: $build_logs)" >&2
in_background udfs scripts/build-udfs.sh --except fraud_model_tract
in_background broker scripts/kafka-broker.sh install
in_background python python_packages
trap 'kill "${background[@]}" 2>/dev/null || true' EXIT
cargo build -p riffle --bin riffle
riffle="$CARGO_TARGET_DIR/debug/riffle"
for name in "${!background[@]}"; do
    if ! wait "${background[$name]}"; then
        tail -n 40 "$build_logs/$name.log" >&2
        echo "error: building or installing $name failed (the whole log: $build_logs/$name.log)" >&2
        exit 1
    fi
done
trap - EXIT
wasm_dir=$(cat "$build_logs/udfs.out")

# A broker of the demo's own on port $1, started here and stopped on exit, with fresh data each
# run; the demo's riffle commands find it through $RIFFLE_KAFKA_BOOTSTRAP.
start_broker() {
    broker_port=$1
    export RIFFLE_BROKER_DIR="$demo_dir/broker"
    scripts/kafka-broker.sh stop "$broker_port" # one a previous run left, if any
    if (exec 3<>"/dev/tcp/127.0.0.1/$broker_port") 2>/dev/null; then
        echo "error: port $broker_port is taken; the demo needs it for a broker of its own" >&2
        exit 1
    fi
    rm -rf "$RIFFLE_BROKER_DIR"
    scripts/kafka-broker.sh start "$broker_port"
    trap stop_all EXIT
    export RIFFLE_KAFKA_BOOTSTRAP="127.0.0.1:$broker_port"
}
# On the way out, whatever happened: the background processes, then the broker.
stop_all() {
    local running
    running=$(jobs -p)
    [ -z "$running" ] || kill $running 2>/dev/null || true
    scripts/kafka-broker.sh stop "$broker_port"
}

if [ "$demo" = inventory ]; then
    demo_dir="$demo_dir/inventory"
    mkdir -p "$demo_dir"
    echo "==> LiveInventory: a shop of 100 products, 3 days of sales and restocks as history," >&2
    echo "    then 6 live hours; each hour one product's demand surges" >&2
    "$riffle" generate sales --rows 259200 --out "$demo_dir/history.parquet" \
        --products-out "$demo_dir/products.parquet"
    "$riffle" generate sales --skip 259200 --rows 21600 --out "$demo_dir/live.parquet"
    rm -rf "$demo_dir/sales" "$demo_dir/LiveInventory" "$demo_dir/inventory-checkpoint"
    mkdir "$demo_dir/sales"
    cp "$demo_dir/history.parquet" "$demo_dir/live.parquet" "$demo_dir/sales/"
    cp scripts/demo/live_inventory.toml scripts/demo/live_inventory.sql "$demo_dir/"
    start_broker 29392
    echo "==> the event log on Kafka: the history, then the live hours" >&2
    "$riffle" produce --topic sales --partitions 4 --file "$demo_dir/history.parquet" --key product_id
    "$riffle" produce --topic sales --partitions 4 --file "$demo_dir/live.parquet" --key product_id
    echo "==> stream: the topic joined with the catalogue, each product's stock and last-hour pace" >&2
    echo "    merged into the Delta table LiveInventory (update mode)" >&2
    "$riffle" run "$demo_dir/live_inventory.toml" --mode stream
    "$riffle" run "$demo_dir/live_inventory.toml" --mode batch
    echo "==> riffle verify: LiveInventory against batch mode over the events the stream released" >&2
    # The last-hour pace is an OVER window, which releases an event once the watermark passes it
    # (a later event could still land in its hour); the table covers the events before the
    # stream's watermark, and verify recomputes batch mode from those (its note says so).
    "$riffle" verify "$demo_dir/live_inventory.toml"
    echo "==> each product's usual pace: scripts/demo/daily_velocity.sql in batch over the history" >&2
    "$riffle" sql --table "sales=$demo_dir/history.parquet" --file scripts/demo/daily_velocity.sql \
        --output "$demo_dir/velocity.parquet"
    echo "==> pricing (scripts/demo/pricing.sql): selling over 3x their usual pace with stock below" >&2
    echo "    the reorder point" >&2
    "$riffle" sql --table "inventory=$demo_dir/LiveInventory" \
        --table "velocity=$demo_dir/velocity.parquet" --file scripts/demo/pricing.sql \
        --output "$demo_dir/pricing.parquet"
    watermark=$("$riffle" status "$demo_dir/live_inventory.toml" --json | python3 -c "
import datetime, json, sys
w = json.load(sys.stdin)['last_commit']['sources']['sales']['watermark']
print(datetime.datetime.fromtimestamp(w / 1e6, datetime.timezone.utc).isoformat())")
    python3 scripts/demo/report_inventory.py "$demo_dir/LiveInventory" "$demo_dir/sales" \
        "$demo_dir/products.parquet" "$demo_dir/velocity.parquet" "$demo_dir/pricing.parquet" \
        "$watermark" "$demo_dir/report"
    exit 0
fi

if [ "$demo" = recs ]; then
    demo_dir="$demo_dir/recs"
    mkdir -p "$demo_dir"
    echo "==> clickstream: 20,000 users, 700 items in clusters of 10 related ones; each user likes" >&2
    echo "    3 clusters and each session is about one of them; a day of history, then 3 live hours" >&2
    clicks=(--users 20000 --items 700 --events-per-second 2)
    rm -rf "$demo_dir/clicks" "$demo_dir/live" "$demo_dir/coviews" "$demo_dir/coviews-checkpoint" \
        "$demo_dir/recommend-checkpoint"
    mkdir "$demo_dir/clicks" "$demo_dir/live"
    "$riffle" generate clickstream "${clicks[@]}" --rows 172800 --out "$demo_dir/clicks/history.parquet"
    # The live hours in two halves of 1.5 hours (10,800 clicks), so that the second half is
    # served the similarity the first half updated.
    "$riffle" generate clickstream "${clicks[@]}" --skip 172800 --rows 10800 \
        --out "$demo_dir/live/1.parquet"
    "$riffle" generate clickstream "${clicks[@]}" --skip 183600 --rows 10800 \
        --out "$demo_dir/live/2.parquet"
    cp scripts/demo/coviews.toml scripts/demo/coviews.sql scripts/demo/recommend.toml "$demo_dir/"
    start_broker 29392
    "$riffle" produce --topic clicks --partitions 4 --file "$demo_dir/clicks/history.parquet" --key user_id
    "$riffle" produce --topic recommendations --partitions 1 --rows 0
    # Each item's 10 most co-viewed items from the co-view table, renamed over the file the
    # recommendation stream joins with (a stream reloads a static table whose file is replaced).
    similar_items() {
        "$riffle" sql --table "coviews=$demo_dir/coviews" --file scripts/demo/similar_items.sql \
            --output "$demo_dir/similar_items.next.parquet"
        mv "$demo_dir/similar_items.next.parquet" "$demo_dir/similar_items.parquet"
    }
    echo "==> co-views over the history: the stream into the Delta table coviews (update mode)," >&2
    echo "    checked against batch mode; each item's 10 most co-viewed (similar_items.sql)" >&2
    "$riffle" run "$demo_dir/coviews.toml" --mode stream
    "$riffle" verify "$demo_dir/coviews.toml"
    similar_items
    cp "$demo_dir/similar_items.parquet" "$demo_dir/similar_items_history.parquet"
    for half in 1 2; do
        # The first run recommends for the history's views as well, all from the history's
        # similar items; the second half is checked from its start, a day and 1.5 hours after
        # the first click (2 clicks a second): batch mode joins with today's similar items.
        range=()
        [ $half = 1 ] || range=(--from "2026-01-02 01:30:00")
        echo "==> live, half $half of 2: each view's recommendations go to the topic" >&2
        echo "    recommendations (exactly once) and are checked against batch mode; then the" >&2
        echo "    co-views take the half in and the similar items are refreshed" >&2
        "$riffle" produce --topic clicks --partitions 4 --file "$demo_dir/live/$half.parquet" --key user_id
        cp "$demo_dir/live/$half.parquet" "$demo_dir/clicks/live-$half.parquet"
        "$riffle" run "$demo_dir/recommend.toml" --mode stream
        "$riffle" verify "$demo_dir/recommend.toml" --key event_id "${range[@]}"
        "$riffle" run "$demo_dir/coviews.toml" --mode stream
        "$riffle" verify "$demo_dir/coviews.toml"
        similar_items
    done
    python3 scripts/demo/report_recs.py "$demo_dir/clicks" "$demo_dir/live" \
        "$demo_dir/coviews" "$demo_dir/similar_items_history.parquet" \
        "$demo_dir/similar_items.parquet" "$RIFFLE_KAFKA_BOOTSTRAP" recommendations \
        "$demo_dir/report"
    exit 0
fi

echo "==> the fraud UDF module" >&2
"$riffle" udf inspect "$wasm_dir/riffle_udfs_fraud.wasm"
echo "==> generating $rows transactions" >&2
mkdir -p "$demo_dir"
"$riffle" generate fraud --rows "$rows" --out "$demo_dir/transactions.parquet"
echo "==> running scripts/demo/fraud_report.sql" >&2
"$riffle" sql \
    --table "transactions=$demo_dir/transactions.parquet" \
    --udf "$wasm_dir/riffle_udfs_fraud.wasm" \
    --udf "$wasm_dir/riffle_udfs_text.wasm" \
    --on-row-error null \
    --file scripts/demo/fraud_report.sql

echo "==> the same windowed query as a pipeline: stream mode (generator, checkpointed), then batch" >&2
cp scripts/demo/fraud_windows.toml "$wasm_dir/riffle_udfs_fraud.wasm" "$demo_dir/"
# The rows the pipeline's generator streams, as a file for batch mode.
"$riffle" generate fraud --rows 200000 --events-per-second 50 --disorder "5 seconds" \
    --out "$demo_dir/transactions-windows.parquet"
rm -rf "$demo_dir/stream-windows" "$demo_dir/stream-windows-checkpoint"
"$riffle" run "$demo_dir/fraud_windows.toml" --mode stream
echo "    stream output: $demo_dir/stream-windows/ (one Parquet file per epoch)," >&2
echo "    progress: $demo_dir/stream-windows-checkpoint/progress.jsonl; its checkpoint:" >&2
"$riffle" status "$demo_dir/fraud_windows.toml" >&2
"$riffle" run "$demo_dir/fraud_windows.toml" --mode batch
echo "    batch output: $demo_dir/batch-windows.parquet" >&2
echo "==> riffle verify: the stream's windows against batch mode over the same rows" >&2
# Per (window, country); sums of floats are added in another order in batch mode.
"$riffle" verify "$demo_dir/fraud_windows.toml" --key window --key country --tolerance 1e-12

echo "==> per-card features over two streams (OVER windows, an interval join): stream, then batch" >&2
"$riffle" generate fraud --rows 100000 --events-per-second 2 --cards 2000 \
    --out "$demo_dir/transactions-features.parquet"
"$riffle" generate fraud --seed 7 --rows 40000 --events-per-second 0.8 --cards 2000 \
    --out "$demo_dir/logins.parquet"
cp scripts/demo/fraud_features.toml "$demo_dir/"
rm -rf "$demo_dir/stream-features" "$demo_dir/stream-features-checkpoint"
"$riffle" run "$demo_dir/fraud_features.toml" --mode stream
"$riffle" run "$demo_dir/fraud_features.toml" --mode batch
echo "==> riffle verify: the stream's features against batch mode, exactly, row for row, and" >&2
echo "    against DataFusion's own window operators (--reference: batch mode runs OVER windows" >&2
echo "    with the stream's operator)" >&2
"$riffle" verify "$demo_dir/fraud_features.toml"
"$riffle" verify "$demo_dir/fraud_features.toml" --reference

echo "==> fraud model: features over each card's history with the generator's labels" >&2
echo "    (scripts/demo/fraud_training.toml): batch writes the training table, stream computes" >&2
echo "    the same features live, riffle verify compares them, scikit-learn trains a model" >&2
"$riffle" generate fraud --rows 300000 --cards 2000 --events-per-second 0.5 \
    --out "$demo_dir/history.parquet"
cp scripts/demo/fraud_training.toml scripts/demo/card_features.sql "$demo_dir/"
rm -rf "$demo_dir/stream-training" "$demo_dir/stream-training-checkpoint"
"$riffle" run "$demo_dir/fraud_training.toml" --mode batch
"$riffle" run "$demo_dir/fraud_training.toml" --mode stream
"$riffle" verify "$demo_dir/fraud_training.toml" --reference
python3 scripts/demo/train_fraud.py "$demo_dir/training.parquet" "$demo_dir/model"

echo "==> serving the model: live payments from Kafka scored in the sandbox, alerts to Kafka" >&2
echo "    (exactly once), every score to a Delta table that a batch backfill also writes" >&2
# train_fraud.py exported model/fraud_model.onnx; the udfs/fraud_model module serves it (its
# init configuration), with the same features (card_features.sql) as the training table.
cp scripts/demo/card_features.sql scripts/demo/fraud_scored.sql scripts/demo/fraud_scores.toml \
    scripts/demo/fraud_alerts.toml "$wasm_dir/riffle_udfs_fraud_model.wasm" "$demo_dir/"
"$riffle" udf inspect "$wasm_dir/riffle_udfs_fraud_model.wasm"
start_broker 29392
# The live payments continue the history's generated sequence (same seed and cards, the
# 20,000 rows after its 300,000), so they are new payments after the history. One partition:
# the Kafka source's watermark follows the largest event time read from any partition (not
# the smallest of the partitions' own, as Flink's does), so rows of a partition read later
# would arrive late.
live_rows=20000
"$riffle" generate fraud --skip 300000 --rows "$live_rows" --cards 2000 --events-per-second 0.5 \
    --out "$demo_dir/live.parquet"
"$riffle" produce --topic payments --partitions 1 --skip 300000 --rows "$live_rows" --cards 2000 \
    --events-per-second 0.5
rm -rf "$demo_dir/scores" "$demo_dir/scores-checkpoint" "$demo_dir/alerts-checkpoint"
echo "    backfill: every historical payment's score into the Delta table" >&2
"$riffle" run "$demo_dir/fraud_scores.toml" --mode batch
echo "    live: the topic's payments scored into the same table, and alerts to the alerts topic" >&2
"$riffle" run "$demo_dir/fraud_scores.toml" --mode stream
"$riffle" run "$demo_dir/fraud_alerts.toml" --mode stream
"$riffle" run "$demo_dir/fraud_alerts.toml" --mode batch
echo "==> riffle verify: the live scores and alerts against batch mode over the same payments" >&2
# The live rows only (the backfill's are earlier), up to a minute before the last payment: the
# stream keeps the last 30 s of event time until its watermark passes them, as a live query
# must (later payments could still arrive).
read -r live_from live_to < <(python3 -c "
import datetime, pyarrow.compute as pc, pyarrow.parquet as pq
ts = pq.read_table('$demo_dir/live.parquet', columns=['ts']).column('ts')
print(pc.min(ts).as_py().isoformat() + 'Z',
      (pc.max(ts).as_py() - datetime.timedelta(minutes=1)).isoformat() + 'Z')")
"$riffle" verify "$demo_dir/fraud_scores.toml" --input "transactions=$demo_dir/live.parquet" \
    --from "$live_from" --to "$live_to" --key tx_id
"$riffle" verify "$demo_dir/fraud_alerts.toml" --to "$live_to" --key tx_id
python3 scripts/demo/report_scores.py "$demo_dir/scores" "$demo_dir/model/fraud_model.onnx" \
    "$demo_dir/live.parquet" "$demo_dir/model"

echo "==> latency: payments produced in real time, from each payment's time to its visible alert" >&2
# The alerts pipeline on topics of its own, with a 1 s watermark and the low-latency trigger: an
# OVER window's row leaves when the watermark passes it, so the watermark's delay is part of
# every alert's latency. A million cards, so payments at 2,000/s look like the training data's
# cards (a card paying every second would be all alerts).
sed -e 's/topic = "payments"/topic = "payments-now"/' -e 's/topic = "alerts"/topic = "alerts-now"/' \
    -e 's/watermark = "30 seconds"/watermark = "1 second"/' \
    -e 's/trigger = "available-now"/trigger = "low-latency"/' \
    -e 's/checkpoint = "alerts-checkpoint"/checkpoint = "alerts-now-checkpoint"/' \
    "$demo_dir/fraud_alerts.toml" > "$demo_dir/fraud_alerts_now.toml"
rm -rf "$demo_dir/alerts-now-checkpoint"
latency_rows=40000
"$riffle" produce --topic payments-now --partitions 1 --rows 0
"$riffle" produce --topic alerts-now --partitions 1 --rows 0
"$riffle" run "$demo_dir/fraud_alerts_now.toml" --mode stream --quiet &
alerts_pid=$!
python3 scripts/demo/alert_latency.py "$RIFFLE_KAFKA_BOOTSTRAP" payments-now alerts-now \
    "$latency_rows" "$demo_dir/model" &
latency_pid=$!
"$riffle" produce --topic payments-now --rows "$latency_rows" --rate 2000 --events-per-second 2000 \
    --start now --cards 1000000 --seed 9
wait "$latency_pid"
kill -INT "$alerts_pid"
wait "$alerts_pid" || true

echo "==> one Delta table, written by a stream and by a backfill (scripts/demo/fraud_delta.toml)" >&2
cp scripts/demo/fraud_delta.toml "$demo_dir/"
rm -rf "$demo_dir/risky-table" "$demo_dir/risky-table-checkpoint"
"$riffle" run "$demo_dir/fraud_delta.toml" --mode stream
"$riffle" run "$demo_dir/fraud_delta.toml" --mode batch
"$riffle" sql --table "risky=$demo_dir/risky-table" \
    "SELECT count(*) AS rows, round(avg(risk), 3) AS avg_risk, min(ts) AS first, max(ts) AS last FROM risky"
echo "    Delta table: $demo_dir/risky-table" >&2
